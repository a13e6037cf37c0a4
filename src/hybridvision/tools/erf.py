"""Effective receptive field (Luo et al. 2016) with the RepLKNet protocol.

For each image: the last-stage feature map ``f = model.forward_features(x)``, the ReLU'd centre pixel
``relu(f[:, :, h // 2, w // 2]).sum()`` is back-propagated to the input; the input gradient is ReLU'd and summed
over channels. The maps are averaged over images, then ``log10(x + 1)`` and normalised to a maximum of 1.
The area ratio at threshold ``t`` is the area of the smallest centred square holding a fraction ``t`` of the
map's total, over ``H·W`` (:func:`area_ratio`).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridvision.tools.profile import model_in_chans

__all__ = [
    "THRESHOLDS",
    "area_ratio",
    "compute_erf",
    "erf_area_ratios",
    "load_images",
    "plot_erf",
    "run_erf",
    "spatial_features",
]

THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def spatial_features(
    model: nn.Module,
    feats: torch.Tensor | Sequence[torch.Tensor],
    input_hw: Sequence[int],
    num_chs: int | None = None,
) -> torch.Tensor:
    """A feature map as ``(B, C, h, w)``.

    NCHW is returned as is; NHWC (timm ``output_fmt="NHWC"``, or last dim == ``num_chs`` != dim 1) is permuted;
    tokens ``(B, N, C)`` (ViT) lose the model's ``num_prefix_tokens`` and are reshaped to the patch grid of an
    input of size ``input_hw = (H, W)``. A list/tuple (e.g. intermediate features) uses its last entry.
    """
    if isinstance(feats, (tuple, list)):
        feats = feats[-1]
    if feats.ndim == 4:
        nhwc = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
        if num_chs is not None:
            nhwc = feats.shape[1] != num_chs and feats.shape[-1] == num_chs
        return feats.permute(0, 3, 1, 2) if nhwc else feats
    if feats.ndim == 3:
        n_prefix = int(getattr(model, "num_prefix_tokens", 0))
        tokens = feats[:, n_prefix:]
        grid = getattr(getattr(model, "patch_embed", None), "dynamic_feat_size", None)
        if grid is not None:
            h, w = grid(tuple(input_hw))
        else:
            h = w = int(round(tokens.shape[1] ** 0.5))
        if h * w != tokens.shape[1]:
            raise ValueError(
                f"{tokens.shape[1]} tokens do not form a {h}x{w} grid; "
                "pass a model whose features are (B, C, h, w)"
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    raise ValueError(f"features of shape {tuple(feats.shape)}: expected (B, C, h, w), (B, h, w, C) or tokens (B, N, C)")


def compute_erf(model: nn.Module, images: Iterable[torch.Tensor]) -> np.ndarray:
    """Mean ReLU'd input gradient of the ReLU'd centre feature pixel, summed over channels (not yet log-scaled).

    Args:
        model: a timm-style model with ``forward_features``; switched to eval mode for the call and restored.
        images: normalised images ``x: (C, H, W)`` or batches ``(B, C, H, W)``, all of the same ``H, W``.

    Returns:
        ``(H, W)`` float64 map, the average over all images.
    """
    if not hasattr(model, "forward_features"):
        raise ValueError(f"{type(model).__name__} has no forward_features(); ERF needs the last-stage feature map")
    was_training = model.training
    model.eval()
    total: torch.Tensor | None = None
    count = 0
    try:
        for img in images:
            x = img.unsqueeze(0) if img.ndim == 3 else img
            for i in range(x.shape[0]):
                xi = x[i : i + 1].detach().clone().requires_grad_(True)
                f = spatial_features(model, model.forward_features(xi), xi.shape[-2:])
                centre = F.relu(f[:, :, f.shape[2] // 2, f.shape[3] // 2]).sum()
                (grad,) = torch.autograd.grad(centre, xi)
                g = F.relu(grad).sum(dim=(0, 1)).double()
                if total is not None and g.shape != total.shape:
                    raise ValueError(f"images have different sizes: {tuple(g.shape)} vs {tuple(total.shape)}")
                total = g if total is None else total + g
                count += 1
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("compute_erf got no images")
    return (total / count).cpu().numpy()


def normalise_erf(erf: np.ndarray) -> np.ndarray:
    """``log10(x + 1)`` then divided by its maximum (an all-zero map stays zero)."""
    m = np.log10(np.asarray(erf, dtype=np.float64) + 1.0)
    peak = m.max()
    return m / peak if peak > 0 else m


def area_ratio(erf: np.ndarray, t: float) -> float:
    """Area of the smallest centred square holding at least a fraction ``t`` of ``erf.sum()``, over ``H·W``.

    Args:
        erf: ``(H, W)`` non-negative map (already log-scaled/normalised by the caller if wanted).
        t: fraction in (0, 1].

    The square has odd side ``2r + 1`` around ``(H // 2, W // 2)``, clipped to the map on non-square maps.
    """
    if not 0 < t <= 1:
        raise ValueError(f"threshold t={t}: expected a fraction in (0, 1]")
    erf = np.asarray(erf, dtype=np.float64)
    if erf.ndim != 2 or (erf < 0).any():
        raise ValueError(f"area_ratio expects a non-negative (H, W) map, got shape {erf.shape}")
    h, w = erf.shape
    total = erf.sum()
    if total <= 0:
        raise ValueError("area_ratio: the map is all zero; the ERF is empty (is the input gradient zero?)")
    cy, cx = h // 2, w // 2
    for r in range(max(h, w)):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        if erf[y0:y1, x0:x1].sum() >= t * total * (1 - 1e-12):
            return (y1 - y0) * (x1 - x0) / (h * w)
    return 1.0


def erf_area_ratios(erf: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """``{"0.2": ratio, ...}`` of the log-scaled, normalised ``erf: (H, W)`` (the raw map of :func:`compute_erf`)."""
    m = normalise_erf(erf)
    return {str(t): area_ratio(m, t) for t in thresholds}


def load_images(
    folder: str | Path,
    img_size: int | tuple[int, int],
    *,
    num_images: int,
    seed: int = 0,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    in_chans: int = 3,
) -> list[torch.Tensor]:
    """Up to ``num_images`` images from ``folder`` (sorted, then shuffled with ``seed``), RGB (grey when
    ``in_chans == 1``), resized to ``img_size`` (bicubic), normalised with ``mean``/``std``: a list of
    ``(in_chans, H, W)`` float32 tensors."""
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans={in_chans}: images are read as RGB (3) or grey (1)")
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: not a directory; pass a folder of .png/.jpg images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    random.Random(seed).shuffle(files)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    m = torch.tensor(mean, dtype=torch.float32)[:in_chans].view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32)[:in_chans].view(-1, 1, 1)
    mode = "RGB" if in_chans == 3 else "L"
    out = []
    for p in files[:num_images]:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert(mode).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {p}: {e}; remove or replace the file") from e
        out.append((torch.from_numpy(arr.reshape(h, w, in_chans)).permute(2, 0, 1) - m) / s)
    return out


def plot_erf(maps: dict[str, np.ndarray], path: str | Path, ratios: dict[str, dict[str, float]] | None = None) -> Path:
    """Heatmaps of the normalised ERFs ``{name: (H, W) raw map}`` side by side, saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4.2), squeeze=False)
    for ax, (name, erf) in zip(axes[0], maps.items()):
        im = ax.imshow(normalise_erf(erf), cmap="RdYlGn", vmin=0, vmax=1)
        title = name
        if ratios and name in ratios:
            title += f"\narea ratio t=0.2: {ratios[name]['0.2']:.4f}, t=0.99: {ratios[name]['0.99']:.4f}"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_erf(
    models: dict[str, nn.Module],
    images: str | Path,
    output: str | Path,
    *,
    img_size: int | tuple[int, int] = 224,
    num_images: int = 50,
    seed: int = 0,
) -> dict:
    """ERF of one or more models on the same images; writes ``output/erf.png`` and ``output/erf.json``.

    Args:
        models: ``{name: model}``; the first is the main model, others are drawn beside it (``--compare``).
        images: a folder of images (read with PIL).
        img_size: ``S`` or ``(H, W)`` of the input.

    Returns:
        The JSON dict: ``{"area_ratio": {"0.2": …}, "model": name, "num_images": n, "img_size": [H, W]}``, plus
        ``"compare": {name: {"area_ratio": …}}`` for the other models.
    """
    if not models:
        raise ValueError("run_erf needs at least one model")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(models.values()))
    cfg = getattr(first, "pretrained_cfg", None) or {}
    imgs = load_images(
        images,
        img_size,
        num_images=num_images,
        seed=seed,
        mean=cfg.get("mean", (0.485, 0.456, 0.406)),
        std=cfg.get("std", (0.229, 0.224, 0.225)),
        in_chans=model_in_chans(first),
    )
    maps = {name: compute_erf(m, imgs) for name, m in models.items()}
    ratios = {name: erf_area_ratios(e) for name, e in maps.items()}
    names = list(models)
    h, w = imgs[0].shape[-2:]
    result: dict = {"area_ratio": ratios[names[0]], "model": names[0], "num_images": len(imgs), "img_size": [h, w]}
    if len(names) > 1:
        result["compare"] = {n: {"area_ratio": ratios[n]} for n in names[1:]}
    plot_erf(maps, out / "erf.png", ratios)
    (out / "erf.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
