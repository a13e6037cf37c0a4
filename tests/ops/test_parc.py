"""ParC2d: parameter layout, resize, equality with an official-style implementation, non-square inputs, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridvision.ops.parc import ParC2d


def official_style(x: torch.Tensor, weight4: torch.Tensor, bias, pe4, direction: str) -> torch.Tensor:
    """The official ParC forward, written out: resize (bilinear, align_corners) to the feature size, add the PE,
    cat(x, x[:-1]) along the axis, valid depthwise conv2d. Square inputs only (as the official code).

    weight4: (C, 1, K, 1) for "H" / (C, 1, 1, K) for "W"; pe4: (1, C, K, 1) / (1, C, 1, K)."""
    f = x.size(2)
    size = (f, 1) if direction == "H" else (1, f)
    if weight4.shape[2:] != size:
        weight4 = F.interpolate(weight4, size, mode="bilinear", align_corners=True)
        pe4 = F.interpolate(pe4, size, mode="bilinear", align_corners=True) if pe4 is not None else None
    if pe4 is not None:
        x = x + pe4
    if direction == "H":
        x = torch.cat([x, x[:, :, :-1, :]], dim=2)
    else:
        x = torch.cat([x, x[:, :, :, :-1]], dim=3)
    return F.conv2d(x, weight4, bias, groups=x.size(1))


def to_official(m: ParC2d):
    if m.direction == "H":
        return m.weight.unsqueeze(3), (m.pe.reshape(1, m.channels, -1, 1) if m.pe is not None else None)
    return m.weight.unsqueeze(2), (m.pe.reshape(1, m.channels, 1, -1) if m.pe is not None else None)


def test_parameter_names_and_shapes():
    torch.manual_seed(0)
    m = ParC2d(8, "H", 14)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"weight": (8, 1, 14), "bias": (8,), "pe": (8, 14)}
    assert 0.01 < m.pe.std().item() < 0.03  # trunc-normal, std .02 (cut at +-2 absolute, as timm's)
    bound = 1 / 14**0.5  # kaiming-uniform(a=sqrt 5) bound = 1/sqrt(fan_in), fan_in = 1 * 14
    assert m.weight.abs().max().item() <= bound and m.weight.std().item() > bound / 4
    dense = ParC2d(6, "W", 7, use_pe=False, bias=False, groups=1)
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == {"weight": (6, 6, 7)}
    assert ParC2d(6, "W", 7, groups=3).weight.shape == (6, 2, 7)


@pytest.mark.parametrize("direction", ["H", "W"])
def test_instance_params_same_size_is_identity(direction):
    m = ParC2d(4, direction, 9)
    w, pe = m.instance_params(9)
    assert torch.equal(w, m.weight) and torch.equal(pe, m.pe)
    w2, pe2 = m.instance_params(13)
    assert w2.shape == (4, 1, 13) and pe2.shape == (4, 13)
    # align_corners=True keeps the end points
    torch.testing.assert_close(w2[..., [0, -1]], m.weight[..., [0, -1]])
    torch.testing.assert_close(pe2[..., [0, -1]], m.pe[..., [0, -1]])


@pytest.mark.parametrize("direction", ["H", "W"])
@pytest.mark.parametrize("size", [7, 10, 14])  # base size, odd and even resize
@pytest.mark.parametrize("method", ["direct", "gemm", "fft"])
def test_matches_official_style(direction, size, method):
    torch.manual_seed(1)
    m = ParC2d(6, direction, 7, method=method).double()
    with torch.no_grad():
        m.pe.normal_()  # make the PE matter
    x = torch.randn(2, 6, size, size, dtype=torch.float64, requires_grad=True)
    w4, pe4 = to_official(m)
    ref = official_style(x, w4, m.bias, pe4, direction)
    y = m(x)
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.weight, m.pe, m.bias), gy)
    exp = torch.autograd.grad(ref, (x, m.weight, m.pe, m.bias), gy)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("direction", ["H", "W"])
def test_non_square(direction):
    """A non-square input: the kernel follows the length of its own axis; equal to the per-axis formula."""
    torch.manual_seed(2)
    m = ParC2d(3, direction, 8).double()
    x = torch.randn(2, 3, 6, 11, dtype=torch.float64)
    y = m(x)
    dim = 2 if direction == "H" else 3
    k = x.size(dim)
    w, pe = m.instance_params(k)
    xp = x + (pe.view(1, 3, k, 1) if dim == 2 else pe.view(1, 3, 1, k))
    idx = (torch.arange(k).view(k, 1) + torch.arange(k).view(1, k)) % k  # [i, k] -> (i + k) mod K
    xl = xp.movedim(dim, -1)[..., idx]  # (B, C, other, i, k)
    ref = torch.einsum("bcnik,ck->bcni", xl, w[:, 0]).movedim(-1, dim) + m.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(y, ref)


def test_dense_and_no_pe():
    torch.manual_seed(3)
    m = ParC2d(4, "W", 5, groups=1, use_pe=False).double()
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    ref = F.conv2d(torch.cat([x, x[..., :-1]], 3), m.weight.unsqueeze(2), m.bias)
    torch.testing.assert_close(m(x), ref)


def test_set_base_size_freezes_instance_kernel():
    torch.manual_seed(4)
    m = ParC2d(4, "H", 7)
    m.pe.requires_grad_(False)
    x = torch.randn(2, 4, 12, 5)
    before = m(x)
    m.set_base_size(12)
    assert m.weight.requires_grad and not m.pe.requires_grad
    assert m.base_size == 12 and m.weight.shape == (4, 1, 12) and m.pe.shape == (4, 12)
    assert isinstance(m.weight, torch.nn.Parameter)
    torch.testing.assert_close(m(x), before)


def test_half_precision_forward():
    torch.manual_seed(5)
    m = ParC2d(4, "W", 8, method="fft")
    x = torch.randn(2, 4, 3, 8)
    y = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m.float()(x), rtol=3e-2, atol=3e-2)


def test_errors():
    with pytest.raises(ValueError, match="direction must be 'H'"):
        ParC2d(4, "V", 7)
    with pytest.raises(ValueError, match="groups=3 must be a positive divisor of channels=4"):
        ParC2d(4, "H", 7, groups=3)
    with pytest.raises(ValueError, match="base_size must be a positive int"):
        ParC2d(4, "H", 0)
    with pytest.raises(ValueError, match="unknown circular_conv method"):
        ParC2d(4, "H", 7, method="slow")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4, H, W\); got \(1, 3, 7, 7\)"):
        ParC2d(4, "H", 7)(torch.randn(1, 3, 7, 7))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("direction,size", [("H", 14), ("W", 11)])
def test_onnx_export_matches(tmp_path, direction, size):
    """While exporting, auto takes the plain Gather + MatMul path: the ONNX graph runs in onnxruntime and agrees,
    at the base size and at a resized one."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(6)
    m = ParC2d(4, direction, 14).eval()
    x = torch.randn(2, 4, size, size + 3 if direction == "H" else size)
    path = tmp_path / "parc.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=False)
    sess = ort.InferenceSession(str(path))
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), m(x).detach(), rtol=1e-4, atol=1e-5)


LAYERS = [(None, True, True), (None, True, False), (None, False, True), (None, False, False), (1, True, True),
          (2, True, False)]  # groups (None: depthwise), use_pe, bias


@pytest.mark.parametrize("method,groups,use_pe,bias", [(m, *layer) for m in ("fft", "gemm", "direct") for layer in LAYERS]
                         + [("native", *layer) for layer in LAYERS if layer[0] is None])  # native: depthwise only
@pytest.mark.parametrize("direction,shape", [("H", (2, 4, 9, 6)), ("W", (2, 4, 5, 8)), ("H", (1, 4, 7, 7))])
def test_eval_cache_gives_the_uncached_result(method, groups, use_pe, bias, direction, shape):
    """In eval mode without gradients the resized kernel and conv(pe, w) + bias come from the cache (the PE's term
    folded into one addend; the native kernel fuses it): same output as the uncached path (grad mode on), for base
    and resized lengths (base 7: 9, 8 and 5 resize), every method, depthwise, dense and grouped."""
    torch.manual_seed(6)
    m = ParC2d(4, direction, 7, groups=groups, use_pe=use_pe, bias=bias, method=method).double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    expected = m(x)  # grad mode on, parameters require grad: the uncached path
    assert expected.requires_grad and not m._cache
    with torch.no_grad():
        got = m(x)
        again = m(x)
    assert len(m._cache) == 1
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), expected.detach(), rtol=1e-10, atol=1e-10)


def test_eval_cache_sees_parameter_changes_and_is_dropped(monkeypatch):
    """The cache is keyed by the parameters' storage and version and dropped when a parameter is assigned: in-place
    updates, load_state_dict, a replaced parameter, set_base_size and dtype changes give fresh results; train() and a frozen-parameter backward through x behave as without it.
    A second call at the same length does not resize again (the cache is used)."""
    from hybridvision.ops import parc

    torch.manual_seed(7)
    m = ParC2d(4, "W", 6).eval()
    x = torch.randn(2, 4, 3, 9)

    def fresh(mod, inp):
        with torch.enable_grad():
            return mod(inp).detach()  # grad mode on, parameters require grad: never cached

    resizes = []
    real_resize = parc._resize
    monkeypatch.setattr(parc, "_resize", lambda t, size: resizes.append(size) or real_resize(t, size))
    with torch.no_grad():
        first = m(x)
        n = len(resizes)
        torch.testing.assert_close(m(x), first, rtol=0, atol=0)
        assert len(resizes) == n  # served from the cache
        m.pe.mul_(3.0)  # in place: a new version
        torch.testing.assert_close(m(x), fresh(m, x))
        other = ParC2d(4, "W", 6)
        m.load_state_dict(other.state_dict())
        assert not m._cache
        torch.testing.assert_close(m(x), fresh(m, x))
        m(x)
        m.weight = torch.nn.Parameter(torch.randn(4, 1, 6))  # replaced outright (its address could be an old one's)
        assert not m._cache
        torch.testing.assert_close(m(x), fresh(m, x))
        m.set_base_size(9)
        assert not m._cache
        torch.testing.assert_close(m(x), fresh(m, x))
        m.double()
        assert not m._cache
        assert m(x.double()).dtype == torch.float64
    # frozen parameters, x requiring grad: cached kernel and addend, gradient to x as without the cache
    for p in m.parameters():
        p.requires_grad_(False)
    xd = x.double().requires_grad_()
    m(xd).square().sum().backward()
    g_cached = xd.grad.clone()
    assert m._cache
    m.train()
    assert not m._cache
    xd.grad = None
    m(xd).square().sum().backward()
    torch.testing.assert_close(g_cached, xd.grad)
