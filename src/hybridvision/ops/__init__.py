"""Pure tensor math: circular convolution (ParC / Fast-ParC) and relative attention. Imports torch only."""
from hybridvision.ops.attention import RelAttention2d, RelPosBias2d
from hybridvision.ops.circular import choose_method, circular_conv, get_default_method, set_default_method
from hybridvision.ops.parc import ParC2d

__all__ = [
    "ParC2d",
    "RelAttention2d",
    "RelPosBias2d",
    "choose_method",
    "circular_conv",
    "get_default_method",
    "set_default_method",
]
