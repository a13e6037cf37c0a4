"""ParC ConvNets on timm's networks: ParC-ConvNeXt-XT, Fast-ParC-ConvNeXt-XT, ParC-ResNet50, ParC-MobileNetV2.

Each model is timm's own class (``ConvNeXt``, ``ResNet``, ``EfficientNet``) built with the usual arguments, whose
spatial convolutions in the recipe's blocks are then swapped for ParC pairs by
:func:`hybridvision.models.convert.replace_convs` (the same code as :func:`~hybridvision.models.convert.parcify`).
The global kernel of each pair is the feature size at ``img_size`` (default 224: 56 / 28 / 14 / 7 px at
stride 4 / 8 / 16 / 32); any input resolution, square or not, runs (the kernels are resized).

| name | recipe | params |
|---|---|---|
| ``convnext_xt`` | ConvNeXt, depths 3,3,9,3, dims 48,96,192,384 (the baseline) | 7.44M |
| ``parc_convnext_xt`` | + ParC in blocks 7-9 of stage 3 and the last block of stage 4 | 7.41M |
| ``fast_parc_convnext_xt`` | + ParC in every block of every stage (56 px stage included) | 7.37M |
| ``parc_resnet50`` | ResNet-50, dense ParC (groups=1) for the 3x3 of the last 3 blocks of stage 3 and the last of stage 4 | 23.7M |
| ``parc_mobilenetv2`` | MobileNetV2-1.0, ParC for the 3x3 depthwise of the 3 stride-16 blocks of the 96-ch stage and the last block | 3.54M |
"""
from __future__ import annotations

from typing import Sequence, Union

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import Bottleneck, ResNet

from hybridvision.blocks.parc import parc_no_weight_decay
from hybridvision.models.convert import ParCReplacement, Where, replace_convs
from hybridvision.models.registry import build, pretrained_cfg, register

__all__ = ["ParCConvNeXt", "ParCEfficientNet", "ParCResNet", "PARC_RECIPES"]

ImgSize = Union[int, Sequence[int]]

#: module-name patterns of the blocks each registered ParC model converts (see ``convert.replace_convs``)
PARC_RECIPES: dict[str, Where] = {
    "parc_convnext_xt": ["stages.2.blocks.6", "stages.2.blocks.7", "stages.2.blocks.8", "stages.3.blocks.2"],
    "fast_parc_convnext_xt": "all",
    "parc_resnet50": ["layer3.3", "layer3.4", "layer3.5", "layer4.2"],
    "parc_mobilenetv2": ["blocks.4.0", "blocks.4.1", "blocks.4.2", "blocks.6.0"],
}


class _ParCMixin:
    """Shared by the ParC ConvNets: convert after the timm network is built; PEs out of weight decay.

    Listed before the timm class in the bases, so ``super().__init__`` is that class's ``__init__``.
    """

    parc_replacements: list[ParCReplacement]

    def __init__(
        self, *, parc_where: Where = "auto", img_size: ImgSize = 224, parc_method: str = "auto",
        parc_use_pe: bool = True, **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.parc_replacements = replace_convs(
            self, where=parc_where, img_size=img_size, method=parc_method, use_pe=parc_use_pe
        )

    def no_weight_decay(self) -> set[str]:
        """The ParC position embeddings (timm's optimizer factory excludes these from weight decay)."""
        return parc_no_weight_decay(self)


class ParCConvNeXt(_ParCMixin, ConvNeXt):
    """timm's ``ConvNeXt`` with ParC pairs (depthwise) instead of the 7x7 depthwise conv in the ``parc_where`` blocks.

    Args:
        parc_where: blocks to convert (module-name patterns, ``"auto"`` or ``"all"``; see ``convert.parcify``).
        img_size: input size the global kernels are sized for. parc_method / parc_use_pe: of the ParC layers.
        **kwargs: timm ``ConvNeXt`` arguments (depths, dims, num_classes, drop_path_rate, ...).

    Shapes:
        forward: x (B, in_chans, H, W) -> (B, num_classes).
    """


class ParCResNet(_ParCMixin, ResNet):
    """timm's ``ResNet`` with dense ParC pairs instead of the bottleneck 3x3 conv in the ``parc_where`` blocks.

    Args: as :class:`ParCConvNeXt`; ``**kwargs`` are timm ``ResNet`` arguments (block, layers, ...).

    Shapes:
        forward: x (B, in_chans, H, W) -> (B, num_classes).
    """


class ParCEfficientNet(_ParCMixin, EfficientNet):
    """timm's ``EfficientNet`` (MobileNetV2 here) with ParC pairs instead of the depthwise conv in ``parc_where``.

    Args: as :class:`ParCConvNeXt`; ``**kwargs`` are timm ``EfficientNet`` arguments (block_args, ...).

    Shapes:
        forward: x (B, in_chans, H, W) -> (B, num_classes).
    """


_CONVNEXT_FEATURES = dict(out_indices=(0, 1, 2, 3), flatten_sequential=True)
_CONVNEXT_XT = dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))
_CONVNEXT_CFG = dict(first_conv="stem.0", classifier="head.fc")

default_cfgs = generate_default_cfgs({
    "convnext_xt": pretrained_cfg(**_CONVNEXT_CFG),
    "parc_convnext_xt": pretrained_cfg(**_CONVNEXT_CFG),
    "fast_parc_convnext_xt": pretrained_cfg(**_CONVNEXT_CFG),
    "parc_resnet50": pretrained_cfg(first_conv="conv1", classifier="fc"),
    "parc_mobilenetv2": pretrained_cfg(first_conv="conv_stem", classifier="classifier"),
})


def _mobilenetv2_args() -> dict:
    """timm's ``mobilenetv2_100`` architecture (MobileNetV2 paper, Table 2)."""
    arch_def = [
        ["ds_r1_k3_s1_c16"],
        ["ir_r2_k3_s2_e6_c24"],
        ["ir_r3_k3_s2_e6_c32"],
        ["ir_r4_k3_s2_e6_c64"],
        ["ir_r3_k3_s1_e6_c96"],
        ["ir_r3_k3_s2_e6_c160"],
        ["ir_r1_k3_s1_e6_c320"],
    ]
    return dict(
        block_args=decode_arch_def(arch_def),
        num_features=1280,
        stem_size=32,
        round_chs_fn=round_channels,
        act_layer=nn.ReLU6,
    )


@register
def convnext_xt(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """ConvNeXt-XT (depths 3,3,9,3, dims 48,96,192,384; 7.44M): the baseline of ParC-ConvNeXt-XT."""
    return build(ConvNeXt, "convnext_xt", pretrained, feature_cfg=_CONVNEXT_FEATURES, **{**_CONVNEXT_XT, **kwargs})


@register
def parc_convnext_xt(pretrained: bool = False, **kwargs) -> ParCConvNeXt:
    """ParC-ConvNeXt-XT (7.41M): ParC in blocks 7-9 of stage 3 and the last block of stage 4."""
    kwargs.setdefault("parc_where", PARC_RECIPES["parc_convnext_xt"])
    return build(ParCConvNeXt, "parc_convnext_xt", pretrained, feature_cfg=_CONVNEXT_FEATURES, **{**_CONVNEXT_XT, **kwargs})


@register
def fast_parc_convnext_xt(pretrained: bool = False, **kwargs) -> ParCConvNeXt:
    """Fast-ParC-ConvNeXt-XT: ParC in every block of every stage (the 56 px stage included)."""
    kwargs.setdefault("parc_where", PARC_RECIPES["fast_parc_convnext_xt"])
    return build(
        ParCConvNeXt, "fast_parc_convnext_xt", pretrained, feature_cfg=_CONVNEXT_FEATURES, **{**_CONVNEXT_XT, **kwargs}
    )


@register
def parc_resnet50(pretrained: bool = False, **kwargs) -> ParCResNet:
    """ParC-ResNet50 (23.7M): dense ParC pairs in the last 3 bottlenecks of stage 3 and the last of stage 4."""
    kwargs.setdefault("parc_where", PARC_RECIPES["parc_resnet50"])
    return build(
        ParCResNet, "parc_resnet50", pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
        **{**dict(block=Bottleneck, layers=(3, 4, 6, 3)), **kwargs},
    )


@register
def parc_mobilenetv2(pretrained: bool = False, **kwargs) -> ParCEfficientNet:
    """ParC-MobileNetV2 (3.54M): ParC pairs for the depthwise 3x3 of 4 late inverted-residual blocks."""
    kwargs.setdefault("parc_where", PARC_RECIPES["parc_mobilenetv2"])
    return build(ParCEfficientNet, "parc_mobilenetv2", pretrained, **{**_mobilenetv2_args(), **kwargs})
