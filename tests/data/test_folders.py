import numpy as np
import pytest
import torch
from PIL import Image

from hybridvision.data.folders import ImageFolderDataset, load_image
from hybridvision.data.loaders import build_data


def make_folder(root, sizes=((20, 17), (9, 12)), corrupt=True):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog", "emu"):
            d = root / split / c
            d.mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        good = (root / "train" / "cat" / "0.png").read_bytes()
        (root / "train" / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_corrupt_image_is_named(tmp_path):
    root = make_folder(tmp_path)
    ds = ImageFolderDataset(root, "train", in_chans=3)
    assert ds.class_names == ("cat", "dog", "emu") and len(ds) == 8
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png"][0]
    with pytest.raises(RuntimeError, match=r"broken.png.*--skip-bad-images"):
        ds[bad]
    with pytest.raises(RuntimeError, match="truncated.png"):
        load_image(root / "train" / "cat" / "truncated.png", "RGB")


def test_skip_bad_images_counts(tmp_path):
    root = make_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = ImageFolderDataset(root, "train", in_chans=1, skip_bad_images=True)
    assert len(ds) == 6 and sorted(p.name for p in ds.bad_files) == ["broken.png", "truncated.png"]
    img, label = ds[0]
    assert img.mode == "L" and label == 0


def test_loader_batches_and_class_checks(tmp_path):
    root = make_folder(tmp_path, corrupt=False)
    data = build_data("folder", root, img_size=16, batch_size=2, seed=0)
    x, y = next(iter(data.train_loader))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.shape == (2,)
    xt, _ = next(iter(data.test_loader))
    assert xt.shape[1:] == (3, 16, 16) and data.num_classes == 3
    (root / "val" / "yak").mkdir()
    with pytest.raises(ValueError, match="yak"):
        ImageFolderDataset(root, "val", class_names=("cat", "dog", "emu"))


def test_missing_folder_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        ImageFolderDataset(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="--data-dir"):
        build_data("folder", None)
