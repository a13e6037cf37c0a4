"""Fashion-MNIST: IDX reader, finder, explicit downloader and an in-memory dataset.

The data is looked up, in order, in ``--data-dir`` (or ``--data-dir/fashion-mnist``), in the folder where the
Debian package ``dataset-fashion-mnist`` installs it (asked from ``dpkg -L``), and in
``/usr/share/datasets/fashion-mnist``. Nothing is downloaded implicitly: :func:`download_fashion_mnist`
(``hybridvision download fashion-mnist --data-dir D``) is the explicit way for machines with internet.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: per-channel statistics of the 60k training images, in [0, 1] units
MEAN: tuple[float, ...] = (0.2860,)
STD: tuple[float, ...] = (0.3530,)

FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: sha256 of the *decompressed* IDX content (so a re-compressed mirror still matches), measured on the
#: files of the Debian package dataset-fashion-mnist: `zcat FILE | sha256sum`
SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
DEFAULT_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into an array of its declared shape and type.

    Returns:
        e.g. images ``(N, 28, 28)`` uint8 or labels ``(N,)`` uint8.

    Raises:
        ValueError: the file is not IDX (bad magic, unknown type, size not matching the header), naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}. Delete it and get the data again "
                         f"(`hybridvision download fashion-mnist --data-dir DIR`).") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
                         f"00 00 <type> <ndim>). Delete it and get the data again.")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header}).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file holds "
                         f"{len(raw)} bytes; it is truncated or corrupt. Delete it and get the data again.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``). Used by tests/tools."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def _dpkg_dirs() -> list[Path]:
    """Folders holding Fashion-MNIST according to ``dpkg -L dataset-fashion-mnist`` (empty if not installed)."""
    try:
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return sorted({Path(line).parent for line in out.stdout.splitlines() if line.endswith(FILES["train"][0])})


def missing_data_message(data_dir: Optional[str | os.PathLike]) -> str:
    """The message for missing Fashion-MNIST data: names both ways to get it."""
    where = f"--data-dir {data_dir} (or {Path(data_dir) / 'fashion-mnist'}), " if data_dir else ""
    return (
        f"Fashion-MNIST not found: looked in {where}the '{DEBIAN_PACKAGE}' Debian package and {SYSTEM_DIR}; "
        f"expected the files {', '.join(n for p in FILES.values() for n in p)}. Get it either way:\n"
        f"  1. sudo apt-get install {DEBIAN_PACKAGE}   (installs into {SYSTEM_DIR})\n"
        f"  2. hybridvision download fashion-mnist --data-dir DIR   (then pass --data-dir DIR)"
    )


def find_fashion_mnist(data_dir: Optional[str | os.PathLike] = None) -> Path:
    """The folder holding the four Fashion-MNIST ``.gz`` files.

    Raises:
        FileNotFoundError: nowhere to be found; the message names the Debian package and the downloader.
    """
    candidates: list[Path] = []
    if data_dir is not None:
        candidates += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    candidates += _dpkg_dirs() + [SYSTEM_DIR]
    for folder in candidates:
        if _has_files(folder):
            return folder
    raise FileNotFoundError(missing_data_message(data_dir))


def load_fashion_mnist(split: str, data_dir: Optional[str | os.PathLike] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split into memory.

    Args:
        split: ``"train"`` (60k) or ``"test"`` (10k).
    Returns:
        images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = find_fashion_mnist(data_dir)
    img_file, lbl_file = (folder / n for n in FILES[split])
    images, labels = read_idx(img_file), read_idx(lbl_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{img_file} / {lbl_file}: expected images (N, H, W) and labels (N,) with the same N, "
                         f"got {images.shape} and {labels.shape}. Delete them and get the data again.")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{lbl_file}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST held in memory as uint8; batched fetching through ``__getitems__``.

    ``dataset[i]`` is ``(image (1, 28, 28) uint8, label)``; ``dataset.__getitems__(idx)`` is
    ``(images (B, 1, 28, 28) uint8, labels (B,) int64)`` so one DataLoader batch is one tensor index
    (use :func:`hybridvision.data.loaders.batch_collate`). Augmentation happens on whole batches
    (:class:`hybridvision.data.transforms.BatchTransform`).
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", data_dir: Optional[str | os.PathLike] = None):
        self.split = split
        self.images, self.labels = load_fashion_mnist(split, data_dir)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def _content_sha256(path: Path) -> str:
    """sha256 of the decompressed content of a ``.gz`` file."""
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(path: Path, name: str, verify: bool) -> bool:
    try:
        read_idx(path)
        return not verify or _content_sha256(path) == SHA256[name]
    except (ValueError, OSError, EOFError):
        return False


def download_fashion_mnist(
    data_dir: str | os.PathLike,
    base_url: str = DEFAULT_BASE_URL,
    verify: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download the four Fashion-MNIST files into ``data_dir`` (explicit; never called implicitly).

    Every file is fetched to a temporary name, checked (sha256 of the decompressed content against
    :data:`SHA256` unless ``verify=False``, then parsed as IDX) and renamed into place, so an interrupted download
    never leaves a half file under the final name. Files already present and valid are kept.

    Returns:
        ``data_dir`` as a Path.
    Raises:
        RuntimeError: a file could not be fetched or failed its check, naming the URL and the fix.
    """
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    for name in (n for pair in FILES.values() for n in pair):
        target = folder / name
        if target.is_file() and _is_valid(target, name, verify):
            continue
        url = base_url + name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".gz", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                shutil.copyfileobj(resp, out)
            read_idx(tmp)
            if verify and (got := _content_sha256(tmp)) != SHA256[name]:
                raise ValueError(f"content sha256 {got} does not match Fashion-MNIST's {SHA256[name]}; the "
                                 f"server holds a different or damaged file. Use another --base-url "
                                 f"(or --no-verify for files you trust)")
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RuntimeError(f"download of {url} failed ({e}). Check the network and --base-url, or install "
                               f"the Debian package: sudo apt-get install {DEBIAN_PACKAGE}") from e
        finally:
            tmp.unlink(missing_ok=True)
    return folder
