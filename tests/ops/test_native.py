"""The native circular_conv kernel (hybridvision.ops.native, csrc/circular_cpu.cpp): its two ops against the float64 formula
on shapes that hit every code path (full and partial vector strips, 16-row tiles with and without a remainder, the
addend), gradcheck through circular_conv, non-contiguous inputs, and the build / switch-off paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hybridvision.ops import circular, native
from hybridvision.ops.circular import circular_conv

# (B, C, H, W): K along dim 2 is H, along dim 3 is W. Odd/even, square/non-square, K and the other axis below,
# at and above the 16 float lanes (tails of 1..15, a half vector of 8, several tiles), tiny axes.
SHAPES = [(2, 3, 7, 5), (3, 4, 17, 18), (2, 5, 33, 40), (1, 2, 56, 56), (2, 3, 9, 70), (2, 2, 1, 3), (1, 1, 4, 1),
          (2, 2, 16, 16), (1, 3, 24, 8),
          # small planes with batches that fill the lanes (the batch-lane path): partial and several groups
          (9, 2, 7, 7), (16, 3, 5, 6), (17, 2, 6, 3), (33, 1, 14, 9), (9, 2, 19, 30),
          # small planes with fewer samples, or more channels to fill the lanes with: lanes over 16 channels (one
          # group, several, a partial last one)
          (1, 8, 7, 7), (1, 40, 5, 6), (3, 17, 6, 3), (2, 33, 14, 9), (7, 16, 9, 12), (9, 20, 7, 7), (17, 16, 6, 5),
          (12, 33, 5, 9),
          # the FFT path: chosen by algo=0 from K=28 (forward along dim 3 from 32, the weight gradient from 20);
          # radices 4, 2, 3, 5, 7 (two odd levels: 21, 45, 49); full strips of 2 x 16 lanes; along dim 2 the columns
          # past the last full strip as one partial strip per plane (more than 16 left) or two planes' in one
          # strip (at most 16; an odd batch leaves one alone), along dim 3 the rows past it pooled over the batch
          (2, 3, 112, 20), (1, 2, 30, 120), (2, 2, 45, 27), (1, 2, 96, 64), (3, 2, 56, 56), (5, 1, 64, 35),
          (40, 1, 64, 33), (3, 1, 21, 49), (5, 2, 28, 56), (4, 1, 36, 27),
          # along dim 3 where K is 7 or 14 vectors or half vectors (56 / 112 / 224 floats, 28 / 56 / 112 doubles
          # with AVX-512; 28 / 56 / 112 floats, 28 / 56 doubles with AVX2): the FFT in registers, lanes along the
          # axis (lane_fft_rows), 2 or 4 rows at a time, H not a multiple of that
          (2, 3, 5, 112), (1, 2, 4, 224), (3, 1, 1, 224), (1, 2, 3, 28), (2, 3, 6, 56), (1, 2, 7, 56), (3, 1, 2, 28),
          # along dim 2 where K = 32, 40, 56, 224: the FFT in sweeps (sweep_correlate), full and partial strips,
          # two planes' columns in one strip
          (2, 3, 32, 20), (3, 2, 40, 9), (1, 1, 56, 33), (1, 2, 224, 20)]


def formula(x: torch.Tensor, w: torch.Tensor, dim: int, add=None) -> torch.Tensor:
    """float64: y[b, c, i] = add[c, i] + sum_k w[c, k] x[b, c, (i + k) mod K] along dim; x (B, C, H, W), w (C, K)."""
    x, w = x.double(), w.double()
    k = x.size(dim)
    y = sum(w[:, j].view(1, -1, 1, 1) * torch.roll(x, -j, dims=dim) for j in range(k))
    if add is not None:
        y = y + (add.double().view(1, -1, k, 1) if dim == 2 else add.double().view(1, -1, 1, k))
    return y


@pytest.mark.slow
def test_avx2_build_matches_float64_formula(tmp_path):
    """The kernel built for AVX2 without AVX-512 (-march=x86-64-v3: 8-float vectors, no masked moves, other
    transposes), as CPUs without AVX-512 run it, under its own op namespace beside the default build: both ops on
    every shape above, float32 and float64, every algo, against the float64 formula."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2 " not in flags or " fma " not in flags:
        pytest.skip("needs a CPU with AVX2 and FMA")
    source = (Path(native.__file__).with_name("csrc") / "circular_cpu.cpp").read_text()
    for mark in ("TORCH_LIBRARY(hybridvision,", "TORCH_LIBRARY_IMPL(hybridvision,"):
        assert mark in source
        source = source.replace(mark, mark.replace("hybridvision", "hvtest_avx2"))
    (tmp_path / "circular_cpu.cpp").write_text(source)
    native.compile_and_load("hvtest_avx2_ext", [str(tmp_path / "circular_cpu.cpp")], build_directory=str(tmp_path),
                            extra_cflags=("-march=x86-64-v3",))
    ops = torch.ops.hvtest_avx2
    for shape in SHAPES:
        for dim in (2, 3):
            k = shape[dim]
            for dtype in (torch.float32, torch.float64):
                g = torch.Generator().manual_seed(sum(shape) * 7 + dim)
                x, gy = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
                w, add = torch.randn(shape[1], k, generator=g, dtype=dtype), torch.randn(shape[1], k, generator=g,
                                                                                         dtype=dtype)
                tol = dict(rtol=1e-5, atol=1e-5 * k) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
                x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
                (formula(x64, w64, dim) * gy.double()).sum().backward()
                for algo in (0, 1, 2) if native.fft_length(k) else (0, 1):
                    msg = f"{shape} dim={dim} {dtype} algo={algo}"
                    torch.testing.assert_close(ops.circular_dw_forward(x, w, add, dim, algo).double(),
                                               formula(x, w, dim, add), **tol, msg=lambda m: f"{msg}: {m}")
                    torch.testing.assert_close(ops.circular_dw_wgrad(gy, x, dim, algo).double(), w64.grad, **tol,
                                               msg=lambda m: f"{msg}: {m}")


def test_fft_length_is_k_of_2_3_5_7_factors():
    assert [k for k in range(40) if native.fft_length(k)] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16, 18, 20, 21,
                                                                24, 25, 27, 28, 30, 32, 35, 36]


@pytest.mark.parametrize("algo", [0, 1, 2], ids=["choose", "direct", "fft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_float64_formula(shape, dim, dtype, algo):
    if algo == 2 and not native.fft_length(shape[dim]):
        x, w = torch.randn(shape), torch.randn(shape[1], shape[dim])
        with pytest.raises(RuntimeError, match="prime factors above 7"):
            native.forward(x, w, None, dim, algo)
        with pytest.raises(RuntimeError, match="prime factors above 7"):
            native.wgrad(x, x, dim, algo)
        return
    g = torch.Generator().manual_seed(sum(shape) * 7 + dim)
    x = torch.randn(shape, generator=g, dtype=dtype)
    k = shape[dim]
    w = torch.randn(shape[1], k, generator=g, dtype=dtype)
    add = torch.randn(shape[1], k, generator=g, dtype=dtype)
    gy = torch.randn(shape, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5 * k) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)

    torch.testing.assert_close(native.forward(x, w, None, dim, algo).double(), formula(x, w, dim), **tol)
    torch.testing.assert_close(native.forward(x, w, add, dim, algo).double(), formula(x, w, dim, add), **tol)
    # the depthwise conv's own weight layout (C, 1, K) and a bias (C,) for add: add[c] at every position
    bias = add[:, 0].contiguous()
    torch.testing.assert_close(native.forward(x, w.unsqueeze(1), bias, dim, algo).double(),
                               formula(x, w, dim, bias[:, None].expand(-1, k)), **tol)

    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    (formula(x64, w64, dim) * gy.double()).sum().backward()
    torch.testing.assert_close(native.wgrad(gy, x, dim, algo).double(), w64.grad, **tol)


@pytest.mark.parametrize("dtype,dim,shape", [(torch.float32, 2, (2, 64, 64, 528)),
                                             (torch.float32, 3, (2, 64, 515, 64)),
                                             (torch.float32, 3, (9, 64, 120, 64)),
                                             (torch.float64, 2, (1, 64, 64, 528)),
                                             (torch.float64, 3, (2, 64, 258, 64))])
def test_fft_path_large_outputs_streamed_equal_direct(dtype, dim, shape):
    """Outputs of at least 16 MiB are written with non-temporal stores (aligned rows) by the FFT path; here with a
    partial last strip / tile, and along W with the pooled rows of an odd batch (9 planes x 24 rows: full and partial
    pool strips across planes), against the direct sum (itself checked against the formula above)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g, dtype=dtype)
    assert x.numel() * x.element_size() >= 16 << 20
    k = shape[dim]
    w, add = torch.randn(shape[1], k, generator=g, dtype=dtype), torch.randn(shape[1], k, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5 * k) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(native.forward(x, w, add, dim, 2), native.forward(x, w, add, dim, 1), **tol)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 18, 3), (2, 1, 3, 17)])
def test_gradcheck_through_circular_conv(shape, dim):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(shape[1], 1, shape[dim], dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: circular_conv(x, w, dim, b, method="native"), (x, w, b))
    # a double backward (create_graph) differentiates the plain ops; a non-contiguous input keeps its graph too
    xt = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w, b: circular_conv(x, w, dim, b, method="native"), (xt, w, b))


def test_channels_last_and_sliced_inputs():
    """Non-contiguous inputs give the same result as their contiguous copies (the kernel reads contiguous data)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 20, 21, generator=g)
    w = torch.randn(6, 1, 20, generator=g)
    ref = circular_conv(x, w, 2, method="gemm")
    torch.testing.assert_close(circular_conv(x.to(memory_format=torch.channels_last), w, 2, method="native"), ref)
    xs = torch.randn(2, 6, 20, 42, generator=g)[..., ::2]
    torch.testing.assert_close(circular_conv(xs, w, 2, method="native"), circular_conv(xs, w, 2, method="gemm"))


def test_calls_without_gradients_skip_the_autograd_function(monkeypatch):
    """Where nothing records a gradient (no grad mode, or no input requiring grad), circular_conv runs the native
    forward without ``Function.apply`` (its per-call cost); the result is the same formula, position embedding and
    bias included. Where a gradient is recorded the Function runs, and forward-mode AD is still refused loudly (the
    bare kernel would drop the tangent)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 30, 29, generator=g)
    w, b, pe = torch.randn(3, 1, 30, generator=g), torch.randn(3, generator=g), torch.randn(3, 30, generator=g)
    add = formula(pe.view(1, 3, 30, 1), w[:, 0], 2)[0, :, :, 0] + b.double().view(3, 1)  # conv(pe, w) + bias
    want = formula(x, w[:, 0], 2, add)
    applied = []
    original = circular._DepthwiseNative.apply
    monkeypatch.setattr(circular._DepthwiseNative, "apply", lambda *a: applied.append(1) or original(*a))
    with torch.no_grad():
        y = circular._circular_conv(x, w, 2, b, 3, "native", pe=pe)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(circular._circular_conv(x, w, 2, b, 3, "native", pe=pe), y)  # grad mode, none required
    assert applied == [] and not y.requires_grad
    y = circular._circular_conv(x, w.requires_grad_(), 2, b, 3, "native", pe=pe)
    assert applied == [1] and y.requires_grad
    torch.testing.assert_close(y.detach().double(), want, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        xd = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match="jvp"):
            circular_conv(xd, w, 2, method="native")


def test_unsupported_inputs_are_named():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 6)
    with pytest.raises(ValueError, match=r"float32/float64 only \(got torch.bfloat16\)"):
        circular_conv(x.bfloat16(), w.bfloat16(), 3, method="native")
    with pytest.raises(ValueError, match="depthwise kernels only"):
        circular_conv(x, torch.randn(4, 4, 6), 3, groups=1, method="native")
    with pytest.raises(RuntimeError, match="algo must be 0 .choose., 1 .direct sum. or 2 .FFT., got 3"):
        native.forward(x, w[:, 0], None, 3, 3)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \(C, K\) or \(C, 1, K\) .*got \[4, 2, 6\]"):
        native.forward(x, torch.randn(4, 2, 6), None, 3)
    with pytest.raises(RuntimeError, match=r"add must be a contiguous \(C, K\) tensor, or \(C,\) .*got \[5\]"):
        native.forward(x, w, torch.randn(5), 3)
    with pytest.raises(RuntimeError, match=r"add must be .*got \[4, 7\]"):
        native.forward(x, w, torch.randn(4, 7), 3)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("HYBRIDVISION_NATIVE", "0")
    assert not native.available()
    x, w = torch.randn(1, 2, 9, 9), torch.randn(2, 1, 9)
    assert circular.choose_method(x, w, 2) != "native"
    with pytest.raises(RuntimeError, match="HYBRIDVISION_NATIVE=0"):
        circular_conv(x, w, 2, method="native")


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """A source that does not compile: available() warns and says False, auto picks another method, and an
    explicit method='native' raises with the compiler's message and the fix. (Own cache folder and library name,
    so the real build is untouched.)"""
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++;\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_SOURCES", [bad])
    monkeypatch.setattr(native, "_cpu_tag", lambda: "broken_test")
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="could not build hybridvision's native kernels"):
        assert not native.available()
    assert not native.available()  # no second build attempt, no second warning
    x, w = torch.randn(1, 2, 9, 9), torch.randn(2, 1, 9)
    assert circular.choose_method(x, w, 2) != "native"
    with pytest.raises(RuntimeError, match="C\\+\\+17 compiler"):
        circular_conv(x, w, 2, method="native")


@pytest.mark.slow
def test_ab_benchmark_builds_the_base_revision_beside_the_working_copy():
    """benchmarks/bench_native_ab.py builds the committed kernel under its own op namespace, checks that both give
    the same results and prints one row per case, dim and op (no timing asserted); --cold sweeps the caches between
    the calls."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    out = subprocess.run([sys.executable, "bench_native_ab.py", "--base", "HEAD", "--cases", "8x12", "--threads", "1",
                          "--budget", "0", "--cold"], cwd=bench, check=True, timeout=600, capture_output=True,
                         text=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 8 | 12 |")]
    assert [row.split("|")[3:5] for row in rows] == [[" 2 ", " fwd "], [" 2 ", " wgrad "], [" 3 ", " fwd "],
                                                      [" 3 ", " wgrad "]]


# depthwise 3x3 (csrc/depthwise_cpu.cpp): (B, C, H, W, stride); C below, at and above the 8 / 16 float lanes and the
# 16-vector channel blocks, odd / even, non-square, 1-pixel and 2-pixel images
DW_SHAPES = [(2, 37, 9, 6, 1), (2, 37, 9, 6, 2), (3, 16, 8, 8, 2), (1, 5, 1, 1, 1), (1, 3, 2, 1, 2),
             (2, 24, 7, 10, 2), (2, 70, 5, 13, 1), (1, 300, 4, 3, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", DW_SHAPES)
def test_depthwise_ops_match_float64(shape, dtype):
    """Forward (with and without bias and GELU) and both gradients against float64 autograd of F.conv2d."""
    b, c, h, w, s = shape
    torch.manual_seed(0)
    x = torch.randn(b, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    wt, bias = torch.randn(c, 1, 3, 3, dtype=dtype), torch.randn(c, dtype=dtype)
    xd, wd = x.double().requires_grad_(), wt.double().requires_grad_()
    ref = torch.nn.functional.conv2d(xd, wd, None, s, 1, 1, c)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for with_bias in (False, True):
        for gelu in (False, True):
            expect = ref + bias.double().view(1, -1, 1, 1) if with_bias else ref
            expect = torch.nn.functional.gelu(expect) if gelu else expect
            y = native.dw3x3_forward(x, wt, bias if with_bias else None, s, gelu)
            assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(y.double(), expect.detach(), **tol)
    gy = torch.randn(ref.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gx_ref, gw_ref = torch.autograd.grad(ref, (xd, wd), gy.double())
    gx = native.dw3x3_backward_input(gy, wt, h, w, s)
    assert gx.shape == x.shape and gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gx.double(), gx_ref, **tol)
    torch.testing.assert_close(native.dw3x3_backward_weight(gy, x, s).double(), gw_ref, **tol)


def test_depthwise_ops_name_bad_inputs():
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="channels-last"):
        native.dw3x3_forward(x.contiguous(), w, None, 1, False)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2, got 3"):
        native.dw3x3_forward(x, w, None, 3, False)
    with pytest.raises(RuntimeError, match=r"weight must be \(C, 1, 3, 3\)"):
        native.dw3x3_forward(x, torch.randn(4, 1, 5, 5), None, 1, False)
    with pytest.raises(RuntimeError, match="does not match an input of 6x5"):
        native.dw3x3_backward_input(x, w, 6, 5, 1)
    with pytest.raises(RuntimeError, match="gy must be"):
        native.dw3x3_backward_weight(x, x, 2)


# attention (csrc/attention_cpu.cpp): (B, N, heads, d). N below, at and above the 8 / 16 float lanes, with 8-row
# blocks, a 4-row block and single rows left over; d below a vector, not a multiple of one, 1, and wide enough for
# several vector pairs of P V; one token.
ATTN_SHAPES = [(2, 5, 3, 4), (3, 49, 2, 32), (2, 196, 3, 32), (1, 17, 2, 40), (2, 33, 1, 64), (1, 1, 1, 1),
               (2, 64, 2, 128), (1, 20, 1, 24), (2, 16, 2, 16), (1, 45, 2, 1)]


def _attention_formula(qkv: torch.Tensor, bias: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64: P = softmax(scale q k^T + bias), y = P v; qkv (B, N, 3, heads, d) -> (y (B, N, heads, d), P)."""
    q, k, v = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)
    p = ((q @ k.transpose(-1, -2)) * scale + bias.double()).softmax(-1)
    return (p @ v).transpose(1, 2), p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_forward_matches_float64(shape, dtype):
    b, n, heads, d = shape
    torch.manual_seed(0)
    qkv, bias = torch.randn(b, n, 3, heads, d, dtype=dtype) * 2, torch.randn(heads, n, n, dtype=dtype) * 3
    y_ref, p_ref = _attention_formula(qkv, bias, d**-0.5)
    # float: exp_u20 (~20 ulp) in the softmax
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for keep in (False, True):
        y, p = native.attention_forward(qkv, bias, heads, d**-0.5, keep)
        assert y.shape == (b, n, heads, d) and y.dtype == dtype and y.is_contiguous()
        torch.testing.assert_close(y.double(), y_ref, **tol)
        if keep:
            torch.testing.assert_close(p.double(), p_ref, **tol)
        else:
            assert p.numel() == 0


def test_attention_forward_is_stable_and_names_bad_inputs():
    # float32 logits far below zero (exp underflows to 0 without the max shift) and far above (overflows): the same
    # softmax, up to the rounding of logits near 200 (ulp 1.5e-5)
    qkv, bias = torch.randn(2, 10, 3, 2, 8), torch.randn(2, 10, 10)
    y, _ = native.attention_forward(qkv, bias, 2, 8**-0.5, False)
    for shift in (-200.0, 200.0):
        torch.testing.assert_close(native.attention_forward(qkv, bias + shift, 2, 8**-0.5, False)[0], y,
                                   rtol=1e-3, atol=2e-4)
    with pytest.raises(RuntimeError, match=r"qkv must be a \(B, N, 3, heads=3, d\)"):
        native.attention_forward(qkv, bias, 3, 1.0, False)
    with pytest.raises(RuntimeError, match="qkv must be contiguous"):
        native.attention_forward(qkv.transpose(0, 1), bias, 2, 1.0, False)
    with pytest.raises(RuntimeError, match=r"bias must be a contiguous \(heads, N, N\) = \(2, 10, 10\)"):
        native.attention_forward(qkv, bias[:, :9, :9], 2, 1.0, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        native.attention_forward(qkv.half(), bias.half(), 2, 1.0, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_backward_matches_float64_autograd(shape, dtype):
    b, n, heads, d = shape
    torch.manual_seed(1)
    qkv, bias = torch.randn(b, n, 3, heads, d, dtype=dtype), torch.randn(heads, n, n, dtype=dtype) * 2
    y, p = native.attention_forward(qkv, bias, heads, d**-0.5, True)
    gy = torch.randn_like(y)
    gqkv, gbias = native.attention_backward(gy, qkv, p, d**-0.5)
    qd, bd = qkv.double().requires_grad_(), bias.double().requires_grad_()
    ref_q, ref_b = torch.autograd.grad(_attention_formula(qd, bd, d**-0.5)[0], (qd, bd), gy.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert gqkv.shape == qkv.shape and gbias.shape == bias.shape and gqkv.dtype == gbias.dtype == dtype
    torch.testing.assert_close(gqkv.double(), ref_q, **tol)
    torch.testing.assert_close(gbias.double(), ref_b, **tol)


def test_attention_backward_names_bad_inputs():
    qkv, bias = torch.randn(2, 10, 3, 2, 8), torch.randn(2, 10, 10)
    y, p = native.attention_forward(qkv, bias, 2, 1.0, True)
    with pytest.raises(RuntimeError, match=r"gy must be a contiguous \(B, N, heads, d\) = \(2, 10, 2, 8\)"):
        native.attention_backward(y[:, :5], qkv, p, 1.0)
    with pytest.raises(RuntimeError, match=r"probs must be the forward's contiguous"):
        native.attention_backward(y, qkv, p.transpose(-1, -2), 1.0)
    with pytest.raises(RuntimeError, match=r"qkv must be a contiguous \(B, N, 3, heads, d\)"):
        native.attention_backward(y, qkv[:, :, :2], p, 1.0)
