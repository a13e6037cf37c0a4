"""Grad-CAM through pytorch-grad-cam, with an automatic target layer for every family.

The automatic target layer is the model's last stage: ``model.feature_info[-1]["module"]`` for timm-style models
(``layer4`` of a ResNet, ``stages.3`` of a ConvNeXt / ParC-ConvNeXt / CoAtNet, ``blocks.N`` of a ViT; for a
class-token ViT ``blocks.N.norm1``, as the last block's patch tokens never reach the logits), else the last child
holding parameters before the head. Token outputs of attention stages ``(B, N, C)`` and channels-last maps
are turned into ``(B, C, h, w)`` by a ``reshape_transform`` (:func:`hybridvision.tools.erf.spatial_features`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from hybridvision.tools.erf import spatial_features
from hybridvision.tools.profile import model_in_chans

__all__ = ["find_target_layer", "grad_cam", "overlay", "run_cam"]

_HEAD_NAMES = {"head", "fc", "classifier", "global_pool", "head_drop", "fc_norm", "pre_logits", "norm", "final_conv"}


def _require_grad_cam():
    try:
        import pytorch_grad_cam
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise RuntimeError(
            "Grad-CAM needs the 'grad-cam' package: pip install 'hybridvision[analysis]' -c constraints.txt"
        ) from e
    return pytorch_grad_cam


def find_target_layer(model: nn.Module, target_layer: str = "auto") -> tuple[str, nn.Module, int | None]:
    """The layer whose activations Grad-CAM weighs: ``(name, module, channels or None)``.

    ``target_layer="auto"`` takes the last stage (see the module docstring); any other value is a dotted module
    name as in ``model.named_modules()`` (e.g. ``"stages.2"``).
    """
    modules = dict(model.named_modules())
    if target_layer != "auto":
        if target_layer not in modules:
            close = [n for n in modules if n and n.split(".")[0] == target_layer.split(".")[0]][:8]
            raise ValueError(
                f"--target-layer {target_layer!r} is not a module of {type(model).__name__}; "
                f"use 'auto' or a name from model.named_modules(), e.g. {close or list(modules)[1:9]}"
            )
        return target_layer, modules[target_layer], None
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, (list, tuple)) else info.get_dicts()[-1]
        name = last.get("module")
        if name in modules:
            if getattr(model, "global_pool", None) == "token" and f"{name}.norm1" in modules:
                # class-token head: the last block's patch-token outputs never reach the logits; take its input norm
                name = f"{name}.norm1"
            return name, modules[name], last.get("num_chs")
    children = [(n, c) for n, c in model.named_children() if n not in _HEAD_NAMES and any(True for _ in c.parameters())]
    if not children:
        raise ValueError(f"cannot find a target layer in {type(model).__name__}; pass --target-layer NAME")
    name, mod = children[-1]
    if isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(mod) > 0:
        name, mod = f"{name}.{len(mod) - 1}", mod[-1]
    return name, mod, None


def _reshape_transform(model: nn.Module, input_hw: Sequence[int], num_chs: int | None) -> Callable:
    def transform(t: torch.Tensor) -> torch.Tensor:
        return spatial_features(model, t, input_hw, num_chs)

    return transform


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    *,
    target_layer: str = "auto",
    target_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Grad-CAM maps of ``x: (B, C, H, W)``.

    Args:
        target_class: explain this class; ``None`` explains each image's top-1 prediction.

    Returns:
        ``(cams, classes, layer_name)``: ``cams: (B, H, W)`` float32 in [0, 1], ``classes: (B,)`` the explained class.
    """
    _require_grad_cam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if x.ndim != 4:
        raise ValueError(f"grad_cam expects x: (B, C, H, W), got shape {tuple(x.shape)}")
    name, layer, num_chs = find_target_layer(model, target_layer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
        classes = (
            np.full(x.shape[0], int(target_class))
            if target_class is not None
            else logits.argmax(-1).cpu().numpy()
        )
        if target_class is not None and not 0 <= target_class < logits.shape[-1]:
            raise ValueError(f"target class {target_class}: the model has {logits.shape[-1]} classes (0..{logits.shape[-1] - 1})")
        with GradCAM(model=model, target_layers=[layer], reshape_transform=_reshape_transform(model, x.shape[-2:], num_chs)) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32), classes, name


def overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``rgb: (H, W, 3)`` float in [0, 1] blended with the jet-coloured ``cam: (H, W)`` -> ``(H, W, 3)`` uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(rgb.astype(np.float32), cam, use_rgb=True, image_weight=1 - alpha)


def run_cam(
    model: nn.Module,
    image: str | Path,
    output: str | Path,
    *,
    img_size: int | tuple[int, int] | None = None,
    target_layer: str = "auto",
    target_class: int | None = None,
) -> dict:
    """Grad-CAM of one image file; writes the overlay PNG to ``output``.

    Args:
        img_size: ``S`` or ``(H, W)``; defaults to the model's ``pretrained_cfg["input_size"]``.

    Returns:
        ``{"output", "class", "target_layer", "img_size"}``.
    """
    from PIL import Image, UnidentifiedImageError

    cfg = getattr(model, "pretrained_cfg", None) or {}
    if img_size is None:
        img_size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    try:
        with Image.open(image) as im:
            rgb = np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {image}: cannot read it ({e}); pass a .png/.jpg file") from e
    mean = np.asarray(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=np.float32)
    std = np.asarray(cfg.get("std", (0.229, 0.224, 0.225)), dtype=np.float32)
    gray = rgb.mean(-1, keepdims=True)
    in_chans = model_in_chans(model)
    arr = np.repeat(gray, in_chans, -1) if in_chans != 3 else rgb
    x = torch.from_numpy((arr - mean[:in_chans]) / std[:in_chans]).permute(2, 0, 1)[None]
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(p.device)
    cams, classes, name = grad_cam(model, x, target_layer=target_layer, target_class=target_class)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(rgb, cams[0])).save(out)
    return {"output": str(out), "class": int(classes[0]), "target_layer": name, "img_size": [h, w]}
