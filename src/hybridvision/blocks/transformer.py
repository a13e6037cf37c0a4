"""CoAtNet's attention block: pre-norm Transformer with 2-D relative attention (Dai et al. 2021, Eq. 3-4).

    x <- Proj(Pool(x)) + Attn(Pool(LN(x)))     (first block of a stage: stride 2 and/or new width)
    x <- x + Attn(LN(x))                         (the others)
    x <- x + FFN(LN(x))                          (FFN: Linear(C, 4C) -> GELU -> Linear(4C, C))

The block takes and returns NCHW tensors (the model keeps them channels-last in memory); inside it works on
the (B, H, W, C) token grid obtained by a free permute of a channels-last tensor, so LayerNorm, the q/k/v,
output and FFN projections are plain GEMMs with no layout copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from hybridvision.ops.attention import RelAttention2d
from hybridvision.ops.fused import hooked, linear_act, linear_add, plain_eager

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block over a 2-D grid with a relative position bias (CoAtNet's "T" block).

    Args:
        in_chs, out_chs: channels in and out (attention width = out_chs, heads = out_chs // head_dim).
        size: (H, W) of the grid this block sees at the model's nominal resolution (sizes the bias table;
            other grids resize it).
        stride: 1, or 2 for the first block of a stage (max/avg-pool 2 on both branches).
        head_dim: channels per head.
        mlp_ratio: FFN hidden width = out_chs * mlp_ratio.
        pool: "max" (paper) or "avg".
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        size: int | tuple[int, int],
        stride: int = 1,
        head_dim: int = 32,
        mlp_ratio: int = 4,
        pool: str = "max",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool={pool!r} is not supported; choose 'max' or 'avg'")
        if stride not in (1, 2):
            raise ValueError(f"TransformerBlock stride must be 1 or 2, got {stride}")
        self.in_chs, self.out_chs, self.stride, self.pool = in_chs, out_chs, stride, pool
        self.norm1 = nn.LayerNorm(in_chs)
        self.attn = RelAttention2d(in_chs, out_chs, head_dim=head_dim, size=size)
        self.proj = nn.Linear(in_chs, out_chs) if in_chs != out_chs else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(out_chs)
        self.mlp = Mlp(out_chs, out_chs * mlp_ratio, act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B, H, W, C) -> (B, H/2, W/2, C); pooled as a channels-last NCHW view (no copy)."""
        if self.stride == 1:
            return t
        pool = F.max_pool2d if self.pool == "max" else F.avg_pool2d
        return pool(t.permute(0, 3, 1, 2), self.stride, self.stride).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride), channels-last in memory."""
        t = x.permute(0, 2, 3, 1).contiguous()  # a no-op for channels-last input
        shortcut = self._pool(t)
        if isinstance(self.proj, nn.Linear):
            shortcut = linear_act(shortcut, self.proj)
        # In eval mode the residual adds and the GELU ride on the GEMMs of the CPU inference fast path (drop paths
        # are identities then), and the MLP runs as fc1 -> GELU -> fc2 (its dropouts and norm are no-ops); modules
        # with hooks to call are called instead.
        if self.training or hooked(self.drop_path1):
            t = shortcut + self.drop_path1(self.attn(self._pool(self.norm1(t))))
        else:
            t = self.attn(self._pool(self.norm1(t)), shortcut=shortcut)
        chain = plain_eager() and not hooked(self.mlp, *self.mlp.children())  # (timm's Mlp: leaf children)
        if chain and not self.training and not hooked(self.drop_path2):
            t = linear_add(linear_act(self.norm2(t), self.mlp.fc1, gelu=True), self.mlp.fc2, t)
        else:
            u = self.norm2(t)
            u = linear_act(linear_act(u, self.mlp.fc1, gelu=True), self.mlp.fc2) if chain else self.mlp(u)
            t = t + self.drop_path2(u)
        return t.permute(0, 3, 1, 2)
