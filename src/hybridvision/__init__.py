"""hybridvision: CoAtNet and ParC / Fast-ParC hybrid backbones for the timm ecosystem.

``import hybridvision`` registers every model in timm's registry.
"""
from hybridvision.models import create_model, list_models, parcify
from hybridvision.ops import ParC2d, RelAttention2d, RelPosBias2d, circular_conv
from hybridvision.tools.export import export_onnx

__version__ = "0.1.0"

__all__ = [
    "ParC2d",
    "RelAttention2d",
    "RelPosBias2d",
    "circular_conv",
    "create_model",
    "export_onnx",
    "list_models",
    "parcify",
    "__version__",
]
