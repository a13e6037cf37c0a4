"""ParC blocks: ParCPair / ParCMixer against a float64 roll-based reference, all circular_conv methods agree,
global receptive field, from_conv eligibility, the ParC-Net blocks at odd / non-square sizes, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hybridvision.blocks.parc import (
    ChannelAttention,
    ParCMetaFormerBlock,
    ParCMixer,
    ParCMobileViTBlock,
    ParCPair,
    ParCTokenMixer,
    conv_parc_eligibility,
    parc_no_weight_decay,
)
from hybridvision.ops.parc import ParC2d

METHODS = ["direct", "gemm", "fft"]


def ref_parc(m: ParC2d, x: torch.Tensor) -> torch.Tensor:
    """Reference ParC in float64: y[o, i] = b[o] + sum_{c, k} w[o, c, k] * (x + pe)[c, (i + k) mod L] along the axis."""
    dim = m.dim
    length = x.size(dim)
    w, pe = m.instance_params(length)
    w, x = w.double(), x.double()
    if pe is not None:
        x = x + (pe.double().unsqueeze(-1) if dim == 2 else pe.double().unsqueeze(-2))
    c_out, c_in_g = w.shape[:2]
    xg = x.reshape(x.size(0), m.groups, c_in_g, x.size(2), x.size(3))
    wg = w.reshape(m.groups, c_out // m.groups, c_in_g, length)
    y = 0
    for k in range(length):
        xs = torch.roll(xg, shifts=-k, dims=dim + 1)  # xs[i] = x[(i + k) mod L]
        y = y + torch.einsum("gjc,bgchw->bgjhw", wg[..., k], xs)
    y = y.reshape(x.size(0), c_out, x.size(2), x.size(3))
    if m.bias is not None:
        y = y + m.bias.double().view(1, -1, 1, 1)
    return y


def ref_pair(p: ParCPair, x: torch.Tensor) -> torch.Tensor:
    x_h, x_w = torch.split(x, p.split, dim=1)
    return torch.cat((ref_parc(p.parc_h, x_h), ref_parc(p.parc_w, x_w)), dim=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("groups,channels", [(None, 8), (1, 6), (1, 7), (2, 12)])
@pytest.mark.parametrize("size", [(7, 7), (6, 9)])
def test_pair_matches_reference(method, groups, channels, size):
    torch.manual_seed(0)
    p = ParCPair(channels, (5, 8), groups=groups, method=method)
    x = torch.randn(2, channels, *size)
    torch.testing.assert_close(p(x).double(), ref_pair(p, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(5, 5), (6, 9)])
def test_mixer_matches_reference_and_is_global(size):
    torch.manual_seed(1)
    m = ParCMixer(8, (6, 6), bias=True, method="direct").double()
    x = torch.randn(2, 8, *size, dtype=torch.float64, requires_grad=True)
    x1, x2 = x.chunk(2, dim=1)
    ref = torch.cat((ref_parc(m.parc_1w, ref_parc(m.parc_1h, x1)), ref_parc(m.parc_2h, ref_parc(m.parc_2w, x2))), 1)
    y = m(x)
    torch.testing.assert_close(y, ref)
    # one output pixel of each half depends on every input pixel of that half (global receptive field)
    for c in (0, 4):
        (g,) = torch.autograd.grad(y[0, c, 0, 0], x, retain_graph=True)
        half = slice(0, 4) if c == 0 else slice(4, 8)
        assert (g[0, half].abs().sum(0) > 0).all()
        other = slice(4, 8) if c == 0 else slice(0, 4)
        assert (g[0, other] == 0).all()


def test_pair_receptive_field_is_a_cross():
    torch.manual_seed(2)
    p = ParCPair(4, 7, method="direct")
    x = torch.randn(1, 4, 7, 9, requires_grad=True)
    (g,) = torch.autograd.grad(p(x)[0, 0, 3, 4], x)  # channel 0 is in the H half: the whole column 4
    nz = g[0, 0] != 0
    assert nz[:, 4].all() and not nz[:, [0, 1, 2, 3, 5, 6, 7, 8]].any()


def _copy_with_method(module: nn.Module, method: str) -> nn.Module:
    for m in module.modules():
        if isinstance(m, ParC2d):
            m.method = method
    return module


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: ParCMetaFormerBlock(16, 8, drop_path=0.1), (2, 16, 8, 8)),
        (lambda: ParCMetaFormerBlock(16, 8, use_pe=False), (2, 16, 5, 11)),
        (lambda: ParCMobileViTBlock(12, 20, 16, 2, (6, 8)), (2, 12, 7, 9)),
        (lambda: ParCPair(10, 6, groups=1, bias=False), (2, 10, 6, 13)),
    ],
)
def test_blocks_all_methods_agree(make, shape):
    torch.manual_seed(3)
    block = make().eval()
    x = torch.randn(*shape)
    outs = [_copy_with_method(block, m)(x) for m in METHODS]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-4, atol=1e-4)
    expected_c = 20 if isinstance(block, ParCMobileViTBlock) else shape[1]
    assert outs[0].shape == (shape[0], expected_c, *shape[2:])


def test_meta_former_block_trains_and_pe_only_first():
    torch.manual_seed(4)
    blk = ParCMobileViTBlock(8, 8, 12, 3, 6)
    assert [b.mixer.parc_1h.pe is not None for b in blk.parc_blocks] == [True, False, False]
    x = torch.randn(2, 8, 6, 6)
    blk(x).square().mean().backward()
    assert blk.parc_blocks[0].mixer.parc_1h.pe.grad.abs().sum() > 0
    assert blk.parc_blocks[2].mixer.parc_2w.weight.grad.abs().sum() > 0
    assert len(parc_no_weight_decay(blk)) == 4 and all(n.endswith(".pe") for n in parc_no_weight_decay(blk))


def test_channel_attention_gates_channels():
    torch.manual_seed(5)
    ca = ChannelAttention(32).eval()
    x = torch.randn(3, 32, 5, 7)
    ratio = ca(x) / x
    gate = ratio[:, :, 0, 0]
    torch.testing.assert_close(ratio, gate[:, :, None, None].expand_as(ratio))
    assert (gate >= 0).all() and (gate <= 1).all()
    assert sum(p.numel() for p in ca.parameters()) == 32 * 2 + 2 * 2 + 2 * 32 + 2 * 32  # convs (no bias) + 2 BNs


def test_from_conv_mirrors_the_conv():
    dw = nn.Conv2d(12, 12, 7, padding=3, groups=12, bias=True).double()
    p = ParCPair.from_conv(dw, (14, 10))
    assert p.parc_h.groups == 6 and p.parc_w.groups == 6 and p.parc_h.bias is not None
    assert (p.parc_h.base_size, p.parc_w.base_size) == (14, 10) and p.parc_h.weight.dtype == torch.float64
    dense = ParCPair.from_conv(nn.Conv2d(8, 8, 3, padding=1, bias=False), 7, use_pe=False)
    assert dense.parc_h.groups == 1 and dense.parc_h.weight.shape == (4, 4, 7)
    assert dense.parc_h.bias is None and dense.parc_h.pe is None


@pytest.mark.parametrize(
    "conv,reason",
    [
        (nn.Conv2d(8, 8, 3, stride=2, padding=1), "stride"),
        (nn.Conv2d(8, 8, 1), "1x1"),
        (nn.Conv2d(8, 16, 3, padding=1), "out_channels"),
        (nn.Conv2d(9, 9, 3, padding=1, groups=9), "does not split"),
        (nn.Linear(4, 4), "not an nn.Conv2d"),
    ],
)
def test_ineligible_convs_are_explained(conv, reason):
    assert reason in conv_parc_eligibility(conv)
    with pytest.raises(ValueError, match="cannot replace"):
        ParCPair.from_conv(conv, 7)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2 channels"):
        ParCPair(1, 7)
    with pytest.raises(ValueError, match="odd"):
        ParCPair(7, 7)
    with pytest.raises(ValueError, match="base_size"):
        ParCPair(8, (7, 0))
    with pytest.raises(ValueError, match="even channel count"):
        ParCMixer(9, 7)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 8, H, W\)"):
        ParCPair(8, 7)(torch.randn(1, 6, 7, 7))
    with pytest.raises(ValueError, match="depth >= 1"):
        ParCMobileViTBlock(8, 8, 8, 0, 7)


def test_token_mixer_runs_the_grid():
    torch.manual_seed(6)
    proj = nn.Linear(8, 8)
    tm = ParCTokenMixer(8, (3, 5), proj=proj, method="direct")
    x = torch.randn(2, 15, 8)
    y = tm(x)
    grid = x.transpose(1, 2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(y, proj(tm.mixer(grid).flatten(2).transpose(1, 2)))
    with pytest.raises(ValueError, match="16 tokens but its grid is 3x5"):
        tm(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="attn_mask"):
        tm(x, attn_mask=torch.ones(15, 15))
