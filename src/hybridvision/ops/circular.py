"""Circular (global) convolution along one spatial axis: the ParC / Fast-ParC operator.

``circular_conv(x, weight, dim)`` computes, for ``x: (B, C_in, H, W)`` and ``weight: (C_out, C_in // groups, K)``
with ``K == x.size(dim)``, the circular **cross-correlation** of the official ParC code
(``cat(x, x[:-1])`` followed by a valid convolution)::

    y[b, o, i] = bias[o] + sum_c sum_k weight[o, c, k] * x[b, c, (i + k) mod K]

along ``dim`` (the other spatial axis is untouched; ``c`` runs over the input channels of ``o``'s group).

Five methods compute the same thing (all differentiable; all tested against a float64 formula and gradcheck):

* ``"direct"``: circular padding by ``K - 1`` followed by ``F.conv2d`` with a ``K x 1`` / ``1 x K`` kernel.
* ``"gemm"``: the ``(K, K)`` circulant matrices are gathered from the kernel by indexing and applied as matrix
  products (BLAS does the work), ``2 K`` FLOPs per output element and input channel of the group. Depthwise kernels
  use a fused autograd Function: for K <= 16 the batch is folded into the matrices (one product per channel),
  above that one in-place product per sample, so no circulant matrix is ever broadcast-copied.
* ``"fft"``: Fast-ParC, ``irfft(rfft(x) * conj(rfft(w)), n=K)`` along ``dim``; half / bfloat16 inputs are computed
  in float32 and cast back. Depthwise kernels use a fused autograd Function (bias and ParC's position embedding
  folded into the spectrum, 1/K folded into the kernel spectrum, rfft(x) recomputed in backward instead of stored).
* ``"native"``: depthwise only, float32/64 on the CPU: hand-vectorised C++ (``csrc/circular_cpu.cpp``, built on
  first use by :mod:`hybridvision.ops.native`), no padded copy, the position embedding and bias folded into one
  addend. Below K=28 (along dim 3 K=32) the direct sum (``2 K`` FLOPs per output; SIMD lanes over the batch for
  small planes, else over the contiguous axis or in-register transposed 16-row tiles); from there on (K without prime
  factors above 7) its own FFT: two real lines per complex one, SIMD lanes over lines, in-place radix passes with the
  kernel spectrum product fused between the forward and the inverse transform and the addend into the last pass, on
  a cache-resident strip. Backward: the same forward with the flipped kernel for dx, and a weight-gradient kernel
  (direct, or the FFT from K=20).
* ``"auto"``: picks one of them by the measured cost model in :func:`choose_method`.

Which method ``"auto"`` means can be overridden globally with :func:`set_default_method` (or the environment
variable ``HYBRIDVISION_CIRCULAR_METHOD`` read at import time), and per call with ``method=``.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from hybridvision.ops import fused, native
from hybridvision.ops.fused import grads_of_plain, in_func_transform, in_onnx_export, plain_eager, records_grad

__all__ = ["METHODS", "choose_method", "circular_conv", "get_default_method", "set_default_method"]

METHODS = ("auto", "direct", "gemm", "fft", "native")

_ENV_VAR = "HYBRIDVISION_CIRCULAR_METHOD"
_default_method = os.environ.get(_ENV_VAR, "auto")
if _default_method not in METHODS:
    raise ValueError(
        f"environment variable {_ENV_VAR}={_default_method!r} is not a circular_conv method; "
        f"expected one of {METHODS} (or unset it)"
    )


def set_default_method(method: str) -> str:
    """Set what ``method="auto"`` resolves to for every later call; returns the previous setting.

    ``set_default_method("fft")`` forces Fast-ParC everywhere (e.g. to compare a whole model's speed);
    ``set_default_method("auto")`` restores the cost model. Per-call ``method=`` other than ``"auto"`` still wins.
    """
    global _default_method
    if method not in METHODS:
        raise ValueError(f"unknown circular_conv method {method!r}; expected one of {METHODS}")
    previous, _default_method = _default_method, method
    return previous


def get_default_method() -> str:
    """The method that ``method="auto"`` currently resolves through (``"auto"`` = the cost model)."""
    return _default_method


GEMM_MAX_K = {("fwd", 2): 72, ("fwd", 3): 48, ("train", 2): 64, ("train", 3): 32}
"""``"auto"`` on CPU, depthwise, float32/64: the largest K that still goes to ``"gemm"``, per pass (``"fwd"`` =
no backward follows, ``"train"`` = forward+backward) and ``dim``; above it ``"fft"``. The GEMM does 2 K FLOPs per
element (cost linear in K), the FFT's cost per element is nearly flat in K and higher along dim 2 (the transform
there is strided: torch copies). The thresholds are the crossovers of per-element costs fitted to exploratory
1-thread CPU-time runs on the 2-core development machine; the check points are in benchmarks/results/circular.md
(``python benchmarks/bench_circular.py --threads 1 --clock cpu``, a loaded machine: identical calls there differ by
up to 40 %), e.g. K=28: gemm, or a tie with fft along dim 3; K=56, dim 2: gemm (fwd 9.8 vs 10.9 ms, fwd+bwd 18.5
vs 34.6 ms); K=56, dim 3: fft (fwd 4.6 vs 6.6 ms, fwd+bwd 13.9 vs 18.8 ms); K >= 112: fft."""
NATIVE_K = {("fwd", 2): (1, 224), ("fwd", 3): (1, 224), ("train", 2): (1, 224), ("train", 3): (1, 224)}
"""``"auto"`` on CPU, depthwise, float32/64, where the native kernel is built: the range of K (inclusive) that goes
to ``"native"``, per pass and ``dim`` (as :data:`GEMM_MAX_K`); outside it the rules below. From
``python benchmarks/bench_circular.py`` (2 threads; benchmarks/results/circular.md): native is the fastest method
at every measured K (7-224) along both dims, forward and forward+backward. Larger K are not measured, and a K with a
prime factor above 7 runs the O(K^2) direct sum, so beyond 224 ``"fft"`` takes over."""
DIRECT_MAX_K = 8
"""``"auto"`` on CPU, depthwise float32/64, no backward: up to this K ``"direct"`` (oneDNN's depthwise conv on the
circularly padded input). At K=7 the whole tensor sits in cache and every method costs about the same;
``python benchmarks/bench_circular.py`` (malloc tuned, 2 threads, idle; benchmarks/results/circular.md) measured
forward ms direct / gemm / reference: 0.18 / 0.25 / 0.18 along dim 2 and 0.23 / 0.33 / 0.24 along dim 3
(B=16, C=384)."""
BF16_GEMM_MAX_K = 112
"""bfloat16 on CPU: the GEMM runs natively in bf16 while the FFT path computes in fp32, so ``"gemm"`` is used up
to this K. ``python benchmarks/bench_circular.py --quick --threads 1 --clock cpu --dtype bfloat16`` measured
(ms, gemm vs fft, forward) K=14: 0.60 vs 1.60 (dim 2), 0.38 vs 1.39 (dim 3); K=56: 2.39 vs 6.06, 2.10 vs 4.74
(benchmarks/results/circular_quick_bfloat16.md)."""


def _plain_ops_only() -> bool:
    """True while torch.jit traces or ONNX / torch.export captures a graph, or inside a ``torch.func`` transform
    (grad, vmap, ...): no Python autograd Functions then (no export formula; functorch needs ``setup_context``)."""
    return torch.jit.is_tracing() or in_onnx_export() or torch.compiler.is_exporting() or in_func_transform()


def choose_method(x: torch.Tensor, weight: torch.Tensor, dim: int, needs_grad: Optional[bool] = None) -> str:
    """The cost model behind ``method="auto"``: returns ``"direct"``, ``"gemm"``, ``"fft"`` or ``"native"``.

    Args:
        x: (B, C_in, H, W); weight: (C_out, C_in // groups, K) (depthwise when (C_in, 1, K));
        dim: the axis (2, 3, -2 or -1);
        needs_grad: whether a backward pass follows (default: grad mode is on and x or weight requires grad).

    Rule (first match):
        1. tracing or exporting (torch.jit.trace, torch.onnx.export, torch.export) or a ``torch.func`` transform:
           ``"gemm"`` through plain differentiable ops (Gather + MatMul, which every runtime has; no FFT operators,
           no Python Functions).
        2. grouped or dense kernels (``weight.size(1) > 1``): ``"fft"`` -- a (C_out/g, C_in/g) complex product per
           frequency instead of 2 K C_in/g FLOPs per output. Exploratory 1-thread CPU-time runs, dense, B=16:
           C=128, K=14 forward fft 4.7-5.0 ms, direct 6.8-9.9 ms, gemm 22 ms; on par with direct only at K <= 7.
        3. depthwise on a non-CPU device: ``"gemm"`` for K <= 32, else ``"fft"`` (not measured: no GPU here).
        4. depthwise float16 on CPU: ``"fft"`` (CPU float16 matmul is slow: K=56, C=48, B=16 gemm 45 ms vs fft
           4.3-5.5 ms in exploratory 1-thread runs);
           bfloat16: ``"gemm"`` up to :data:`BF16_GEMM_MAX_K`, else ``"fft"``.
        5. depthwise float32/64 on CPU, K in :data:`NATIVE_K` [pass, dim], and the native kernel built
           (:mod:`hybridvision.ops.native`; the first call builds it): ``"native"``, under ``torch.compile`` too (an
           opaque op in the graph).
        6. depthwise float32/64 on CPU without backward: ``"direct"`` up to :data:`DIRECT_MAX_K` (ahead of gemm at
           K=7; at K=14 on par or behind, from K=28 on 1.2-5x slower than the better of gemm and fft in
           benchmarks/results/circular.md).
        7. depthwise float32/64 on CPU: ``"gemm"`` up to :data:`GEMM_MAX_K` [pass, dim], else ``"fft"``.
    Override: ``set_default_method(...)`` / ``HYBRIDVISION_CIRCULAR_METHOD`` globally, ``method=`` per call.
    """
    return _choose(x, weight, dim, needs_grad, _plain_ops_only())


def _choose(x: torch.Tensor, weight: torch.Tensor, dim: int, needs_grad: Optional[bool], plain_only: bool) -> str:
    """:func:`choose_method` with the graph-capture state (``_plain_ops_only()``) already known."""
    if plain_only:
        return "gemm"
    if weight.size(1) != 1 or weight.size(0) != x.size(1):
        return "fft"
    k = x.size(dim)
    if x.device.type != "cpu":
        return "gemm" if k <= 32 else "fft"
    if x.dtype == torch.float16:
        return "fft"
    if x.dtype == torch.bfloat16:
        return "gemm" if k <= BF16_GEMM_MAX_K else "fft"
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    pass_ = "train" if needs_grad else "fwd"
    lo, hi = NATIVE_K[pass_, dim % 4]
    if lo <= k <= hi and native.available():
        return "native"
    if not needs_grad and k <= DIRECT_MAX_K:
        return "direct"
    return "gemm" if k <= GEMM_MAX_K[pass_, dim % 4] else "fft"


def _check(
    x: torch.Tensor, weight: torch.Tensor, dim: int, bias: Optional[torch.Tensor], groups: Optional[int], method: str
) -> tuple[int, int]:
    """Validate the arguments of :func:`circular_conv`; returns ``(dim, groups)`` normalised."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"circular_conv expects x of shape (B, C, H, W); got {shape}. Add the missing batch/channel axes.")
    if not x.is_floating_point():
        raise ValueError(f"circular_conv expects a floating-point x; got dtype {x.dtype}. Convert it with x.float().")
    if dim not in (2, 3, -2, -1):
        raise ValueError(f"dim must be one of 2, 3, -2, -1 (height or width of (B, C, H, W)); got {dim}")
    dim = dim % 4
    if method not in METHODS:
        raise ValueError(f"unknown circular_conv method {method!r}; expected one of {METHODS}")
    c_in, k = x.size(1), x.size(dim)
    if groups is None:
        groups = c_in
    if not isinstance(groups, int) or groups < 1 or c_in % groups:
        raise ValueError(f"groups={groups} must be a positive divisor of the {c_in} input channels")
    if weight.dim() != 3:
        raise ValueError(
            f"weight must have shape (C_out, C_in // groups, K) = (C_out, {c_in // groups}, {k}); "
            f"got {tuple(weight.shape)}"
        )
    c_out, c_g, k_w = weight.shape
    if k_w != k:
        raise ValueError(
            f"kernel length {k_w} != x.size({dim}) = {k}: a circular conv needs a kernel as long as the axis; "
            "resize the kernel to the input (ParC2d does this) or pass dim of the matching axis"
        )
    if c_g != c_in // groups:
        raise ValueError(
            f"weight.size(1) = {c_g} but x has {c_in} channels in {groups} groups, so it must be {c_in // groups}; "
            "check the channel count of x and the groups argument"
        )
    if c_out % groups:
        raise ValueError(f"weight.size(0) = {c_out} output channels is not divisible by groups={groups}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},) (one per output channel); got {tuple(bias.shape)}")
    return dim, groups


def circular_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    dim: int,
    bias: Optional[torch.Tensor] = None,
    groups: Optional[int] = None,
    method: str = "auto",
) -> torch.Tensor:
    """Circular cross-correlation of ``x`` with a global kernel along ``dim`` (ParC / Fast-ParC).

    Args:
        x: (B, C_in, H, W), floating point.
        weight: (C_out, C_in // groups, K) with ``K == x.size(dim)``.
        dim: 2 / -2 (along the height: the official ParC type ``'H'``, a K x 1 kernel) or 3 / -1 (along the width).
        bias: (C_out,) or None.
        groups: ``None`` = depthwise (``groups = C_in``); 1 = dense; any divisor of C_in and C_out.
        method: ``"auto"`` (cost model :func:`choose_method`, or the global override of :func:`set_default_method`),
            ``"direct"``, ``"gemm"`` or ``"fft"``.

    Returns:
        y: (B, C_out, H, W), same dtype as ``x``:
        ``y[b, o, i] = bias[o] + sum_c sum_k weight[o, c, k] * x[b, c, (i + k) mod K]`` along ``dim``.
    """
    dim, groups = _check(x, weight, dim, bias, groups, method)
    return _circular_conv(x, weight, dim, bias, groups, method)


def _circular_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    dim: int,
    bias: Optional[torch.Tensor],
    groups: int,
    method: str,
    pe: Optional[torch.Tensor] = None,
    addend: Optional[torch.Tensor] = None,
    eager: Optional[bool] = None,
) -> torch.Tensor:
    """:func:`circular_conv` without argument checks (``dim`` in {2, 3}), plus an optional position embedding.

    pe: (C_in, K) or None, added to x along ``dim`` (broadcast over batch and the other axis) before the
    convolution: ``circular_conv(x + pe, ...)``. The depthwise FFT path fuses the addition into the spectrum.
    addend: (C_out, K) or None, added to the output along ``dim`` instead of ``bias`` and ``pe`` (pass neither):
    ``conv(pe, weight) + bias`` precomputed, as ParC2d's eval-mode cache does; the native kernel fuses it.
    eager: ``plain_eager()`` where the caller has just asked it (None: asked here).
    """
    # the graph-capture state, looked up once per call (plain eager rules out all but tracing); then the concrete
    # method: per call, else the global default, else the cost model
    eager = plain_eager() if eager is None else eager
    plain_only = torch.jit.is_tracing() if eager else _plain_ops_only()
    requested = _default_method if method == "auto" else method
    method = _choose(x, weight, dim, None, plain_only) if requested == "auto" else requested
    if requested == "native":  # the cost model only picks it where it applies
        _check_native(x, weight, groups, plain_only)
    if bias is not None:
        bias = _as(bias, x.dtype)
    # depthwise: fused Functions; under torch.compile only the native kernel's (an opaque op with a fake-tensor
    # formula), the others as the plain ops below (the compiled FFT Function's backward failed in inductor on its
    # complex views)
    depthwise = weight.size(1) == 1 and weight.size(0) == x.size(1) and not plain_only
    fn = _DEPTHWISE.get(method) if depthwise and (method == "native" or not torch.compiler.is_compiling()) else None
    if fn is None:
        y = _plain_conv(x, weight, dim, bias, groups, method, pe)
    else:
        if method == "native":  # (the copy outside: a double backward differentiates through it)
            x = x.contiguous()
        if not records_grad(x, weight, bias, pe, addend):  # nothing to record: no Function.apply and its bookkeeping
            if method == "native":  # the addend fused into the kernel's output pass
                return fn.compute(x, weight, bias, pe, dim, addend, eager)
            y = fn.compute(x, weight, bias, pe, dim)
        else:
            y = fn.apply(x, weight, bias, pe, dim)
    if addend is None:
        return y
    return y + (addend.unsqueeze(-1) if dim == 2 else addend.unsqueeze(-2)).to(y.dtype)


def _plain_conv(x: torch.Tensor, weight: torch.Tensor, dim: int, bias: Optional[torch.Tensor], groups: int,
                method: str, pe: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`_circular_conv` in plain differentiable torch ops (``method`` "direct", "gemm" or "fft"):
    ``circular_conv(x + pe, weight) + bias``. x: (B, C_in, H, W) -> (B, C_out, H, W)."""
    if pe is not None:
        x = x + (pe.unsqueeze(-1) if dim == 2 else pe.unsqueeze(-2)).to(x.dtype)
    if method == "direct":
        return _direct(x, weight, dim, bias, groups)
    if method == "gemm":
        return _gemm(x, weight, dim, bias, groups)
    return _fft(x, weight, dim, bias, groups)


def _check_native(x: torch.Tensor, weight: torch.Tensor, groups: int, plain_only: bool) -> None:
    """``method="native"`` covers depthwise float32/64 CPU tensors (and not graph capture); say so otherwise."""
    problems = []
    if groups != x.size(1) or weight.size(0) != x.size(1):
        problems.append(f"depthwise kernels only (got groups={groups}, C_out={weight.size(0)}, C_in={x.size(1)})")
    if x.device.type != "cpu":
        problems.append(f"CPU tensors only (got {x.device})")
    if x.dtype not in (torch.float32, torch.float64):
        problems.append(f"float32/float64 only (got {x.dtype})")
    if plain_only:
        problems.append("no tracing/export or torch.func transform (the kernel is not an ONNX/aten op)")
    if problems:
        raise ValueError(f"circular_conv method='native': {'; '.join(problems)}. Use method='auto' (it picks "
                         "'native' where it applies) or 'gemm' / 'fft'.")


def _direct(x: torch.Tensor, weight: torch.Tensor, dim: int, bias: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """Circular pad by K - 1 at the end of ``dim`` + ``conv2d`` (valid). x: (B, C_in, H, W) -> (B, C_out, H, W)."""
    k = x.size(dim)
    if dim == 2:
        xp = F.pad(x, (0, 0, 0, k - 1), mode="circular")
        w4 = weight.unsqueeze(3)
    else:
        xp = F.pad(x, (0, k - 1, 0, 0), mode="circular")
        w4 = weight.unsqueeze(2)
    return F.conv2d(xp, w4.to(x.dtype), bias, groups=groups)


def _circulant(weight: torch.Tensor, groups: int, transpose: bool) -> torch.Tensor:
    """Circulant matrices of the kernel, one per group.

    weight: (C_out, C_in // groups, K) -> (groups, C_out/groups * K, C_in/groups * K) with
    ``M[g, (o, i), (c, j)] = weight[g*Og + o, c, (j - i) mod K]`` (so ``y = M @ x`` along the axis), or its
    transpose (groups, C_in/groups * K, C_out/groups * K) when ``transpose`` (so ``y = x @ M^T``).
    """
    c_out, c_g, k = weight.shape
    o_g = c_out // groups
    ar = torch.arange(k, device=weight.device)
    idx = (ar.view(1, k) - ar.view(k, 1)) % k  # idx[i, j] = (j - i) mod K
    if transpose:
        idx = idx.t()  # idx[j, i]
    m = weight[:, :, idx]  # (C_out, Cg, K, K): [o, c, i, j] or [o, c, j, i]
    m = m.view(groups, o_g, c_g, k, k)
    if transpose:  # -> [g, (c, j), (o, i)]
        return m.permute(0, 2, 3, 1, 4).reshape(groups, c_g * k, o_g * k)
    return m.permute(0, 1, 3, 2, 4).reshape(groups, o_g * k, c_g * k)  # [g, (o, i), (c, j)]


def _gemm(x: torch.Tensor, weight: torch.Tensor, dim: int, bias: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """Circulant matrix product. x: (B, C_in, H, W) -> (B, C_out, H, W)."""
    b, c_in, h, w = x.shape
    c_out, c_g, k = weight.shape
    o_g = c_out // groups
    weight = weight.to(x.dtype)
    if dim == 2:  # y[b, g, (o, i), w] = M[g] @ x[b, g, (c, j), w]
        m = _circulant(weight, groups, transpose=False)
        y = torch.einsum("gij,bgjw->bgiw", m, x.reshape(b, groups, c_g * k, w))
        y = y.reshape(b, c_out, h, w)
    else:  # y[b, g, h, (o, i)] = x[b, g, h, (c, j)] @ M^T[g]
        mt = _circulant(weight, groups, transpose=True)
        xg = x.reshape(b, groups, c_g, h, k).transpose(2, 3).reshape(b, groups, h, c_g * k)
        y = torch.einsum("bghj,gji->bghi", xg, mt)
        y = y.reshape(b, groups, h, o_g, k).transpose(2, 3).reshape(b, c_out, h, w)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


GEMM_FOLD_MAX_K = 16
"""Up to this K the depthwise GEMM folds the batch into the matrices (one bigger product per channel, at the cost
of a transposing copy in and out); above it, it loops over the batch with in-place products (no copies)."""
GEMM_COLS_MAX_K = 8
"""Folding along dim 3 (W): up to this K the kernel axis goes first, (C, K, B*H) (the product's long side is the
columns); above it, the kernel axis stays last, (C, B*H, K) (a cheaper copy). Measured in exploratory 1-thread
CPU-time runs of the forward product alone (B=16, C=2688/K), first vs last: K=7 0.42 vs 0.82 ms, K=14 0.70 vs
0.53 ms; along dim 2 the kernel-first layout is the natural one."""


def _layout(k: int, dim: int) -> str:
    """How the depthwise GEMM arranges its work: ``"first"`` (C, K, B*other), ``"last"`` (C, B*H, K) or ``"loop"``."""
    if k > GEMM_FOLD_MAX_K:
        return "loop"
    return "first" if dim == 2 or k <= GEMM_COLS_MAX_K else "last"


def _fold(t: torch.Tensor, dim: int, layout: str) -> torch.Tensor:
    """(B, C, H, W) -> (C, K, B * other) for ``"first"``, (C, B * H, K) for ``"last"`` (dim 3 only); a copy."""
    b, c, h, w = t.shape
    if layout == "last":
        return t.permute(1, 0, 2, 3).reshape(c, b * h, w)
    if dim == 2:
        return t.permute(1, 2, 0, 3).reshape(c, h, b * w)
    return t.permute(1, 3, 0, 2).reshape(c, w, b * h)


def _unfold(t: torch.Tensor, shape: torch.Size, dim: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`_fold` -> contiguous (B, C, H, W)."""
    b, c, h, w = shape
    if layout == "last":
        return t.view(c, b, h, w).permute(1, 0, 2, 3).contiguous()
    if dim == 2:
        return t.view(c, h, b, w).permute(2, 0, 1, 3).contiguous()
    return t.view(c, w, b, h).permute(2, 0, 3, 1).contiguous()


def _product(xf: torch.Tensor, m: torch.Tensor, layout: str) -> torch.Tensor:
    """The per-channel product on folded data: (C, K, K) @ (C, K, N) for ``"first"``, (C, N, K) @ (C, K, K)^T for
    ``"last"``; same layout out."""
    return torch.bmm(m, xf) if layout == "first" else torch.bmm(xf, m.transpose(1, 2))


def _outer(gf: torch.Tensor, xf: torch.Tensor, layout: str) -> torch.Tensor:
    """S[c, i, j] = sum over the folded batch/other index n of gf[c, i, n] * xf[c, j, n] (i, j along the kernel
    axis), for either folded layout -> (C, K, K)."""
    return torch.bmm(gf, xf.transpose(1, 2)) if layout == "first" else torch.bmm(gf.transpose(1, 2), xf)


def _circulant_apply(x: torch.Tensor, m: torch.Tensor, dim: int, addend: Optional[torch.Tensor]) -> torch.Tensor:
    """Per channel, the matrix product along ``dim``: y[b, c, i] = sum_j m[c, i, j] x[b, c, j] (+ addend[c, i]).

    x: (B, C, H, W); m: (C, K, K) (any strides); addend: (C, K), (C, 1) or None. Returns (B, C, H, W), contiguous.
    """
    layout = _layout(x.size(dim), dim)
    if layout != "loop":
        yf = _product(_fold(x, dim, layout), m, layout)
        if addend is not None:
            yf.add_(addend.unsqueeze(-1) if layout == "first" else addend.unsqueeze(-2))
        return _unfold(yf, x.shape, dim, layout)
    add = None if addend is None else (addend.unsqueeze(-1) if dim == 2 else addend.unsqueeze(-2))
    x = x.contiguous()
    y = torch.empty_like(x)
    mt = m.transpose(1, 2)
    for i in range(x.size(0)):
        if dim == 2:
            torch.bmm(m, x[i], out=y[i])
        else:
            torch.bmm(x[i], mt, out=y[i])
        if add is not None:
            y[i].add_(add)
    return y


def _circulant_outer(gy: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """S[c, i, j] = sum over batch and the other axis of gy[b, c, i] * x[b, c, j] (i, j along ``dim``), one
    accumulating product per sample (the ``"loop"`` layout; folded data uses :func:`_outer`).

    gy, x: (B, C, H, W) -> (C, K, K)."""
    k = x.size(dim)
    gy, x = gy.contiguous(), x.contiguous()
    s = torch.zeros(x.size(1), k, k, dtype=x.dtype, device=x.device)
    for i in range(x.size(0)):
        if dim == 2:
            s.baddbmm_(gy[i], x[i].transpose(1, 2))
        else:
            s.baddbmm_(gy[i].transpose(1, 2), x[i])
    return s


def _saved(ctx) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int, tuple[bool, ...]]:
    """What the forward of a depthwise autograd Function saved (``save_for_backward(x, weight, bias, pe)``,
    ``ctx.dim``), for its backward: (x, weight, pe, dim, needs), ``needs`` flagging which of x, weight, bias, pe
    want gradients. x: (B, C, H, W); weight: (C, 1, K); pe: (C, K) or None."""
    x, weight, _, pe = ctx.saved_tensors
    return x, weight, pe, ctx.dim, ctx.needs_input_grad[:4]


def _twice_differentiable(method: str):
    """Decorator for the backward of the depthwise Functions (inputs x, weight, bias, pe, dim): under
    ``create_graph`` (a double backward to come) autograd through :func:`_plain_conv` with ``method`` runs instead
    of the hand-written first-order formulas (:func:`hybridvision.ops.fused.grads_of_plain`)."""

    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, gy):
            if not torch.is_grad_enabled():
                return backward(ctx, gy)
            x, weight, bias, pe = ctx.saved_tensors

            def plain(x, weight, bias, pe):
                return _plain_conv(x, weight, ctx.dim, bias, x.size(1), method, pe)

            return grads_of_plain(plain, (x, weight, bias, pe), ctx.needs_input_grad[:4], (gy,)) + (None,)

        return run

    return wrap


class _DepthwiseGemm(torch.autograd.Function):
    """Depthwise circulant GEMM without broadcast copies of the matrices, position embedding and bias fused.

    With M[c, i, j] = w[c, (j - i) mod K] (so y = M x along ``dim``), x' = x + pe and S = sum over batch and the
    other axis:  forward y = M x + (M pe + bias);  backward dx = M^T dy, dpe = M^T S[dy],
    dw[c, k] = sum_i (S[dy x^T] + S[dy] pe^T)[c, i, (i + k) mod K], dbias = S[dy] summed.
    x: (B, C, H, W); weight: (C, 1, K); bias: (C,) or None; pe: (C, K) or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pe, dim):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias, pe)
        ctx.dim = dim
        return _DepthwiseGemm.compute(x, weight, bias, pe, dim)

    @staticmethod
    def compute(x, weight, bias, pe, dim):
        """The forward without autograd bookkeeping (also run directly where nothing records a gradient)."""
        m = _circulant(weight.to(x.dtype), x.size(1), transpose=False)  # (C, K, K)
        addend = None
        if pe is not None:
            addend = torch.bmm(m, pe.to(x.dtype).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            b = bias.to(x.dtype).unsqueeze(-1)  # (C, 1): broadcasts along the axis
            addend = b if addend is None else addend + b
        return _circulant_apply(x, m, dim, addend)

    @staticmethod
    @_twice_differentiable("gemm")
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, pe, dim, (need_x, need_w, need_b, need_pe) = _saved(ctx)
        k = x.size(dim)
        m = _circulant(weight.to(x.dtype), x.size(1), transpose=False)
        layout = _layout(k, dim)
        gx = gpe = gb = gw = None
        if layout == "loop":
            gx = _circulant_apply(gy, m.transpose(1, 2), dim, None) if need_x else None
            g_sum = gy.sum(dim=(0, 3 if dim == 2 else 2))  # (C, K)
        else:  # fold dy once for dx, S and the sums
            gyf = _fold(gy, dim, layout)
            if need_x:
                gx = _unfold(_product(gyf, m.transpose(1, 2), layout), x.shape, dim, layout)
            g_sum = gyf.sum(dim=2 if layout == "first" else 1)
        if need_w:
            s = _circulant_outer(gy, x, dim) if layout == "loop" else _outer(gyf, _fold(x, dim, layout), layout)
            if pe is not None:
                s = s + g_sum.unsqueeze(-1) * pe.to(x.dtype).unsqueeze(-2)
            ar = torch.arange(k, device=x.device)
            idx = (ar.view(k, 1) + ar.view(1, k)) % k  # [i, k] -> (i + k) mod K
            gw = s.gather(2, idx.expand_as(s)).sum(dim=1).unsqueeze(1).to(weight.dtype)
        if need_pe:
            gpe = torch.bmm(m.transpose(1, 2), g_sum.unsqueeze(-1)).squeeze(-1).to(pe.dtype)
        if need_b:
            gb = g_sum.sum(dim=1).to(gy.dtype)
        return gx, gw, gb, gpe, None


class _DepthwiseNative(torch.autograd.Function):
    """Depthwise circular conv through the hand-written CPU kernel (:mod:`hybridvision.ops.native`), position
    embedding and bias fused into one (C, K) addend.

    With x' = x + pe and S = sum over batch and the other axis:  forward y = conv(x, w) + (conv(pe, w) + bias);
    backward dx = conv(dy, w') with the flipped kernel w'[k] = w[(K - k) mod K], dw[k] = S[dy x'(shifted by k)]
    (the kernel's wgrad on x plus sum_i S[dy][i] pe[(i + k) mod K]), dpe = conv(S[dy], w'), dbias = S[dy] summed.
    x: (B, C, H, W) float32/64 on the CPU, contiguous; weight: (C, 1, K); bias: (C,) or None; pe: (C, K) or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pe, dim):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias, pe)
        ctx.dim = dim
        return _DepthwiseNative.compute(x, weight, bias, pe, dim)

    @staticmethod
    def compute(x, weight, bias, pe, dim, addend=None, eager=None):
        """The forward without autograd bookkeeping (also run directly where nothing records a gradient); x
        contiguous. addend: (C, K), the fused conv(pe, w) + bias when the caller has it (then bias = pe = None);
        eager: as :func:`_native_algo`'s."""
        # weight as it is, (C, 1, K), and a bias alone as (C,): the kernel takes both, so that an eval forward makes
        # no views or copies here. Each op on this path costs 10-30 us where a large kernel call has just swept the
        # caches: circular_conv with a bias, no grad, B=16, C=2688/K, 2 threads, the views and the (C, K) bias copy
        # against none (alternating in one process, scratch ovh9.py), median of the per-round ratios 1.06x at K=56
        # along H and along W, 1.03x at 112, 1.02x at 224, 1.13x at 7, 0.99x at 14 (45-67 us a call at K >= 56).
        w = _as(weight, x.dtype)
        if pe is not None:
            addend = _circular_mv(w.squeeze(1), _as(pe, x.dtype))
        if bias is not None:
            b = _as(bias, x.dtype)
            addend = b if addend is None else addend + b.unsqueeze(-1)
        addend = None if addend is None else _as(addend, x.dtype).contiguous()
        return _native_algo("forward", x, dim, lambda algo: native.forward(x, w, addend, dim, algo), eager)

    @staticmethod
    @_twice_differentiable("direct")
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, pe, dim, (need_x, need_w, need_b, need_pe) = _saved(ctx)
        gy = gy.contiguous()  # once, for both kernels
        w = weight[:, 0].to(x.dtype)
        w_flip = torch.roll(w.flip(-1), 1, dims=-1)  # w'[k] = w[(K - k) mod K]
        gx = None
        if need_x:
            gx = _native_algo("forward", gy, dim, lambda algo: native.forward(gy, w_flip, None, dim, algo))
        need_sum = need_b or need_pe or (need_w and pe is not None)
        g_sum = gy.sum(dim=(0, 3 if dim == 2 else 2)) if need_sum else None  # (C, K)
        gw = gpe = gb = None
        if need_w:
            gw = _native_algo("wgrad", x, dim, lambda algo: native.wgrad(gy, x, dim, algo))
            if pe is not None:
                gw = gw + _circular_mv(g_sum, pe.to(x.dtype))
            gw = gw.unsqueeze(1).to(weight.dtype)
        if need_pe:
            gpe = _circular_mv(w_flip, g_sum).to(pe.dtype)
        if need_b:
            gb = g_sum.sum(dim=1).to(gy.dtype)
        return gx, gw, gb, gpe, None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it is (a no-op ``.to`` costs 0.7 us, a tenth of the native kernel at batch 1,
    C=384, K=7, on the per-call path of an inference forward)."""
    return t if t.dtype == dtype else t.to(dtype)


def _native_algo(op: str, x: torch.Tensor, dim: int, run, eager: Optional[bool] = None) -> torch.Tensor:
    """``run(algo)`` for the native kernel's ``op`` ("forward" / "wgrad") on x (B, C, H, W) along ``dim``: where K has
    an FFT (K >= 2, no prime factor above 7), the fastest of the kernel's own crossover (``algo=0``, measured by
    ``benchmarks/bench_native_crossover.py`` on one machine at one shape per K), the direct sum (1) and the FFT (2),
    timed per shape by :mod:`hybridvision.ops.fused`'s autotuner (with the earlier Stockham FFT, the direct sum at
    K=56 along W ran 1.26 ms against the 1.93 ms of the FFT that the crossover picked, B=16, C=48, Zen 5 VM,
    scratch); else ``algo=0``, and always outside plain eager execution (``eager``: ``plain_eager()`` where the
    caller has it, None: asked here)."""
    k = x.size(dim)
    if not (plain_eager() if eager is None else eager) or not native.fft_length(k):
        return run(0)
    return fused._fastest(("circular_" + op, tuple(x.shape), dim, x.dtype), x.numel() * k,
                          (("auto", lambda: run(0)), ("direct", lambda: run(1)), ("fft", lambda: run(2))))


def _circular_mv(kernel: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-row circular cross-correlations of small (C, K) tables (same dtype, float32/64), by FFT:
    ``out[c, i] = sum_j kernel[c, (j - i) mod K] v[c, j]`` (= circular_conv of the row v with that kernel).
    16-19 us at C * K = 2688 for K = 7 .. 224, 2 threads, where the (C, K, K) circulant matrices and a batched
    product took 38-706 us (at C=48, K=56: 168-228 us of the 622 us eval forward of a ParC layer with a position
    embedding, B=16; scratch, 2026-12-03)."""
    return torch.fft.irfft(torch.fft.rfft(v) * torch.fft.rfft(kernel).conj(), n=v.size(-1))


CHUNK_BYTES = 32 << 20
"""The depthwise FFT processes at most this many input bytes per step (whole samples, or channel ranges of one
sample), which bounds its temporary complex spectra; smaller inputs go in one step. Measured on the development
CPU (B=16, K=56..224): splitting into 2 or 16 MiB steps was not faster than one step, so the bound is for memory."""


def _chunks(x: torch.Tensor) -> list[tuple[slice, slice]]:
    """Split (B, C, H, W) into contiguous blocks of about :data:`CHUNK_BYTES`: whole samples, or channel ranges of
    one sample when a sample alone is larger. Returns (batch slice, channel slice) pairs."""
    b, c, h, w = x.shape
    plane = h * w * 4
    if c * plane <= CHUNK_BYTES:
        nb = max(1, CHUNK_BYTES // (c * plane))
        return [(slice(i, i + nb), slice(None)) for i in range(0, b, nb)]
    nc = max(1, CHUNK_BYTES // plane)
    return [(slice(i, i + 1), slice(j, j + nc)) for i in range(b) for j in range(0, c, nc)]


def _spectrum_view(spec: torch.Tensor, dim: int) -> torch.Tensor:
    """(C, F) kernel spectrum -> (C, F, 1) for dim 2 or (C, 1, F) for dim 3, to broadcast against rfft(x)."""
    return spec.unsqueeze(-1) if dim == 2 else spec.unsqueeze(-2)


class _DepthwiseFFT(torch.autograd.Function):
    """Depthwise Fast-ParC in bounded steps (:data:`CHUNK_BYTES`), the position embedding and bias fused into the
    spectrum, with a hand-written backward that recomputes rfft(x) instead of storing the complex spectrum.

    With W = rfft(w), P = rfft(pe), G = rfft(dy) along the kernel axis and S = sum over batch and the other axis:
        forward   y  = irfft((rfft(x) + P) * conj(W), n=K) + bias   (bias enters as K * bias in the DC bin)
        backward  dx = irfft(G * W);  dpe = irfft(W * S[G]);  dw = irfft(S[conj(G) * rfft(x)] + conj(S[G]) * P)
                  dbias = sum dy
    The 1/K of the inverse transform is folded into the small kernel spectrum (``irfft(norm="forward")`` does no
    scaling pass). x: (B, C, H, W); weight: (C, 1, K); bias: (C,) or None; pe: (C, K) or None (added along ``dim``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pe, dim):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias, pe)
        ctx.dim = dim
        return _DepthwiseFFT.compute(x, weight, bias, pe, dim)

    @staticmethod
    def compute(x, weight, bias, pe, dim):
        """The forward without autograd bookkeeping (also run directly where nothing records a gradient)."""
        k = x.size(dim)
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        wf = torch.fft.rfft(weight[:, 0].to(ct), dim=-1).conj() / k  # (C, F)
        addend = None  # (C, F): (P * conj(W) + K * bias at DC) / K
        if pe is not None:
            addend = torch.fft.rfft(pe.to(ct), dim=-1) * wf
        if bias is not None:
            dc = torch.zeros_like(wf)
            dc[:, 0] = bias.to(ct)
            addend = dc if addend is None else addend + dc
        wf = _spectrum_view(wf, dim)
        addend = _spectrum_view(addend, dim) if addend is not None else None
        return _chunked(x, lambda xc, cs: _fft_step(xc.to(ct), wf[cs], addend[cs] if addend is not None else None, dim))

    @staticmethod
    @_twice_differentiable("fft")
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, pe, dim, (need_x, need_w, need_b, need_pe) = _saved(ctx)
        k = x.size(dim)
        other = 3 if dim == 2 else 2
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        wf = _spectrum_view(torch.fft.rfft(weight[:, 0].to(ct), dim=-1), dim)
        g_sum = torch.zeros(wf.shape, dtype=wf.dtype, device=wf.device)  # S[G]
        gx_w = torch.zeros_like(g_sum) if need_w else None  # S[conj(G) * rfft(x)]
        gy = gy.contiguous()
        chunks = _chunks(x)
        gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x and len(chunks) > 1 else None
        for bs, cs in chunks:
            gf = torch.fft.rfft(gy[bs, cs].to(ct), dim=dim)
            if need_pe or (need_w and pe is not None):
                g_sum[cs] += gf.sum(dim=(0, other), keepdim=True)[0]
            if need_w:
                xf = torch.fft.rfft(x[bs, cs].to(ct), dim=dim)
                gx_w[cs] += xf.mul_(gf.conj()).sum(dim=(0, other), keepdim=True)[0]
            if need_x:
                gxc = torch.fft.irfft(gf.mul_(wf[cs] / k), n=k, dim=dim, norm="forward")
                if gx is None:
                    gx = gxc.to(x.dtype)
                else:
                    gx[bs, cs] = gxc
        axis = other - 1  # the singleton axis of the (C, F, 1) / (C, 1, F) spectra
        gw = gpe = None
        if need_w:
            if pe is not None:
                gx_w += g_sum.conj() * _spectrum_view(torch.fft.rfft(pe.to(ct), dim=-1), dim)
            gw = torch.fft.irfft(gx_w.squeeze(axis), n=k, dim=-1).unsqueeze(1).to(weight.dtype)
        if need_pe:
            gpe = torch.fft.irfft((wf * g_sum).squeeze(axis), n=k, dim=-1).to(pe.dtype)
        gb = gy.sum(dim=(0, 2, 3)) if need_b else None
        return gx, gw, gb, gpe, None


def _fft_step(xc: torch.Tensor, wf: torch.Tensor, addend: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """One chunk of the depthwise FFT forward: irfft(rfft(xc) * wf + addend, norm="forward") along ``dim``."""
    xf = torch.fft.rfft(xc, dim=dim)
    xf.mul_(wf)
    if addend is not None:
        xf.add_(addend)
    return torch.fft.irfft(xf, n=xc.size(dim), dim=dim, norm="forward")


def _chunked(x: torch.Tensor, step) -> torch.Tensor:
    """Apply ``step(x_chunk, channel_slice) -> y_chunk`` over the :func:`_chunks` of x (B, C, H, W); each result is
    copied into the output while it is still in cache. Returns (B, C, H, W) with x's dtype."""
    chunks = _chunks(x)
    if len(chunks) == 1:
        return step(x, slice(None)).to(x.dtype)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for bs, cs in chunks:
        out[bs, cs] = step(x[bs, cs], cs)
    return out


def _fft(x: torch.Tensor, weight: torch.Tensor, dim: int, bias: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """Fast-ParC for grouped / dense kernels (depthwise goes through :class:`_DepthwiseFFT`):
    irfft(sum_c rfft(x) * conj(rfft(w)), n=K) along ``dim``. x: (B, C_in, H, W) -> (B, C_out, H, W)."""
    out_dtype = x.dtype
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    b, c_in, h, w = x.shape
    c_out, c_g, k = weight.shape
    o_g = c_out // groups
    xf = torch.fft.rfft(x, dim=dim)  # (B, C_in, F, W) or (B, C_in, H, F)
    wf = torch.fft.rfft(weight.to(x.dtype), dim=-1).conj()  # (C_out, Cg, F)
    f = wf.size(-1)
    if c_g == 1 and o_g == 1:
        # depthwise (reached while exporting): an elementwise complex product, which ONNX export can lower
        # (it has no decomposition for a complex einsum).
        yf = xf * (wf.view(1, c_out, f, 1) if dim == 2 else wf.view(1, c_out, 1, f))
    elif dim == 2:
        xf = xf.view(b, groups, c_g, f, w)
        yf = torch.einsum("gocf,bgcfw->bgofw", wf.view(groups, o_g, c_g, f), xf).reshape(b, c_out, f, w)
    else:
        xf = xf.view(b, groups, c_g, h, f)
        yf = torch.einsum("gocf,bgchf->bgohf", wf.view(groups, o_g, c_g, f), xf).reshape(b, c_out, h, f)
    y = torch.fft.irfft(yf, n=k, dim=dim)
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    return y.to(out_dtype)


_DEPTHWISE = {"native": _DepthwiseNative, "fft": _DepthwiseFFT, "gemm": _DepthwiseGemm}
"""The fused depthwise autograd Functions by method (:func:`_circular_conv`)."""
