import functools
import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridvision.data import fashion_mnist as fm


def write_fake(folder: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        img, lbl = fm.FILES[split]
        fm.write_idx(folder / img, rng.integers(0, 256, (n, 28, 28)))
        fm.write_idx(folder / lbl, rng.integers(0, 10, n))
    return folder


@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 4, 5)])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, shape, gz):
    a = np.random.default_rng(1).integers(1, 256, shape).astype(np.uint8)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    fm.write_idx(p, a)
    b = fm.read_idx(p)
    assert b.shape == shape and b.dtype == np.uint8 and np.array_equal(a, b)


def test_idx_bad_magic_and_truncation_name_the_file(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="bad.gz.*not an IDX"):
        fm.read_idx(bad)
    good = tmp_path / "t.gz"
    fm.write_idx(good, np.ones((4, 28, 28)))
    raw = gzip.decompress(good.read_bytes())
    trunc = tmp_path / "trunc.gz"
    trunc.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(ValueError, match="trunc.gz.*truncated"):
        fm.read_idx(trunc)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good.read_bytes()[:20])  # broken gzip stream
    with pytest.raises(ValueError, match="cut.gz"):
        fm.read_idx(cut)


def test_dataset_from_data_dir(tmp_path):
    write_fake(tmp_path / "fashion-mnist")
    ds = fm.FashionMNIST("train", tmp_path)  # finds DIR/fashion-mnist too
    assert len(ds) == 20 and ds.images.shape == (20, 1, 28, 28) and ds.images.dtype == torch.uint8
    x, y = ds.__getitems__([3, 1, 3])
    assert x.shape == (3, 1, 28, 28) and torch.equal(x[0], ds[3][0]) and y[1].item() == ds[1][1]
    assert len(fm.FashionMNIST("test", tmp_path / "fashion-mnist")) == 10


def test_missing_data_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(fm, "_dpkg_dirs", lambda: [])
    with pytest.raises(FileNotFoundError) as e:
        fm.find_fashion_mnist(tmp_path / "empty")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "hybridvision download fashion-mnist" in msg
    assert str(tmp_path / "empty") in msg


def test_bad_split_and_label_range(tmp_path):
    d = write_fake(tmp_path)
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("val", d)
    fm.write_idx(d / fm.FILES["test"][1], np.full(10, 12))
    with pytest.raises(ValueError, match="label 12"):
        fm.load_fashion_mnist("test", d)


def test_system_install_is_found():
    if not fm._has_files(fm.SYSTEM_DIR):
        pytest.skip("dataset-fashion-mnist not installed")
    assert fm._has_files(fm.find_fashion_mnist())


class _Server:
    def __init__(self, folder: Path):
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a, **k: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_from_local_server(tmp_path):
    src = write_fake(tmp_path / "served")
    with _Server(src) as srv:
        out = fm.download_fashion_mnist(tmp_path / "dl", srv.url, verify=False)
    for pair in fm.FILES.values():
        for name in pair:
            assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert len(fm.FashionMNIST("train", out)) == 20


def test_download_rejects_wrong_content_and_missing_files(tmp_path):
    src = write_fake(tmp_path / "served")
    with _Server(src) as srv:
        with pytest.raises(RuntimeError, match="sha256.*does not match"):
            fm.download_fashion_mnist(tmp_path / "dl", srv.url, verify=True)
        with pytest.raises(RuntimeError, match=r"download of .*/nope/train-images-idx3-ubyte.gz failed"):
            fm.download_fashion_mnist(tmp_path / "dl2", srv.url + "nope/", verify=False)
    assert not (tmp_path / "dl" / "train-images-idx3-ubyte.gz").exists()


def test_download_verified_against_real_files(tmp_path):
    if not fm._has_files(fm.SYSTEM_DIR):
        pytest.skip("dataset-fashion-mnist not installed")
    with _Server(fm.SYSTEM_DIR) as srv:
        out = fm.download_fashion_mnist(tmp_path / "dl", srv.url, verify=True)
    assert len(fm.load_fashion_mnist("test", out)[1]) == 10000
