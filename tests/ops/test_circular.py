"""circular_conv: every method equals the float64 formula, forward and all gradients; errors; dtype handling."""
from __future__ import annotations

import pytest
import torch

from hybridvision.ops import circular
from hybridvision.ops.circular import choose_method, circular_conv, get_default_method, set_default_method

METHODS = ["direct", "gemm", "fft", "native", "auto"]


def reference(x: torch.Tensor, weight: torch.Tensor, dim: int, bias, groups: int) -> torch.Tensor:
    """The formula, in float64: y[b, o, i] = bias[o] + sum_c sum_k w[o, c, k] x[b, c, (i + k) mod K] along dim."""
    x, weight = x.double(), weight.double()
    dim = dim % 4
    xl = x.movedim(dim, -1)  # (B, C_in, other, K)
    b, c_in, n, k = xl.shape
    c_out, c_g, _ = weight.shape
    o_g = c_out // groups
    ar = torch.arange(k)
    idx = (ar.view(k, 1) + ar.view(1, k)) % k  # [i, k] -> (i + k) mod K
    xs = xl[..., idx].view(b, groups, c_g, n, k, k)  # [b, g, c, n, i, k]
    y = torch.einsum("bgcnik,gock->bgoni", xs, weight.view(groups, o_g, c_g, k)).reshape(b, c_out, n, k)
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    return y.movedim(-1, dim)


def make(shape, c_out, groups, dim, seed, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    b, c_in, h, w = shape
    k = (h, w)[dim % 4 - 2]
    x = torch.randn(shape, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, k, generator=g, dtype=dtype) / k**0.5
    bb = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return x, weight, bb


CASES = [
    # (B, C_in, H, W), C_out, groups (None = depthwise)
    ((2, 6, 7, 7), 6, None),  # odd, square, depthwise
    ((2, 4, 8, 8), 4, None),  # even, square
    ((3, 5, 5, 9), 5, None),  # non-square
    ((2, 4, 6, 11), 6, 1),  # dense, non-square
    ((1, 6, 10, 4), 4, 2),  # grouped
    ((2, 3, 7, 6), 6, 3),  # depthwise with a channel multiplier
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dim", [2, 3, -2, -1])
@pytest.mark.parametrize("shape,c_out,groups", CASES)
def test_forward_and_grads_match_float64_formula(method, dim, shape, c_out, groups):
    g = shape[1] if groups is None else groups
    x, w, b = make(shape, c_out, g, dim, seed=hash((shape, dim)) % 1000)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    if method == "native" and (g != shape[1] or c_out != shape[1]):  # depthwise only: a clear error otherwise
        with pytest.raises(ValueError, match="method='native': depthwise kernels only"):
            circular_conv(x, w, dim, b, groups=groups, method=method)
        return
    y = circular_conv(x, w, dim, b, groups=groups, method=method)
    assert y.shape == (shape[0], c_out, shape[2], shape[3]) and y.dtype == torch.float32

    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    ref = reference(x64, w64, dim, b64, g)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)

    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    rx, rw, rb = torch.autograd.grad(ref, (x64, w64, b64), gy.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-4)


def test_reference_is_the_official_cat_plus_valid_conv():
    """The test's formula agrees with the official ParC implementation (cat(x, x[:-1]) + valid conv)."""
    x, w, b = make((2, 4, 6, 9), 4, 4, 3, seed=3, dtype=torch.float64)
    official = torch.nn.functional.conv2d(torch.cat([x, x[..., :-1]], dim=3), w.unsqueeze(2), b, groups=4)
    torch.testing.assert_close(reference(x, w, 3, b, 4), official)


def test_no_bias_and_large_axis():
    x, w, _ = make((1, 3, 2, 64), 3, 3, 3, seed=5, bias=False)
    ref = reference(x, w, 3, None, 3)
    for m in ["direct", "gemm", "fft"]:
        torch.testing.assert_close(circular_conv(x, w, 3, method=m).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["direct", "gemm", "fft"])
@pytest.mark.parametrize("dim,groups,c_out", [(2, None, 3), (3, None, 3), (2, 1, 2), (3, 3, 6)])
def test_gradcheck(method, dim, groups, c_out):
    g = 3 if groups is None else groups
    x, w, b = make((2, 3, 5, 4), c_out, g, dim, seed=7, dtype=torch.float64)
    for t in (x, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: circular_conv(x, w, dim, b, groups, method), (x, w, b), fast_mode=True
    )


FUSED_VARIANTS = [  # (method, {module attribute: value}): every code path of the fused depthwise Functions
    ("fft", {"CHUNK_BYTES": 1 << 30}),  # one step
    ("fft", {"CHUNK_BYTES": 200}),  # whole samples per step
    ("fft", {"CHUNK_BYTES": 1}),  # channel ranges of one sample
    ("gemm", {"GEMM_FOLD_MAX_K": 1 << 10, "GEMM_COLS_MAX_K": 1 << 10}),  # batch folded, kernel axis first
    ("gemm", {"GEMM_FOLD_MAX_K": 1 << 10, "GEMM_COLS_MAX_K": 0}),  # batch folded, kernel axis last (dim 3)
    ("gemm", {"GEMM_FOLD_MAX_K": 0}),  # loop over the batch, in place
    ("native", {}),  # the C++ kernel, pe and bias in one addend
]


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("method,attrs", FUSED_VARIANTS)
def test_fused_depthwise_paths_with_pe(monkeypatch, dim, method, attrs):
    """The fused depthwise FFT / GEMM Functions with the position embedding: every code path gives the formula,
    and gradcheck and gradgradcheck (a double backward) pass for x, weight, bias and pe (also when only some inputs
    need a gradient)."""
    for attr, value in attrs.items():
        monkeypatch.setattr(circular, attr, value)
    x, w, b = make((3, 4, 5, 6), 4, 4, dim, seed=17, dtype=torch.float64)
    pe = torch.randn(4, x.size(dim), dtype=torch.float64, generator=torch.Generator().manual_seed(19))
    pe_b = pe.unsqueeze(-1) if dim == 2 else pe.unsqueeze(-2)
    ref = reference(x + pe_b, w, dim, b, 4)
    torch.testing.assert_close(circular._circular_conv(x, w, dim, b, 4, method, pe=pe), ref)
    for t in (x, w, b, pe):
        t.requires_grad_(True)
    fn = lambda x, w, b, pe: circular._circular_conv(x, w, dim, b, 4, method, pe=pe)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, pe), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b, pe), fast_mode=True)
    x.requires_grad_(False)
    gw, gpe = torch.autograd.grad(fn(x, w, None, pe).square().sum(), (w, pe))
    pe_b = pe.unsqueeze(-1) if dim == 2 else pe.unsqueeze(-2)
    rw, rpe = torch.autograd.grad(reference(x + pe_b, w, dim, None, 4).square().sum(), (w, pe))
    torch.testing.assert_close((gw, gpe), (rw, rpe))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_through_fft(dtype):
    x, w, b = make((2, 4, 6, 10), 4, 4, 3, seed=11)
    y = circular_conv(x.to(dtype), w.to(dtype), 3, b.to(dtype), method="fft")
    assert y.dtype == dtype
    ref = reference(x.to(dtype), w.to(dtype), 3, b.to(dtype), 4)
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


def test_default_method_override(monkeypatch):
    x, w, b = make((1, 2, 4, 4), 2, 2, 2, seed=13)
    calls = []
    rfft = torch.fft.rfft
    monkeypatch.setattr(torch.fft, "rfft", lambda *a, **k: calls.append(1) or rfft(*a, **k))
    previous = set_default_method("fft")
    try:
        assert get_default_method() == "fft"
        circular_conv(x, w, 2, b, method="gemm")  # per call wins
        assert not calls
        circular_conv(x, w, 2, b)  # auto -> forced fft
        assert calls
    finally:
        set_default_method(previous)
    assert get_default_method() == previous
    with pytest.raises(ValueError, match="unknown circular_conv method"):
        set_default_method("winograd")


def test_choose_method_rule(monkeypatch):
    """The documented rule of choose_method, item by item (rules without the native kernel, then with it)."""
    from hybridvision.ops import native

    monkeypatch.setattr(native, "available", lambda: False)

    def pick(c, k, dim=3, dtype=torch.float32, dense=False, grad=False):
        x = torch.zeros(2, c, k, k, dtype=dtype)
        w = torch.zeros(c, c if dense else 1, k, dtype=dtype)
        return choose_method(x, w, dim, needs_grad=grad)

    assert pick(8, 14, dense=True) == "fft"
    assert pick(8, 7) == "direct" and pick(8, 7, grad=True) == "gemm" and pick(8, 224) == "fft"
    assert pick(8, circular.DIRECT_MAX_K + 1) == "gemm"
    k_fwd, k_train = circular.GEMM_MAX_K["fwd", 3], circular.GEMM_MAX_K["train", 3]
    assert pick(4, k_fwd) == "gemm" and pick(4, k_fwd + 1) == "fft"
    assert pick(4, k_train, grad=True) == "gemm" and pick(4, k_train + 1, grad=True) == "fft"
    assert pick(4, circular.GEMM_MAX_K["fwd", 2], dim=-2) == "gemm"
    assert pick(4, 14, dtype=torch.float16) == "fft" and pick(4, 56, dtype=torch.bfloat16) == "gemm"
    k = circular.GEMM_MAX_K["train", 2] + 1
    x, w = torch.zeros(1, 4, k, 3, requires_grad=True), torch.zeros(4, 1, k)
    assert choose_method(x, w, 2) == "fft"  # needs_grad inferred from x.requires_grad
    with torch.no_grad():
        assert choose_method(x, w, 2) == "gemm"
    monkeypatch.setattr(native, "available", lambda: True)
    for (pass_, dim), (lo, hi) in circular.NATIVE_K.items():
        grad = pass_ == "train"
        assert pick(4, max(lo, 2), dim=dim, grad=grad) == "native" and pick(4, hi, dim=dim, grad=grad) == "native"
        assert pick(4, hi + 1, dim=dim, grad=grad) in ("gemm", "fft")
    assert pick(4, 7, dim=3) == "native" and pick(4, 7, dim=2) == "native"
    assert pick(4, 14, dense=True) == "fft" and pick(4, 14, dtype=torch.float16) == "fft"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert pick(4, 14, dim=2) == "native"  # torch.compile keeps the kernel as an opaque op (fake-tensor formula)
    monkeypatch.setattr(circular, "in_onnx_export", lambda: True)
    assert pick(4, 224) == "gemm" and pick(4, 14, dense=True) == "gemm"  # exportable MatMul while exporting


@pytest.mark.parametrize(
    "x_shape,w_shape,dim,groups,bias_shape,match",
    [
        ((2, 4, 8), (4, 1, 8), 2, None, None, r"shape \(B, C, H, W\)"),
        ((2, 4, 8, 8), (4, 1, 7), 3, None, None, "kernel length 7 != x.size\\(3\\) = 8"),
        ((2, 4, 8, 8), (4, 1, 8), 1, None, None, "dim must be one of"),
        ((2, 4, 8, 8), (4, 8), 3, None, None, "weight must have shape"),
        ((2, 4, 8, 8), (4, 2, 8), 3, None, None, "weight.size\\(1\\) = 2"),
        ((2, 5, 8, 8), (5, 1, 8), 3, 2, None, "groups=2 must be a positive divisor of the 5"),
        ((2, 4, 8, 8), (5, 2, 8), 3, 2, None, "not divisible by groups=2"),
        ((2, 4, 8, 8), (4, 1, 8), 3, None, (3,), r"bias must have shape \(4,\)"),
    ],
)
def test_bad_input_errors(x_shape, w_shape, dim, groups, bias_shape, match):
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    bias = torch.randn(bias_shape) if bias_shape else None
    with pytest.raises(ValueError, match=match):
        circular_conv(x, w, dim, bias, groups)


def test_bad_method_and_dtype():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 1, 4)
    with pytest.raises(ValueError, match="unknown circular_conv method 'best'"):
        circular_conv(x, w, 3, method="best")
    with pytest.raises(ValueError, match="floating-point"):
        circular_conv(x.long(), w, 3)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [None, 2])
def test_benchmark_quick_runs(tmp_path, batch):
    """benchmarks/bench_circular.py --quick runs end to end and writes its table and plot (no timing asserted), at
    the default batch and with --batch."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_circular.py"
    extra = [] if batch is None else ["--batch", str(batch)]
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path), *extra], check=True, timeout=600)
    stem = "circular_quick" + ("" if batch is None else f"_b{batch}")
    text = (tmp_path / f"{stem}.md").read_text()
    assert "| 56 | 48 | 3 | fwd |" in text and (tmp_path / f"{stem}.png").stat().st_size > 0
    assert f"B={batch or 16}, C=2688/L" in text


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench_circular.py imported as a module (dropped again afterwards)."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    yield __import__("bench_circular")
    sys.modules.pop("bench_circular", None)


def _fake_clock(monkeypatch, bench):
    """bench.CLOCK replaced by a counter; returns the log of calls and ``tick(name, dt)``, which makes a function that
    logs its name and advances the clock by dt."""
    now, log = [0], []

    def tick(name, dt):
        def f():
            log.append(name)
            now[0] += dt
        return f

    monkeypatch.setattr(bench, "CLOCK", lambda: now[0])
    return log, tick


def test_benchmark_rounds_run_the_between_hook_untimed(monkeypatch, bench):
    """bench_circular.timed_rounds calls each function untimed, then ``between``, then times the function again; the
    hook's time is not in the result (a fake clock that the hook advances by 100 and each call by 1); warm-up calls
    stop at ``warmup`` or once they have taken ``warmup_s``."""
    log, tick = _fake_clock(monkeypatch, bench)
    times = bench.timed_rounds({"a": tick("a", 1), "b": tick("b", 1)}, budget_s=0.0, min_reps=3,
                               between=tick("sweep", 100))
    assert times == {"a": [1, 1, 1], "b": [1, 1, 1]}
    assert log[:6] == ["a", "sweep", "a", "b", "sweep", "b"] and len(log) == 18

    # warm-up: up to `warmup` untimed calls, fewer once they have taken warmup_s (a slow function gets one)
    log.clear()
    times = bench.timed_rounds({"a": tick("a", 1), "b": tick("b", 50)}, budget_s=0.0, min_reps=2, warmup=3,
                               warmup_s=10)
    assert times == {"a": [1, 1], "b": [50, 50]}
    assert log == ["a"] * 4 + ["b"] * 2 + ["a"] * 4 + ["b"] * 2


def test_benchmark_floor_from_its_rounds(bench):
    """bench_circular.floor_stats: the bandwidth from the best copy, the floor at it, the best auto over that floor,
    and the median over the rounds of auto against the same round's copy (not against the best copy)."""
    # rounds (auto s, copy s): (2, 1), (4, 4), (3, 1); 10 bytes in + out, the copy moves 20. Per round 4, 2, 6 (median
    # 4; against the best copy it would be 4, 8, 6: median 6)
    st = bench.floor_stats([2.0, 4.0, 3.0], [1.0, 4.0, 1.0], nbytes=10, copy_bytes=20)
    assert st == pytest.approx(dict(bw=20.0, floor=500.0, floor_ratio=4.0, floor_median=4.0))


def test_benchmark_floor_rounds_visit_every_case_beside_a_copy(monkeypatch, bench):
    """bench_circular.floor_rounds: each round times every case's auto with the copy right after it (every other round
    the whole order reversed, so the copy comes right before it), and returns per case its auto times and the times of
    the copies beside them, one of each per round (a fake clock: each call of case i's auto advances it by i + 1, each
    copy by 10; a call takes more than warmup_s, so each timed call follows one untimed call)."""
    log, tick = _fake_clock(monkeypatch, bench)
    autos = [tick("a0", 1), tick("a1", 2), tick("a2", 3)]
    floors = bench.floor_rounds(autos, (tick("copy", 10), 20), budget_s=0.0, min_reps=3)
    assert floors == [{"auto": [i + 1] * 3, "copy": [10] * 3} for i in range(3)]
    forward = ["a0", "a0", "copy", "copy", "a1", "a1", "copy", "copy", "a2", "a2", "copy", "copy"]
    assert log == forward + forward[::-1] + forward


def test_native_algorithm_is_timed_per_shape(monkeypatch):
    """Where K has an FFT, the native kernel's forward and weight gradient go through the autotuner (the crossover,
    the direct sum, the FFT), and every alternative gives the same result; other K run the crossover untimed."""
    from hybridvision.ops import fused, native
    if not native.available():
        pytest.skip("native kernels not built")
    ran = []
    for pick in (0, 1, 2):
        def forced(key, macs, alternatives, pick=pick):
            ran.append((key[0], alternatives[pick][0]))
            return alternatives[pick][1]()
        monkeypatch.setattr(fused, "_fastest", forced)
        torch.manual_seed(0)
        x = torch.randn(2, 3, 6, 56, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 1, 56, dtype=torch.float64, requires_grad=True)
        y = circular_conv(x, w, 3, method="native")
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        ref = circular_conv(x, w, 3, method="direct")
        rgx, rgw = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
        for a, b in ((y, ref), (gx, rgx), (gw, rgw)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    name = ("auto", "direct", "fft")
    ops = ("circular_forward", "circular_forward", "circular_wgrad")  # y, then the input and weight gradients
    assert ran == [(op, name[p]) for p in (0, 1, 2) for op in ops]
    ran.clear()
    circular_conv(torch.randn(1, 2, 4, 11), torch.randn(2, 1, 11), 3, method="native")  # 11: no FFT, untimed
    assert ran == []
