import numpy as np
import pytest

from hybridvision.data.fashion_mnist import FILES, write_idx


@pytest.fixture
def make_fmnist(tmp_path):
    """``make_fmnist(n_train, n_test)``: a tiny random Fashion-MNIST written as IDX .gz files; returns its folder."""

    def make(n_train: int, n_test: int):
        rng = np.random.default_rng(0)
        folder = tmp_path / "fmnist"
        folder.mkdir()
        for split, n in (("train", n_train), ("test", n_test)):
            write_idx(folder / FILES[split][0], rng.integers(0, 256, (n, 28, 28)))
            write_idx(folder / FILES[split][1], rng.integers(0, 10, n))
        return folder

    return make
