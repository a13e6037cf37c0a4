"""BatchNorm2d in training mode followed by GELU (or nothing), as one native CPU kernel pair with autograd.

``batch_norm_act(x, bn, gelu=True)`` equals ``F.gelu(bn(x))`` (``bn(x)`` with ``gelu=False``), running statistics
and ``num_batches_tracked`` included. Eager PyTorch runs it as three ops forward (statistics, normalise, GELU) and
three passes backward, each reading or writing a full activation; the kernel (``csrc/batchnorm_act_cpu.cpp``) reads
x twice and writes y once forward, and backward makes two passes over the gradient and x (the first writes GELU's
gradient into the output buffer, the second turns it into the input gradient there); autograd keeps only x (the
normalised tensor is recomputed). CoAtNet's MBConv runs three of these per block, on its
widest activations.

The kernel runs when all of these hold, else the function computes the plain expression with torch's ops:
``bn`` is an ``nn.BatchNorm2d`` (exactly; subclasses such as timm's ``BatchNormAct2d`` and ``SyncBatchNorm`` keep their
own forward) in training mode with affine parameters and running statistics; x is a plain CPU float32/float64
(B, C, H, W) tensor in channels-last memory with more than one value per channel; plain eager execution
(:func:`hybridvision.ops.fused.plain_eager`: not compiling, exporting, under a dispatch mode or a torch.func
transform); ``bn`` has no hooks; the native kernels are available (``HYBRIDVISION_NATIVE=0`` turns them off). A double
backward differentiates the plain expression (:func:`hybridvision.ops.fused.grads_of_plain`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridvision.ops import native
from hybridvision.ops.fused import grads_of_plain, hooked, plain_eager

__all__ = ["batch_norm_act"]


class _BatchNormAct(torch.autograd.Function):
    """(x, weight, bias) -> (y, batch mean, biased batch var); gradients for x, weight and bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, gelu: bool):
        y, mean, var = native.batch_norm_act_forward(x, weight, bias, eps, gelu)
        ctx.save_for_backward(x, weight, bias, mean, torch.rsqrt(var + eps))
        ctx.gelu, ctx.eps = gelu, eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy: torch.Tensor, _gmean, _gvar):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again

            def plain(x, weight, bias):
                y = F.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps)
                return F.gelu(y) if ctx.gelu else y

            return grads_of_plain(plain, (x, weight, bias), ctx.needs_input_grad[:3], (gy,)) + (None, None)
        gy = gy.contiguous(memory_format=torch.channels_last)
        gx, gweight, gbias = native.batch_norm_act_backward(gy, x, weight, bias, mean, invstd, ctx.gelu)
        return gx, gweight, gbias, None, None


def _kernel_applies(x: torch.Tensor, bn: nn.Module) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and type(x) is torch.Tensor
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dtype == bn.weight.dtype
        and x.dim() == 4
        and x.numel() > x.size(1)  # more than one value per channel (torch's BatchNorm raises otherwise)
        and x.is_contiguous(memory_format=torch.channels_last)
        and plain_eager()
        and not hooked(bn)  # the kernel does not call bn: a hooked BatchNorm runs as itself
        and native.available()
    )


def batch_norm_act(x: torch.Tensor, bn: nn.BatchNorm2d, gelu: bool = True) -> torch.Tensor:
    """``F.gelu(bn(x))``, or ``bn(x)`` with ``gelu=False``. x: (B, C, H, W) -> (B, C, H, W)."""
    if not _kernel_applies(x, bn):
        y = bn(x)
        return F.gelu(y) if gelu else y
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    y, mean, var = _BatchNormAct.apply(x, bn.weight, bn.bias, bn.eps, gelu)
    n = x.numel() // x.size(1)
    with torch.no_grad():
        bn.running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
        bn.running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * n / (n - 1))
    return y
