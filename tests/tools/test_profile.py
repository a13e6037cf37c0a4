"""Profiler: MACs on models whose count is known by hand (conv, linear, FFT ParC, attention), throughput, MFU."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridvision.ops.circular import circular_conv
from hybridvision.tools import profile
from hybridvision.tools.profile import count_flops, count_macs, format_results, profile_model, throughput


class ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class FFTParC(nn.Module):
    """Depthwise circular correlation along the width via rfft/irfft (Fast-ParC)."""

    def __init__(self, c: int, k: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, k))

    def forward(self, x):
        k = x.shape[-1]
        return torch.fft.irfft(torch.fft.rfft(x, dim=-1) * torch.fft.rfft(self.w, dim=-1).conj().unsqueeze(1), n=k, dim=-1)


class Attention(nn.Module):
    def __init__(self, mask: bool):
        super().__init__()
        self.mask = torch.randn(2, 12, 12) if mask else None
        self.scale = nn.Parameter(torch.ones(()))  # element-wise (uncounted); gives the backward a parameter

    def forward(self, x):  # x: (B, 2 heads, 12 tokens, 8)
        x = x * self.scale
        return F.scaled_dot_product_attention(x, x, x, attn_mask=self.mask)


def test_conv_and_linear_macs_by_hand():
    m = ConvLinear()
    conv = 8 * 3 * 3 * 3 * 10 * 13  # C_out * C_in * k * k * H * W
    assert count_macs(m, (1, 3, 10, 13)) == conv + 8 * 5
    assert count_macs(m, (3, 3, 10, 13)) == 3 * (conv + 8 * 5)


def test_training_macs_count_the_backward():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 10), nn.ReLU(), nn.Linear(10, 5))
    fwd = 2 * (48 * 10 + 10 * 5)
    assert count_macs(m, (2, 3, 4, 4)) == fwd
    # first Linear: forward + weight grad (no input grad); second: forward + weight grad + input grad
    assert count_macs(m, (2, 3, 4, 4), train=True) == 2 * 2 * 48 * 10 + 3 * 2 * 10 * 5
    assert m.training and all(p.grad is None for p in m.parameters())  # the caller's model is untouched


def test_depthwise_conv_backward_by_hand():
    """Forward + weight grad + input grad of the depthwise conv; torch's own formula ignores groups (64x more)."""
    m = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 7, padding=3, groups=64))
    pointwise = 2 * 64 * 3 * 16 * 16
    depthwise = 2 * 64 * 49 * 16 * 16
    assert count_macs(m, (2, 3, 16, 16)) == pointwise + depthwise
    # first conv: forward + weight grad (no input grad); depthwise: forward + weight grad + input grad
    assert count_macs(m, (2, 3, 16, 16), train=True) == 2 * pointwise + 3 * depthwise


def test_fft_parc_flops_by_hand():
    c, h, k = 4, 6, 8  # log2(8) = 3
    flops = count_flops(FFTParC(c, k), (1, c, h, k))
    rfft_x = 2.5 * c * h * k * 3
    rfft_w = 2.5 * c * k * 3
    product = 6 * c * h * (k // 2 + 1)  # complex multiply, 6 FLOPs per element
    irfft = 2.5 * c * h * k * 3
    assert flops == int(rfft_x) + int(rfft_w) + product + int(irfft)


def test_circular_conv_methods_are_all_counted():
    torch.manual_seed(0)
    w = torch.randn(4, 1, 16)

    class M(nn.Module):
        def __init__(self, method):
            super().__init__()
            self.method = method

        def forward(self, x):
            return circular_conv(x, w, dim=3, method=self.method)

    direct = count_macs(M("direct"), (1, 4, 5, 16))
    assert direct == 4 * 5 * 16 * 16  # K MACs per output element
    assert count_macs(M("gemm"), (1, 4, 5, 16)) == direct
    fft = count_macs(M("fft"), (1, 4, 5, 16))
    assert 0 < fft < direct


@pytest.mark.parametrize("mask", [False, True])  # fused CPU kernel (no mask) and the math path (mask)
def test_attention_macs_by_hand(mask):
    b, heads, n, d = 1, 2, 12, 8
    expected = 2 * b * heads * n * n * d  # QK^T and AV, n*n*d MACs each per head
    assert count_macs(Attention(mask), (b, heads, n, d)) == expected
    assert count_macs(Attention(mask), (b, heads, n, d), train=True) > expected


def test_throughput_and_profile(tmp_path):
    torch.manual_seed(0)
    m = ConvLinear()
    assert throughput(m, (2, 3, 16, 16), iters=2, warmup=1) > 0
    r = profile_model(m, (16, 20), batch_size=2, name="a", iters=2, warmup=1, peak_flops=1e9)
    assert r.macs == 8 * 27 * 16 * 20 + 40 and r.params == sum(p.numel() for p in m.parameters())
    assert r.train_macs > r.macs and r.infer_img_s > 0 and r.train_img_s > 0 and r.infer_mfu > 0
    assert r.infer_mfu == pytest.approx(2 * r.macs * r.infer_img_s / 1e9)
    r2 = profile_model(m, 16, batch_size=2, name="b", measure_speed=False)
    table = format_results([r, r2])
    assert "| a |" in table and "| b |" in table and "×)" in table
    with pytest.raises(ValueError, match="no results"):
        format_results([])
    with pytest.raises(ValueError, match="input_size"):
        count_macs(m, (3, 16, 16))


def test_mfu_is_against_the_fastest_gemm(monkeypatch):
    """The MFU denominator is the fastest kernel of gemm_peaks (torch.mm ran at half oneDNN's rate on the development
    VM, and CoAtNet-0 then read 120% MFU); each kernel's rate is measured for real here (positive), then replaced by
    known values to check which one profile_model divides by."""
    peaks = profile.gemm_peaks("cpu")
    assert peaks["torch.mm"] > 0 and set(peaks) == {"torch.mm", "oneDNN GEMM"}
    assert peaks["oneDNN GEMM"] > 0 or not torch.backends.mkldnn.is_available()
    for mm, dnn in ((2e9, 5e9), (7e9, 3e9)):
        monkeypatch.setattr(profile, "matmul_peak_flops", lambda *a, mm=mm, **k: mm)
        monkeypatch.setattr(profile, "onednn_gemm_peak_flops", lambda *a, dnn=dnn, **k: dnn)
        assert profile.gemm_peak_flops("cpu") == max(mm, dnn)
        r = profile_model(ConvLinear(), 16, batch_size=2, iters=1, warmup=0)
        assert r.peak_flops == max(mm, dnn) and r.infer_mfu == pytest.approx(2 * r.macs * r.infer_img_s / max(mm, dnn))


def test_cli_profile(capsys):
    from hybridvision.cli import main

    assert main(["profile", "--model", "resnet18", "--img-size", "32", "48", "--batch-size", "2", "--iters", "1",
                 "--compare", "timm:resnet10t"]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 | 32×48 |" in out and "| timm:resnet10t |" in out and "GEMM peak" in out
