"""ParC2d: position-aware circular convolution with a global kernel (ParC-Net, Zhang et al. 2022).

A ParC layer holds a *meta kernel* ``weight`` (C, C // groups, base_size) and a *position embedding* ``pe``
(C, base_size) along one spatial axis. For an input whose length ``L`` along that axis is not ``base_size``, both
are resized to ``L`` bilinearly (``align_corners=True``, as the official code does); the PE is added to the input
(broadcast over the other axis) and the circular cross-correlation :func:`~hybridvision.ops.circular.circular_conv`
is applied along the axis. Non-square inputs work.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridvision.ops.circular import METHODS, _circular_conv
from hybridvision.ops.fused import EvalCache

__all__ = ["ParC2d"]

_DIMS = {"H": 2, "W": 3}


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (align_corners=True) resize of the last axis. t: (..., K) -> (..., size); identity if K == size."""
    if t.size(-1) == size:
        return t
    lead = t.shape[:-1]
    t4 = t.reshape(1, -1, t.size(-1), 1)
    out = F.interpolate(t4, size=(size, 1), mode="bilinear", align_corners=True)
    return out.reshape(*lead, size)


class ParC2d(EvalCache):
    """Position-aware circular convolution along the height (``"H"``) or the width (``"W"``).

    Args:
        channels: C, input and output channels.
        direction: ``"H"``: a global ``K x 1`` kernel running along the height (official ParC type ``'H'``);
            ``"W"``: a ``1 x K`` kernel along the width.
        base_size: K, the length of the stored meta kernel and PE (the feature size at the training resolution).
        use_pe: add the position embedding ``pe`` before the convolution.
        bias: learn a bias per output channel.
        groups: ``None`` = depthwise (C groups, the ParC default); 1 = dense (ParC-ResNet50); any divisor of C.
        method: :func:`~hybridvision.ops.circular.circular_conv` method, ``"auto"`` by default.

    Parameters (the public layout, checkpoints depend on it):
        weight: (C, C // groups, base_size), PyTorch's conv default init (kaiming-uniform, a = sqrt(5)).
        bias: (C,) or None, PyTorch's conv default init.
        pe: (C, base_size) or None, truncated normal with std 0.02.

    Shapes:
        forward: x (B, C, H, W) -> (B, C, H, W), for any H and W.

    To run at one fixed resolution without the per-call resize (e.g. before ONNX export), call
    :meth:`set_base_size` with the feature size of that resolution: the meta kernel and PE are replaced by their
    resized versions, so the forward pass contains no interpolation.

    In eval mode, where nothing records a gradient of the parameters (``torch.no_grad`` / ``torch.inference_mode``)
    and in plain eager execution, the resized kernel and the PE's part of the output, ``conv(pe, weight) + bias``
    (C, L), are computed once per length L and kept (:class:`~hybridvision.ops.fused.EvalCache`: in-place updates are
    seen; dropped by ``train()``, ``load_state_dict``, ``.to()`` and :meth:`set_base_size`): a call is then the
    convolution alone, with that term as its addend.
    """

    def __init__(
        self,
        channels: int,
        direction: str,
        base_size: int,
        *,
        use_pe: bool = True,
        bias: bool = True,
        groups: Optional[int] = None,
        method: str = "auto",
    ) -> None:
        super().__init__()
        if direction not in _DIMS:
            raise ValueError(f"direction must be 'H' (kernel along the height) or 'W' (along the width); got {direction!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int; got {channels!r}")
        if not isinstance(base_size, int) or base_size < 1:
            raise ValueError(f"base_size must be a positive int (the feature size at training resolution); got {base_size!r}")
        groups = channels if groups is None else groups
        if not isinstance(groups, int) or groups < 1 or channels % groups:
            raise ValueError(f"groups={groups!r} must be a positive divisor of channels={channels} (None = depthwise)")
        if method not in METHODS:
            raise ValueError(f"unknown circular_conv method {method!r}; expected one of {METHODS}")
        self.channels = channels
        self.direction = direction
        self.base_size = base_size
        self.groups = groups
        self.method = method
        self.weight = nn.Parameter(torch.empty(channels, channels // groups, base_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.pe = nn.Parameter(torch.empty(channels, base_size)) if use_pe else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv default init for ``weight`` / ``bias`` (as ``nn.Conv2d``), trunc-normal std 0.02 for ``pe``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.size(1) * self.weight.size(2)
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        if self.pe is not None:
            nn.init.trunc_normal_(self.pe, std=0.02)

    @property
    def dim(self) -> int:
        """The axis of (B, C, H, W) the kernel runs along: 2 for ``"H"``, 3 for ``"W"``."""
        return _DIMS[self.direction]

    def instance_params(self, size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kernel and PE used for an input of length ``size`` along :attr:`direction`.

        Returns:
            weight: (C, C // groups, size); pe: (C, size) or None. Both are the stored parameters themselves when
            ``size == base_size``, else their bilinear (align_corners=True) resize (differentiable).
        """
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}")
        return self._instance_params(size)

    def _instance_params(self, size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`instance_params` without the check (``size`` may be a traced size while exporting)."""
        weight = _resize(self.weight, size)
        pe = _resize(self.pe, size) if self.pe is not None else None
        return weight, pe

    @torch.no_grad()
    def set_base_size(self, size: int) -> None:
        """Replace ``weight`` and ``pe`` by their resized versions for length ``size`` (and set ``base_size``).

        Use it to fine-tune at a new resolution, or to freeze the instance kernel before exporting at a fixed
        resolution (the exported graph then has no Resize). Changes the shapes in the state dict and replaces the
        Parameter objects (``requires_grad`` is kept): build the optimizer afterwards.
        """
        weight, pe = self.instance_params(size)
        self.weight = nn.Parameter(weight.clone(), requires_grad=self.weight.requires_grad)
        if pe is not None:
            self.pe = nn.Parameter(pe.clone(), requires_grad=self.pe.requires_grad)
        self.base_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        if x.dim() != 4 or x.size(1) != self.channels:
            raise ValueError(
                f"ParC2d({self.channels}, {self.direction!r}) expects x of shape (B, {self.channels}, H, W); "
                f"got {tuple(x.shape)}"
            )
        dim = self.dim
        params = (self.weight, self.pe, self.bias)
        if self.cache_applies(*params):
            size = x.size(dim)
            weight, addend = self.cached((size,), params, lambda: self._folded(size))
            return _circular_conv(x, weight, dim, None, self.groups, self.method, addend=addend, eager=True)
        weight, pe = self._instance_params(x.size(dim))
        return _circular_conv(x, weight, dim, self.bias, self.groups, self.method, pe=pe)

    def _folded(self, size: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kernel for length ``size`` and the addend that replaces pe and bias, ``conv(pe, weight) + bias``
        (C, size) (the PE run through the layer as a one-line input; linear, so the same as adding it to x), or None
        without either."""
        with torch.autocast(self.weight.device.type, enabled=False):
            weight, pe = self._instance_params(size)
            if pe is not None:
                line = pe.unsqueeze(0).unsqueeze(-1 if self.dim == 2 else -2)  # (1, C, size, 1) or (1, C, 1, size)
                addend = _circular_conv(line, weight, self.dim, self.bias, self.groups, self.method)
                return weight, addend.reshape(self.channels, size)
            if self.bias is not None:  # materialised once here, not by the native kernel's call each forward
                return weight, self.bias.unsqueeze(-1).expand(self.channels, size).contiguous()
            return weight, None

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, direction={self.direction!r}, base_size={self.base_size}, groups={self.groups}, "
            f"use_pe={self.pe is not None}, bias={self.bias is not None}, method={self.method!r}"
        )
