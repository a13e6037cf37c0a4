"""CPU inference fast path (torch only): one oneDNN call for conv/linear + GELU, and for conv/linear + residual add.

PyTorch ships these fused kernels for its own compiler (``torch.ops.mkldnn._convolution_pointwise`` and
``_linear_pointwise``, the ops Inductor emits on CPU); called eagerly they save a pass over every activation
(the GELU or the residual add runs as a oneDNN post-op) and, for linears, replace ``addmm`` with oneDNN's GEMM.
They have no autograd formula, so the fused forms run only where nothing needs a gradient (with autograd on,
``linear_act`` runs its GEMMs, forward and backward, through oneDNN in a small autograd Function):

* grad mode off (``torch.no_grad`` / ``torch.inference_mode``), fp32, CPU, a plain ``torch.Tensor``
  (not a FakeTensor or another subclass), oneDNN available;
* not while scripting, compiling (``torch.compile`` does its own fusion), exporting or in ONNX export, and not
  under a Python dispatch mode (``FlopCounterMode`` counts the plain ops, ``FakeTensorMode`` traces them);
* the module has no hooks (:func:`hooked`): the fused forms use its parameters without calling it, so a module with
  forward / backward hooks (its own or global ones) is called instead and its hooks see what they expect.

Everywhere else the same functions compute the identical eager expression (``F.gelu(conv(x))``, ...), so callers
never branch. ``fast_path_enabled(False)`` turns the oneDNN path off globally (e.g. to compare).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["use_onednn", "fast_path_enabled", "plain_eager", "in_func_transform", "hooked", "has_own_hooks",
           "grads_of_plain", "conv_act", "conv_add", "linear_act", "linear_add"]

_ENABLED = True


def fast_path_enabled(enabled: bool | None = None) -> bool:
    """Get (no argument) or set the global switch of the oneDNN inference path; returns the current value."""
    global _ENABLED
    if enabled is not None:
        _ENABLED = bool(enabled)
    return _ENABLED


def _plain_cpu_f32(t: torch.Tensor) -> bool:
    """A plain (not subclassed) float32 CPU tensor: what the oneDNN kernels take."""
    return type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32


def in_func_transform() -> bool:
    """Inside a ``torch.func`` transform (``grad``, ``vmap``, ...), which rejects autograd Functions without
    ``setup_context`` (and, under ``vmap``, channels-last clones). False under ``torch.compile``, whose tracing
    also shows functorch's interpreter stack."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def plain_eager() -> bool:
    """Plain eager execution: not scripting, compiling (``torch.compile`` does its own fusion), exporting or in ONNX
    export, no Python dispatch mode (``FlopCounterMode``, ``FakeTensorMode``, ... must see the plain ops) and no
    ``torch.func`` transform (``grad``, ``vmap``, ...: they reject autograd Functions without ``setup_context``).
    Hand-written kernels and autograd Functions without a meta or export formula run only then."""
    return (
        not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not torch.onnx.is_in_onnx_export()
        and _get_current_dispatch_mode() is None
        and not in_func_transform()
    )


def has_own_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself carries forward or backward (pre-)hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def hooked(*modules: nn.Module) -> bool:
    """Whether calling any of ``modules`` would run hooks: its own or global (``nn.modules.module.register_module_*``)
    forward / backward (pre-)hooks, the test ``nn.Module.__call__`` makes. Code that computes a module's output from
    its parameters without calling it (the fused kernels, the SE Function, the chained Transformer MLP) calls the
    module instead when this is True, so hook-based tools (torchinfo, thop, timm's ``FeatureHooks`` and activation
    statistics, Grad-CAM on inner layers) see every module."""
    m = _nn_module
    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks \
            or m._global_backward_pre_hooks:
        return True
    return any(has_own_hooks(mod) for mod in modules)


def grads_of_plain(plain, inputs: tuple, needs: tuple, grads: tuple) -> tuple:
    """The backward of a hand-written autograd Function when a double backward is asked for.

    Grad mode is on inside a Function's backward only under ``create_graph=True`` (gradient penalties, double
    backprop); the hand-written first-order formulas then step aside for autograd through ``plain(*inputs)``, the
    Function's forward written as plain differentiable ops, with ``create_graph``, so the result can be
    differentiated again. ``inputs``: the Function's tensor inputs as saved (None where absent; the saved inputs
    keep their graph); ``needs``: ``ctx.needs_input_grad`` for them; ``grads``: the gradients of the outputs that
    ``plain`` returns (a tuple, in order). Returns one gradient or None per input.
    """
    with torch.enable_grad():
        out = plain(*inputs)
    wanted = [t for t, need in zip(inputs, needs) if need]
    got = iter(torch.autograd.grad(out if isinstance(out, tuple) else (out,), wanted, grads, create_graph=True,
                                   allow_unused=True))
    return tuple(next(got) if need else None for need in needs)


def _onednn_ok(x: torch.Tensor) -> bool:
    # plain_eager() first: under torch.compile it is False before torch.backends.mkldnn.is_available(), which
    # Dynamo does not trace, would break the graph
    return _ENABLED and plain_eager() and _plain_cpu_f32(x) and torch.backends.mkldnn.is_available()


def use_onednn(x: torch.Tensor) -> bool:
    """Whether the fused (gradient-free) oneDNN kernels may run on ``x`` (conditions: module docstring)."""
    return not torch.is_grad_enabled() and _onednn_ok(x)


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T with oneDNN. a: (M, K), b: (N, K), either may be a strided view (e.g. a transpose) -> (M, N)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with every GEMM (forward, grad input, grad weight) run by oneDNN (fp32 CPU).

    On the CPUs we measured, oneDNN's GEMM ran ~2.5x the FLOP/s of ``torch.mm`` (benchmarks/bench_models.py
    prints both peaks), so training steps gain too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
            return grads_of_plain(F.linear, (x, weight, bias), ctx.needs_input_grad, (grad,))
        g = grad.reshape(-1, grad.shape[-1]).contiguous()
        gx = gw = gb = None
        # the transposed operands go in as views: oneDNN reads them strided, no transposed copies
        if ctx.needs_input_grad[0]:
            gx = _gemm(g, weight.t()).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = _gemm(g.t(), x.reshape(-1, x.shape[-1]).t())
        if bias is not None and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def _conv_args(conv: nn.Conv2d) -> tuple:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"fused conv needs numeric zero padding, got {conv.padding!r} / {conv.padding_mode!r}")
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_act(x: torch.Tensor, conv: nn.Conv2d, gelu: bool = True) -> torch.Tensor:
    """``F.gelu(conv(x))`` (or ``conv(x)``). x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    if use_onednn(x) and not hooked(conv):
        pad, stride, dil, groups = _conv_args(conv)
        attr, algo = ("gelu", "none") if gelu else ("none", "")
        return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, pad, stride, dil, groups, attr, [], algo)
    y = conv(x)
    return F.gelu(y) if gelu else y


def conv_add(x: torch.Tensor, conv: nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    """``conv(x) + other``. x: (B, C_in, H, W); other: (B, C_out, H', W') -> (B, C_out, H', W')."""
    if use_onednn(x) and _plain_cpu_f32(other) and other.is_contiguous(memory_format=torch.channels_last) \
            and x.is_contiguous(memory_format=torch.channels_last) and not hooked(conv):
        pad, stride, dil, groups = _conv_args(conv)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, conv.weight, conv.bias, pad, stride, dil, groups, "add", 1.0, None, [], None
        )
    return conv(x) + other


def linear_act(x: torch.Tensor, linear: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``F.gelu(linear(x))`` or ``linear(x)``. x: (..., C_in) -> (..., C_out)."""
    if _onednn_ok(x) and x.is_contiguous() and not hooked(linear):
        if not torch.is_grad_enabled():
            attr, algo = ("gelu", "none") if gelu else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, attr, [], algo)
        y = _OneDNNLinear.apply(x, linear.weight, linear.bias)
    else:
        y = linear(x)
    return F.gelu(y) if gelu else y


def linear_add(x: torch.Tensor, linear: nn.Linear, other: torch.Tensor) -> torch.Tensor:
    """``linear(x) + other``. x: (..., C_in); other: (..., C_out) -> (..., C_out)."""
    if use_onednn(x) and _plain_cpu_f32(other) and x.is_contiguous() and other.is_contiguous() and not hooked(linear):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, linear.weight, linear.bias, "add")
    return linear(x) + other
