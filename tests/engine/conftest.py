import pytest


@pytest.fixture
def fmnist_dir(make_fmnist):
    """A tiny Fashion-MNIST (32 train / 16 test random images) written as IDX .gz files."""
    return make_fmnist(32, 16)
