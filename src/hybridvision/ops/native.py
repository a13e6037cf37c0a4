"""hybridvision's hand-written CPU kernels: ``circular_conv(..., method="native")`` (``csrc/circular_cpu.cpp``),
training-mode BatchNorm + GELU (``csrc/batchnorm_act_cpu.cpp``, used by :mod:`hybridvision.ops.norm_act`), the
depthwise 3x3 conv (``csrc/depthwise_cpu.cpp``, an alternative in :mod:`hybridvision.ops.fused`) and relative
self-attention (``csrc/attention_cpu.cpp``, an alternative in :mod:`hybridvision.ops.attention`).

They are compiled, as one extension, on first use with ``torch.utils.cpp_extension`` (a C++17 compiler and ninja
are needed; 49 s on the 2-core development machine of 2026-12-02, see the README) into torch's extension cache,
``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` moves it), and loaded from there afterwards; ``make setup``
builds it once
(:func:`prebuild`). The build uses ``-march=native``, so the library's name carries a hash of this CPU's model and
feature flags: a home directory shared by different machines gets one build per CPU type.

``HYBRIDVISION_NATIVE=0`` switches it off (``"auto"`` then never picks it, ``method="native"`` raises and BatchNorm
runs as torch's). Where it cannot be built, ``"auto"`` falls back to the other methods and BatchNorm to torch's, after
one warning.

Ops (registered as ``torch.ops.hybridvision.*``, float32 / float64, CPU, contiguous inputs):
    circular_dw_forward(x (B, C, H, W), weight (C, K), add (C, K) or None, dim, algo=0) -> (B, C, H, W)
        y[b, c, i] = add[c, i] + sum_k weight[c, k] * x[b, c, (i + k) mod K] along ``dim`` (2 or 3)
    circular_dw_wgrad(gy (B, C, H, W), x (B, C, H, W), dim, algo=0) -> (C, K)
        dw[c, k] = sum over b, the other axis and i of gy[b, c, i] * x[b, c, (i + k) mod K]
``algo``: 0 chooses (the FFT from a K measured by ``benchmarks/bench_native_crossover.py``, when K has no prime
factor above 7), 1 forces the direct sum, 2 the FFT.
    batch_norm_act_forward(x (B, C, H, W) channels-last, weight (C), bias (C), eps, gelu) -> (y, mean (C), var (C))
        y = gelu(BN(x)) (or BN(x)) with the batch statistics; var is biased
    batch_norm_act_backward(gy, x, weight, bias, mean, invstd, gelu) -> (gx, gweight (C), gbias (C))
    dw3x3_forward(x (B, C, H, W) channels-last, weight (C, 1, 3, 3), bias (C) or None, stride (1 or 2), gelu)
        -> (B, C, Ho, Wo) channels-last: depthwise 3x3 conv, zero padding 1, then GELU when asked
        (``csrc/depthwise_cpu.cpp``; ``hybridvision.ops.fused`` times it against oneDNN)
    dw3x3_backward_input(gy (B, C, Ho, Wo), weight, H, W, stride) -> gx (B, C, H, W) channels-last
    dw3x3_backward_weight(gy, x, stride) -> gweight (C, 1, 3, 3)
    attention_forward(qkv (B, N, 3, heads, d), bias (heads, N, N), heads, scale, keep_probs) -> (y (B, N, heads, d),
        P (B, heads, N, N), or an empty tensor unless keep_probs): P = softmax(scale q k^T + bias) per image and head,
        y = P v (``csrc/attention_cpu.cpp``)
    attention_backward(gy (B, N, heads, d), qkv, P, scale) -> (gqkv (B, N, 3, heads, d), gbias (heads, N, N))
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["attention_backward", "attention_forward", "available", "batch_norm_act_backward", "batch_norm_act_forward",
           "build", "compile_and_load", "disabled", "dw3x3_backward_input", "dw3x3_backward_weight", "dw3x3_forward",
           "fft_length", "forward", "prebuild", "wgrad"]

_ENV_VAR = "HYBRIDVISION_NATIVE"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("circular_cpu.cpp", "batchnorm_act_cpu.cpp", "depthwise_cpu.cpp",
                                       "attention_cpu.cpp")]
_HEADERS = [_CSRC / "vec_gelu.h"]
_lock = threading.Lock()
_state: dict[str, Optional[str]] = {}  # "error": None once loaded, else the build error


def disabled() -> bool:
    """True when ``HYBRIDVISION_NATIVE=0`` (read at every call, so tests and users can flip it)."""
    return os.environ.get(_ENV_VAR, "1") == "0"


def _cpu_tag() -> str:
    """A short hash of this CPU's model name and feature flags (the build is ``-march=native``)."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        text += "".join(line for line in info if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _ninja_on_path() -> None:
    """Put the ``ninja`` of the pip package (a dependency) on PATH when none is there: torch runs ``ninja`` by name,
    and ``.venv/bin`` is not on PATH unless the environment is activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def compile_and_load(name: str, sources: list[str], build_directory: Optional[str] = None,
                     verbose: bool = False, extra_cflags: tuple[str, ...] = ()) -> None:
    """Compile C++ ``sources`` with the native kernels' flags (``-O3 -march=native``, OpenMP; then ``extra_cflags``,
    e.g. ``-march=x86-64-v3`` for the AVX2 code on an AVX-512 machine) into torch's extension cache (or
    ``build_directory``) and load the library into this process, as extension ``name``; errors propagate.
    :func:`build` uses it, and so does ``benchmarks/bench_native_ab.py`` for an older revision of the kernel."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    # torch rebuilds a cached extension when its sources or flags change, not its headers: their hash is a flag
    headers = hashlib.sha1(b"".join(path.read_bytes() for path in _HEADERS)).hexdigest()[:12]
    cpp_extension.load(name=name, sources=sources,
                       extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DHYBRIDVISION_HEADERS={headers}",
                                     *extra_cflags],
                       extra_ldflags=["-fopenmp"], is_python_module=False, build_directory=build_directory,
                       verbose=verbose)


def build(verbose: bool = False) -> None:
    """Compile (or load the cached build of) the kernels into this process; raises ``RuntimeError`` with the
    compiler's message and the fix when that fails. Idempotent and thread-safe."""
    if disabled():
        raise RuntimeError(f"hybridvision's native kernels are switched off ({_ENV_VAR}=0); unset it, or use "
                           "method='gemm' / 'fft'")
    if _state.get("error", "") is None:  # loaded: no lock on the per-call path
        return
    with _lock:
        if "error" in _state:
            if _state["error"] is not None:
                raise RuntimeError(_state["error"])
            return
        try:
            compile_and_load(f"hybridvision_native_{_cpu_tag()}", [str(path) for path in _SOURCES], verbose=verbose)
        except Exception as exc:  # the compiler's or loader's own message is the useful part
            _state["error"] = (
                f"could not build hybridvision's native kernels ({type(exc).__name__}: {exc}). "
                "It needs a C++17 compiler (g++ or clang++) and ninja (pip install ninja); or use "
                "method='gemm' / 'fft', or set HYBRIDVISION_NATIVE=0 to stop 'auto' from trying it."
            )
            raise RuntimeError(_state["error"]) from exc
        _register_fakes()
        _state["error"] = None


def _register_fakes() -> None:
    """Shape-only (fake tensor) formulas of the circular-conv ops, so that ``torch.compile`` can keep the kernel in
    its graph as an opaque call: forward (B, C, H, W) -> the same shape; wgrad -> (C, K)."""
    torch.library.register_fake("hybridvision::circular_dw_forward")(
        lambda x, weight, add, dim, algo=0: torch.empty_like(x, memory_format=torch.contiguous_format))
    torch.library.register_fake("hybridvision::circular_dw_wgrad")(
        lambda gy, x, dim, algo=0: gy.new_empty(gy.size(1), gy.size(dim)))


@torch.compiler.assume_constant_result  # torch.compile runs it eagerly while tracing (its lock would break the graph)
def available() -> bool:
    """True when the kernels are enabled and loaded (building them on the first call; a failed build warns once)."""
    if disabled():
        return False
    if "error" not in _state:
        try:
            build()
        except RuntimeError as exc:
            warnings.warn(f"{exc} Falling back to the other methods.", RuntimeWarning, stacklevel=2)
    return _state.get("error", "") is None


def fft_length(k: int) -> bool:
    """Whether the circular kernels have an FFT of length ``k`` (``algo=2``): k >= 2 without prime factors above 7."""
    if k < 2:
        return False
    for p in (2, 3, 5, 7):
        while k % p == 0:
            k //= p
    return k == 1


def forward(x: torch.Tensor, weight: torch.Tensor, add: Optional[torch.Tensor], dim: int, algo: int = 0) -> torch.Tensor:
    """``torch.ops.hybridvision.circular_dw_forward`` on contiguous tensors (builds the kernel if needed): x
    (B, C, H, W), weight (C, K) or (C, 1, K), add (C, K), (C,) (a bias) or None; returns y like x."""
    build()
    return torch.ops.hybridvision.circular_dw_forward(x.contiguous(), weight.contiguous(), add, dim, algo)


def wgrad(gy: torch.Tensor, x: torch.Tensor, dim: int, algo: int = 0) -> torch.Tensor:
    """``torch.ops.hybridvision.circular_dw_wgrad`` on contiguous tensors (builds the kernel if needed)."""
    build()
    return torch.ops.hybridvision.circular_dw_wgrad(gy.contiguous(), x.contiguous(), dim, algo)


def batch_norm_act_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                           gelu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.hybridvision.batch_norm_act_forward`` (builds the kernels if needed); x channels-last."""
    build()
    return torch.ops.hybridvision.batch_norm_act_forward(x, weight, bias, eps, gelu)


def batch_norm_act_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            mean: torch.Tensor, invstd: torch.Tensor,
                            gelu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.hybridvision.batch_norm_act_backward`` (builds the kernels if needed); gy, x channels-last."""
    build()
    return torch.ops.hybridvision.batch_norm_act_backward(gy, x, weight, bias, mean, invstd, gelu)


def prebuild() -> None:
    """Build the kernels now and say so (``make setup`` calls this); a failed build only warns, as everything
    works without them."""
    if disabled():
        print(f"[setup] {_ENV_VAR}=0: not building hybridvision's native kernels")
        return
    try:
        build()
    except RuntimeError as exc:
        print(f"[setup] WARNING: {exc}")
        return
    print("[setup] native kernels ready (circular_conv, BatchNorm+GELU, depthwise 3x3; torch.ops.hybridvision, "
          f"CPU tag {_cpu_tag()})")


def dw3x3_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                  gelu: bool) -> torch.Tensor:
    """``torch.ops.hybridvision.dw3x3_forward``: x (B, C, H, W) channels-last, weight (C, 1, 3, 3) -> (B, C, Ho, Wo)."""
    build()
    return torch.ops.hybridvision.dw3x3_forward(x, weight, bias, stride, gelu)


def dw3x3_backward_input(gy: torch.Tensor, weight: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """``torch.ops.hybridvision.dw3x3_backward_input``: gy (B, C, Ho, Wo) channels-last -> gx (B, C, h, w)."""
    build()
    return torch.ops.hybridvision.dw3x3_backward_input(gy, weight, h, w, stride)


def dw3x3_backward_weight(gy: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    """``torch.ops.hybridvision.dw3x3_backward_weight``: gy (B, C, Ho, Wo), x (B, C, H, W) -> gw (C, 1, 3, 3)."""
    build()
    return torch.ops.hybridvision.dw3x3_backward_weight(gy, x, stride)


def attention_forward(qkv: torch.Tensor, bias: torch.Tensor, heads: int, scale: float,
                      keep_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.hybridvision.attention_forward``: qkv (B, N, 3, heads, d) contiguous, bias (heads, N, N) ->
    (y (B, N, heads, d), P (B, heads, N, N) or an empty tensor)."""
    build()
    return torch.ops.hybridvision.attention_forward(qkv, bias, heads, scale, keep_probs)


def attention_backward(gy: torch.Tensor, qkv: torch.Tensor, probs: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.hybridvision.attention_backward``: the gradients of :func:`attention_forward`'s y for the output
    gradient gy (B, N, heads, d), given its qkv and P -> (gqkv (B, N, 3, heads, d), gbias (heads, N, N))."""
    build()
    return torch.ops.hybridvision.attention_backward(gy, qkv, probs, scale)
