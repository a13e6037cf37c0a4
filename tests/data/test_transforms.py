import pytest
import torch
import torch.nn.functional as F

from hybridvision.data.transforms import BatchTransform, random_hflip, random_translate


@pytest.mark.parametrize("h,w,pad", [(7, 7, 2), (8, 5, 3), (28, 28, 4)])
def test_random_translate_matches_per_sample_reference(h, w, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, h, w, dtype=torch.float64, generator=g)
    out = random_translate(x, pad, generator=torch.Generator().manual_seed(1))
    g2 = torch.Generator().manual_seed(1)
    oy = torch.randint(0, 2 * pad + 1, (6, 1, 1), generator=g2).flatten()
    ox = torch.randint(0, 2 * pad + 1, (6, 1, 1), generator=g2).flatten()
    xp = F.pad(x, (pad,) * 4)
    ref = torch.stack([xp[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(6)])
    assert out.shape == x.shape and torch.equal(out, ref)
    assert not torch.equal(out, x)


def test_random_hflip_is_per_sample():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4).repeat(8, 1, 1, 1)
    out = random_hflip(x, 0.5, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_batch_transform_eval_is_exact_normalisation():
    x = torch.randint(0, 256, (3, 1, 9, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = BatchTransform(9, (0.3,), (0.2,), in_chans=1)(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), (x.double() / 255 - 0.3) / 0.2, atol=1e-5)
    tf3 = BatchTransform(18, (0.3,), (0.2,), in_chans=3, train=True, re_prob=0.5)
    out3 = tf3(x)
    assert out3.shape == (3, 3, 18, 18) and out3.dtype == torch.float32


def test_batch_transform_bad_channels():
    with pytest.raises(ValueError, match="in_chans=2"):
        BatchTransform(28, (0.5,), (0.5,), in_chans=2)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        BatchTransform(28, (0.5,), (0.5,), in_chans=1)(torch.zeros(28, 28, dtype=torch.uint8))
