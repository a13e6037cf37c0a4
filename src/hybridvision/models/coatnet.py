"""CoAtNet (Dai et al. 2021): MBConv stages followed by relative-attention Transformer stages.

One module, :class:`CoAtNet`, built from a frozen :class:`CoAtNetConfig`. Presets ``coatnet_0`` ...
``coatnet_7`` follow the paper (Tables 3, 4, 9-12), ``coatnet_nano`` / ``coatnet_micro`` (32 px, total stride 8) / ``coatnet_pico``
(28 px, total stride 4) are small-image models (Fashion-MNIST, CIFAR). All are registered in timm's registry::

    import hybridvision, timm
    m = timm.create_model("coatnet_0", num_classes=10, drop_path_rate=0.1)
    m = timm.create_model("coatnet_0", layout="CCCT", stride_mode="dw", pool="avg")
    f = timm.create_model("coatnet_0", features_only=True)          # strides 2, 4, 8, 16, 32

Stages: S0 = conv stem (``depths[0]`` 3x3 convs, the first with stride ``strides[0]``); S1..S4 = MBConv ("C")
or Transformer ("T") blocks as given by ``layout``; the first block of each stage downsamples by
``strides[i]`` and/or widens. CoAtNet-6/7 open S3 with a run of MBConv blocks of another width
(``s3_conv=(depth, width)``) before S3's Transformer blocks. ``layout="VIT_REL"`` replaces S0-S2 by a
``patch_size`` patch embedding (a ViT with relative attention: S1-S3's blocks all become Transformer blocks at
S3's width, S4 as usual).

Any input size divisible by the total stride (32 for the presets) works, square or not; the
relative-bias tables are resized on the fly. Inference: ``model.eval().fuse()`` folds every BatchNorm into
its neighbouring conv (same outputs, fewer ops).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import NormMlpClassifierHead, calculate_drop_path_rates
from timm.models import checkpoint_seq, generate_default_cfgs
from timm.models._features import feature_take_indices
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from hybridvision.blocks.mbconv import MBConv, refuse_to_fold_hooked
from hybridvision.blocks.transformer import TransformerBlock
from hybridvision.models.registry import SMALL_IMAGE_MAX, build, pretrained_cfg, register
from hybridvision.ops.fused import conv2d, conv_act, hooked, in_func_transform
from hybridvision.ops.norm_act import batch_norm_act
from hybridvision.ops.sizes import pair as _pair

__all__ = ["CoAtNetConfig", "CoAtNet", "PRESETS", "LAYOUTS"]

LAYOUTS = ("CCCC", "CCCT", "CCTT", "CTTT", "VIT_REL")


@dataclass(frozen=True)
class CoAtNetConfig:
    """Architecture and run-time defaults of one CoAtNet.

    Attributes:
        depths: blocks per stage S0..S4 (S0 = number of stem convs).
        dims: widths of S0..S4.
        layout: block types of S1..S4, "C" (MBConv) / "T" (Transformer), e.g. "CCTT"; or "VIT_REL".
        strides: downsampling of S0..S4 (1 or 2 each); total stride = their product.
        s3_conv: (depth, width) of MBConv blocks that open S3 before its Transformer blocks (CoAtNet-6/7), or None.
        head_dim: channels per attention head (32; 64 for CoAtNet-5, 128 for -6/7).
        expansion: MBConv expansion ratio. mlp_ratio: FFN ratio. se_ratio: SE bottleneck ratio.
        stride_mode: "1x1" (paper Eq. 5) or "dw" (Table 9 / timm) for the MBConv downsampling.
        pool: "max" (paper) or "avg" pooling in the downsampling shortcuts and Transformer blocks.
        patch_size: patch-embedding size of the VIT_REL layout.
        drop_path_rate: stochastic depth, linearly increasing over all blocks up to this value.
        drop_rate: dropout before the classifier.
        img_size: nominal input (H, W); sizes the relative-bias tables (other sizes resize them).
        in_chans: input channels. num_classes: classifier outputs (0 = no classifier). global_pool: "avg".
    """

    depths: tuple[int, ...] = (2, 2, 3, 5, 2)
    dims: tuple[int, ...] = (64, 96, 192, 384, 768)
    layout: str = "CCTT"
    strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    s3_conv: tuple[int, int] | None = None
    head_dim: int = 32
    expansion: int = 4
    mlp_ratio: int = 4
    se_ratio: float = 0.25
    stride_mode: str = "1x1"
    pool: str = "max"
    patch_size: int = 16
    drop_path_rate: float = 0.2
    drop_rate: float = 0.0
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"

    def __post_init__(self) -> None:
        if len(self.depths) != 5 or len(self.dims) != 5 or len(self.strides) != 5:
            raise ValueError(
                f"depths, dims and strides need 5 entries (S0..S4), got {self.depths}, {self.dims}, {self.strides}"
            )
        if self.layout != "VIT_REL" and (len(self.layout) != 4 or set(self.layout) - {"C", "T"}):
            raise ValueError(
                f"layout={self.layout!r}: expected 4 letters of C/T for S1..S4 (e.g. {LAYOUTS[:4]}) or 'VIT_REL'"
            )
        if any(s not in (1, 2) for s in self.strides):
            raise ValueError(f"strides must be 1 or 2 per stage, got {self.strides}")
        if min(self.depths[:1] + self.depths[4:]) < 1 or min(self.depths) < 0:
            raise ValueError(f"depths must be >= 1 for S0 and S4 and >= 0 elsewhere, got {self.depths}")
        if self.stride_mode not in ("1x1", "dw"):
            raise ValueError(f"stride_mode={self.stride_mode!r}: choose '1x1' (paper Eq. 5) or 'dw' (Table 9)")
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool={self.pool!r}: choose 'max' or 'avg'")
        if self.global_pool != "avg":
            raise ValueError(f"global_pool={self.global_pool!r}: CoAtNet's head uses global average pooling ('avg')")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        for name, dim in self.transformer_widths():
            if dim % self.head_dim:
                raise ValueError(
                    f"{name} width {dim} is not a multiple of head_dim={self.head_dim}: change dims or head_dim"
                )

    @property
    def total_stride(self) -> int:
        """Product of the stage strides (VIT_REL: patch_size times S4's stride)."""
        if self.layout == "VIT_REL":
            return self.patch_size * self.strides[4]
        return math.prod(self.strides)

    def stage_specs(self) -> list[tuple[str, list[tuple[str, int, int, int]]]]:
        """The blocks of S1..S4 as ``(stage name, [(kind, depth, width, stride), ...])``; empty stages dropped."""
        if self.layout == "VIT_REL":
            return [
                ("S3", [("T", sum(self.depths[1:4]), self.dims[3], 1)]),
                ("S4", [("T", self.depths[4], self.dims[4], self.strides[4])]),
            ]
        specs = []
        for i in range(1, 5):
            runs = [(self.layout[i - 1], self.depths[i], self.dims[i], self.strides[i])]
            if i == 3 and self.s3_conv is not None:
                conv_depth, conv_dim = self.s3_conv
                runs = [("C", conv_depth, conv_dim, self.strides[i]), (self.layout[2], self.depths[i], self.dims[i], 1)]
            runs = [r for r in runs if r[1] > 0]
            if runs:
                specs.append((f"S{i}", runs))
        return specs

    def transformer_widths(self) -> list[tuple[str, int]]:
        return [(name, dim) for name, runs in self.stage_specs() for kind, _, dim, _ in runs if kind == "T"]


class Stem(nn.Module):
    """S0: ``n`` 3x3 convs (BN + GELU between them), the first with the stage stride; or a patch embedding.

    Also the model's entry check: channel count and divisibility by the total stride (so ``features_only``
    wrappers, which call the stem directly, report bad inputs the same way).
    """

    def __init__(self, cfg: CoAtNetConfig) -> None:
        super().__init__()
        self.in_chans, self.total_stride = cfg.in_chans, cfg.total_stride
        if cfg.layout == "VIT_REL":
            p = cfg.patch_size
            self.convs = nn.ModuleList([nn.Conv2d(cfg.in_chans, cfg.dims[3], p, stride=p)])
        else:
            dim = cfg.dims[0]
            self.convs = nn.ModuleList(
                [nn.Conv2d(cfg.in_chans, dim, 3, stride=cfg.strides[0], padding=1, bias=False)]
                + [nn.Conv2d(dim, dim, 3, padding=1, bias=i == cfg.depths[0] - 2) for i in range(cfg.depths[0] - 1)]
            )
        self.norms = nn.ModuleList([nn.BatchNorm2d(c.out_channels) for c in self.convs[:-1]])
        self.fused = False

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (B, in_chans, H, W) with H, W multiples of the total stride."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a (B, {self.in_chans}, H, W) image batch, got shape {tuple(x.shape)}: "
                f"build the model with in_chans={x.shape[1] if x.ndim == 4 else '?'} or convert the images"
            )
        h, w = x.shape[-2:]
        s = self.total_stride
        if h % s or w % s:
            raise ValueError(
                f"input size {h}x{w} is not divisible by the model's total stride {s}: resize or pad to a "
                f"multiple of {s} (e.g. {max(s, -(-h // s) * s)}x{max(s, -(-w // s) * s)})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, D0, H / s0, W / s0), channels-last in memory."""
        self.check_input(x)
        # a 1-channel image is NCHW and channels-last at once, and the first conv would then return NCHW (and the
        # whole network run NCHW): the clone gives it unambiguous channels-last strides; else no copy if already so
        cl = torch.channels_last
        if not in_func_transform():  # (torch.func.vmap cannot clone to channels-last; the layout is speed only)
            x = x.clone(memory_format=cl) if x.shape[1] == 1 else x.contiguous(memory_format=cl)
        for i, conv in enumerate(self.convs):
            if i == len(self.norms):
                x = conv2d(x, conv)
            elif self.fused and not hooked(self.norms[i]):
                x = conv_act(x, conv)  # BN folded: conv + GELU in one oneDNN call on CPU
            else:
                x = batch_norm_act(conv2d(x, conv), self.norms[i])  # one native kernel pair when training on CPU
        return x

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the stem's BatchNorms into the preceding convs (eval statistics)."""
        folded = tuple(f"norms.{i}" for i, bn in enumerate(self.norms) if isinstance(bn, nn.BatchNorm2d))
        refuse_to_fold_hooked(self, folded)
        for i, bn in enumerate(self.norms):
            if isinstance(bn, nn.BatchNorm2d):
                self.convs[i] = fuse_conv_bn_eval(self.convs[i], bn)
                self.norms[i] = nn.Identity()
        self.fused = True


class CoAtNetStage(nn.Module):
    """One stage: a sequence of MBConv / Transformer blocks; the first downsamples and/or widens."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class CoAtNet(nn.Module):
    """CoAtNet backbone + classifier, timm conventions (feature_info, forward_features/head/intermediates, ...).

    Args:
        cfg: the architecture (default: CoAtNet-0).
        **overrides: any :class:`CoAtNetConfig` field (what ``timm.create_model(name, **kw)`` passes),
            e.g. ``num_classes=10, in_chans=1, drop_path_rate=0.1, layout="CCCT", img_size=(256, 192)``.
    """

    def __init__(self, cfg: CoAtNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = cfg or CoAtNetConfig()
        fields = {f.name for f in dataclasses.fields(CoAtNetConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"CoAtNet got unknown option(s) {unknown}; valid options: {sorted(fields)}")
        if isinstance(overrides.get("img_size"), list):  # timm/yaml configs may pass lists
            overrides["img_size"] = tuple(overrides["img_size"])
        cfg = dataclasses.replace(cfg, **overrides)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.drop_rate = cfg.drop_rate
        self.grad_checkpointing = False

        self.stem = Stem(cfg)
        stride = cfg.patch_size if cfg.layout == "VIT_REL" else cfg.strides[0]
        in_chs = self.stem.convs[-1].out_channels
        self.feature_info = [dict(num_chs=in_chs, reduction=stride, module="stem")]
        img = _pair(cfg.img_size)
        specs = cfg.stage_specs()
        n_blocks = sum(d for _, runs in specs for _, d, _, _ in runs)
        dpr = calculate_drop_path_rates(cfg.drop_path_rate, n_blocks)
        stages, k = [], 0
        for _, runs in specs:
            blocks: list[nn.Module] = []
            for kind, depth, dim, run_stride in runs:
                for j in range(depth):
                    s = run_stride if j == 0 else 1
                    stride *= s
                    if kind == "C":
                        blocks.append(MBConv(
                            in_chs, dim, stride=s, expansion=cfg.expansion, se_ratio=cfg.se_ratio,
                            stride_mode=cfg.stride_mode, pool=cfg.pool, drop_path=dpr[k],
                        ))
                    else:
                        grid = (max(1, img[0] // stride), max(1, img[1] // stride))
                        blocks.append(TransformerBlock(
                            in_chs, dim, size=grid, stride=s, head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio,
                            pool=cfg.pool, drop_path=dpr[k],
                        ))
                    in_chs, k = dim, k + 1
            stages.append(CoAtNetStage(blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=stride, module=f"stages.{len(stages) - 1}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = NormMlpClassifierHead(
            in_chs, cfg.num_classes, pool_type=cfg.global_pool, drop_rate=cfg.drop_rate, norm_layer="layernorm2d"
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the relative-position-bias tables (kept out of weight decay)."""
        return {n for n, _ in self.named_parameters() if n.endswith("rel_pos.table")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None) if coarse else (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: CoAtNet supports 'avg' only")
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_features, H / total_stride, W / total_stride)."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, num_features, h, w) -> (B, num_classes), or the pooled, normed (B, num_features) if pre_logits."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) with H, W divisible by the total stride -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Features of the stem (index 0) and each stage (1..), timm's signature.

        Args:
            x: (B, in_chans, H, W).
            indices: last n features if int, all if None, else the listed indices.
            norm: unused (CoAtNet has no final feature norm outside the head); accepted for the timm signature.
            stop_early: stop after the last requested stage.
            output_fmt: "NCHW" only.
            intermediates_only: return only the list.

        Returns:
            ``[(B, C_i, H / r_i, W / r_i), ...]`` or ``(final features, that list)``.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: CoAtNet returns 'NCHW' features")
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        feats = []
        x = self.stem(x)
        if 0 in take:
            feats.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take:
                feats.append(x)
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last index in ``indices`` (and the head); returns the kept indices."""
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if prune_head:
            self.reset_classifier(0)
        return take

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def fuse(self) -> "CoAtNet":
        """Fold every BatchNorm into its adjacent conv (stem, MBConv pre-norm/inner BNs) for inference.

        Requires eval mode; the outputs are unchanged up to float rounding (tested). Returns self. Under
        ``torch.inference_mode()``/``no_grad`` on CPU fp32 the fused model then runs conv+GELU, conv+residual and
        linear+GELU/+residual as single oneDNN kernels (:mod:`hybridvision.ops.fused`); the Transformer parts use
        them in eval mode with or without ``fuse()``. Typical use::

            model = hybridvision.create_model("coatnet_0").eval().fuse()
            with torch.inference_mode():
                logits = model(images)
        """
        if self.training:
            raise RuntimeError("CoAtNet.fuse() folds eval-mode BatchNorm statistics: call model.eval() first")
        # checked for the whole model before anything is folded (no half-fused model left behind)
        refuse_to_fold_hooked(self, tuple(n for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)))
        self.stem.fuse()
        for m in self.modules():
            if isinstance(m, MBConv):
                m.fuse()
        return self


# --------------------------------------------------------------------------------------- presets
_STAGES_0 = dict(depths=(2, 2, 3, 5, 2), dims=(64, 96, 192, 384, 768))
PRESETS: dict[str, CoAtNetConfig] = {
    "coatnet_0": CoAtNetConfig(**_STAGES_0, drop_path_rate=0.2),
    "coatnet_1": CoAtNetConfig(depths=(2, 2, 6, 14, 2), dims=(64, 96, 192, 384, 768), drop_path_rate=0.3),
    "coatnet_2": CoAtNetConfig(depths=(2, 2, 6, 14, 2), dims=(128, 128, 256, 512, 1024), drop_path_rate=0.5),
    "coatnet_3": CoAtNetConfig(depths=(2, 2, 6, 14, 2), dims=(192, 192, 384, 768, 1536), drop_path_rate=0.7),
    "coatnet_4": CoAtNetConfig(depths=(2, 2, 12, 28, 2), dims=(192, 192, 384, 768, 1536), drop_path_rate=0.8),
    "coatnet_5": CoAtNetConfig(
        depths=(2, 2, 12, 28, 2), dims=(192, 256, 512, 1280, 2048), head_dim=64, drop_path_rate=0.8
    ),
    "coatnet_6": CoAtNetConfig(
        depths=(2, 2, 4, 42, 2), dims=(192, 192, 384, 1536, 2048), s3_conv=(8, 768), head_dim=128,
        drop_path_rate=0.9,
    ),
    "coatnet_7": CoAtNetConfig(
        depths=(2, 2, 4, 42, 2), dims=(192, 256, 512, 2048, 3072), s3_conv=(8, 1024), head_dim=128,
        drop_path_rate=0.9,
    ),
    # small images, C-C-T-T. nano: 32 px (Fashion-MNIST resized 28 -> 32), total stride 8:
    # 32 -> 16 (S0) -> 8x8 (S1) -> 4x4 (S2..S4); one block per stage keeps an 8-epoch Fashion-MNIST run within
    # the demo's 15 min on 2 CPU cores (configs/demo.yaml); stride-2 depthwise downsampling (Table 9) keeps every
    # pixel in the MBConv branch, which converges faster here than the strided 1x1. pico: 28 px, total stride 4.
    "coatnet_nano": CoAtNetConfig(
        depths=(2, 1, 1, 1, 1), dims=(24, 32, 64, 96, 128), strides=(2, 2, 2, 1, 1), stride_mode="dw",
        drop_path_rate=0.0, img_size=32,
    ),
    # micro: nano's geometry, two blocks per stage in S1..S3 and ~1.5x the width (1.3M params).
    "coatnet_micro": CoAtNetConfig(
        depths=(2, 2, 2, 2, 1), dims=(32, 48, 96, 160, 192), strides=(2, 2, 2, 1, 1), stride_mode="dw",
        drop_path_rate=0.0, img_size=32,
    ),
    # mini: micro with wider stages (2.1M params): the longer Fashion-MNIST recipe (configs/fashion_mnist_long.yaml).
    "coatnet_mini": CoAtNetConfig(
        depths=(2, 2, 2, 2, 1), dims=(48, 64, 128, 192, 256), strides=(2, 2, 2, 1, 1), stride_mode="dw",
        drop_path_rate=0.0, img_size=32,
    ),
    "coatnet_pico": CoAtNetConfig(
        depths=(1, 1, 1, 1, 1), dims=(16, 32, 48, 64, 96), strides=(2, 2, 1, 1, 1), head_dim=16,
        drop_path_rate=0.0, img_size=28,
    ),
}

def _cfg(name: str) -> dict:
    c = PRESETS[name]
    h, w = _pair(c.img_size)
    small = max(h, w) <= SMALL_IMAGE_MAX
    return pretrained_cfg(
        (c.in_chans, h, w),
        first_conv="stem.convs.0",
        classifier="head.fc",
        crop_pct=1.0 if small else 0.95,
        pool_size=(max(1, h // c.total_stride), max(1, w // c.total_stride)),
        **({"mean": (0.5,) * c.in_chans, "std": (0.5,) * c.in_chans} if small else {}),
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in PRESETS})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CoAtNet:
    probe = dataclasses.replace(PRESETS[variant], **{k: v for k, v in kwargs.items() if k in ("layout", "s3_conv")})
    n_features = 1 + len(probe.stage_specs())
    kwargs.setdefault("feature_cfg", dict(flatten_sequential=True, out_indices=tuple(range(n_features))))
    return build(CoAtNet, variant, pretrained, cfg=PRESETS[variant], **kwargs)


@register
def coatnet_0(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-0: L=2,2,3,5,2, D=64,96,192,384,768, C-C-T-T; 25M params, 4.2 GMACs @224."""
    return _create("coatnet_0", pretrained, **kwargs)


@register
def coatnet_1(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-1: L=2,2,6,14,2, D=64,96,192,384,768; 42M params."""
    return _create("coatnet_1", pretrained, **kwargs)


@register
def coatnet_2(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-2: L=2,2,6,14,2, D=128,128,256,512,1024; 75M params."""
    return _create("coatnet_2", pretrained, **kwargs)


@register
def coatnet_3(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-3: L=2,2,6,14,2, D=192,192,384,768,1536; 168M params."""
    return _create("coatnet_3", pretrained, **kwargs)


@register
def coatnet_4(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-4: L=2,2,12,28,2, D=192,192,384,768,1536; 275M params."""
    return _create("coatnet_4", pretrained, **kwargs)


@register
def coatnet_5(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-5: L=2,2,12,28,2, D=192,256,512,1280,2048, head size 64; 688M params."""
    return _create("coatnet_5", pretrained, **kwargs)


@register
def coatnet_6(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-6: S3 = 8 MBConv @768 then 42 Transformer @1536, head size 128; 1.47B params."""
    return _create("coatnet_6", pretrained, **kwargs)


@register
def coatnet_7(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """CoAtNet-7: S3 = 8 MBConv @1024 then 42 Transformer @2048, head size 128; 2.44B params."""
    return _create("coatnet_7", pretrained, **kwargs)


@register
def coatnet_nano(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """Small-image CoAtNet (32 px, total stride 8), C-C-T-T, 0.37M params; the training demo's default model."""
    return _create("coatnet_nano", pretrained, **kwargs)


@register
def coatnet_micro(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """Small-image CoAtNet (32 px, total stride 8), C-C-T-T, two blocks in S1-S3, 1.3M params."""
    return _create("coatnet_micro", pretrained, **kwargs)


@register
def coatnet_mini(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """Small-image CoAtNet (32 px, total stride 8), C-C-T-T, micro's depths at 48-256 wide, 2.1M params; the longer
    Fashion-MNIST recipe's model (94.18% test top-1, README)."""
    return _create("coatnet_mini", pretrained, **kwargs)


@register
def coatnet_pico(pretrained: bool = False, **kwargs: Any) -> CoAtNet:
    """Smallest small-image CoAtNet (28-64 px, total stride 4), C-C-T-T, head size 16."""
    return _create("coatnet_pico", pretrained, **kwargs)
