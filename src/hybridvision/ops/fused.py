"""CPU inference fast path (torch only): one oneDNN call for conv/linear + GELU, and for conv/linear + residual add.

PyTorch ships these fused kernels for its own compiler (``torch.ops.mkldnn._convolution_pointwise`` and
``_linear_pointwise``, the ops Inductor emits on CPU); called eagerly they save a pass over every activation
(the GELU or the residual add runs as a oneDNN post-op) and, for linears, replace ``addmm`` with oneDNN's GEMM.
They have no autograd formula, so the fused forms run only where nothing needs a gradient (with autograd on,
``linear_act`` runs its GEMMs, forward and backward, in a small autograd Function, and so does :func:`conv2d`, which
picks each backward kernel as below):

* grad mode off (``torch.no_grad`` / ``torch.inference_mode``), fp32, CPU, a plain ``torch.Tensor``
  (not a FakeTensor or another subclass), no CPU autocast, oneDNN available;
* not while scripting, compiling (``torch.compile`` does its own fusion), exporting or in ONNX export, and not
  under a Python dispatch mode (``FlopCounterMode`` counts the plain ops, ``FakeTensorMode`` traces them);
* the module has no hooks (:func:`hooked`): the fused forms use its parameters without calling it, so a module with
  forward / backward hooks (its own or global ones) is called instead and its hooks see what they expect.

Everywhere else the same functions compute the identical eager expression (``F.gelu(conv(x))``, ...), so callers
never branch. ``fast_path_enabled(False)`` turns the oneDNN path off globally (e.g. to compare).

Which kernel is fastest depends on the CPU: on AVX-512 machines oneDNN's GEMM ran up to ~2x MKL's ``torch.mm``
(MKL takes its AVX2 code on AMD CPUs), on an AVX2-only EPYC MKL ran 1.1-1.7x oneDNN's on the backward's transposed
operands and oneDNN's GELU post-op cost more than a separate GELU. So each fused op has its plain form as an
alternative and, the first time a shape is seen in a process, every alternative is timed (3 alternating rounds,
best of each, each timed call right after an untimed call of the same alternative) and the fastest is used for
that shape and thread count (:func:`tuned_choices` lists them). (The benchmarks' protocol: on the development VM
a kernel's first calls in a process ran 2-3x its later time, page faults of fresh output memory among the causes,
and before the untimed calls the native circular conv's tuning once chose its direct sum, 1.9x the FFT's time, at
L=56 along W; scratch.) The
shape is timed once more at its first call :data:`RETIME_AFTER_S` seconds later, and the fastest over both timings
is kept for good: a process's first steps grow the heap and fault fresh pages in, and in the first CoAtNet-0
training step on an AVX-512 EPYC whole stretches of calls ran 3-40x slow (oneDNN and the alternatives alike), so
the one timing chose MKL GEMMs at half oneDNN's speed for up to 4 of 75 shapes; re-timed, every changed choice went
to the faster kernel (scratch runs). Ops below :data:`MIN_TUNED_MACS` multiply-adds are not timed (the first
alternative runs). Every alternative computes the same expression up to fp32 rounding, but two processes may pick
different ones: for bitwise-repeatable runs, ``torch.use_deterministic_algorithms(True)``,
``HYBRIDVISION_AUTOTUNE=0`` or ``autotune(False)`` fix the choice to the first alternative (the oneDNN kernel), also
for shapes chosen before they were set.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules import module as _nn_module
from torch.utils._python_dispatch import _get_current_dispatch_mode

from hybridvision.ops import native

__all__ = ["use_onednn", "fast_path_enabled", "autotune", "tuned_choices", "MIN_TUNED_MACS", "RETIME_AFTER_S",
           "plain_eager", "in_func_transform", "in_onnx_export", "records_grad", "EvalCache", "hooked", "has_own_hooks",
           "grads_of_plain", "conv2d", "conv_act", "conv_add", "linear_act", "linear_add"]

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


_ONNX_FLAGS: Optional[tuple[Any, ...]] = None  # in_onnx_export: the exporters' flag holders, () where not found


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without its two imports per call: the flags it reads (its body in torch
    2.13), looked up once; where a torch release has moved them, the function itself. (0.05 against 0.93 us a call,
    ``timeit``; the checks of a ParC layer's eval forward ran it three times, 2.8 us of its 41 us at batch 1, C=96,
    K=14.)"""
    global _ONNX_FLAGS
    if torch.compiler.is_compiling():  # Dynamo traces torch's function (a constant to it), not the private modules
        return torch.onnx.is_in_onnx_export()
    if _ONNX_FLAGS is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
            _ONNX_FLAGS = (GLOBALS, _flags) if hasattr(GLOBALS, "in_onnx_export") and hasattr(
                _flags, "_is_onnx_exporting") else ()
        except ImportError:
            _ONNX_FLAGS = ()
    if not _ONNX_FLAGS:
        return torch.onnx.is_in_onnx_export()
    return _ONNX_FLAGS[0].in_onnx_export or _ONNX_FLAGS[1]._is_onnx_exporting


def plain_eager() -> bool:
    """Plain eager execution: not scripting, compiling (``torch.compile`` does its own fusion), exporting or in ONNX
    export, no Python dispatch mode (``FlopCounterMode``, ``FakeTensorMode``, ... must see the plain ops) and no
    ``torch.func`` transform (``grad``, ``vmap``, ...: they reject autograd Functions without ``setup_context``).
    Hand-written kernels and autograd Functions without a meta or export formula run only then."""
    return (
        not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and not in_onnx_export()
        and _get_current_dispatch_mode() is None
        and torch._C._functorch.peek_interpreter_stack() is None  # in_func_transform() (not compiling: checked)
    )


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record an op on ``tensors`` (grad mode on and one of them requires grad) or forward-mode
    AD is active (dual tensors do not show in ``requires_grad``); when neither, a Function's forward may run without
    ``Function.apply`` (whose bookkeeping costs several microseconds per call), and tensors derived from them may be
    cached (:class:`EvalCache`)."""
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class EvalCache(nn.Module):
    """Base of modules that keep tensors derived from their parameters for inference (RelPosBias2d's bias, ParC2d's
    resized kernel and PE term).

    :meth:`cache_applies` says whether a cached value may stand in for the computation: eval mode, nothing records a
    gradient of the parameters, plain eager execution (under ``torch.compile`` / export the computation stays in the
    traced graph). :meth:`cached` keys each value by the caller's key, the parameters' storage and version counter (an
    in-place update is seen) and whether inference mode is on (its tensors may not be used outside it). The cache is
    dropped by ``train()``, ``load_state_dict``, ``.to()`` / ``.half()`` / ``.cuda()`` and by assigning a tensor
    attribute (a replaced parameter: its storage address may be an old one's), and holds at most :attr:`MAX_CACHE`
    entries.
    """

    MAX_CACHE = 8

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[Any, ...], Any] = {}

    def cache_applies(self, *params: Optional[torch.Tensor]) -> bool:
        return not self.training and not records_grad(*params) and plain_eager()

    def cached(self, key: tuple[Any, ...], params: tuple[Optional[torch.Tensor], ...], compute: Callable[[], Any]) -> Any:
        """``compute()`` (run under ``torch.no_grad``) for ``key`` and the current ``params``, from the cache when
        there; call where :meth:`cache_applies`."""
        key = (*key, torch.is_inference_mode_enabled(),
               *((p.data_ptr(), p._version) if p is not None else None for p in params))
        value = self._cache.get(key)
        if value is None:
            with torch.no_grad():
                value = compute()
            if len(self._cache) >= self.MAX_CACHE:
                self._cache.clear()
            self._cache[key] = value
        return value

    def clear_cache(self) -> None:
        """Drop every cached value."""
        self._cache.clear()

    def train(self, mode: bool = True) -> "EvalCache":
        self._cache.clear()
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> "EvalCache":
        self._cache.clear()  # .to()/.half()/.cuda(): cached tensors would keep the old storage alive
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor) and "_cache" in self.__dict__:
            self._cache.clear()
        super().__setattr__(name, value)


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


MIN_TUNED_MACS = 1 << 24
"""Ops with fewer multiply-adds than this (~0.1-0.2 ms on a 2-core CPU) run their first alternative untimed."""
_AUTOTUNE_ENV = "HYBRIDVISION_AUTOTUNE"
_AUTOTUNE: bool | None = None  # None: on unless HYBRIDVISION_AUTOTUNE=0
_TUNE_ROUNDS = 3
RETIME_AFTER_S = 2.0
"""A shape's choice is timed again at its first call this many seconds after the first timing (module docstring)."""
_CHOICES: dict[tuple, tuple[int, str]] = {}  # key -> (index, name) of the fastest alternative
_PENDING: dict[tuple, tuple[float, list[float]]] = {}  # key -> (when first timed, best s of each alternative)
Alternatives = tuple[tuple[str, Callable[[], torch.Tensor]], ...]


def autotune(enabled: bool | None = None) -> bool:
    """Get (no argument) or set whether fused ops pick their kernel by timing (module docstring); setting it clears
    the choices made so far. Off while ``torch.are_deterministic_algorithms_enabled()`` and, unless set here, when
    the environment variable ``HYBRIDVISION_AUTOTUNE=0``."""
    global _AUTOTUNE
    if enabled is not None:
        _AUTOTUNE = bool(enabled)
        _CHOICES.clear()
        _PENDING.clear()
    on = _AUTOTUNE if _AUTOTUNE is not None else os.environ.get(_AUTOTUNE_ENV, "1") != "0"
    return on and not torch.are_deterministic_algorithms_enabled()


def tuned_choices() -> dict[tuple, str]:
    """The kernels chosen so far in this process: ``{(op, shapes..., threads): alternative name}``."""
    return {key: name for key, (_, name) in _CHOICES.items()}


def _fastest(key: tuple, macs: int, alternatives: Alternatives) -> torch.Tensor:
    """Run the fastest of ``alternatives`` (``(name, thunk)`` pairs computing the same tensor) for ``key``, timing them
    all the first time the key is seen and once more :data:`RETIME_AFTER_S` later (:func:`autotune`); returns the
    thunk's result."""
    if not autotune():  # also for keys chosen before tuning was switched off or determinism on
        return alternatives[0][1]()
    key = key + (torch.get_num_threads(),)
    choice = _CHOICES.get(key)
    if choice is not None:
        pending = _PENDING.get(key)
        if pending is None or time.perf_counter() - pending[0] < RETIME_AFTER_S:
            return alternatives[choice[0]][1]()
        del _PENDING[key]
        best = pending[1]
    elif macs < MIN_TUNED_MACS:
        return alternatives[0][1]()
    else:
        best = [float("inf")] * len(alternatives)
    outs: list[torch.Tensor | None] = [None] * len(alternatives)
    for r in range(_TUNE_ROUNDS):
        order = range(len(alternatives)) if r % 2 == 0 else reversed(range(len(alternatives)))
        for i in order:
            alternatives[i][1]()  # untimed: each timing directly follows a call of the same alternative (module doc)
            t0 = time.perf_counter()
            outs[i] = alternatives[i][1]()
            best[i] = min(best[i], time.perf_counter() - t0)
    i = min(range(len(alternatives)), key=best.__getitem__)
    if choice is None:
        _PENDING[key] = (time.perf_counter(), best)
    _CHOICES[key] = (i, alternatives[i][0])
    return outs[i]


def _onednn_ok(x: torch.Tensor) -> bool:
    # plain_eager() first: under torch.compile it is False before torch.backends.mkldnn.is_available(), which
    # Dynamo does not trace, would break the graph
    # under CPU autocast the modules' own ops run (autocast picks their dtype; the fp32 kernels here would not)
    return _ENABLED and plain_eager() and _plain_cpu_f32(x) and not torch.is_autocast_enabled("cpu") \
        and torch.backends.mkldnn.is_available()


def use_onednn(x: torch.Tensor) -> bool:
    """Whether the fused (gradient-free) oneDNN kernels may run on ``x`` (conditions: module docstring)."""
    return not torch.is_grad_enabled() and _onednn_ok(x)


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T with oneDNN. a: (M, K), b: (N, K), either may be a strided view (e.g. a transpose) -> (M, N)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool) -> torch.Tensor:
    """``F.linear`` (+ GELU) by the fastest of oneDNN (GELU as its post-op or apart) and MKL (``F.linear``).
    x: (..., K) contiguous, weight: (N, K) -> (..., N)."""
    n, k = weight.shape
    m = x.numel() // k

    def onednn(act: bool) -> torch.Tensor:
        attr, algo = ("gelu", "none") if act else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algo)

    if gelu:
        alternatives = (("onednn+gelu", lambda: onednn(True)), ("onednn, gelu", lambda: F.gelu(onednn(False))),
                        ("mkl, gelu", lambda: F.gelu(F.linear(x, weight, bias))))
    else:
        alternatives = (("onednn", lambda: onednn(False)), ("mkl", lambda: F.linear(x, weight, bias)))
    return _fastest(("linear", m, k, n, bias is not None, gelu), m * k * n, alternatives)


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` (fp32 CPU) with each GEMM (forward, grad input, grad weight) by oneDNN or MKL, the faster for
    its shape (module docstring): on AVX-512 CPUs oneDNN's GEMM ran up to ~2x ``torch.mm``'s, on an AVX2-only
    EPYC MKL ran the transposed-operand GEMMs of the backward 1.1-1.7x faster (benchmarks/bench_models.py prints
    both peaks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        return _linear(x, weight, bias, gelu=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
            return grads_of_plain(F.linear, (x, weight, bias), ctx.needs_input_grad, (grad,))
        g = grad.reshape(-1, grad.shape[-1]).contiguous()
        x2 = x.reshape(-1, x.shape[-1])
        (m, n), k = g.shape, x2.shape[1]
        gx = gw = gb = None
        # the transposed operands go in as views: both libraries read them strided, no transposed copies
        if ctx.needs_input_grad[0]:
            gx = _fastest(("linear_gx", m, k, n), m * k * n,
                          (("onednn", lambda: _gemm(g, weight.t())), ("mkl", lambda: torch.mm(g, weight))))
            gx = gx.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = _fastest(("linear_gw", m, k, n), m * k * n,
                          (("onednn", lambda: _gemm(g.t(), x2.t())), ("mkl", lambda: torch.mm(g.t(), x2))))
        if bias is not None and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def _conv_args(conv: nn.Conv2d) -> tuple:
    """(padding, stride, dilation, groups) of ``conv``, the first three as tuples of two ints."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"fused conv needs numeric zero padding, got {conv.padding!r} / {conv.padding_mode!r}")
    return tuple(conv.padding), tuple(conv.stride), tuple(conv.dilation), conv.groups


def _conv_key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple, stride: tuple,
              dilation: tuple, groups: int) -> tuple:
    """What decides a conv kernel's speed: shapes, bias, padding, stride, dilation, groups."""
    return tuple(x.shape), tuple(weight.shape), bias is not None, padding, stride, dilation, groups


def _conv_macs(x: torch.Tensor, weight: torch.Tensor, stride: tuple) -> int:
    """Multiply-adds of a conv of x (B, C_in, H, W) by weight (C_out, C_in / groups, kh, kw) (the output size taken
    as H, W over the strides)."""
    return x.shape[0] * weight.numel() * (x.shape[2] // stride[0]) * (x.shape[3] // stride[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels-last -> its (B*H*W, C) rows, a view."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_rows(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B*H*W, C) rows -> (B, C, H, W) channels-last view, B, H, W taken from ``like``."""
    b, _, h, w = like.shape
    return m.view(b, h, w, m.shape[1]).permute(0, 3, 1, 2)


def _native_dw3x3(x: torch.Tensor, weight: torch.Tensor, stride: tuple, padding: tuple, dilation: tuple,
                  groups: int) -> bool:
    """Whether hybridvision's depthwise 3x3 kernel (``ops/csrc/depthwise_cpu.cpp``) computes this conv: one channel
    per group, 3x3, padding 1, stride 1 or 2 on both axes, no dilation, channels-last input, kernels built."""
    return (groups == x.shape[1] == weight.shape[0] and weight.shape[1:] == (1, 3, 3) and padding == (1, 1)
            and dilation == (1, 1) and stride in ((1, 1), (2, 2))
            and x.is_contiguous(memory_format=torch.channels_last) and native.available())


def _pointwise(weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """A dense 1x1 conv with stride 1 and no padding: a GEMM on the channels-last rows."""
    return weight.shape[2:] == (1, 1) and stride == (1, 1) and padding == (0, 0) and groups == 1


def _pointwise_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A pointwise conv (:func:`_pointwise`) of channels-last x by MKL: (B, C_in, H, W) -> (B, C_out, H, W)."""
    w = weight.flatten(1).t()
    return _from_rows(torch.mm(_rows(x), w) if bias is None else torch.addmm(bias, _rows(x), w), x)


class _TunedConv(torch.autograd.Function):
    """``F.conv2d`` on channels-last fp32 CPU input that takes the forward and each gradient from the fastest
    alternative (module docstring): the input gradient from oneDNN or, for 1x1 stride-1 dense convs, an MKL GEMM on
    the rows; the weight gradient from oneDNN on channels-last, oneDNN on NCHW copies (on an AVX2 EPYC oneDNN's
    channels-last weight gradient of a 64->64 3x3 conv at 112 px ran 190 ms against 94 ms with the copies) or the
    MKL GEMM; depthwise 3x3 convs have hybridvision's own kernel (:func:`_native_dw3x3`) as one more alternative for
    the forward and both gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, bias)
        ctx.conf = stride, padding, dilation, groups
        ctx.dw3x3 = _native_dw3x3(x, weight, stride, padding, dilation, groups)
        alternatives = (("onednn", lambda: F.conv2d(x, weight, bias, stride, padding, dilation, groups)),)
        if ctx.dw3x3:
            alternatives += (("native", lambda: native.dw3x3_forward(x, weight, bias, stride[0], False)),)
        if _pointwise(weight, stride, padding, groups):
            alternatives += (("mkl", lambda: _pointwise_mm(x, weight, bias)),)
        if len(alternatives) == 1:
            return alternatives[0][1]()
        return _fastest(("conv",) + _conv_key(x, weight, bias, padding, stride, dilation, groups),
                        _conv_macs(x, weight, stride), alternatives)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: a backward that can be differentiated again
            conv = lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups)  # noqa: E731
            return grads_of_plain(conv, (x, weight, bias), needs, (grad,)) + (None,) * 4
        grad = grad.contiguous(memory_format=torch.channels_last)
        key = _conv_key(x, weight, bias, padding, stride, dilation, groups)
        macs = _conv_macs(x, weight, stride)
        pointwise = _pointwise(weight, stride, padding, groups)

        def onednn(g: torch.Tensor, inp: torch.Tensor, which: int) -> torch.Tensor:
            mask = [which == 0, which == 1, False]
            return torch.ops.aten.convolution_backward(g, inp, weight, None, stride, padding, dilation, False, [0, 0],
                                                       groups, mask)[which]

        gx = gw = gb = None
        if needs[0]:
            alternatives = (("onednn", lambda: onednn(grad, x, 0)),)
            if pointwise:
                alternatives += (("mkl", lambda: _from_rows(torch.mm(_rows(grad), weight.flatten(1)), x)),)
            if ctx.dw3x3:
                alternatives += (("native", lambda: native.dw3x3_backward_input(grad, weight, *x.shape[2:],
                                                                                stride[0])),)
            gx = _fastest(("conv_gx",) + key, macs, alternatives)
        if needs[1]:
            alternatives = (("onednn", lambda: onednn(grad, x, 1)),
                            ("onednn nchw", lambda: onednn(grad.contiguous(), x.contiguous(), 1)))
            if pointwise:
                alternatives += (("mkl", lambda: torch.mm(_rows(grad).t(), _rows(x)).view(weight.shape)),)
            if ctx.dw3x3:
                alternatives += (("native", lambda: native.dw3x3_backward_weight(grad, x, stride[0])),)
            gw = _fastest(("conv_gw",) + key, macs, alternatives)
        if bias is not None and needs[2]:
            gb = _rows(grad).sum(0)
        return gx, gw, gb, None, None, None, None


def conv2d(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv(x)``; when ``conv`` is a plain ``nn.Conv2d`` (its own ``forward``, zero numeric padding, no hooks) that
    trains on the CPU (grad mode, fp32, channels-last input, plain eager), the forward and each gradient take the
    fastest kernel (:class:`_TunedConv`). Any other module is called. x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    if isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward and torch.is_grad_enabled() \
            and _onednn_ok(x) and x.is_contiguous(memory_format=torch.channels_last) \
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not hooked(conv) \
            and (x.requires_grad or conv.weight.requires_grad):
        pad, stride, dil, groups = _conv_args(conv)
        return _TunedConv.apply(x, conv.weight, conv.bias, stride, pad, dil, groups)
    return conv(x)


def conv_act(x: torch.Tensor, conv: nn.Conv2d, gelu: bool = True) -> torch.Tensor:
    """``F.gelu(conv(x))`` (or ``conv(x)``). x: (B, C_in, H, W) -> (B, C_out, H', W')."""
    if use_onednn(x) and not hooked(conv):
        pad, stride, dil, groups = _conv_args(conv)

        def onednn(act: bool) -> torch.Tensor:
            attr, algo = ("gelu", "none") if act else ("none", "")
            return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, pad, stride, dil, groups, attr,
                                                           [], algo)

        if gelu:
            alternatives = (("onednn+gelu", lambda: onednn(True)), ("onednn, gelu", lambda: F.gelu(onednn(False))))
        else:
            alternatives = (("onednn", lambda: onednn(False)),)
        if _native_dw3x3(x, conv.weight, stride, pad, dil, groups):
            alternatives += (("native" + "+gelu" * gelu,
                              lambda: native.dw3x3_forward(x, conv.weight, conv.bias, stride[0], gelu)),)
        if _pointwise(conv.weight, stride, pad, groups) and x.is_contiguous(memory_format=torch.channels_last):
            mkl = lambda: _pointwise_mm(x, conv.weight, conv.bias)  # noqa: E731
            alternatives += (("mkl, gelu", lambda: F.gelu(mkl())) if gelu else ("mkl", mkl),)
        if len(alternatives) == 1:
            return onednn(False)
        key = _conv_key(x, conv.weight, conv.bias, pad, stride, dil, groups)
        return _fastest(("conv_gelu" if gelu else "conv",) + key, _conv_macs(x, conv.weight, stride), alternatives)
    y = conv(x)
    return F.gelu(y) if gelu else y


def conv_add(x: torch.Tensor, conv: nn.Conv2d, other: torch.Tensor) -> torch.Tensor:
    """``conv(x) + other``. x: (B, C_in, H, W); other: (B, C_out, H', W') -> (B, C_out, H', W')."""
    if use_onednn(x) and _plain_cpu_f32(other) and other.is_contiguous(memory_format=torch.channels_last) \
            and x.is_contiguous(memory_format=torch.channels_last) and not hooked(conv):
        pad, stride, dil, groups = _conv_args(conv)
        w, b = conv.weight, conv.bias
        return _fastest(("conv_add",) + _conv_key(x, w, b, pad, stride, dil, groups), _conv_macs(x, w, stride), (
            ("onednn+add", lambda: torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, w, b, pad, stride, dil, groups, "add", 1.0, None, [], None)),
            ("onednn, add", lambda: torch.ops.mkldnn._convolution_pointwise(
                x, w, b, pad, stride, dil, groups, "none", [], "").add_(other)),
        ) + ((("mkl, add", lambda: _pointwise_mm(x, w, b).add_(other)),) if _pointwise(w, stride, pad, groups) else ()))
    return conv(x) + other


def linear_act(x: torch.Tensor, linear: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``F.gelu(linear(x))`` or ``linear(x)``. x: (..., C_in) -> (..., C_out)."""
    if _onednn_ok(x) and x.is_contiguous() and not hooked(linear):
        if not torch.is_grad_enabled():
            return _linear(x, linear.weight, linear.bias, gelu)
        y = _OneDNNLinear.apply(x, linear.weight, linear.bias)
    else:
        y = linear(x)
    return F.gelu(y) if gelu else y


def linear_add(x: torch.Tensor, linear: nn.Linear, other: torch.Tensor) -> torch.Tensor:
    """``linear(x) + other``. x: (..., C_in); other: (..., C_out) -> (..., C_out)."""
    if use_onednn(x) and _plain_cpu_f32(other) and x.is_contiguous() and other.is_contiguous() and not hooked(linear):
        w, b = linear.weight, linear.bias
        (n, k), m = w.shape, x.numel() // w.shape[1]
        return _fastest(("linear_add", m, k, n, b is not None), m * k * n, (
            ("onednn+add", lambda: torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "add")),
            ("mkl, add", lambda: F.linear(x, w, b).add_(other)),
        ))
    return linear(x) + other
