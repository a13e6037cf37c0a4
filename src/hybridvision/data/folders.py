"""Image folders for users' own data: ``ROOT/train/<class>/*.png`` and ``ROOT/val/<class>/*.png``.

Images are decoded with PIL (torchvision's compiled image io is not used). A corrupt or unreadable image
stops the run with an error naming the file, unless ``skip_bad_images=True``: then every image is checked
once up front and the bad ones are skipped and counted (``dataset.bad_files``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by extension) under ``folder``, recursively, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike, mode: str) -> Image.Image:
    """Decode an image fully and convert it to ``mode`` (``"RGB"`` or ``"L"``).

    Raises:
        RuntimeError: the file is missing, corrupt or truncated; names it and the fixes.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise RuntimeError(f"cannot read image {path}: {e}. Fix or delete the file, or pass --skip-bad-images "
                           f"to skip and count unreadable images.") from e


class ImageFolderDataset(Dataset):
    """One split of an image-folder dataset.

    Args:
        root: the dataset folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        transform: PIL image -> tensor (e.g. :func:`hybridvision.data.transforms.file_transform`).
        in_chans: 3 (RGB) or 1 (grayscale).
        class_names: fix the class order (eval/val use the training classes); default: sorted sub-folders.
        skip_bad_images: check every image now and drop the unreadable ones instead of failing later.
    ``dataset[i]`` = ``(transform(image), label)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Optional[Callable] = None,
        in_chans: int = 3,
        class_names: Optional[Sequence[str]] = None,
        skip_bad_images: bool = False,
    ):
        folder = Path(root) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist: expected {Path(root)}/train/<class>/* "
                                    f"and {Path(root)}/val/<class>/* (one sub-folder per class)")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.class_names = tuple(class_names) if class_names is not None else tuple(found)
        if not self.class_names:
            raise ValueError(f"{folder} has no class sub-folders; put each class's images in {folder}/<class>/")
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise ValueError(f"{folder} has class folders {unknown} that the training split does not have "
                             f"(classes: {list(self.class_names)}); rename or remove them")
        self.samples = [(p, label) for label, c in enumerate(self.class_names) for p in list_images(folder / c)]
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
        self.mode = {1: "L", 3: "RGB"}.get(in_chans)
        if self.mode is None:
            raise ValueError(f"in_chans must be 1 or 3 for image folders, got {in_chans}")
        self.transform = transform
        self.bad_files: list[Path] = []
        if skip_bad_images:
            good = []
            for path, label in self.samples:
                try:
                    load_image(path, self.mode)
                    good.append((path, label))
                except RuntimeError:
                    self.bad_files.append(path)
            self.samples = good
            if self.bad_files:
                shown = ", ".join(str(p) for p in self.bad_files[:5])
                warnings.warn(f"skipped {len(self.bad_files)} unreadable image(s) in {folder}: {shown}"
                              f"{' ...' if len(self.bad_files) > 5 else ''}", stacklevel=2)
            if not self.samples:
                raise ValueError(f"every image under {folder} is unreadable")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = load_image(path, self.mode)
        return (self.transform(img) if self.transform is not None else img), label
