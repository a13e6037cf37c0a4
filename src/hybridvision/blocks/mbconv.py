"""CoAtNet's convolution block: pre-norm MBConv with squeeze-excitation (Dai et al. 2021, Eq. 5 / Table 9).

    x <- Proj(Pool(x)) + Conv1x1(SE(DConv3x3(Conv1x1(BN(x)))))      (first block of a stage)
    x <- x + Conv1x1(SE(DConv3x3(Conv1x1(BN(x)))))                  (the others)

The inner convolutions are followed by BatchNorm + GELU (``hybridvision.ops.norm_act.batch_norm_act``). The
stride of a downsampling block sits on the first 1x1 (``stride_mode="1x1"``, the paper's Eq. 5; the expansion then
runs at the low resolution) or on the depthwise conv (``stride_mode="dw"``, Table 9 and timm's paper-like models).

All tensors are NCHW; the CoAtNet model keeps them in ``torch.channels_last`` memory format, which the CPU
(oneDNN) and GPU convolution kernels prefer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from hybridvision.ops.fused import conv2d, conv_act, conv_add, grads_of_plain, has_own_hooks, hooked, plain_eager
from hybridvision.ops.norm_act import batch_norm_act

__all__ = ["MBConv", "Downsample2d", "SqueezeExcite", "fold_prenorm_bn_into_conv1x1"]

POOLS = ("max", "avg")
STRIDE_MODES = ("1x1", "dw")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not supported; choose one of {choices}")


class Downsample2d(nn.Module):
    """Shortcut of a downsampling / widening block: Proj(Pool(x)).

    Args:
        in_chs, out_chs: channels; the 1x1 projection exists only when they differ.
        stride: pooling window and stride (1 = no pooling).
        pool: "max" (CoAtNet default) or "avg" (timm's paper-like models).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2, pool: str = "max") -> None:
        super().__init__()
        _check_choice(pool, POOLS, "pool")
        self.stride = stride
        self.pool = pool
        self.proj = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        if self.stride > 1:
            pool = nn.functional.max_pool2d if self.pool == "max" else nn.functional.avg_pool2d
            x = pool(x, self.stride, self.stride)
        return conv2d(x, self.proj)


class _SqueezeExciteFn(torch.autograd.Function):
    """``x * gate(mean(x))``, x: (B, C, H, W), with a backward that writes two x-sized tensors instead of four.

    Autograd's own backward of the expression materialises ``g * gate``, ``g * x``, the mean's expanded gradient
    and their sum. Here: ``d gate = sum_hw(g * x)``, then the small MLP's backward (recomputed from the pooled
    (B, C) vector), then ``dx = g * gate + d pooled / (H W)`` in one ``addcmul``. The MLP is ``module.gate`` of the
    SqueezeExcite whose parameters come in as ``params``. A double backward (``create_graph=True``) differentiates
    the plain expression instead (:func:`hybridvision.ops.fused.grads_of_plain`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "SqueezeExcite", *params: torch.Tensor) -> torch.Tensor:
        pooled = x.mean((2, 3))
        gate = module.gate(pooled)
        ctx.module = module
        dev = x.device.type  # the MLP is recomputed under the same autocast state (bf16 training)
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, pooled, *params)
        return x * gate[:, :, None, None]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, pooled, *params = ctx.saved_tensors
        dev, amp, amp_dtype = ctx.autocast
        if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again

            def plain(x, *params):
                with torch.autocast(dev, dtype=amp_dtype, enabled=amp):
                    return x * ctx.module.gate(x.mean((2, 3)), list(params))[:, :, None, None]

            needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])  # (the module argument has none)
            gx, *g_params = grads_of_plain(plain, (x, *params), needs, (g,))
            return (gx, None, *g_params)
        with torch.enable_grad(), torch.autocast(dev, dtype=amp_dtype, enabled=amp):  # the MLP again, own leaves
            p = pooled.detach().requires_grad_()
            leaves = [w.detach().requires_grad_(w.requires_grad) for w in params]
            gate = ctx.module.gate(p, leaves)
        d_gate = (g * x).sum((2, 3))
        need = [p] + [w for w in leaves if w.requires_grad]
        grads = iter(torch.autograd.grad(gate, need, d_gate))
        d_pooled = next(grads)
        d_params = [next(grads) if w.requires_grad else None for w in leaves]
        dx = None
        if ctx.needs_input_grad[0]:
            hw = x.shape[2] * x.shape[3]
            dx = torch.addcmul((d_pooled / hw)[:, :, None, None], g, gate.detach()[:, :, None, None])
        return (dx, None, *d_params)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation with its two FCs as ``nn.Linear`` on the pooled (B, C) vector.

    Same math as timm's ``SEModule`` (GAP -> FC -> act -> FC -> sigmoid gate), which runs the FCs as 1x1
    convs on a (B, C, 1, 1) map; on CPU each of those calls pays oneDNN's weight reorder, which made SE
    one of the most expensive ops of CoAtNet-0 inference in our profile. A GEMM has no such cost.
    In plain eager training the whole block is one autograd Function (:class:`_SqueezeExciteFn`) whose backward
    makes fewer passes over the (large) input.
    """

    def __init__(self, channels: int, rd_channels: int, act_layer: type[nn.Module] = nn.SiLU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, rd_channels)
        self.act = act_layer()
        self.fc2 = nn.Linear(rd_channels, channels)

    def gate(self, pooled: torch.Tensor, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C) pooled input -> (B, C) gate in (0, 1) through ``fc1``, ``act``, ``fc2``; ``params`` (fc1 weight,
        bias, fc2 weight, bias) replace the FCs' own parameters (the Function's backward recomputes on leaves)."""
        if params is None:
            return self.fc2(self.act(self.fc1(pooled))).sigmoid()
        w1, b1, w2, b2 = params
        return F.linear(self.act(F.linear(pooled, w1, b1)), w2, b2).sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> x * gate, gate: (B, C, 1, 1) in (0, 1)."""
        # the Function's backward recomputes the MLP without calling the modules: hooked ones take the plain path
        if torch.is_grad_enabled() and plain_eager() and not hooked(self.fc1, self.act, self.fc2):
            return _SqueezeExciteFn.apply(x, self, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return x * self.gate(x.mean((2, 3)))[:, :, None, None]


@torch.no_grad()
def fold_prenorm_bn_into_conv1x1(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """A 1x1 conv equal to ``conv(bn(x))`` for an eval-mode BatchNorm (exact: a 1x1 conv has no padding).

    conv(s * x + t) = (W * s) x + W t + b with s = gamma / sqrt(var + eps), t = beta - mean * s.
    """
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError(f"pre-norm folding needs a dense 1x1 conv, got kernel {conv.kernel_size}, groups {conv.groups}")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=True,
        device=conv.weight.device, dtype=conv.weight.dtype,
    ).train(conv.training)
    w = conv.weight[:, :, 0, 0]
    fused.weight.copy_((w * scale[None, :])[:, :, None, None])
    fused.bias.copy_(w @ shift + (conv.bias if conv.bias is not None else 0.0))
    return fused


class MBConv(nn.Module):
    """Pre-norm inverted-bottleneck block with SE (CoAtNet's "C" block).

    Args:
        in_chs, out_chs: channels in and out.
        stride: 1, or 2 for the first block of a stage (then the shortcut is Proj(Pool(x))).
        expansion: inner width = ``out_chs * expansion`` (4 in the paper).
        se_ratio: SE bottleneck = ``out_chs * se_ratio`` channels (0.25).
        stride_mode: "1x1" (stride on the expansion conv, paper Eq. 5) or "dw" (on the depthwise conv).
        pool: pooling of the downsampling shortcut, "max" or "avg".
        drop_path: stochastic-depth rate of the residual branch.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int = 1,
        expansion: int = 4,
        se_ratio: float = 0.25,
        stride_mode: str = "1x1",
        pool: str = "max",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        _check_choice(stride_mode, STRIDE_MODES, "stride_mode")
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        mid = out_chs * expansion
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.fused = False
        self.shortcut = (
            Downsample2d(in_chs, out_chs, stride, pool) if stride > 1 or in_chs != out_chs else nn.Identity()
        )
        self.norm = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, stride=stride if stride_mode == "1x1" else 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(
            mid, mid, 3, stride=stride if stride_mode == "dw" else 1, padding=1, groups=mid, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, max(1, int(out_chs * se_ratio)))
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        # BNs folded: conv+GELU and conv+add are single oneDNN calls on CPU. The expression below gives the same
        # with the Identity left where each BN was; it runs when those (or drop_path) have hooks to call.
        if self.fused and not self.training and not hooked(self.norm, self.bn1, self.bn2, self.drop_path):
            y = conv_act(conv_act(x, self.conv1), self.conv2)
            return conv_add(self.se(y), self.conv3, self.shortcut(x))
        # BN (+ GELU): one native kernel pair per norm when training on CPU (hybridvision.ops.norm_act)
        # convs: each backward kernel picked by timing when training on CPU (hybridvision.ops.fused.conv2d)
        y = batch_norm_act(conv2d(batch_norm_act(x, self.norm, gelu=False), self.conv1), self.bn1)
        y = batch_norm_act(conv2d(y, self.conv2), self.bn2)
        y = conv2d(self.se(y), self.conv3)
        return self.shortcut(x) + self.drop_path(y)

    @torch.no_grad()
    def fuse(self) -> "MBConv":
        """Fold the three BatchNorms into the convs (eval statistics; exact up to float rounding).

        The block becomes Conv1x1+GELU -> DWConv+GELU -> SE -> Conv1x1; meant for inference
        (the BN layers are gone, so training it afterwards trains the folded convs).
        """
        if self.fused:
            return self
        if self.norm.training or self.bn1.training or self.bn2.training:
            raise RuntimeError("MBConv.fuse() folds eval-mode BatchNorm statistics: call model.eval() first")
        refuse_to_fold_hooked(self, ("norm", "bn1", "bn2"))
        conv1 = fold_prenorm_bn_into_conv1x1(self.norm, self.conv1)
        self.conv1 = fuse_conv_bn_eval(conv1, self.bn1)
        self.conv2 = fuse_conv_bn_eval(self.conv2, self.bn2)
        self.norm, self.bn1, self.bn2 = nn.Identity(), nn.Identity(), nn.Identity()
        self.fused = True
        return self


def refuse_to_fold_hooked(owner: nn.Module, names: tuple[str, ...]) -> None:
    """Raise before ``fuse()`` replaces a BatchNorm that carries hooks (they would silently stop firing).

    ``names``: attributes of ``owner`` (dotted for nested ones, e.g. ``"norms.0"``) that the fold removes.
    """
    hooked_bns = [n for n in names if has_own_hooks(owner.get_submodule(n))]
    if hooked_bns:
        raise RuntimeError(
            f"fuse() would fold {hooked_bns} of {type(owner).__name__} into the adjacent convs, but they have hooks "
            f"registered, which would stop firing: remove those hooks first (or register them after fuse())"
        )
