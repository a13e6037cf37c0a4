"""``parcify``: turn a plain ConvNet or a ViT into a ParC network, keeping every other weight.

ConvNet direction (timm ``resnet*``, ``mobilenetv2*``, ``efficientnet*``, ``convnext*``, torchvision models, ...):
the chosen stride-1 spatial convolutions (``KxK``, as many input as output channels, depthwise or dense) are
replaced by a :class:`~hybridvision.blocks.parc.ParCPair` (half the channels ParC-H, half ParC-W, same group
size, bias iff the conv had one). Each pair's global kernel length is the conv's feature size at the model's
input size, measured by one dry forward pass at that size (so the block's stride and the network's layout are
taken into account whatever the architecture).

ViT direction (timm ``VisionTransformer``: ``vit_tiny_patch16_224``, DeiT, ...): every block's self-attention is
replaced by a :class:`~hybridvision.blocks.parc.ParCTokenMixer` on the 2-D token grid (the attention's output
projection is kept); the class / register tokens are removed and the head pools globally: a pure ConvNet.

In both directions all other parameters stay the same tensors (bit-equal), so a pretrained model can be converted
and fine-tuned; the ParC position embeddings are added to ``model.no_weight_decay()``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from hybridvision.blocks.parc import ParCPair, ParCTokenMixer, conv_parc_eligibility, parc_no_weight_decay

__all__ = ["ParCReplacement", "parcify", "replace_convs"]

Where = Union[str, Sequence[str]]


@dataclass(frozen=True)
class ParCReplacement:
    """One module that :func:`parcify` replaced.

    Attributes:
        name: its path in the model (``model.get_submodule(name)`` is now the ParC module).
        old: what was there, e.g. ``"Conv2d 3x3 depthwise"`` or ``"Attention"``.
        new: ``"ParCPair"`` or ``"ParCTokenMixer"``.
        channels: channels of the module.
        base_size: ``(K_h, K_w)``, the global kernel lengths (the feature size at the model's input size).
    """

    name: str
    old: str
    new: str
    channels: int
    base_size: tuple[int, int]


def _img_size(model: nn.Module, img_size: Optional[Union[int, Sequence[int]]]) -> tuple[int, int]:
    """The model's input size ``(H, W)``: ``img_size`` if given, else timm's ``pretrained_cfg['input_size']``."""
    if img_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise ValueError(
                f"parcify needs the model's input size to size the global kernels, and {type(model).__name__} has no "
                f"timm pretrained_cfg['input_size']: pass img_size=224 (or (H, W)) explicitly."
            )
        img_size = tuple(cfg["input_size"][-2:])
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    img_size = tuple(img_size)
    if len(img_size) != 2 or not all(isinstance(s, int) and s >= 1 for s in img_size):
        raise ValueError(f"img_size must be a positive int or an (H, W) pair; got {img_size!r}")
    return img_size  # type: ignore[return-value]


def _conv_kind(conv: nn.Conv2d) -> str:
    k = "x".join(str(s) for s in conv.kernel_size)
    if conv.groups == 1:
        return f"Conv2d {k} dense"
    if conv.groups == conv.in_channels:
        return f"Conv2d {k} depthwise"
    return f"Conv2d {k} groups={conv.groups}"


@torch.no_grad()
def _measure(model: nn.Module, names: Sequence[str], img_size: tuple[int, int]) -> dict[str, tuple[tuple, tuple]]:
    """Spatial size of the input and output of each named conv in one dry forward pass (eval mode, batch 1)."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError(f"parcify: {type(model).__name__} has no nn.Conv2d; nothing to replace")
    param = first_conv.weight
    sizes: dict[str, tuple[tuple, tuple]] = {}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            sizes[name] = (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(torch.zeros(1, first_conv.in_channels, *img_size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return sizes


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _select(eligible: dict[str, tuple[int, int]], where: Where, model_name: str) -> list[str]:
    """Which eligible convs (name -> feature size) ``where`` chooses, in model order."""
    names = list(eligible)
    if where == "all":
        return names
    if where == "auto":
        # The ParC ConvNet recipe: the last three at the stride-16 resolution, the last one at stride 32
        # (generically: the second-smallest and the smallest feature resolutions present).
        areas = sorted({h * w for h, w in eligible.values()})
        chosen = []
        for area, count in zip(areas[:2], (1, 3)):
            chosen += [n for n in names if eligible[n][0] * eligible[n][1] == area][-count:]
        return [n for n in names if n in chosen]
    patterns = [where] if isinstance(where, str) else list(where)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"where must be 'auto', 'all', a module-name pattern or a list of them; got {where!r}")
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if any(fnmatch.fnmatchcase(a, pattern) for a in _ancestors(n))]
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"parcify: where pattern {pattern!r} matches no replaceable convolution of {model_name}. "
                f"Replaceable ones: {shown}"
            )
        chosen += hits
    return [n for n in names if n in set(chosen)]


def replace_convs(
    model: nn.Module,
    *,
    where: Where = "auto",
    img_size: Optional[Union[int, Sequence[int]]] = None,
    method: str = "auto",
    use_pe: bool = True,
) -> list[ParCReplacement]:
    """Replace the chosen spatial convolutions of ``model`` by :class:`ParCPair` in place (see :func:`parcify`).

    Returns:
        What was replaced, in model order.

    Raises:
        ValueError: no convolution can be replaced, or ``where`` matches none.
    """
    model_name = type(model).__name__
    hw = _img_size(model, img_size)
    candidates = {}
    ineligible = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and max(mod.kernel_size) > 1:
            reason = conv_parc_eligibility(mod)
            if reason is None:
                candidates[name] = mod
            else:
                ineligible[name] = reason
    sizes = _measure(model, list(candidates), hw) if candidates else {}
    eligible = {}
    for name in candidates:
        if name not in sizes:
            ineligible[name] = "not run by the model's forward"
        elif sizes[name][0] != sizes[name][1]:
            ineligible[name] = f"its padding changes the size {sizes[name][0]} -> {sizes[name][1]}"
        else:
            eligible[name] = sizes[name][0]
    if not eligible:
        why = "; ".join(f"{n}: {r}" for n, r in list(ineligible.items())[:6]) or "it has no KxK convolution"
        raise ValueError(
            f"parcify: nothing to replace in {model_name}: ParC replaces stride-1 KxK convolutions with as many "
            f"input as output channels (depthwise or dense) that keep the size. Found none ({why})."
        )
    replaced = []
    for name in _select(eligible, where, model_name):
        conv = model.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, ParCPair.from_conv(conv, eligible[name], use_pe=use_pe, method=method))
        replaced.append(ParCReplacement(name, _conv_kind(conv), "ParCPair", conv.in_channels, eligible[name]))
    return replaced


class _GridTracker:
    """Forward pre-hook on a ViT's patch embedding: tells every ParC token mixer the token grid of this input."""

    def __init__(self, mixers: list[ParCTokenMixer]) -> None:
        self.mixers = mixers

    def __call__(self, patch_embed: nn.Module, args: tuple) -> None:
        h, w = args[0].shape[-2:]
        grid = tuple(patch_embed.dynamic_feat_size((h, w)))
        for m in self.mixers:
            m.grid = grid


def _parcify_vit(model: nn.Module, where: Where, img_size, method: str, use_pe: bool) -> list[ParCReplacement]:
    """ViT -> pure ConvNet: ParC token mixers instead of attention, no class/register tokens, average pooling."""
    if img_size is None:
        grid = tuple(model.patch_embed.grid_size)
    else:
        grid = tuple(model.patch_embed.dynamic_feat_size(_img_size(model, img_size)))
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    if where in ("auto", "all"):
        chosen = names
    else:
        patterns = [where] if isinstance(where, str) else list(where)
        chosen = [n for n in names if any(fnmatch.fnmatchcase(a, p) for p in patterns for a in _ancestors(n))]
        if not chosen:
            raise ValueError(f"parcify: where={where!r} matches none of the ViT blocks {names[0]} .. {names[-1]}")
    replaced, mixers = [], []
    for name in chosen:
        block = model.get_submodule(name)
        attn = getattr(block, "attn", None)
        if attn is None or isinstance(attn, ParCTokenMixer):
            continue
        dim = block.norm1.normalized_shape[0]
        mixer = ParCTokenMixer(
            dim, grid, proj=getattr(attn, "proj", None), proj_drop=getattr(attn, "proj_drop", None),
            use_pe=use_pe, method=method,
        )
        p = next(block.parameters())
        block.attn = mixer.to(device=p.device, dtype=p.dtype)
        mixers.append(mixer)
        replaced.append(ParCReplacement(f"{name}.attn", type(attn).__name__, "ParCTokenMixer", dim, grid))
    if not replaced:
        raise ValueError(f"parcify: nothing to replace in {type(model).__name__}: the chosen blocks hold no attention")
    n_prefix = model.num_prefix_tokens
    if n_prefix:
        model.cls_token = None
        model.reg_token = None
        if model.pos_embed is not None and not model.no_embed_class:
            model.pos_embed = nn.Parameter(model.pos_embed.data[:, n_prefix:].clone())
        model.num_prefix_tokens = 0
        model.has_class_token = False
        if model.global_pool == "token":
            model.global_pool = "avg"
    # every ParCTokenMixer of the model must follow the input's grid, those of earlier calls included
    all_mixers = [m for m in model.modules() if isinstance(m, ParCTokenMixer)]
    model.patch_embed.register_forward_pre_hook(_GridTracker(all_mixers))
    return replaced


class _NoWeightDecay:
    """``model.no_weight_decay()`` after parcify: the model's own names plus the ParC position embeddings."""

    def __init__(self, names: set[str]) -> None:
        self.names = frozenset(names)

    def __call__(self) -> set[str]:
        return set(self.names)


def parcify(
    model: nn.Module,
    *,
    where: Where = "auto",
    method: str = "auto",
    use_pe: bool = True,
    img_size: Optional[Union[int, Sequence[int]]] = None,
    report: bool = False,
) -> Union[nn.Module, tuple[nn.Module, list[ParCReplacement]]]:
    """Make ``model`` a ParC network in place: global circular convolutions instead of local convs / attention.

    Args:
        model: a timm (or torchvision) ConvNet, or a timm ``VisionTransformer``.
        where: which modules to convert.
            ConvNets: ``"auto"`` (the ParC ConvNet recipe: the last three replaceable convolutions at the
            second-smallest feature resolution (stride 16) and the last one at the smallest (stride 32);
            e.g. ResNet-50: ``layer3.3-5.conv2`` and ``layer4.2.conv2``), ``"all"`` (every replaceable one), or
            fnmatch patterns on module names matching the conv or any module containing it
            (``["stages.2.blocks.8", "layer4.*"]``). Replaceable: stride 1, KxK, in == out channels, depthwise
            or dense, size-preserving padding.
            ViTs: ``"auto"``/``"all"`` = every block, or patterns on ``blocks.<i>``.
        method: :func:`~hybridvision.ops.circular.circular_conv` method of every new ParC layer.
        use_pe: give the new ParC layers position embeddings.
        img_size: the input size ``H`` or ``(H, W)`` the global kernels are sized for; default: timm's
            ``model.pretrained_cfg['input_size']`` (required for models without one, e.g. torchvision's).
        report: also return the list of :class:`ParCReplacement`.

    Returns:
        ``model`` (the same object, modified), or ``(model, replacements)`` with ``report=True``.
        ``model.parc_replacements`` also holds the replacements of the last call.

    Raises:
        ValueError: nothing can be replaced (e.g. a model of 1x1 convolutions only), a ``where`` pattern matches
            nothing replaceable, or the input size is unknown.

    Shapes:
        the converted model takes the same input as before, ``x: (B, C, H, W)``, at any resolution its layout
        allows (the ParC kernels are resized to each input).
    """
    from timm.models.vision_transformer import VisionTransformer

    previous = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    if isinstance(model, VisionTransformer):
        replaced = _parcify_vit(model, where, img_size, method, use_pe)
    else:
        replaced = replace_convs(model, where=where, img_size=img_size, method=method, use_pe=use_pe)
    model.no_weight_decay = _NoWeightDecay(previous | parc_no_weight_decay(model))
    model.parc_replacements = replaced
    return (model, replaced) if report else model
