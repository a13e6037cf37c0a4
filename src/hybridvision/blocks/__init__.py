"""hybridvision.blocks: nn.Modules built from the ops (CoAtNet's MBConv / Transformer blocks, ParC blocks)."""
from hybridvision.blocks.mbconv import MBConv
from hybridvision.blocks.transformer import TransformerBlock

__all__ = ["MBConv", "TransformerBlock"]
