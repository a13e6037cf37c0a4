"""Training-mode BatchNorm + GELU (hybridvision.ops.norm_act, csrc/batchnorm_act_cpu.cpp): the kernel pair against
the float64 formula (output, every gradient, running statistics), gradcheck, the cases that fall back to torch's
ops, and the blocks that use it against their plain-module formula."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hybridvision.blocks.mbconv import MBConv
from hybridvision.ops import native, norm_act
from hybridvision.ops.norm_act import batch_norm_act

# (B, C, H, W): C below, at and above the 16 float / 8 double lanes with tails; odd / even, non-square; H*W = 1;
# enough rows for several 32-row blocks and threads.
SHAPES = [(3, 37, 5, 7), (2, 16, 4, 4), (4, 1, 3, 2), (5, 3, 1, 1), (2, 24, 9, 14), (8, 70, 15, 11)]


def channels_last(shape, dtype, mean=0.5, std=2.0):
    return (torch.randn(shape, dtype=dtype) * std + mean).contiguous(memory_format=torch.channels_last)


def random_bn(c: int, dtype: torch.dtype, momentum=0.1) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def formula(x, weight, bias, gelu):
    """float64: gelu((x - mean) / sqrt(var + eps) * weight + bias) with the biased batch variance, eps = 1e-5."""
    x, weight, bias = x.double(), weight.double(), bias.double()
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    z = (x - mean) / torch.sqrt(var + 1e-5) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return z * 0.5 * (1 + torch.erf(z / 2 ** 0.5)) if gelu else z


@pytest.fixture
def count_kernel_calls(monkeypatch):
    """How often the native forward ran (so a test knows which path it exercised)."""
    calls = []
    real = native.batch_norm_act_forward

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(native, "batch_norm_act_forward", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gelu", [True, False])
def test_matches_float64_formula(shape, dtype, gelu, count_kernel_calls):
    torch.manual_seed(sum(shape))
    bn = random_bn(shape[1], dtype)
    x = channels_last(shape, dtype).requires_grad_()
    g = torch.randn(shape, dtype=dtype)
    running = (bn.running_mean.double().clone(), bn.running_var.double().clone())
    y = batch_norm_act(x, bn, gelu)
    assert count_kernel_calls == [shape]
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    gx, gw, gb = torch.autograd.grad(y, (x, bn.weight, bn.bias), g)

    xd = x.detach().double().requires_grad_()
    wd, bd = bn.weight.detach().double().requires_grad_(), bn.bias.detach().double().requires_grad_()
    want = formula(xd, wd, bd, gelu)
    wgx, wgw, wgb = torch.autograd.grad(want, (xd, wd, bd), g.double())
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for got, ref in ((y, want), (gx, wgx), (gw, wgw), (gb, wgb)):
        torch.testing.assert_close(got.double(), ref, **tol)
    # running statistics: momentum 0.1, unbiased variance; one batch counted
    n = x.numel() // shape[1]
    mean, var = xd.detach().mean((0, 2, 3)), xd.detach().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(bn.running_mean.double(), 0.9 * running[0] + 0.1 * mean, **tol)
    torch.testing.assert_close(bn.running_var.double(), 0.9 * running[1] + 0.1 * var * n / (n - 1), **tol)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("gelu", [True, False])
def test_gradcheck(gelu):
    torch.manual_seed(1)
    bn = random_bn(5, torch.float64)
    x = channels_last((3, 5, 4, 3), torch.float64).requires_grad_()
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return norm_act._BatchNormAct.apply(x, w, b, 1e-5, gelu)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))  # a double backward differentiates the plain expression


def test_statistics_accurate_with_a_large_mean():
    """Mean 1000 against spread 0.01 (E[x^2] - E[x]^2 in float32 would lose every digit of the variance)."""
    torch.manual_seed(2)
    x = channels_last((4, 20, 9, 9), torch.float32, mean=1000.0, std=0.01)
    y, mean, var = native.batch_norm_act_forward(x, torch.ones(20), torch.zeros(20), 1e-5, False)
    xd = x.double()
    torch.testing.assert_close(mean.double(), xd.mean((0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), xd.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    # y is limited by the float32 mean itself (rounded by up to 3e-5 near 1000, i.e. 3e-3 of the spread)
    torch.testing.assert_close(y.double(), formula(x, torch.ones(20), torch.zeros(20), False), rtol=0, atol=4e-3)


def test_momentum_none_is_the_cumulative_average(count_kernel_calls):
    torch.manual_seed(3)
    bn = random_bn(6, torch.float32, momentum=None)
    ref = copy.deepcopy(bn)
    for _ in range(3):
        x = channels_last((2, 6, 5, 4), torch.float32)
        batch_norm_act(x, bn, gelu=False)
        ref(x)
    assert len(count_kernel_calls) == 3
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_falls_back_to_torch_ops(count_kernel_calls, monkeypatch):
    """Eval mode, NCHW memory, a BatchNorm subclass, no running statistics, a single value per channel and the
    switched-off kernel all compute F.gelu(bn(x)) with torch's ops."""
    torch.manual_seed(4)
    x = channels_last((2, 8, 5, 6), torch.float32)
    bn = random_bn(8, torch.float32)

    class MyBN(torch.nn.BatchNorm2d):
        pass

    sub = MyBN(8)
    sub.load_state_dict(bn.state_dict())
    untracked = torch.nn.BatchNorm2d(8, track_running_stats=False)
    cases = [(copy.deepcopy(bn).eval(), x), (copy.deepcopy(bn), x.contiguous()), (sub, x), (untracked, x)]
    for module, inp in cases:
        want = F.gelu(copy.deepcopy(module)(inp))
        torch.testing.assert_close(batch_norm_act(inp, module), want)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        batch_norm_act(torch.randn(1, 8, 1, 1), copy.deepcopy(bn))
    monkeypatch.setenv("HYBRIDVISION_NATIVE", "0")
    torch.testing.assert_close(batch_norm_act(x, copy.deepcopy(bn)), F.gelu(copy.deepcopy(bn)(x)))
    assert count_kernel_calls == []


def test_op_rejects_bad_input():
    x = torch.randn(2, 4, 3, 3)
    ones, zeros = torch.ones(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="channels-last contiguous"):
        native.batch_norm_act_forward(x.contiguous(), ones, zeros, 1e-5, True)
    x = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="weight must be a contiguous \\(C,\\) CPU tensor .* C = 4"):
        native.batch_norm_act_forward(x, torch.ones(5), zeros, 1e-5, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        native.batch_norm_act_forward(x.half(), ones.half(), zeros.half(), 1e-5, True)
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        native.batch_norm_act_forward(x[:1, :, :1, :1].contiguous(memory_format=torch.channels_last), ones, zeros,
                                      1e-5, True)


@pytest.mark.parametrize("stride_mode", ["1x1", "dw"])
def test_mbconv_training_path_matches_formula(stride_mode, count_kernel_calls):
    """MBConv in training mode runs its three norms through the kernel; outputs, every gradient and the running
    statistics equal the plain-module formula."""
    torch.manual_seed(5)
    blk = MBConv(12, 24, stride=2, stride_mode=stride_mode).train()
    ref = copy.deepcopy(blk)
    x = channels_last((3, 12, 10, 6), torch.float32).requires_grad_()
    g = torch.randn(3, 24, 5, 3)
    got = torch.autograd.grad(blk(x), [x, *blk.parameters()], g)
    assert len(count_kernel_calls) == 3
    y = F.gelu(ref.bn1(ref.conv1(ref.norm(x))))
    y = ref.conv3(ref.se(F.gelu(ref.bn2(ref.conv2(y)))))
    want = torch.autograd.grad(ref.shortcut(x) + y, [x, *ref.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, buf in blk.named_buffers():
        torch.testing.assert_close(buf, dict(ref.named_buffers())[name])


def test_coatnet_training_step_matches_torch_ops(count_kernel_calls, monkeypatch):
    """A whole CoAtNet (stem norms + every MBConv norm through the kernel) in training mode: loss, every gradient and
    the running statistics equal the same model with the kernel switched off."""
    import hybridvision

    torch.manual_seed(6)
    model = hybridvision.create_model("coatnet_nano", in_chans=1, num_classes=10).train()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 3, 5, 9])
    torch.manual_seed(7)  # stochastic depth draws
    got = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    n_bn = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert len(count_kernel_calls) == n_bn > 0
    monkeypatch.setenv("HYBRIDVISION_NATIVE", "0")
    torch.manual_seed(7)
    want = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    assert len(count_kernel_calls) == n_bn
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_float_gelu_accuracy_over_a_wide_range():
    """The float kernel's GELU (A&S erf with a fast exp) and its derivative stay within 1e-6 of the float64 formula
    for z in [-12, 12] (torch's fp32 gelu is within 3e-7): a cruder exp or erf would fail here."""
    z = torch.linspace(-12, 12, 96_001, dtype=torch.float64)
    x = torch.stack([z, -z]).view(2, 1, 1, -1).repeat(1, 9, 1, 1).float().contiguous(memory_format=torch.channels_last)
    std = x.double().var((0, 2, 3), unbiased=False).sqrt()
    weight, bias = std.float(), torch.zeros(9)  # BN's scale undone: the GELU sees z = x - mean
    y, mean, var = native.batch_norm_act_forward(x, weight, bias, 0.0, True)
    zn = (x.double() - mean.double().view(1, -1, 1, 1)) / var.double().sqrt().view(1, -1, 1, 1) \
        * weight.double().view(1, -1, 1, 1)
    assert zn.abs().max() > 11
    cdf = 0.5 * (1 + torch.erf(zn / 2 ** 0.5))
    torch.testing.assert_close(y.double(), zn * cdf, rtol=0, atol=1e-6)
    gy = torch.randn_like(x)
    gx, gw, gb = native.batch_norm_act_backward(gy, x, weight, bias, mean, var.rsqrt(), True)
    dgelu = cdf + zn * torch.exp(-zn ** 2 / 2) / (2 * torch.pi) ** 0.5
    torch.testing.assert_close(gb.double(), (gy.double() * dgelu).sum((0, 2, 3)), rtol=1e-6, atol=1e-3)
