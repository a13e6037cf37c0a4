"""MBConv and TransformerBlock: shapes, the downsampling formulas, BN folding, gradients, errors."""
import pytest
import torch
import torch.nn.functional as F

from hybridvision.blocks import MBConv, TransformerBlock
from hybridvision.blocks.mbconv import SqueezeExcite, fold_prenorm_bn_into_conv1x1


def _randomize_bn(module: torch.nn.Module) -> None:
    """Non-trivial running stats and affine params so a wrong fold would show."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


@pytest.mark.parametrize("stride_mode", ["1x1", "dw"])
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_mbconv_downsample_shapes_and_formula(stride_mode, pool, hw):
    torch.manual_seed(0)
    blk = MBConv(8, 16, stride=2, stride_mode=stride_mode, pool=pool).eval()
    _randomize_bn(blk)
    x = torch.randn(2, 8, *hw)
    y = blk(x)
    assert y.shape == (2, 16, hw[0] // 2, hw[1] // 2)
    # x <- Proj(Pool(x)) + Conv(DConv(Conv(BN(x)))): subtract the branch to recover the shortcut
    pooled = (F.max_pool2d if pool == "max" else F.avg_pool2d)(x, 2)
    shortcut = blk.shortcut.proj(pooled)
    branch = blk.conv3(blk.se(F.gelu(blk.bn2(blk.conv2(F.gelu(blk.bn1(blk.conv1(blk.norm(x)))))))))
    torch.testing.assert_close(y, shortcut + branch)
    # where the stride sits
    assert blk.conv1.stride == ((2, 2) if stride_mode == "1x1" else (1, 1))
    assert blk.conv2.stride == ((1, 1) if stride_mode == "1x1" else (2, 2))


def test_mbconv_identity_block_and_widths():
    torch.manual_seed(0)
    blk = MBConv(16, 16, expansion=4, se_ratio=0.25)
    assert isinstance(blk.shortcut, torch.nn.Identity)
    assert blk.conv1.out_channels == 64 and blk.se.fc1.out_features == 4
    x = torch.randn(2, 16, 5, 7)
    assert blk(x).shape == x.shape


def _se_plain(se, x):
    """The SE expression written out, for autograd to differentiate (the reference of the fused Function)."""
    return x * se.gate(x.mean((2, 3)))[:, :, None, None]


@pytest.mark.parametrize("act", [torch.nn.SiLU, torch.nn.GELU])
@pytest.mark.parametrize("shape", [(3, 10, 5, 7), (2, 8, 6, 6)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_squeeze_excite_function_matches_autograd(act, shape, channels_last):
    """In grad mode SE runs as one autograd Function (two x-sized writes in the backward): its output and the
    gradients of x and of all four parameters equal autograd's through the plain expression, float64."""
    torch.manual_seed(0)
    se = SqueezeExcite(shape[1], 3, act).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    params = list(se.parameters())
    ref = _se_plain(se, x)
    out = se(x)
    assert "SqueezeExcite" in type(out.grad_fn).__name__  # the fused backward is the one under test
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, [x] + params, g), torch.autograd.grad(ref, [x] + params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # frozen SE, input gradient only; and the other way round
    se.requires_grad_(False)
    (gx,) = torch.autograd.grad(se(x), [x], g)
    torch.testing.assert_close(gx, torch.autograd.grad(_se_plain(se, x), [x], g)[0])
    se.requires_grad_(True)
    xd = x.detach()
    for a, b in zip(torch.autograd.grad(se(xd), params, g),
                    torch.autograd.grad(_se_plain(se, xd), params, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_squeeze_excite_function_under_bf16_autocast():
    """The backward recomputes the MLP under the forward's autocast state: bf16 training gives autograd's gradients
    (the same expression under autocast), not a dtype error."""
    torch.manual_seed(0)
    se = SqueezeExcite(16, 4)
    x = torch.randn(2, 16, 6, 5).to(torch.bfloat16).to(memory_format=torch.channels_last).requires_grad_()
    params = list(se.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = se(x)
        ref = _se_plain(se, x)
    assert "SqueezeExcite" in type(out.grad_fn).__name__ and out.dtype == ref.dtype == torch.bfloat16
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x] + params, g), torch.autograd.grad(ref, [x] + params, g)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_coatnet_training_step_under_bf16_autocast():
    """A whole CoAtNet (MBConv + SE Function + attention's training path) trains under bf16 autocast."""
    import hybridvision

    torch.manual_seed(0)
    m = hybridvision.create_model("coatnet_pico", depths=(1, 1, 1, 1, 1), num_classes=5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(m(torch.randn(2, 3, 64, 64)).float(), torch.tensor([1, 3]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_squeeze_excite_gradcheck():
    torch.manual_seed(0)
    se = SqueezeExcite(6, 2).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    w = [p.detach().clone().requires_grad_() for p in se.parameters()]
    names = [n for n, _ in se.named_parameters()]

    def f(inp, *ws):
        return torch.func.functional_call(se, dict(zip(names, ws)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *w))
    assert torch.autograd.gradgradcheck(f, (x, *w))  # a double backward differentiates the plain expression


@pytest.mark.parametrize("stride_mode", ["1x1", "dw"])
def test_mbconv_fuse_equals_unfused(stride_mode):
    torch.manual_seed(0)
    blk = MBConv(8, 16, stride=2, stride_mode=stride_mode).double().eval()
    _randomize_bn(blk)
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    ref = blk(x)
    blk.fuse()
    assert blk.fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in blk.modules())
    torch.testing.assert_close(blk(x), ref, rtol=1e-10, atol=1e-10)


def test_fuse_needs_eval_mode():
    with pytest.raises(RuntimeError, match="eval"):
        MBConv(8, 8).fuse()


def test_fold_prenorm_bn_is_exact():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(6).double().eval()
    _randomize_bn(bn)
    conv = torch.nn.Conv2d(6, 5, 1, stride=2, bias=True).double()
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(fold_prenorm_bn_into_conv1x1(bn, conv)(x), conv(bn(x)))
    with pytest.raises(ValueError, match="1x1"):
        fold_prenorm_bn_into_conv1x1(bn, torch.nn.Conv2d(6, 5, 3))


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_transformer_downsample_formula(pool, hw):
    torch.manual_seed(0)
    blk = TransformerBlock(16, 32, size=(4, 4), stride=2, head_dim=8, pool=pool).eval()
    x = torch.randn(2, 16, *hw)
    y = blk(x)
    assert y.shape == (2, 32, hw[0] // 2, hw[1] // 2)
    # x <- Proj(Pool(x)) + Attn(Pool(LN(x))); x <- x + FFN(LN(x)), written out in NCHW
    poolf = F.max_pool2d if pool == "max" else F.avg_pool2d
    t = x.permute(0, 2, 3, 1)
    pooled = poolf(x, 2).permute(0, 2, 3, 1)
    normed = poolf(blk.norm1(t).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    t = blk.proj(pooled) + blk.attn(normed)
    t = t + blk.mlp(blk.norm2(t))
    torch.testing.assert_close(y, t.permute(0, 3, 1, 2))


def test_transformer_training_path_matches_formula():
    """Training mode (oneDNN linears in an autograd Function on the CPU): outputs and every gradient equal the
    plain-module formula."""
    torch.manual_seed(0)
    blk = TransformerBlock(16, 32, size=(4, 4), stride=2, head_dim=8).train()
    x = torch.randn(2, 16, 8, 6, requires_grad=True)
    g = torch.randn(2, 32, 4, 3)
    params = [x, *blk.parameters()]
    got = torch.autograd.grad(blk(x), params, g)
    t = x.permute(0, 2, 3, 1)
    normed = F.max_pool2d(blk.norm1(t).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    t = blk.proj(F.max_pool2d(x, 2).permute(0, 2, 3, 1)) + blk.attn(normed)
    t = t + blk.mlp(blk.norm2(t))
    want = torch.autograd.grad(t.permute(0, 3, 1, 2), params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_transformer_identity_block_any_grid():
    torch.manual_seed(0)
    blk = TransformerBlock(32, 32, size=(4, 4), head_dim=8)
    assert isinstance(blk.proj, torch.nn.Identity) and blk.attn.num_heads == 4
    for hw in [(4, 4), (3, 7), (6, 2)]:
        x = torch.randn(2, 32, *hw).contiguous(memory_format=torch.channels_last)
        assert blk(x).shape == x.shape
        assert blk(x.contiguous()).shape == x.shape  # plain NCHW works too


def test_blocks_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for blk, x in [
        (MBConv(8, 16, stride=2, drop_path=0.1), torch.randn(2, 8, 6, 6)),
        (TransformerBlock(8, 16, size=3, stride=2, head_dim=8, drop_path=0.1), torch.randn(2, 8, 6, 6)),
    ]:
        blk.train()
        torch.manual_seed(1)
        blk(x).square().mean().backward()
        missing = [n for n, p in blk.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, missing


def test_block_errors():
    with pytest.raises(ValueError, match="stride_mode"):
        MBConv(8, 8, stride_mode="pool")
    with pytest.raises(ValueError, match="pool"):
        MBConv(8, 16, stride=2, pool="min")
    with pytest.raises(ValueError, match="pool"):
        TransformerBlock(8, 8, size=4, pool="min")
    with pytest.raises(ValueError, match="head_dim"):
        TransformerBlock(8, 24, size=4, head_dim=16)
