"""RelPosBias2d / RelAttention2d against the explicit formula of CoAtNet Eq. 3, in float64."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from hybridvision.ops import fused, native
from hybridvision.ops.attention import RelAttention2d, RelPosBias2d, relative_index


def _explicit_bias(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(heads, N, N) by loops over every query/key pair: table[:, hi - hj + H - 1, wi - wj + W - 1]."""
    heads = table.shape[0]
    H, W = (table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2
    assert (H, W) == (h, w)
    n = h * w
    out = torch.empty(heads, n, n, dtype=table.dtype)
    for i in range(n):
        for j in range(n):
            hi, wi, hj, wj = i // w, i % w, j // w, j % w
            out[:, i, j] = table[:, hi - hj + h - 1, wi - wj + w - 1]
    return out


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (4, 4), (5, 3)])
def test_relative_index_matches_loops(h, w):
    torch.manual_seed(0)
    table = torch.randn(3, 2 * h - 1, 2 * w - 1, dtype=torch.float64)
    flat = table.flatten(1)[:, relative_index(h, w)]
    torch.testing.assert_close(flat, _explicit_bias(table, h, w), rtol=0, atol=0)


def test_bias_same_size_is_table_identity():
    torch.manual_seed(0)
    rpb = RelPosBias2d(4, (3, 5)).double()
    assert rpb.table.shape == (4, 5, 9)
    assert rpb.table_for((3, 5)) is rpb.table
    torch.testing.assert_close(rpb((3, 5)), _explicit_bias(rpb.table.detach(), 3, 5))


def test_bias_init_is_truncated_normal_02():
    torch.manual_seed(0)
    t = RelPosBias2d(64, 14).table.detach()
    # timm/torch convention trunc_normal_(std=.02) (cut at +-2 absolute, i.e. effectively N(0, .02^2))
    assert abs(t.std().item() - 0.02) < 0.001 and abs(t.mean().item()) < 0.001


@pytest.mark.parametrize("grid", [(4, 4), (7, 3), (2, 6), (1, 1)])
def test_bias_resize_is_bilinear_on_the_table(grid):
    torch.manual_seed(0)
    rpb = RelPosBias2d(2, (5, 4)).double()
    h, w = grid
    resized = F.interpolate(rpb.table.detach()[None], size=(2 * h - 1, 2 * w - 1), mode="bilinear",
                            align_corners=False)[0]
    torch.testing.assert_close(rpb(grid), _explicit_bias(resized, h, w))
    assert rpb(grid).shape == (2, h * w, h * w)


def test_bias_resize_same_size_bilinear_is_identity():
    torch.manual_seed(0)
    t = torch.randn(3, 9, 13, dtype=torch.float64)
    torch.testing.assert_close(F.interpolate(t[None], size=(9, 13), mode="bilinear", align_corners=False)[0], t)


def test_eval_cache_and_its_invalidation():
    torch.manual_seed(0)
    rpb = RelPosBias2d(2, 4).eval()
    with torch.no_grad():
        a = rpb((4, 4))
        assert rpb((4, 4)) is a  # cached
        b = rpb((3, 5))
        assert b.shape == (2, 15, 15) and rpb((3, 5)) is b
        assert rpb((4, 4), dtype=torch.float64).dtype == torch.float64
        rpb.table.add_(1.0)  # in-place change: version bump invalidates
        c = rpb((4, 4))
        torch.testing.assert_close(c, a + 1.0)
    with torch.inference_mode():
        d = rpb((4, 4))
    # an inference tensor is never handed out outside inference mode (it could not be saved for backward)
    frozen_x = torch.randn(2, 16, requires_grad=True)
    rpb.table.requires_grad_(False)
    e = rpb((4, 4))
    assert e is not d and not e.is_inference()
    (frozen_x.sum() * e.sum()).backward()
    rpb.table.requires_grad_(True)
    rpb.train()
    assert not rpb._cache
    # training mode: never cached, gradient flows to the table
    out = rpb((4, 4))
    out.sum().backward()
    assert rpb.table.grad is not None and rpb.table.grad.abs().sum() > 0
    # eval with grad enabled and a trainable table (e.g. BN-frozen fine-tuning): no cache, gradient flows
    rpb.eval()
    rpb.table.grad = None
    rpb((4, 4)).sum().backward()
    assert rpb.table.grad is not None and not rpb._cache


def test_index_built_in_inference_mode_serves_training():
    torch.manual_seed(0)
    rpb = RelPosBias2d(2, (3, 4)).eval()
    with torch.inference_mode():
        rpb((3, 4))
    rpb.train()
    rpb((3, 4)).square().sum().backward()  # would raise if the cached index were an inference tensor
    assert rpb.table.grad.abs().sum() > 0


def test_cache_dropped_on_load_state_dict():
    torch.manual_seed(0)
    rpb = RelPosBias2d(2, 3).eval()
    with torch.no_grad():
        old = rpb((3, 3))
        other = RelPosBias2d(2, 3)
        buf = io.BytesIO()
        torch.save(other.state_dict(), buf)
        buf.seek(0)
        rpb.load_state_dict(torch.load(buf, weights_only=True))
        new = rpb((3, 3))
    assert not torch.equal(old, new)
    torch.testing.assert_close(new, _explicit_bias(other.table.detach(), 3, 3))


def _explicit_attention(attn: RelAttention2d, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + B) V, written out, x: (B, H, W, C)."""
    b, h, w, c = x.shape
    n, nh, d = h * w, attn.num_heads, attn.head_dim
    qkv = x.reshape(b, n, c) @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.split(attn.out_dim, dim=-1)
    q, k, v = (t.reshape(b, n, nh, d).transpose(1, 2) for t in (q, k, v))
    table = attn.rel_pos.table_for((h, w)).detach()
    if (h, w) == attn.rel_pos.size:
        bias = _explicit_bias(table, h, w)
    else:
        bias = table.flatten(1)[:, relative_index(h, w)]
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
    y = torch.softmax(logits, dim=-1) @ v
    y = y.transpose(1, 2).reshape(b, n, attn.out_dim)
    return (y @ attn.proj.weight.T + attn.proj.bias).reshape(b, h, w, attn.out_dim)


@pytest.mark.parametrize("dim,out_dim,head_dim,size,grid", [
    (16, 16, 8, (4, 4), (4, 4)),
    (12, 24, 8, (3, 5), (3, 5)),
    (16, 32, 16, (4, 4), (3, 6)),  # resized bias, non-square
    (8, 8, 4, (5, 5), (5, 5)),
])
def test_attention_equals_explicit_softmax_float64(dim, out_dim, head_dim, size, grid):
    torch.manual_seed(0)
    attn = RelAttention2d(dim, out_dim, head_dim=head_dim, size=size).double()
    with torch.no_grad():
        attn.rel_pos.table.normal_(0, 1.0)  # strong bias so a missing/misplaced one would show
        attn.qkv.bias.normal_()
    x = torch.randn(2, *grid, dim, dtype=torch.float64)
    for mode in (attn.train, attn.eval):
        mode()
        with torch.no_grad():
            torch.testing.assert_close(attn(x), _explicit_attention(attn, x), rtol=1e-10, atol=1e-10)
    # with autograd on (the written-out path for a trainable bias, in place of SDPA's math fallback) too, and its
    # gradients against autograd through the reference formula
    attn.train()
    xg = x.clone().requires_grad_()
    out, ref = attn(xg), _explicit_attention(attn, xg)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(out)
    params = [attn.qkv.weight, attn.qkv.bias, attn.proj.weight]
    for a, b in zip(torch.autograd.grad(out, [xg] + params, gy), torch.autograd.grad(ref, [xg] + params, gy)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", [0, 1], ids=["sdpa", "native"])
@pytest.mark.parametrize("grid,head_dim", [((7, 7), 32), ((3, 5), 8), ((4, 6), 12)])
def test_float_inference_kernels_equal_the_formula(kernel, grid, head_dim, monkeypatch):
    """CPU fp32 inference runs the attention by the tuner's choice: each alternative against the float64 formula."""
    if kernel == 1 and not native.available():
        pytest.skip("native kernels not built")
    ran = []

    def forced(key, macs, alternatives):
        ran.append((key[0], alternatives[kernel][0]))  # the linears around it: their alternative of that index
        return alternatives[kernel][1]()

    monkeypatch.setattr(fused, "_fastest", forced)
    torch.manual_seed(0)
    attn = RelAttention2d(24, 2 * head_dim * 2, head_dim=head_dim, size=(5, 5)).eval()
    with torch.no_grad():
        attn.rel_pos.table.normal_(0, 1.0)
    x = torch.randn(3, *grid, 24)
    with torch.inference_mode():
        out = attn(x)
    ref = _explicit_attention(attn.double(), x.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    assert ("attention", ("sdpa", "native")[kernel]) in ran


@pytest.mark.parametrize("grid,head_dim", [((7, 7), 32), ((3, 5), 8), ((4, 6), 12)])
def test_float_training_native_gradients_equal_the_formula(grid, head_dim):
    """CPU fp32 training runs the native forward and backward: outputs and the gradients of the input, the
    projections and the relative-bias table against the same module in float64 (autograd through the written-out
    formula, itself checked against the explicit one in test_attention_equals_explicit_softmax_float64)."""
    if not native.available():
        pytest.skip("native kernels not built")
    torch.manual_seed(0)
    attn = RelAttention2d(24, 2 * head_dim * 2, head_dim=head_dim, size=(5, 5)).train()
    with torch.no_grad():
        attn.rel_pos.table.normal_(0, 1.0)
    ref = RelAttention2d(24, 2 * head_dim * 2, head_dim=head_dim, size=(5, 5)).double().train()
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(3, *grid, 24, requires_grad=True)
    xd = x.detach().double().requires_grad_()
    out, expect = attn(x), ref(xd)
    assert "NativeAttention" in str(out.grad_fn.next_functions[0][0].next_functions)  # through the native Function
    torch.testing.assert_close(out.double(), expect, rtol=1e-4, atol=1e-5)
    gy = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x, attn.qkv.weight, attn.proj.weight, attn.rel_pos.table], gy)
    theirs = torch.autograd.grad(expect, [xd, ref.qkv.weight, ref.proj.weight, ref.rel_pos.table], gy.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_native_attention_double_backward_matches_the_formula():
    """create_graph=True through the native Function differentiates the written-out formula."""
    if not native.available():
        pytest.skip("native kernels not built")
    from hybridvision.ops.attention import _NativeAttention, _formula
    torch.manual_seed(0)
    qkv = torch.randn(2, 6, 3, 2, 4, requires_grad=True)
    bias = torch.randn(2, 6, 6, requires_grad=True)
    gy = torch.randn(2, 6, 2, 4)
    results = []
    for fn in (_NativeAttention.apply, _formula):
        g_qkv, g_bias = torch.autograd.grad(fn(qkv, bias), (qkv, bias), gy, create_graph=True)
        results.append(torch.autograd.grad((g_qkv**2).sum() + (g_bias**2).sum(), (qkv, bias)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_gradcheck_float64():
    torch.manual_seed(0)
    attn = RelAttention2d(8, 8, head_dim=4, size=(3, 2)).double()
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    table = attn.rel_pos.table.detach().clone().requires_grad_(True)

    def f(inp, tab):
        return torch.func.functional_call(attn, {"rel_pos.table": tab}, (inp,))

    assert torch.autograd.gradcheck(f, (x, table))
    # resized bias: gradient reaches the table through the bilinear resize
    x2 = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x2, table))


def test_export_leaves_no_tracer_tensor_in_the_caches():
    """torch.export runs the module's Python on FakeTensors: neither the shared relative index nor the bias cache
    may keep one, or later eager calls on that grid get a fake bias."""
    from torch._subclasses.fake_tensor import FakeTensor

    from hybridvision.ops import attention

    torch.manual_seed(0)
    attn = RelAttention2d(8, head_dim=4, size=(3, 3)).eval()
    x = torch.randn(1, 7, 9, 8)  # a grid no other test uses, so the export is the first to ask for its index
    attention._INDEX_CACHE.pop((7, 9, x.device), None)
    with torch.no_grad():
        torch.export.export(attn, (x,))
        bias = attn.rel_pos((7, 9))
        assert type(bias) is torch.Tensor and not isinstance(bias, FakeTensor)
        torch.testing.assert_close(bias, attn.rel_pos.table_for((7, 9)).flatten(1)[:, relative_index(7, 9)])
        torch.testing.assert_close(attn(x), _explicit_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        RelAttention2d(16, 20, head_dim=8)
    attn = RelAttention2d(16, head_dim=8)
    with pytest.raises(ValueError, match="C=16"):
        attn(torch.randn(1, 4, 4, 12))
    with pytest.raises(ValueError, match="size"):
        RelPosBias2d(2, (0, 3))
