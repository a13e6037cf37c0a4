import numpy as np
import pytest
import torch

from hybridvision.data.cluttered import ClutteredFashionMNIST, make_canvas
from hybridvision.data.fashion_mnist import FILES, write_idx


@pytest.fixture
def fake_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 12)):
        write_idx(tmp_path / FILES[split][0], rng.integers(1, 256, (n, 28, 28)))
        write_idx(tmp_path / FILES[split][1], rng.integers(0, 10, n))
    return tmp_path


def test_deterministic_per_seed_and_index(fake_dir):
    a = ClutteredFashionMNIST("train", fake_dir, seed=3)
    b = ClutteredFashionMNIST("train", fake_dir, seed=3)
    c = ClutteredFashionMNIST("train", fake_dir, seed=4)
    x, y = a[7]
    assert x.shape == (1, 112, 112) and x.dtype == torch.uint8 and y == int(a.labels[7])
    assert torch.equal(x, b[7][0]) and torch.equal(x, a[7][0])
    assert not torch.equal(x, c[7][0]) and not torch.equal(x, a[8][0])
    xs, ys = a.__getitems__([7, 2])
    assert torch.equal(xs[0], x) and ys.tolist() == [y, int(a.labels[2])]


def test_item_is_pasted_whole():
    rng_img = np.random.default_rng(1)
    pool = rng_img.integers(1, 256, (5, 28, 28)).astype(np.uint8)
    for size in (112, 61):
        canvas = make_canvas(pool, 2, np.random.default_rng(5), size=size, num_clutter=4, patch=9)
        assert canvas.shape == (size, size)
        # the item appears at some position with every pixel >= the item's (max-blend keeps it whole)
        win = np.lib.stride_tricks.sliding_window_view(canvas, (28, 28))
        assert (win >= pool[2]).all(axis=(-1, -2)).any()
        assert (canvas > 0).sum() > 28 * 28  # clutter present besides the item


def test_canvas_too_small():
    with pytest.raises(ValueError, match="canvas size 20"):
        make_canvas(np.zeros((2, 28, 28), np.uint8), 0, np.random.default_rng(0), size=20)
