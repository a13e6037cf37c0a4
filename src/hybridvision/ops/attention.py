"""Relative self-attention of CoAtNet (Dai et al. 2021, Eq. 3).

    y_i = sum_j softmax_j(q_i . k_j / sqrt(d) + w_{i-j}) v_j

``w`` is a trainable (2H-1) x (2W-1) table per head (one per layer), indexed by the 2-D offset
between query and key. For a grid other than the table's ``size`` the table is resized bilinearly
(``align_corners=False``, the half-pixel rule of the official ``tf.image.resize``), so one model
runs at any resolution, square or not.

On the CPU at inference, the attention itself (softmax(q k^T / sqrt(d) + B) v) has two kernels, timed against each
other per shape by :mod:`hybridvision.ops.fused`'s autotuner: ``F.scaled_dot_product_attention`` and hybridvision's
own (``ops/csrc/attention_cpu.cpp``, reading q, k and v straight from the projection's output).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridvision.ops import fused, native
from hybridvision.ops.fused import EvalCache, grads_of_plain, hooked, linear_act, linear_add, plain_eager
from hybridvision.ops.sizes import pair as _pair

__all__ = ["RelPosBias2d", "RelAttention2d", "relative_index", "attend"]


def relative_index(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Flat index into a (2H-1, 2W-1) table of the offset between every query/key pair of an H x W grid.

    Returns:
        (N, N) int64 with N = H*W; entry [i, j] = (h_i - h_j + H - 1) * (2W - 1) + (w_i - w_j + W - 1),
        tokens in row-major (h, w) order.
    """
    hh = torch.arange(height, device=device)
    ww = torch.arange(width, device=device)
    coords = torch.stack(torch.meshgrid(hh, ww, indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + height - 1) * (2 * width - 1) + (rel[1] + width - 1)


_INDEX_CACHE: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_INDEX_CACHE_MAX = 32


def _shared_index(height: int, width: int, device: torch.device) -> torch.Tensor:
    """:func:`relative_index`, cached once for every layer (at most :data:`_INDEX_CACHE_MAX` grid/device pairs):
    (N, N) int64, read-only. Built outside inference mode: a plain tensor that the gather's backward may save.
    Not cached while compiling / exporting: the tensor built then is the tracer's (a FakeTensor), not data."""
    if not plain_eager():
        return relative_index(height, width, device=device)
    key = (height, width, device)
    index = _INDEX_CACHE.get(key)
    if index is None:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_MAX:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False):
            index = _INDEX_CACHE[key] = relative_index(height, width, device=device)
    return index


class RelPosBias2d(EvalCache):
    """Per-head relative position bias for 2-D attention (CoAtNet Eq. 3).

    Args:
        num_heads: number of heads (one table each).
        size: grid (H, W) the table is sized for; the table is (num_heads, 2H-1, 2W-1), trunc-normal std 0.02.

    ``forward(grid)`` returns the (num_heads, N, N) bias for an (h, w) grid, N = h*w. A grid other than
    ``size`` resizes the table bilinearly to (2h-1, 2w-1) first. In eval mode, when no gradient for the table
    is requested (``torch.no_grad``/``inference_mode`` or a frozen table), the bias is cached per
    grid/device/dtype; the cache is dropped by ``train()``, by ``load_state_dict`` and by any in-place change
    of the table (its version counter is part of the key; :class:`~hybridvision.ops.fused.EvalCache`). Under
    ``torch.compile`` / export the bias is computed in the traced graph instead (no Python-side cache, no graph break).
    """

    def __init__(self, num_heads: int, size: int | tuple[int, int]) -> None:
        super().__init__()
        if int(num_heads) < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads = int(num_heads)
        self.size = _pair(size, "size")
        h, w = self.size
        self.table = nn.Parameter(torch.empty(self.num_heads, 2 * h - 1, 2 * w - 1))
        nn.init.trunc_normal_(self.table, std=0.02)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, size={self.size}"

    def table_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The table resized for ``grid`` (h, w).

        Returns:
            (num_heads, 2h-1, 2w-1); ``self.table`` itself when ``grid == size``.
        """
        h, w = _pair(grid, "grid")
        if (h, w) == self.size:
            return self.table
        return F.interpolate(
            self.table.unsqueeze(0), size=(2 * h - 1, 2 * w - 1), mode="bilinear", align_corners=False
        ).squeeze(0)

    def _compute(self, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        table = self.table_for(grid).flatten(1)  # (heads, (2h-1)(2w-1))
        return table[:, _shared_index(h, w, table.device)]

    def forward(
        self, grid: int | tuple[int, int], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Bias for an (h, w) grid.

        Args:
            grid: (h, w) of the token grid (an int means square).
            dtype: dtype of the result (default: the table's).

        Returns:
            (num_heads, N, N) with N = h*w, to be added to the attention logits before the softmax.
        """
        grid = _pair(grid, "grid")
        dtype = dtype or self.table.dtype
        # no cache while compiling / exporting: the gather becomes part of the traced graph
        if not self.cache_applies(self.table):
            return self._compute(grid).to(dtype)
        return self.cached((grid, dtype), (self.table,), lambda: self._compute(grid).to(dtype).contiguous())


def _formula(qkv: torch.Tensor, bias: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """The attention written out (dropout on the probabilities): qkv (B, N, 3, heads, d), bias (heads, N, N) ->
    (B, N, heads, d)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d)
    attn = (torch.matmul(q * qkv.shape[4]**-0.5, k.transpose(-2, -1)) + bias).softmax(-1)
    return ((F.dropout(attn, dropout) if dropout else attn) @ v).transpose(1, 2)


class _NativeAttention(torch.autograd.Function):
    """The native kernels with gradients: the forward keeps P (B, heads, N, N) for the backward, which returns the
    gradients of qkv and of the bias (summed over the images). Double backward: through :func:`_formula`."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y, probs = native.attention_forward(qkv, bias, qkv.shape[3], qkv.shape[4]**-0.5, True)
        ctx.save_for_backward(qkv, bias, probs)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, bias, probs = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
            return grads_of_plain(_formula, (qkv, bias), needs, (grad,))
        gqkv, gbias = native.attention_backward(grad.contiguous(), qkv, probs, qkv.shape[4]**-0.5)
        return gqkv if needs[0] else None, gbias if needs[1] else None


def attend(qkv: torch.Tensor, bias: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + bias) v for every image and head (``dropout`` on the probabilities;
    head_dim = qkv.shape[4]).

    CPU fp32 without dropout, where the native kernels are built: with gradients, the native forward and backward
    (``_NativeAttention``: 2.8x the written-out expression's forward + backward at CoAtNet-0's stage-3 shape, batch 8,
    scratch timing); without, the faster of SDPA and the native forward for the shape (module docstring). Elsewhere:
    SDPA, or, on the CPU when the bias needs a gradient, the written-out expression (a mask that needs a gradient
    sends SDPA on the CPU to its math path, which also scales k and runs a NaN-safe softmax: extra passes over the
    (B, heads, N, N) logits).

    Args:
        qkv: (B, N, 3, heads, head_dim): a q/k/v projection's output, tokens first.
        bias: (heads, N, N).

    Returns:
        (B, N, heads, head_dim); its (B, N, heads * head_dim) reshape is the output projection's input.
    """
    b, n, _, heads, d = qkv.shape

    def sdpa() -> torch.Tensor:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, d) views
        # a 4-D mask lets SDPA pick the fused CPU flash kernel (a 3-D one falls back to the math path); the flash
        # kernel's output is laid out as (B, N, heads, d): the transpose back is free
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=dropout).transpose(1, 2)

    grad = torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)
    if not dropout and fused._onednn_ok(qkv) and native.available():
        qkv, bias = qkv.contiguous(), bias.contiguous()
        if grad:
            return _NativeAttention.apply(qkv, bias)
        return fused._fastest(("attention", b, n, heads, d), 2 * b * heads * n * n * d, (
            ("sdpa", sdpa), ("native", lambda: native.attention_forward(qkv, bias, heads, d**-0.5, False)[0])))
    if grad and bias.requires_grad and qkv.device.type == "cpu" and plain_eager():
        return _formula(qkv, bias, dropout)
    return sdpa()


class RelAttention2d(nn.Module):
    """Multi-head self-attention over a 2-D token grid with a relative position bias (CoAtNet Eq. 3).

    Args:
        dim: input channels C_in.
        out_dim: attention width and output channels C_out (default ``dim``); heads = out_dim // head_dim.
        head_dim: channels per head (32 in CoAtNet-0..4, 64 in -5, 128 in -6/7).
        size: grid (H, W) of the relative-bias table (resized for other grids at run time).
        qkv_bias: bias in the q/k/v projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.

    The attention itself is :func:`attend`: on the CPU in fp32 hybridvision's native kernels (inference: or SDPA,
    whichever is faster for the shape), elsewhere ``F.scaled_dot_product_attention`` with ``B`` as the additive
    float mask.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        *,
        head_dim: int = 32,
        size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_dim = out_dim or dim
        if head_dim < 1 or out_dim % head_dim:
            raise ValueError(
                f"out_dim={out_dim} is not divisible by head_dim={head_dim}: choose a width that is a multiple "
                f"of the head size (CoAtNet uses head_dim 32, 64 or 128)"
            )
        self.dim, self.out_dim, self.head_dim = dim, out_dim, head_dim
        self.num_heads = out_dim // head_dim
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.rel_pos = RelPosBias2d(self.num_heads, size)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the grid.

        Args:
            x: (B, H, W, C_in), channels last (a token grid).
            shortcut: optional (B, H, W, C_out) added to the output (fused into the output projection on the
                CPU inference fast path, see :mod:`hybridvision.ops.fused`).

        Returns:
            (B, H, W, C_out): ``proj(attention) (+ shortcut)``.
        """
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"RelAttention2d expects (B, H, W, C={self.dim}) channels-last input, got shape {tuple(x.shape)}"
            )
        b, h, w, _ = x.shape
        n = h * w
        qkv = linear_act(x, self.qkv).reshape(b, n, 3, self.num_heads, self.head_dim)
        bias = self.rel_pos((h, w), dtype=qkv.dtype)  # (heads, N, N)
        y = attend(qkv, bias, self.attn_drop if self.training else 0.0)  # (B, N, heads, d)
        y = y.reshape(b, h, w, self.out_dim)
        if shortcut is None:
            return self.proj_drop(linear_act(y, self.proj))
        if (self.training and self.proj_drop.p > 0) or hooked(self.proj_drop):  # the fused add skips proj_drop
            return shortcut + self.proj_drop(linear_act(y, self.proj))
        return linear_add(y, self.proj, shortcut)
