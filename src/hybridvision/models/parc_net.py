"""ParC-Net-S (Zhang et al., ECCV 2022): MobileViT-S with every MobileViT block replaced by a ParC block.

Built on timm's bring-your-own-blocks network (``ByobNet``, the class timm's MobileViT uses): the stem, the
MobileNetV2 blocks, the final 1x1 conv, the head, ``feature_info`` / ``features_only``, ``forward_features`` /
``forward_head`` and ``reset_classifier`` are timm's; the ParC block
(:class:`~hybridvision.blocks.parc.ParCMobileViTBlock`) is registered in ByobNet's block registry as
``"parc_mobilevit"``.

Layout (official ``scale_s`` configuration, 256 px):

| stage | stride | block(s) | ParC width D / FFN / depth / global kernel |
|---|---|---|---|
| stem | 2 | 3x3 conv, 16 ch | |
| 1 | 2 | MV2 x1, 32 ch | |
| 2 | 4 | MV2 x3, 64 ch | |
| 3 | 8 | MV2 (stride 2) + ParC block, 96 ch | 192 / 384 / 2 / 32 |
| 4 | 16 | MV2 (stride 2) + ParC block, 128 ch | 256 / 512 / 4 / 16 |
| 5 | 32 | MV2 (stride 2) + ParC block, 160 ch | 320 / 640 / 3 / 8 |
| head | | 1x1 conv 640, global average pool, FC | |

MV2 = inverted residual, expansion 4; SiLU activations. The global kernel of each ParC block is its feature size
at ``img_size`` (default 256); other resolutions, square or not, run with resized kernels.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence, Union

import torch.nn as nn
from timm.models import generate_default_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg, LayerFn, register_block

from hybridvision.blocks.parc import ParCMobileViTBlock, parc_no_weight_decay
from hybridvision.models.registry import build, pretrained_cfg, register

__all__ = ["ParCNet", "model_cfgs"]


def _parc_mobilevit_block(
    in_chs: int,
    out_chs: int,
    *,
    stride: int,
    dim: int,
    depth: int,
    mlp_hidden: int,
    base_size: tuple[int, int],
    drop: float = 0.0,
    drop_path_rate: float = 0.0,
    method: str = "auto",
    layers: Optional[LayerFn] = None,
    **byob_kwargs,
) -> ParCMobileViTBlock:
    """ByobNet's factory for ``type="parc_mobilevit"``; ByobNet's generic conv arguments (``byob_kwargs``:
    dilation, group_size, bottle_ratio, ...) do not apply to this block. The MV2 block before it downsamples."""
    if stride != 1:
        raise ValueError(f"a parc_mobilevit block keeps the resolution (stride 1); got stride={stride}")
    act = layers.act if layers is not None else nn.SiLU
    return ParCMobileViTBlock(
        in_chs, out_chs, dim, depth, base_size, mlp_hidden=mlp_hidden, act_layer=act,
        drop=drop, drop_path=drop_path_rate, method=method,
    )


register_block("parc_mobilevit", _parc_mobilevit_block)


def _mv2(d: int, c: int, s: int) -> ByoBlockCfg:
    """MobileNetV2 inverted residual (expansion 4, depthwise, linear output) as a ByobNet block config."""
    return ByoBlockCfg(type="bottle", d=d, c=c, s=s, gs=1, br=4.0, block_kwargs=dict(bottle_in=True, linear_out=True))


def _parc_stage(c: int, dim: int, depth: int, feat_stride: int) -> tuple[ByoBlockCfg, ByoBlockCfg]:
    """A ParC-Net stage: stride-2 MV2 block, then the ParC block (its feature stride fixes the kernel size)."""
    return (
        _mv2(1, c, 2),
        ByoBlockCfg(
            type="parc_mobilevit", d=1, c=c, s=1,
            block_kwargs=dict(dim=dim, depth=depth, mlp_hidden=2 * dim, drop=0.1, feat_stride=feat_stride),
        ),
    )


model_cfgs = dict(
    parc_net_s=ByoModelCfg(
        blocks=(
            _mv2(1, 32, 1),
            _mv2(3, 64, 2),
            _parc_stage(96, 192, 2, 8),
            _parc_stage(128, 256, 4, 16),
            _parc_stage(160, 320, 3, 32),
        ),
        stem_chs=16,
        stem_type="3x3",
        stem_pool="",
        downsample="",
        act_layer="silu",
        num_features=640,
    ),
)


def _sized(cfg: ByoModelCfg, img_size: tuple[int, int], method: str) -> ByoModelCfg:
    """``cfg`` with each ParC block's ``feat_stride`` turned into its global kernel size at ``img_size``."""

    def fix(block: ByoBlockCfg) -> ByoBlockCfg:
        if block.type != "parc_mobilevit":
            return block
        kw = dict(block.block_kwargs)
        s = kw.pop("feat_stride")
        kw["base_size"] = (max(img_size[0] // s, 1), max(img_size[1] // s, 1))
        kw["method"] = method
        return replace(block, block_kwargs=kw)

    blocks = tuple(tuple(fix(b) for b in stage) if isinstance(stage, tuple) else fix(stage) for stage in cfg.blocks)
    return replace(cfg, blocks=blocks)


class ParCNet(ByobNet):
    """timm ``ByobNet`` with ParC blocks; the ParC position embeddings are excluded from weight decay.

    Args:
        cfg: a ByobNet config with ``parc_mobilevit`` blocks (``model_cfgs["parc_net_s"]``).
        img_size: input size ``H`` or ``(H, W)`` the global kernels are sized for (256 for ParC-Net-S).
        parc_method: circular_conv method of every ParC layer.
        **kwargs: ``ByobNet`` arguments (num_classes, in_chans, drop_rate, drop_path_rate, global_pool, ...).

    Shapes:
        forward: x (B, in_chans, H, W) -> (B, num_classes), H and W multiples of 32 recommended (any >= 32 run).
    """

    def __init__(
        self, cfg: ByoModelCfg, *, img_size: Union[int, Sequence[int]] = 256, parc_method: str = "auto", **kwargs
    ) -> None:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(hw) != 2 or not all(isinstance(s, int) and s >= 32 for s in hw):
            raise ValueError(f"img_size must be an int >= 32 or an (H, W) pair of them (stride 32); got {img_size!r}")
        super().__init__(_sized(cfg, hw, parc_method), img_size=hw, **kwargs)

    def no_weight_decay(self) -> set[str]:
        """The ParC position embeddings."""
        return parc_no_weight_decay(self)


default_cfgs = generate_default_cfgs({
    "parc_net_s": pretrained_cfg((3, 256, 256), first_conv="stem.conv", classifier="head.fc", crop_pct=0.9),
})


@register
def parc_net_s(pretrained: bool = False, **kwargs) -> ParCNet:
    """ParC-Net-S (5.0M params, 256 px): MobileViT-S layout, ParC meta-former blocks instead of transformers."""
    return build(
        ParCNet, "parc_net_s", pretrained, model_cfg=model_cfgs["parc_net_s"],
        feature_cfg=dict(flatten_sequential=True), **kwargs,
    )
