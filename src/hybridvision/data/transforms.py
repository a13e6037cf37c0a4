"""Transforms: batched tensor-level augmentation for small in-memory images, timm's pipelines for files.

At 28 px the per-sample PIL pipeline costs more than the model on 2 cores, so in-memory datasets
(Fashion-MNIST, cluttered Fashion-MNIST) hand out uint8 batches and :class:`BatchTransform` augments the
whole batch at once: per-sample random translation (pad + crop) and horizontal flip, resize, normalise,
channel repeat for grayscale data fed to 3-channel models, and timm's RandomErasing. Image folders use
timm's ``create_transform`` (random-resized-crop, flip, RandAugment, ...) per sample, see
:func:`file_transform`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing


def random_translate(x: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-sample random crop of the zero-padded batch (a random shift of up to ``pad`` px per axis).

    Args:
        x: ``(B, C, H, W)`` any dtype.
        pad: maximum shift in pixels.
    Returns:
        ``(B, C, H, W)``, same dtype.
    """
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b, 1, 1), generator=generator, device=x.device)
    rows = oy + torch.arange(h, device=x.device).view(1, h, 1)
    cols = ox + torch.arange(w, device=x.device).view(1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_hflip(x: torch.Tensor, prob: float = 0.5, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip each sample left-right with probability ``prob``. ``x: (B, C, H, W)`` -> same."""
    if prob <= 0:
        return x
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < prob
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class BatchTransform:
    """Turn a uint8 batch into the model's float input, with training augmentation when ``train``.

    Args:
        img_size: output side (the batch is resized bilinearly when it differs).
        mean, std: per-channel statistics of the data in [0, 1] units (length = data channels).
        in_chans: channels the model expects; 1-channel data is repeated to 3 when ``in_chans == 3``.
        train: apply translation (``translate`` fraction of the side), flip and random erasing.
    Call:
        ``x: (B, C, H, W)`` uint8 (or float already in [0, 1]) -> ``(B, in_chans, img_size, img_size)`` float32.
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int,
        train: bool = False,
        translate: float = 0.125,
        hflip: float = 0.5,
        re_prob: float = 0.0,
    ):
        if in_chans != len(mean) and not (len(mean) == 1 and in_chans == 3):
            raise ValueError(f"the data has {len(mean)} channel(s) but the model expects in_chans={in_chans}; "
                             f"use --in-chans {len(mean)} (or 3 for grayscale data, repeated)")
        self.img_size, self.in_chans, self.train = img_size, in_chans, train
        self.translate, self.hflip = translate, hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.erase = RandomErasing(re_prob, mode="pixel", device="cpu") if train and re_prob > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
        if self.train:
            x = random_translate(x, round(self.translate * x.shape[-1]))
            x = random_hflip(x, self.hflip)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.img_size)
        if self.mean.device != x.device:  # moved once, not per batch
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        x = (x - self.mean) / self.std
        if self.in_chans == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        if self.erase is not None:
            self.erase.device = x.device
            x = self.erase(x)
        return x


def file_transform(
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    auto_augment: Optional[str] = None,
    re_prob: float = 0.0,
    crop_pct: float = 1.0,
):
    """timm's per-sample PIL pipeline: PIL image -> float ``(in_chans, img_size, img_size)``, normalised.

    Training: random-resized-crop, flip, colour jitter (RGB only), optional RandAugment (``auto_augment``, e.g.
    ``"rand-m9-mstd0.5"``) and random erasing. Eval: resize + centre crop (``crop_pct``).
    """
    if train:
        return create_transform(
            (in_chans, img_size, img_size), is_training=True, auto_augment=auto_augment,
            color_jitter=0.4 if in_chans == 3 else 0.0, re_prob=re_prob, re_mode="pixel",
            interpolation="bicubic", mean=tuple(mean), std=tuple(std),
        )
    return create_transform(
        (in_chans, img_size, img_size), is_training=False, crop_pct=crop_pct, interpolation="bicubic",
        mean=tuple(mean), std=tuple(std),
    )
