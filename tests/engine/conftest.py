import numpy as np
import pytest

from hybridvision.data.fashion_mnist import FILES, write_idx


@pytest.fixture
def fmnist_dir(tmp_path):
    """A tiny Fashion-MNIST (32 train / 16 test random images) written as IDX .gz files."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, n in (("train", 32), ("test", 16)):
        write_idx(folder / FILES[split][0], rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / FILES[split][1], rng.integers(0, 10, n))
    return folder
