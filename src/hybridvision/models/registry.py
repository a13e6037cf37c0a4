"""Registration of hybridvision models into timm's registry.

Every model module declares ``default_cfgs = generate_default_cfgs({name: pretrained_cfg(...)})``
and decorates its entry points with :func:`register`; importing :mod:`hybridvision` imports the
model modules, so ``timm.create_model("coatnet_0")`` works. No pretrained weights exist offline:
``pretrained=True`` raises a clear error; ``checkpoint_path=`` (safetensors or a weights_only
``.pt``) is loaded by timm.
"""
from __future__ import annotations

from typing import Any, Callable

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model

_HV_MODELS: list[str] = []

SMALL_IMAGE_MAX = 64
"""A model whose default input side is at most this many px is a small-image model (e.g. ``coatnet_nano``, 32 px):
no crop at evaluation, and the trainer's default image size when ``--img-size`` is not given."""


def pretrained_cfg(
    input_size: tuple[int, int, int] = (3, 224, 224),
    *,
    first_conv: str,
    classifier: str = "head.fc",
    crop_pct: float = 0.95,
    **kwargs: Any,
) -> dict:
    """A timm pretrained_cfg dict (no weights: ``url``/``hf_hub_id`` empty)."""
    h, w = input_size[1:]
    cfg = dict(
        url="",
        num_classes=1000,
        input_size=input_size,
        pool_size=(max(h // 32, 1), max(w // 32, 1)),
        crop_pct=crop_pct,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv=first_conv,
        classifier=classifier,
        license="apache-2.0",
    )
    cfg.update(kwargs)
    return cfg


def register(fn: Callable) -> Callable:
    """``timm.models.register_model`` + bookkeeping for :func:`list_models`."""
    if fn.__name__ not in _HV_MODELS:
        _HV_MODELS.append(fn.__name__)
    return register_model(fn)


def build(model_cls: type, variant: str, pretrained: bool = False, **kwargs: Any):
    """Build ``model_cls`` through timm's ``build_model_with_cfg`` (features_only, pretrained_cfg).

    Raises:
        RuntimeError: ``pretrained=True``; no pretrained weights are published or reachable offline.
    """
    if pretrained:
        raise RuntimeError(
            f"pretrained=True for '{variant}': hybridvision ships no pretrained weights and never downloads. "
            f"Train one with `hybridvision train --model {variant}` and load it with "
            f"timm.create_model('{variant}', checkpoint_path='model.safetensors')."
        )
    kwargs.setdefault("feature_cfg", dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)))
    return build_model_with_cfg(model_cls, variant, pretrained=False, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """hybridvision's registered model names matching ``pattern`` (fnmatch), sorted."""
    import fnmatch

    import hybridvision.models  # noqa: F401  (registers everything)

    return sorted(n for n in _HV_MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs: Any):
    """``timm.create_model`` for hybridvision (and any timm) model names."""
    import hybridvision.models  # noqa: F401

    return timm.create_model(name, **kwargs)
