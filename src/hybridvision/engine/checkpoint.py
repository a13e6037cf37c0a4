"""Checkpoints: atomic writes, weights_only loading, RNG capture, final safetensors export.

A training checkpoint is a plain dict of tensors and Python primitives, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs)::

    {"format": "hybridvision-checkpoint", "version": 1, "model_name", "num_classes", "in_chans",
     "epoch", "model", "optimizer", "scheduler", "ema" (or None), "rng": [per-rank states],
     "args", "metrics", "best_top1", "data": {...}}
"""
from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT = "hybridvision-checkpoint"
VERSION = 1


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    """Write a file atomically: ``write_fn(file_object)`` fills a temp file in the same folder, which is
    flushed, fsync'ed and renamed over ``path``. A crash at any point leaves the old ``path`` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def rng_state() -> dict:
    """Every RNG state of this process (torch CPU/CUDA, numpy, Python), weights_only-loadable."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(
    path: str | os.PathLike,
    model_name: Optional[str] = None,
    num_classes: Optional[int] = None,
) -> dict:
    """Load a training checkpoint (or a bare state dict) with ``torch.load(weights_only=True)``.

    Args:
        model_name, num_classes: when given, the checkpoint must match them.
    Returns:
        the checkpoint dict; a bare state dict comes back as ``{"model": state_dict}``.
    Raises:
        FileNotFoundError: no such file.
        RuntimeError: corrupt/truncated file, not a checkpoint, another model's, or another class count;
            each message names the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a checkpoint-last.pt / "
                                f"checkpoint-best.pt written by `hybridvision train`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise RuntimeError(f"checkpoint {path} is corrupt or truncated and cannot be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}). Use the other checkpoint in its folder "
                           f"(checkpoint-best.pt / checkpoint-last.pt) or train again.") from e
    if isinstance(ckpt, dict) and ckpt.get("format") != FORMAT and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise RuntimeError(f"{path} is not a hybridvision checkpoint nor a state dict (found "
                           f"{type(ckpt).__name__}); pass a file written by `hybridvision train`")
    if model_name is not None and ckpt.get("model_name") not in (None, model_name):
        raise RuntimeError(f"checkpoint {path} holds a '{ckpt['model_name']}' model, not '{model_name}'; "
                           f"pass --model {ckpt['model_name']} or another checkpoint")
    if num_classes is not None and ckpt.get("num_classes") not in (None, num_classes):
        raise RuntimeError(f"checkpoint {path} has {ckpt['num_classes']} classes but the data has {num_classes}; "
                           f"use the dataset it was trained on, or start a new run without --resume")
    return ckpt


def load_model_state(model: torch.nn.Module, state_dict: dict, path: str | os.PathLike) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with an error that names the file and the mismatch."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = "; ".join(line.strip() for line in lines[1:4]) or lines[0]
        raise RuntimeError(f"the weights in {path} do not fit this model ({detail}). The checkpoint was written "
                           f"for another model or class count: pass the same --model (and data) it was trained "
                           f"with.") from e


def save_final(state_dict: dict, folder: str | os.PathLike, config: dict) -> tuple[Path, Path]:
    """Write ``model.safetensors`` (the weights of ``state_dict``) and ``config.json`` (how to rebuild and
    feed the model: name, num_classes, in_chans, img_size, mean, std, class_names)."""
    from safetensors.torch import save

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    weights = atomic_write(folder / "model.safetensors", lambda f: f.write(save(state, metadata={
        "model": str(config.get("model", "")), "format": "pt"})))
    cfg = atomic_write(folder / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return weights, cfg


def load_final(folder_or_file: str | os.PathLike) -> tuple[dict, dict]:
    """Read ``model.safetensors`` + ``config.json`` -> ``(state_dict, config)``.

    ``folder_or_file`` is the run folder or the ``.safetensors`` path (``config.json`` next to it).
    """
    from safetensors.torch import load_file

    p = Path(folder_or_file)
    weights = p / "model.safetensors" if p.is_dir() else p
    cfg_path = weights.parent / "config.json"
    if not weights.is_file() or not cfg_path.is_file():
        raise FileNotFoundError(f"expected {weights} and {cfg_path} (written at the end of `hybridvision train`)")
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise RuntimeError(f"{weights} is corrupt or truncated ({e}); train again or use a checkpoint-*.pt") from e
    return state, json.loads(cfg_path.read_text())
