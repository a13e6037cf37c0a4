"""Datasets by name and their DataLoaders (single process or one shard per distributed rank)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from hybridvision.data import cluttered, fashion_mnist
from hybridvision.data.folders import ImageFolderDataset
from hybridvision.data.transforms import BatchTransform, file_transform

DATASETS = ("fashion-mnist", "fashion-mnist-cluttered", "folder")
#: the side the images have on disk / in memory; --img-size resizes to another
NATIVE_SIZE = {"fashion-mnist": 28, "fashion-mnist-cluttered": 112, "folder": 224}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def batch_collate(batch):
    """Collate for datasets fetched with ``__getitems__``: the batch is already ``(images, labels)``."""
    return batch


@dataclass
class DataBundle:
    """What the trainer needs to know about the data.

    ``train_transform`` / ``eval_transform`` map a loader's image batch to the model input
    ``(B, in_chans, img_size, img_size)`` float.
    """

    dataset: str
    train_loader: Optional[DataLoader]
    test_loader: DataLoader
    train_sampler: Optional[DistributedSampler]
    num_classes: int
    class_names: tuple[str, ...]
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_transform: Callable[[torch.Tensor], torch.Tensor]
    eval_transform: Callable[[torch.Tensor], torch.Tensor]


def _subset(ds: Dataset, n: Optional[int], seed: int) -> Dataset:
    if not n or n >= len(ds):
        return ds
    if n < 0:
        raise ValueError(f"subset size must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].sort().values.tolist())


def build_data(
    dataset: str,
    data_dir: Optional[str | os.PathLike] = None,
    *,
    img_size: Optional[int] = None,
    in_chans: Optional[int] = None,
    batch_size: int = 128,
    eval_batch_size: Optional[int] = None,
    workers: int = 0,
    seed: int = 0,
    train: bool = True,
    train_subset: Optional[int] = None,
    test_subset: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    translate: float = 0.125,
    hflip: float = 0.5,
    re_prob: float = 0.0,
    auto_augment: Optional[str] = None,
    skip_bad_images: bool = False,
    class_names: Optional[Sequence[str]] = None,
    pin_memory: bool = False,
) -> DataBundle:
    """Build the datasets and loaders for ``dataset`` (one of :data:`DATASETS`).

    ``in_chans`` defaults to the data's channels (1 for Fashion-MNIST, 3 for folders). Training batches are
    shuffled by a :class:`DistributedSampler` (also for one process: the order is a function of seed and epoch,
    which makes resume exact) and drop the last incomplete batch; the test set is split over ranks without
    padding, so reduced metrics count every test image once.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    img_size = img_size or NATIVE_SIZE[dataset]
    eval_batch_size = eval_batch_size or 2 * batch_size
    if dataset == "folder":
        if data_dir is None:
            raise ValueError("--dataset folder needs --data-dir ROOT with ROOT/train/<class>/ and ROOT/val/<class>/")
        in_chans = in_chans or 3
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
        kw = dict(in_chans=in_chans, skip_bad_images=skip_bad_images)
        train_set = ImageFolderDataset(
            data_dir, "train", file_transform(img_size, in_chans, mean, std, True, auto_augment, re_prob),
            class_names=class_names, **kw) if train else None
        names = train_set.class_names if train_set is not None else class_names
        test_set = ImageFolderDataset(data_dir, "val", file_transform(img_size, in_chans, mean, std, False),
                                      class_names=names, **kw)
        names = test_set.class_names
        train_tf = eval_tf = nn.Identity()  # file datasets' per-sample transform made float tensors
        collate = None
    else:
        module = fashion_mnist if dataset == "fashion-mnist" else cluttered
        if dataset == "fashion-mnist":
            make = lambda split: fashion_mnist.FashionMNIST(split, data_dir)  # noqa: E731
        else:
            make = lambda split: cluttered.ClutteredFashionMNIST(split, data_dir, seed=seed)  # noqa: E731
        train_set = make("train") if train else None
        test_set = make("test")
        names, mean, std = fashion_mnist.CLASS_NAMES, module.MEAN, module.STD
        in_chans = in_chans or 1
        train_tf = BatchTransform(img_size, mean, std, in_chans, True, translate, hflip, re_prob)
        eval_tf = BatchTransform(img_size, mean, std, in_chans, False)
        collate = batch_collate
    if class_names is not None and tuple(class_names) != tuple(names):
        raise ValueError(f"the checkpoint's classes {list(class_names)} differ from the data's {list(names)}")
    loader_kw = dict(num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                     persistent_workers=workers > 0)
    train_loader = sampler = None
    if train_set is not None:
        train_set = _subset(train_set, train_subset, seed)
        if len(train_set) < batch_size * world_size:
            raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch "
                             f"(--batch-size {batch_size} x {world_size} process(es)); lower --batch-size")
        sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_kw)
    test_set = _subset(test_set, test_subset, seed)
    test_loader = DataLoader(test_set, batch_size=eval_batch_size, sampler=list(range(rank, len(test_set), world_size)),
                             **loader_kw)
    return DataBundle(dataset, train_loader, test_loader, sampler, len(names), tuple(names), in_chans, img_size,
                      tuple(mean), tuple(std), train_tf, eval_tf)
