"""ParC blocks: the spatial ParC pair that replaces a ConvNet's KxK convolution, and the ParC-Net blocks.

Every module here runs its circular convolutions through :class:`hybridvision.ops.parc.ParC2d` (one
implementation of the operator). Two ways of combining ParC-H and ParC-W:

* :class:`ParCPair` (the ParC ConvNets: ParC-ConvNeXt / ParC-MobileNetV2 / ParC-ResNet50): half of the channels
  through ParC-H, the other half through ParC-W, in parallel. It is a drop-in replacement for a stride-1
  depthwise (or dense, ``groups=1``) ``KxK`` convolution; :meth:`ParCPair.from_conv` builds it from one.
  A ParC-ConvNeXt block is timm's ``ConvNeXtBlock`` with ``conv_dw`` replaced by a depthwise pair, a ParC-MV2 block
  timm's ``InvertedResidual`` with ``conv_dw`` replaced, a ParC bottleneck timm's ``Bottleneck`` with ``conv2``
  replaced by a dense pair (see :func:`hybridvision.models.convert.parcify`, which performs those swaps).
* :class:`ParCMixer` (ParC-Net): one half ParC-H then ParC-W, the other half ParC-W then ParC-H, so every output
  sees the whole map. :class:`ParCMetaFormerBlock` wraps it as a meta-former block with the channel attention
  :class:`ChannelAttention`; :class:`ParCMobileViTBlock` is the ParC-Net replacement of the MobileViT block;
  :class:`ParCTokenMixer` runs the mixer on a ViT's token grid in place of self-attention.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, DropPath, Mlp

from hybridvision.ops.parc import ParC2d
from hybridvision.ops.sizes import Size2
from hybridvision.ops.sizes import pair as _pair

__all__ = [
    "ChannelAttention",
    "ParCMetaFormerBlock",
    "ParCMixer",
    "ParCMobileViTBlock",
    "ParCPair",
    "ParCTokenMixer",
    "conv_parc_eligibility",
    "parc_no_weight_decay",
]


def _half_groups(channels: int, groups: int) -> Optional[int]:
    """Groups of each half of a conv with ``groups`` over ``channels`` split in two; None if it does not split."""
    if groups == 1:
        return 1
    if groups % 2 or channels % 2:
        return None
    return groups // 2


def conv_parc_eligibility(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot be replaced by a :class:`ParCPair`, or None if it can.

    Eligible: an ``nn.Conv2d`` (or subclass) with a spatial kernel (some side > 1), stride 1, as many input as
    output channels, and groups 1 (dense) or an even split (depthwise included).
    """
    if not isinstance(conv, nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    if max(conv.kernel_size) <= 1:
        return "1x1 (pointwise) convolution"
    if tuple(conv.stride) != (1, 1):
        return f"stride {tuple(conv.stride)} (ParC keeps the resolution; only stride-1 convolutions are replaced)"
    if conv.in_channels != conv.out_channels:
        return f"in_channels {conv.in_channels} != out_channels {conv.out_channels}"
    if conv.in_channels < 2:
        return "fewer than 2 channels (cannot split into an H and a W half)"
    if _half_groups(conv.in_channels, conv.groups) is None:
        return f"groups={conv.groups} over {conv.in_channels} channels does not split into two halves"
    return None


class ParCPair(nn.Module):
    """ParC-H on the first half of the channels, ParC-W on the second half, concatenated (ParC ConvNets).

    Args:
        channels: C; the H half gets ``C // 2`` channels, the W half the rest.
        base_size: the global kernel lengths ``K`` or ``(K_h, K_w)``: the feature size at the training resolution.
        groups: groups of each half: None = depthwise (ParC-ConvNeXt / ParC-MobileNetV2), 1 = dense
            (ParC-ResNet50), or any divisor of the half's channels.
        use_pe, bias, method: as :class:`~hybridvision.ops.parc.ParC2d`.

    Shapes:
        forward: x (B, C, H, W) -> (B, C, H, W), any H and W (the kernels are resized to the input).
    """

    def __init__(
        self,
        channels: int,
        base_size: Size2,
        *,
        groups: Optional[int] = None,
        use_pe: bool = True,
        bias: bool = True,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 2:
            raise ValueError(f"ParCPair needs at least 2 channels (one H half, one W half); got channels={channels!r}")
        k_h, k_w = _pair(base_size, "base_size")
        c_h = channels // 2
        c_w = channels - c_h
        if c_h != c_w and groups != 1:
            raise ValueError(
                f"channels={channels} is odd: only a dense pair (groups=1) can split it unevenly; "
                f"got groups={groups!r}. Use an even channel count or groups=1."
            )
        self.channels = channels
        self.split = (c_h, c_w)
        self.parc_h = ParC2d(c_h, "H", k_h, use_pe=use_pe, bias=bias, groups=groups, method=method)
        self.parc_w = ParC2d(c_w, "W", k_w, use_pe=use_pe, bias=bias, groups=groups, method=method)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, base_size: Size2, *, use_pe: bool = True, method: str = "auto") -> "ParCPair":
        """A pair replacing ``conv`` (same channels, same group size, bias iff ``conv`` has one), on its device/dtype.

        Raises:
            ValueError: ``conv`` is not eligible (see :func:`conv_parc_eligibility`).
        """
        reason = conv_parc_eligibility(conv)
        if reason is not None:
            raise ValueError(f"cannot replace {conv} by a ParC pair: {reason}")
        pair = cls(
            conv.in_channels,
            base_size,
            groups=_half_groups(conv.in_channels, conv.groups),
            use_pe=use_pe,
            bias=conv.bias is not None,
            method=method,
        )
        return pair.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        if x.dim() != 4 or x.size(1) != self.channels:
            raise ValueError(f"ParCPair({self.channels}) expects x of shape (B, {self.channels}, H, W); got {tuple(x.shape)}")
        x_h, x_w = torch.split(x, self.split, dim=1)
        return torch.cat((self.parc_h(x_h), self.parc_w(x_w)), dim=1)


class ParCMixer(nn.Module):
    """The ParC-Net spatial mixer: half 1 ParC-H then ParC-W, half 2 ParC-W then ParC-H (global in both axes).

    Args:
        channels: C (even); each half has C / 2 channels, all four ParC layers are depthwise.
        base_size: ``K`` or ``(K_h, K_w)``, the feature size at the training resolution.
        use_pe: position embeddings in the four ParC layers (ParC-Net: only in the first block of a stage).
        bias: biases in the four ParC layers (ParC-Net-S: none).
        method: :func:`~hybridvision.ops.circular.circular_conv` method.

    Shapes:
        forward: x (B, C, H, W) -> (B, C, H, W), any H and W.
    """

    def __init__(self, channels: int, base_size: Size2, *, use_pe: bool = True, bias: bool = False, method: str = "auto"):
        super().__init__()
        if not isinstance(channels, int) or channels < 2 or channels % 2:
            raise ValueError(f"ParCMixer needs an even channel count >= 2 (two halves); got channels={channels!r}")
        k_h, k_w = _pair(base_size, "base_size")
        half = channels // 2
        self.channels = channels
        kw = dict(use_pe=use_pe, bias=bias, method=method)
        self.parc_1h = ParC2d(half, "H", k_h, **kw)
        self.parc_1w = ParC2d(half, "W", k_w, **kw)
        self.parc_2w = ParC2d(half, "W", k_w, **kw)
        self.parc_2h = ParC2d(half, "H", k_h, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        if x.dim() != 4 or x.size(1) != self.channels:
            raise ValueError(f"ParCMixer({self.channels}) expects x of shape (B, {self.channels}, H, W); got {tuple(x.shape)}")
        x_1, x_2 = x.chunk(2, dim=1)
        return torch.cat((self.parc_1w(self.parc_1h(x_1)), self.parc_2h(self.parc_2w(x_2))), dim=1)


class ChannelAttention(nn.Module):
    """ParC-Net's SE-style channel attention: x * Hardsigmoid(BN(1x1(Hardswish(BN(1x1(GAP(x))))))).

    Args:
        channels: C.
        reduction: the hidden width is ``max(C // reduction, 1)`` (16 in ParC-Net).

    Shapes:
        forward: x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = ConvNormAct(channels, hidden, 1, act_layer=nn.Hardswish)
        self.expand = ConvNormAct(hidden, channels, 1, apply_act=False)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return x * self.gate(self.expand(self.reduce(self.pool(x))))


class ParCMetaFormerBlock(nn.Module):
    """ParC-Net meta-former block: x + ParCMixer(BN(x)), then x + CA(FFN(x)), FFN = BN, 1x1, Hardswish, 1x1.

    Args:
        dim: C (even).
        base_size: ``K`` or ``(K_h, K_w)``, the feature size at the training resolution.
        mlp_hidden: FFN hidden width (ParC-Net-S: 2 * dim).
        use_pe: position embeddings in the mixer (ParC-Net: first block of a stage only).
        bias: biases in the ParC layers.
        drop: dropout after the FFN (ParC-Net: 0.1); drop_path: stochastic depth on both residual branches.
        method: circular_conv method.

    Shapes:
        forward: x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self,
        dim: int,
        base_size: Size2,
        *,
        mlp_hidden: Optional[int] = None,
        use_pe: bool = True,
        bias: bool = False,
        drop: float = 0.0,
        drop_path: float = 0.0,
        method: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.mixer = ParCMixer(dim, base_size, use_pe=use_pe, bias=bias, method=method)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, mlp_hidden or 2 * dim, act_layer=nn.Hardswish, drop=(0.0, drop), use_conv=True)
        self.ca = ChannelAttention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.ca(self.mlp(self.norm2(x))))


class ParCMobileViTBlock(nn.Module):
    """ParC-Net's replacement of the MobileViT block (official ``outer_frame_v1``, concat fusion).

    local: 3x3 conv C_in -> D (groups gcd(C_in, D)) + BN + act, then 1x1 D -> D;
    global: ``depth`` :class:`ParCMetaFormerBlock` (PE in the first only) + BN;
    projection: 1x1 D -> C_out (groups gcd(D, C_out)) + BN + act; fusion: 3x3 conv over cat(projection, input).

    Args:
        in_chs, out_chs: C_in, C_out. dim: D (even), the width of the ParC blocks. depth: number of ParC blocks.
        base_size: ``K`` or ``(K_h, K_w)``: this block's feature size at the model's default input size.
        mlp_hidden: FFN width of the ParC blocks (ParC-Net-S: 2 * D).
        act_layer: activation of the conv layers (ParC-Net-S: SiLU).
        drop: FFN output dropout; drop_path: stochastic depth; method: circular_conv method.

    Shapes:
        forward: x (B, C_in, H, W) -> (B, C_out, H, W), any H and W.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        dim: int,
        depth: int,
        base_size: Size2,
        *,
        mlp_hidden: Optional[int] = None,
        act_layer: Callable[..., nn.Module] = nn.SiLU,
        drop: float = 0.0,
        drop_path: float = 0.0,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"ParCMobileViTBlock needs depth >= 1 ParC blocks; got depth={depth}")
        self.conv_local = ConvNormAct(in_chs, dim, 3, groups=math.gcd(in_chs, dim), act_layer=act_layer)
        self.conv_1x1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.parc_blocks = nn.Sequential(*[
            ParCMetaFormerBlock(
                dim, base_size, mlp_hidden=mlp_hidden, use_pe=i == 0, drop=drop, drop_path=drop_path, method=method
            )
            for i in range(depth)
        ])
        self.norm = nn.BatchNorm2d(dim)
        self.conv_proj = ConvNormAct(dim, out_chs, 1, groups=math.gcd(dim, out_chs), act_layer=act_layer)
        self.conv_fusion = ConvNormAct(in_chs + out_chs, out_chs, 3, act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        y = self.conv_1x1(self.conv_local(x))
        y = self.conv_proj(self.norm(self.parc_blocks(y)))
        return self.conv_fusion(torch.cat((y, x), dim=1))


class ParCTokenMixer(nn.Module):
    """A ViT block's token mixer made of ParC: tokens -> 2-D grid -> :class:`ParCMixer` -> tokens -> projection.

    Replaces ``Attention`` inside a timm ViT block (same call signature). The grid of the current input is held in
    :attr:`grid` (set by :func:`hybridvision.models.convert.parcify` from the patch embedding before each forward).

    Args:
        dim: C, the embedding width (even).
        base_grid: the token grid ``(H, W)`` at the model's default input size (the global kernel lengths).
        proj: the output projection (the attention's ``proj``, kept with its weights), ``nn.Identity`` for none.
        proj_drop: dropout after the projection.
        use_pe, bias, method: as :class:`ParCMixer`.

    Shapes:
        forward: x (B, N, C) with N = H * W of :attr:`grid` -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        base_grid: Size2,
        *,
        proj: Optional[nn.Module] = None,
        proj_drop: Optional[nn.Module] = None,
        use_pe: bool = True,
        bias: bool = True,
        method: str = "auto",
    ) -> None:
        super().__init__()
        self.grid = _pair(base_grid, "base_grid")
        self.mixer = ParCMixer(dim, self.grid, use_pe=use_pe, bias=bias, method=method)
        self.proj = proj if proj is not None else nn.Identity()
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C). ``attn_mask`` / ``is_causal`` must be unset (a convolution has no mask)."""
        if attn_mask is not None or is_causal:
            raise ValueError("ParCTokenMixer is a convolution over the token grid: attn_mask / is_causal are not supported")
        b, n, c = x.shape
        h, w = self.grid
        if n != h * w:
            raise ValueError(
                f"ParCTokenMixer got {n} tokens but its grid is {h}x{w} = {h * w}: the tokens must be exactly the patch "
                f"grid (no class/register tokens). Convert the model with hybridvision.parcify, which removes them "
                f"and updates the grid from each input."
            )
        y = self.mixer(x.transpose(1, 2).reshape(b, c, h, w))
        return self.proj_drop(self.proj(y.flatten(2).transpose(1, 2)))


def parc_no_weight_decay(module: nn.Module, prefix: str = "") -> set[str]:
    """Names (as in ``module.named_parameters()``, with ``prefix``) of every ParC position embedding in ``module``.

    Position embeddings are excluded from weight decay, like a ViT's ``pos_embed``.
    """
    names = set()
    for mod_name, mod in module.named_modules():
        if isinstance(mod, ParC2d) and mod.pe is not None:
            names.add(f"{prefix}{mod_name}.pe" if mod_name else f"{prefix}pe")
    return names
