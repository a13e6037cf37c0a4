"""Cost of a model: parameters, MACs, inference / training throughput and MFU.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2) with these additions
and corrections:

* the FFT ops behind Fast-ParC (``aten._fft_r2c``, ``aten._fft_c2r``, ``aten._fft_c2c``) with the standard
  estimate of 5·N·log2(n) FLOPs for a complex transform of N points over a length-n axis set and half of
  that, 2.5·N·log2(n), for a real one (N = number of real points of the real side);
* the complex pointwise product of the spectra (``aten.mul`` with a complex result): 6 FLOPs per element
  (4 multiplications + 2 additions); real element-wise ops stay uncounted, as everywhere in torch's counter;
* the backward of grouped / depthwise convolutions (torch's formula ignores ``groups``);
* CPU's fused attention kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward),
  which torch's registry lacks, with torch's own SDPA formula (QKᵀ and AV: 4·B·h·Nq·Nk·d FLOPs forward).

MFU (model FLOPs utilisation) = model FLOPs per second / the fp32 GEMM peak measured in the same run on the
same device (:func:`gemm_peak_flops`: the fastest of ``torch.mm`` and, on CPU, oneDNN's GEMM). Training FLOPs are
counted, not estimated: forward + backward of one step under the counter.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from hybridvision.ops import fused

aten = torch.ops.aten

__all__ = [
    "ProfileResult",
    "count_flops",
    "count_macs",
    "format_results",
    "gemm_peak_flops",
    "gemm_peaks",
    "matmul_peak_flops",
    "onednn_gemm_peak_flops",
    "model_in_chans",
    "profile_model",
    "throughput",
]


def model_in_chans(model: nn.Module) -> int:
    """Input channels of ``model``: its ``in_chans`` attribute, else the first ``Conv2d``'s ``in_channels``, else
    timm's ``pretrained_cfg["input_size"][0]``, else 3."""
    if isinstance(getattr(model, "in_chans", None), int):
        return model.in_chans
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None:
        return conv.in_channels
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3,))[0])


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _fft_log2(shape: Any, dims: Any) -> float:
    return math.log2(max(_numel([shape[d] for d in dims]), 1))


def _raw(fn: Callable) -> Callable:
    """Mark ``fn`` to receive tensors (not shapes) from FlopCounterMode."""
    fn._get_raw = True  # type: ignore[attr-defined]
    return fn


def _fft_r2c_flop(x_shape, dim, normalization, onesided, *, out_shape=None, **_: Any) -> int:
    """Real-to-complex FFT of ``x: (..., n, ...)`` along ``dim``: 2.5·numel(x)·log2(n)."""
    return int(2.5 * _numel(x_shape) * _fft_log2(x_shape, dim))


def _fft_c2r_flop(x_shape, dim, normalization, last_dim_size, *, out_shape=None, **_: Any) -> int:
    """Complex-to-real inverse FFT producing ``out: (..., n, ...)``: 2.5·numel(out)·log2(n)."""
    return int(2.5 * _numel(out_shape) * _fft_log2(out_shape, dim))


def _fft_c2c_flop(x_shape, dim, normalization, forward, *, out_shape=None, **_: Any) -> int:
    """Complex FFT of ``x`` along ``dim``: 5·numel(x)·log2(n)."""
    return int(5 * _numel(x_shape) * _fft_log2(x_shape, dim))


@_raw
def _complex_mul_flop(*args: Any, out_val: Any = None, **_: Any) -> int:
    """``aten.mul`` with a complex result: 6 FLOPs per output element; real products are not counted."""
    if isinstance(out_val, torch.Tensor) and out_val.is_complex():
        return 6 * out_val.numel()
    return 0


def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, _out_pad, _groups, output_mask,
    *, out_shape=None, **_: Any,
) -> int:
    """Backward of a (grouped) convolution: the forward cost once for the input gradient and once for the weight
    gradient, each when requested. torch's own formula ignores ``groups`` and overcounts a depthwise conv's
    backward by a factor of ``C``."""
    fwd = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _sdpa_cpu_flop(q_shape, k_shape, v_shape, *args: Any, out_shape=None, **_: Any) -> int:
    """CPU flash attention, ``q: (B, h, Nq, d)``, ``k, v: (B, h, Nk, d)``: torch's SDPA formula."""
    return flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)


def _sdpa_cpu_backward_flop(grad_shape, q_shape, k_shape, v_shape, *args: Any, out_shape=None, **_: Any) -> int:
    """Backward of CPU flash attention: torch's SDPA backward formula."""
    return flop_counter.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


FLOP_FORMULAS: dict[Any, Callable] = {
    aten._fft_r2c: _fft_r2c_flop,
    aten._fft_c2r: _fft_c2r_flop,
    aten._fft_c2c: _fft_c2c_flop,
    aten.mul: _complex_mul_flop,
    aten.convolution_backward: _conv_backward_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flop,
}


def _example_input(model: nn.Module, input_size: tuple[int, int, int, int]) -> torch.Tensor:
    if len(input_size) != 4 or any(int(s) <= 0 for s in input_size):
        raise ValueError(f"input_size={tuple(input_size)}: expected (B, C, H, W) with positive sizes, e.g. (1, 3, 224, 224)")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(0)
    return torch.randn(*input_size, generator=g).to(device=device, dtype=dtype)


def _train_step_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 2:
        target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
        return F.cross_entropy(out, target)
    return out.float().pow(2).mean()


def count_flops(model: nn.Module, input_size: tuple[int, int, int, int], *, train: bool = False) -> int:
    """FLOPs of one forward (``train=False``, eval mode, no grad) or one forward + backward (``train=True``).

    Args:
        model: any ``nn.Module`` taking ``x: (B, C, H, W)``; it is not modified (a copy is used for ``train``).
        input_size: ``(B, C, H, W)`` of the batch that is counted.

    Returns:
        Total FLOPs for the whole batch (divide by ``B`` for per image).
    """
    x = _example_input(model, input_size)
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    if train:
        m = copy.deepcopy(model).train()
        with counter:
            _train_step_loss(m, x).backward()
    else:
        was_training = model.training
        model.eval()
        try:
            with counter, torch.no_grad():
                model(x)
        finally:
            model.train(was_training)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: tuple[int, int, int, int], *, train: bool = False) -> int:
    """MACs (= FLOPs / 2) of one forward (or forward + backward) over the batch ``input_size = (B, C, H, W)``."""
    return count_flops(model, input_size, train=train) // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_flops(device: str | torch.device = "cpu", *, n: int | None = None, reps: int = 10) -> float:
    """Best fp32 ``torch.mm`` throughput (FLOP/s) of ``(n, n) @ (n, n)`` on ``device``.

    ``n`` defaults to 1024 on CPU and 8192 on GPU; the best of ``reps`` timed calls after two warm-up calls.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2.0 * n**3 / _best_time(lambda: a @ b, device, 2, reps)


def onednn_gemm_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 FLOP/s of oneDNN's GEMM on the CPU (``hybridvision.ops.fused``'s, the kernel of the fused CoAtNet
    inference path) on ``(n, n) x (n, n)``, the best of ``reps`` calls after two warm-up calls; 0 where oneDNN is
    unavailable. On the 2-core Zen 5 VM of development it read about twice ``torch.mm``'s rate."""
    if not torch.backends.mkldnn.is_available():
        return 0.0
    a, w = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        return 2.0 * n**3 / _best_time(lambda: fused._gemm(a, w), torch.device("cpu"), 2, reps)


def gemm_peaks(device: str | torch.device = "cpu") -> dict[str, float]:
    """The fp32 GEMM rates (FLOP/s) an MFU is measured against, by kernel: on CPU ``torch.mm`` (the better of
    n = 1024 and 2048) and oneDNN's GEMM; on GPU ``torch.mm`` at n = 8192. :func:`gemm_peak_flops` is the largest."""
    device = torch.device(device)
    if device.type != "cpu":
        return {"torch.mm": matmul_peak_flops(device)}
    return {"torch.mm": max(matmul_peak_flops(device, n=1024), matmul_peak_flops(device, n=2048, reps=3)),
            "oneDNN GEMM": onednn_gemm_peak_flops()}


def gemm_peak_flops(device: str | torch.device = "cpu") -> float:
    """The MFU denominator: the fastest fp32 GEMM of :func:`gemm_peaks` measured now on ``device``, so that a
    model whose matmuls run on the faster kernel cannot read above 100%. (Against ``torch.mm`` alone, which on the
    development VM ran at half oneDNN's rate, CoAtNet-0 read 120% inference MFU.)"""
    return max(gemm_peaks(device).values())


def throughput(
    model: nn.Module,
    input_size: tuple[int, int, int, int],
    *,
    train: bool = False,
    warmup: int = 2,
    iters: int = 5,
) -> float:
    """Images per second of ``model`` on batches ``x: (B, C, H, W)`` (median of ``iters`` timed steps).

    ``train=False``: eval mode under ``torch.inference_mode``. ``train=True``: forward, cross-entropy,
    backward and an SGD step on a deep copy (the caller's weights and BN statistics are untouched).
    """
    x = _example_input(model, input_size)
    device = x.device
    times: list[float] = []
    if train:
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-6)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            _train_step_loss(m, x).backward()
            opt.step()

        ctx: Any = torch.enable_grad
    else:
        m = model
        was_training = m.training
        m.eval()

        def step() -> None:
            m(x)

        ctx = torch.inference_mode
    try:
        with ctx():
            for i in range(warmup + iters):
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        if not train:
            m.train(was_training)
    times.sort()
    return input_size[0] / times[len(times) // 2]


@dataclass
class ProfileResult:
    """One model's cost at one resolution; MACs are per image (one forward), MFU in [0, 1]."""

    model: str
    img_size: tuple[int, int]
    batch_size: int
    device: str
    params: int
    macs: int
    train_macs: int
    infer_img_s: float
    train_img_s: float
    peak_flops: float
    infer_mfu: float
    train_mfu: float

    def as_dict(self) -> dict:
        return asdict(self)


def profile_model(
    model: nn.Module,
    img_size: int | tuple[int, int],
    *,
    batch_size: int = 8,
    name: str | None = None,
    peak_flops: float | None = None,
    warmup: int = 2,
    iters: int = 5,
    measure_speed: bool = True,
) -> ProfileResult:
    """Params, MACs per image, inference/training img/s and MFU of ``model`` on ``x: (batch_size, C, H, W)``.

    Args:
        model: the model; its device is used. Not modified.
        img_size: ``S`` or ``(H, W)``.
        peak_flops: the fp32 GEMM peak (FLOP/s) to compare against; measured with :func:`gemm_peak_flops` when
            ``None`` (pass one value to several calls so they share the same anchor).
        measure_speed: ``False`` skips timing (img/s, MFU and peak are then 0).
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = model_in_chans(model)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    params = sum(q.numel() for q in model.parameters())
    macs = count_macs(model, (1, in_chans, h, w))
    train_macs = count_macs(model, (2, in_chans, h, w), train=True) // 2
    size = (batch_size, in_chans, h, w)
    if measure_speed:
        peak = peak_flops if peak_flops is not None else gemm_peak_flops(device)
        infer = throughput(model, size, train=False, warmup=warmup, iters=iters)
        train = throughput(model, size, train=True, warmup=warmup, iters=iters)
        infer_mfu = 2 * macs * infer / peak
        train_mfu = 2 * train_macs * train / peak
    else:
        peak = infer = train = infer_mfu = train_mfu = 0.0
    return ProfileResult(
        model=name or type(model).__name__,
        img_size=(h, w),
        batch_size=batch_size,
        device=str(device),
        params=params,
        macs=macs,
        train_macs=train_macs,
        infer_img_s=infer,
        train_img_s=train,
        peak_flops=peak,
        infer_mfu=infer_mfu,
        train_mfu=train_mfu,
    )


def format_results(results: list[ProfileResult]) -> str:
    """A markdown table of ``results``; with several rows, ratios against the first (the anchor) are added."""
    if not results:
        raise ValueError("format_results: got no results; profile at least one model")
    a = results[0]
    head = "| model | size | params (M) | GMACs | infer img/s | train img/s | infer MFU | train MFU |"
    lines = [head, "|" + "---|" * 8]
    for r in results:
        def ratio(v: float, ref: float) -> str:
            return f" ({v / ref:.2f}×)" if r is not a and ref else ""

        lines.append(
            f"| {r.model} | {r.img_size[0]}×{r.img_size[1]} | {r.params / 1e6:.2f}{ratio(r.params, a.params)} "
            f"| {r.macs / 1e9:.3f}{ratio(r.macs, a.macs)} | {r.infer_img_s:.1f}{ratio(r.infer_img_s, a.infer_img_s)} "
            f"| {r.train_img_s:.1f}{ratio(r.train_img_s, a.train_img_s)} | {100 * r.infer_mfu:.1f}% | {100 * r.train_mfu:.1f}% |"
        )
    lines.append(
        f"\nbatch {a.batch_size} on {a.device}; fp32 GEMM peak measured in this run: {a.peak_flops / 1e9:.1f} GFLOP/s "
        "(the fastest of torch.mm and oneDNN's GEMM on CPU); "
        "MACs per image, forward; ratios against the first row."
    )
    return "\n".join(lines)
