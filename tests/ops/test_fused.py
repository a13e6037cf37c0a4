"""ops.fused: the oneDNN inference path computes the same as the eager expressions (with every kernel alternative the
autotuner may pick), stays off under autograd, and the autotuner picks the fastest alternative once per shape."""
import time

import pytest
import torch
import torch.nn.functional as F

from hybridvision.ops import fused
from hybridvision.ops.fused import (MIN_TUNED_MACS, autotune, conv_act, conv_add, fast_path_enabled, linear_act,
                                    linear_add, tuned_choices, use_onednn)

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (CPU build)")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.fixture(params=[0, 1, 2], ids=["alt0", "alt1", "alt2"])
def alternative(request, monkeypatch):
    """Every tuned op runs its alternative number ``param`` (the last one where it has fewer); yields the list of
    (op, alternative name) run (``.index``: the number), so a test can check that its ops went through the autotuner
    at all."""

    class Runs(list):
        index = request.param

    ran = Runs()

    def forced(key, macs, alternatives):
        name, thunk = alternatives[min(request.param, len(alternatives) - 1)]
        ran.append((key[0], name))
        return thunk()

    monkeypatch.setattr(fused, "_fastest", forced)
    yield ran


@pytest.mark.parametrize("groups,stride,k", [(1, 1, 1), (1, 2, 1), (12, 2, 3), (12, 1, 3), (1, 1, 3)])
def test_conv_paths_equal_eager(groups, stride, k, alternative):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 12, k, stride=stride, padding=k // 2, groups=groups)
    x = _cl(torch.randn(2, 12, 9, 6))
    with torch.inference_mode():
        assert use_onednn(x)
        ref = F.gelu(conv(x))
        torch.testing.assert_close(conv_act(x, conv), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(conv_act(x, conv, gelu=False), conv(x), rtol=1e-4, atol=1e-5)
        other = _cl(torch.randn_like(conv(x)))
        torch.testing.assert_close(conv_add(x, conv, other), conv(x) + other, rtol=1e-4, atol=1e-5)
    # depthwise 3x3: hybridvision's own kernel is one more alternative; pointwise: an MKL GEMM on the rows; both
    # make the plain conv (gelu=False) a tuned op too
    tuned_plain = (groups > 1 and k == 3) or (k == 1 and stride == 1 and groups == 1)
    assert {op for op, _ in alternative} == {"conv_gelu", "conv_add"} | ({"conv"} if tuned_plain else set())


def test_linear_paths_equal_eager(alternative):
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 12)
    x = torch.randn(2, 5, 3, 20)
    other = torch.randn(2, 5, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(linear_act(x, lin, gelu=True), F.gelu(lin(x)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(linear_act(x, lin), lin(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(linear_add(x, lin, other), lin(x) + other, rtol=1e-4, atol=1e-5)
    assert {op for op, _ in alternative} == {"linear", "linear_add"}


def test_fast_path_off_under_autograd_and_switch():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    assert not use_onednn(x)
    linear_act(x, lin, gelu=True).sum().backward()  # eager path: gradients flow
    assert x.grad is not None and lin.weight.grad is not None
    with torch.no_grad():
        assert not use_onednn(x.double())
        assert fast_path_enabled() and use_onednn(x.detach())
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            assert not use_onednn(x.detach())
            linear_act(x.detach(), lin, gelu=True)
        assert fc.get_total_flops() == 2 * 5 * 4 * 3
        fast_path_enabled(False)
        try:
            assert not use_onednn(x.detach())
        finally:
            fast_path_enabled(True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_check_agrees_with_torch_during_an_export(dynamo, tmp_path):
    """fused.in_onnx_export reads the exporters' flags itself: it says what torch.onnx.is_in_onnx_export says, inside a
    real export by either exporter and outside one, so plain_eager() is False while exporting."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((fused.in_onnx_export(), torch.onnx.is_in_onnx_export(), fused.plain_eager()))
            return x * 2

    assert fused.in_onnx_export() is False and fused.plain_eager()
    torch.onnx.export(Probe(), (torch.randn(2, 3),), str(tmp_path / "probe.onnx"), dynamo=dynamo,
                      external_data=False, verbose=False)
    assert seen and all(ours == theirs for ours, theirs, _ in seen)
    assert any(theirs for _, theirs, _ in seen) and not any(eager for _, theirs, eager in seen if theirs)
    assert fused.in_onnx_export() is False and fused.plain_eager()


def test_onednn_linear_double_backward_matches_eager():
    """Under create_graph the oneDNN linear's backward is differentiable again: a gradient penalty's gradients
    (input, weight, bias) equal eager ``F.linear``'s (fp32: the oneDNN path; gradgradcheck needs float64)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 7, 24, requires_grad=True)

    def penalty(out):
        (gx,) = torch.autograd.grad(out.tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, lin.weight, lin.bias))

    out = linear_act(x, lin)
    assert "OneDNN" in type(out.grad_fn).__name__
    for a, b in zip(penalty(out), penalty(lin(x))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lead, cin, cout", [((3, 5, 7), 24, 40), ((2, 196), 96, 384)])
def test_onednn_linear_autograd_matches_eager(lead, cin, cout, alternative):
    """Forward and all three gradients (the backward hands oneDNN transposed views) equal eager ``F.linear``;
    odd sizes and CoAtNet-like ones (oneDNN picks blocked kernels for those)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(cin, cout)
    x = torch.randn(*lead, cin, requires_grad=True)
    g = torch.randn(*lead, cout)
    for gelu in (False, True):
        ref = F.gelu(lin(x)) if gelu else lin(x)
        ref_grads = torch.autograd.grad(ref, (x, lin.weight, lin.bias), g)
        out = linear_act(x, lin, gelu=gelu)
        if not gelu:
            assert "OneDNN" in type(out.grad_fn).__name__
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(torch.autograd.grad(out, (x, lin.weight, lin.bias), g), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # frozen weight, no bias: only the input gradient
    lin2 = torch.nn.Linear(cin, 8, bias=False).requires_grad_(False)
    out = linear_act(x, lin2)
    (gx,) = torch.autograd.grad(out.sum(), (x,))
    torch.testing.assert_close(gx, lin2.weight.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    assert {op for op, _ in alternative} == {"linear", "linear_gx", "linear_gw"}


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty choice cache, no re-timing, autotuning switched on (HYBRIDVISION_AUTOTUNE unset), restored
    afterwards."""
    monkeypatch.setattr(fused, "_CHOICES", {})
    monkeypatch.setattr(fused, "_PENDING", {})
    monkeypatch.setattr(fused, "RETIME_AFTER_S", float("inf"))
    monkeypatch.setattr(fused, "_AUTOTUNE", True)
    monkeypatch.delenv("HYBRIDVISION_AUTOTUNE", raising=False)


def _sleepy(name, seconds, calls):
    def run():
        calls.append(name)
        time.sleep(seconds)
        return torch.full((1,), float(len(name)))
    return name, run


def test_autotune_picks_the_fastest_once_per_key(fresh_choices):
    calls = []
    alts = (_sleepy("slow", 0.004, calls), _sleepy("fast!", 0.0, calls), _sleepy("slower", 0.008, calls))
    out = fused._fastest(("op", 1, 2), MIN_TUNED_MACS, alts)
    assert out.item() == len("fast!")  # the chosen alternative's result
    assert sorted(set(calls)) == ["fast!", "slow", "slower"] and len(calls) == 2 * 3 * fused._TUNE_ROUNDS
    assert calls[0::2] == calls[1::2]  # each timed call right after an untimed one of the same alternative
    assert tuned_choices() == {("op", 1, 2, torch.get_num_threads()): "fast!"}
    calls.clear()
    for _ in range(3):
        fused._fastest(("op", 1, 2), MIN_TUNED_MACS, alts)
    assert calls == ["fast!"] * 3  # cached: no more timing
    fused._fastest(("op", 1, 3), MIN_TUNED_MACS, alts)  # a new shape is timed again
    assert len(tuned_choices()) == 2


def test_autotune_times_each_key_again_later_and_keeps_the_best_of_both(fresh_choices, monkeypatch):
    """A stall during the first timing (here: the fast alternative slept then) is outvoted by the second timing,
    which runs at the key's first call RETIME_AFTER_S after the first and then never again."""
    calls, naps = [], {"fast": 0.02, "slow": 0.004}
    alts = tuple((name, lambda name=name: (calls.append(name), time.sleep(naps[name]), torch.ones(1))[2])
                 for name in ("slow", "fast"))
    key = ("op", 7)
    fused._fastest(key, MIN_TUNED_MACS, alts)
    assert list(tuned_choices().values()) == ["slow"]  # the stall fooled the first timing
    naps["fast"] = 0.0
    calls.clear()
    fused._fastest(key, MIN_TUNED_MACS, alts)
    assert calls == ["slow"]  # before RETIME_AFTER_S: the first choice, untimed
    monkeypatch.setattr(fused, "RETIME_AFTER_S", 0.0)
    calls.clear()
    fused._fastest(key, MIN_TUNED_MACS, alts)
    assert len(calls) == 2 * 2 * fused._TUNE_ROUNDS and list(tuned_choices().values()) == ["fast"]
    naps["fast"] = 0.02  # a stall now changes nothing: the choice is final
    calls.clear()
    for _ in range(2):
        fused._fastest(key, MIN_TUNED_MACS, alts)
    assert calls == ["fast", "fast"] and list(tuned_choices().values()) == ["fast"]
    # the best of both timings counts: a key whose second timing alone would pick the other alternative
    naps["fast"], naps["slow"] = 0.0, 0.006
    key2 = ("op", 8)
    fused._fastest(key2, MIN_TUNED_MACS, alts)
    naps["fast"], naps["slow"] = 0.012, 0.003
    fused._fastest(key2, MIN_TUNED_MACS, alts)
    assert tuned_choices()[key2 + (torch.get_num_threads(),)] == "fast"
    assert not fused._PENDING


def test_autotune_off_small_and_deterministic_run_the_first(fresh_choices, monkeypatch):
    calls = []
    alts = (_sleepy("slow", 0.002, calls), _sleepy("fast", 0.0, calls))
    fused._fastest(("op",), MIN_TUNED_MACS - 1, alts)  # too small to time
    assert calls == ["slow"] and tuned_choices() == {}
    monkeypatch.setenv("HYBRIDVISION_AUTOTUNE", "0")
    monkeypatch.setattr(fused, "_AUTOTUNE", None)
    assert not autotune()
    fused._fastest(("op",), MIN_TUNED_MACS, alts)
    assert calls == ["slow"] * 2 and tuned_choices() == {}
    assert autotune(True)  # the explicit setting overrides the environment
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not autotune()
    fused._fastest(("op",), MIN_TUNED_MACS, alts)
    assert calls == ["slow"] * 3 and tuned_choices() == {}
    # a key chosen while tuning was on runs the first alternative once determinism is switched on
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    fused._fastest(("op", 2), MIN_TUNED_MACS, alts)
    assert tuned_choices()[("op", 2, torch.get_num_threads())] == "fast"
    calls.clear()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    fused._fastest(("op", 2), MIN_TUNED_MACS, alts)
    assert calls == ["slow"]


def test_autotune_records_the_models_shapes(fresh_choices):
    """A linear big enough to be timed gets a choice under its shape, and the result equals eager either way."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(300, 256)
    with torch.no_grad():
        torch.testing.assert_close(linear_act(x, lin, gelu=True), F.gelu(lin(x)), rtol=1e-4, atol=1e-5)
    (key, name), = tuned_choices().items()
    assert key[:6] == ("linear", 300, 256, 256, True, True) and name in {"onednn+gelu", "onednn, gelu", "mkl, gelu"}


@pytest.mark.parametrize("cin, cout, k, stride, groups, bias", [
    (12, 20, 1, 1, 1, True),   # pointwise: the MKL alternatives too
    (12, 20, 1, 2, 1, False),
    (12, 12, 3, 2, 12, False),  # depthwise, strided: hybridvision's depthwise kernel too
    (7, 7, 3, 1, 7, True),
    (6, 10, 3, 1, 1, True),
    (3, 8, 3, 2, 1, False),
])
def test_tuned_conv_training_matches_eager(cin, cout, k, stride, groups, bias, alternative):
    """``conv2d`` in training (every backward alternative) gives the module's output and all its gradients;
    odd and non-square sizes."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
    x = _cl(torch.randn(2, cin, 9, 6)).requires_grad_()
    out = fused.conv2d(x, conv)
    assert "TunedConv" in type(out.grad_fn).__name__
    ref = conv(x)
    g = _cl(torch.randn_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    wanted = (x, conv.weight) + ((conv.bias,) if bias else ())
    for a, b in zip(torch.autograd.grad(out, wanted, g), torch.autograd.grad(ref, wanted, g)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    depthwise = groups == cin and k == 3
    tuned_forward = depthwise or (k == 1 and stride == 1)
    assert {op for op, _ in alternative} == {"conv_gx", "conv_gw"} | ({"conv"} if tuned_forward else set())
    if depthwise and alternative.index == 2:  # the last alternative of each: hybridvision's own kernel
        assert {name for _, name in alternative} == {"native"}
    # frozen weight: only the input gradient; frozen input: only the weight's
    conv.requires_grad_(False)
    (gx,) = torch.autograd.grad(fused.conv2d(x, conv), (x,), g)
    torch.testing.assert_close(gx, torch.autograd.grad(conv(x), (x,), g)[0], rtol=1e-4, atol=1e-4)


def test_tuned_conv_double_backward_and_fallbacks():
    """Under create_graph the conv's backward is differentiable again (a gradient penalty equals eager's); NCHW
    input, no grad, bf16 autocast and a hooked conv call the module."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, padding=1)
    x = _cl(torch.randn(2, 6, 7, 5)).requires_grad_()

    def penalty(out):
        (gx,) = torch.autograd.grad(out.tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, conv.weight, conv.bias))

    out = fused.conv2d(x, conv)
    assert "TunedConv" in type(out.grad_fn).__name__
    for a, b in zip(penalty(out), penalty(conv(x))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert "TunedConv" not in type(fused.conv2d(x.detach().contiguous().requires_grad_(), conv).grad_fn).__name__
    with torch.no_grad():
        assert fused.conv2d(x, conv).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.conv2d(x, conv).dtype == conv(x).dtype == torch.bfloat16
    handle = conv.register_forward_hook(lambda m, i, o: o + 1)
    try:
        torch.testing.assert_close(fused.conv2d(x, conv), conv(x))
        assert "TunedConv" not in type(fused.conv2d(x, conv).grad_fn).__name__
    finally:
        handle.remove()


def test_fast_paths_follow_autocast(alternative):
    """Under CPU autocast the fused linear steps aside: the output has autocast's dtype whichever kernel would
    have been picked, and the backward runs."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_act(x, lin)
        assert out.dtype == lin(x).dtype == torch.bfloat16
        with torch.no_grad():
            assert linear_act(x, lin, gelu=True).dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and alternative == []
