"""Pure tensor math: circular convolution (ParC / Fast-ParC) and relative attention. Imports torch only."""
from hybridvision.ops.attention import RelAttention2d, RelPosBias2d
from hybridvision.ops.circular import circular_conv
from hybridvision.ops.parc import ParC2d

__all__ = ["ParC2d", "RelAttention2d", "RelPosBias2d", "circular_conv"]
