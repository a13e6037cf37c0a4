"""Evaluation and prediction from a trained run: a ``checkpoint-*.pt``, a ``model.safetensors`` or a run folder."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional, Sequence, TextIO

import torch
from torch import nn

from hybridvision.data.folders import list_images, load_image
from hybridvision.data.loaders import build_data
from hybridvision.data.transforms import file_transform
from hybridvision.engine import checkpoint as ckpt_io
from hybridvision.engine.distributed import DistInfo, init_distributed
from hybridvision.engine.trainer import build_model, evaluate


def load_trained(path: str | os.PathLike, ema: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a trained model in eval mode -> ``(model, model_cfg)``.

    ``path``: a ``checkpoint-*.pt`` (weights_only load), a ``model.safetensors`` (+ ``config.json`` beside it) or
    a run folder (its ``model.safetensors``). ``ema=True`` takes a checkpoint's EMA weights.
    """
    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        state, cfg = ckpt_io.load_final(p)
        source = p / "model.safetensors" if p.is_dir() else p
    else:
        ck = ckpt_io.load_checkpoint(p)
        cfg = ck.get("model_cfg")
        if cfg is None:
            raise RuntimeError(f"{p} holds weights but no model description (model_cfg); use a checkpoint written "
                               f"by `hybridvision train`, or model.safetensors with its config.json")
        state, source = ck["model"], p
        if ema:
            if ck.get("ema") is None:
                raise RuntimeError(f"{p} has no EMA weights (trained without --model-ema); drop --ema")
            state = ck["ema"]
    model = build_model(cfg["model"], cfg["num_classes"], cfg["in_chans"], cfg["img_size"])
    ckpt_io.load_model_state(model, state, source)
    return model.eval(), cfg


def evaluate_checkpoint(
    path: str | os.PathLike,
    dataset: Optional[str] = None,
    data_dir: Optional[str] = None,
    batch_size: int = 256,
    workers: int = 0,
    test_subset: Optional[int] = None,
    ema: bool = False,
    device: str = "auto",
    skip_bad_images: bool = False,
) -> dict:
    """Top-1/top-5 of a trained model on a test set (default: the dataset it was trained on).

    Raises:
        RuntimeError: the data has another class count or other classes than the model.
    """
    model, cfg = load_trained(path, ema)
    dataset = dataset or cfg["dataset"]
    info: DistInfo = init_distributed(device)
    data = build_data(dataset, data_dir, img_size=cfg["img_size"], in_chans=cfg["in_chans"], batch_size=batch_size,
                      eval_batch_size=batch_size, workers=workers, train=False, test_subset=test_subset,
                      skip_bad_images=skip_bad_images,
                      class_names=cfg["class_names"] if dataset == "folder" else None)
    if data.num_classes != cfg["num_classes"]:
        raise RuntimeError(f"{path} was trained with {cfg['num_classes']} classes but {dataset} has "
                           f"{data.num_classes}; evaluate on the data it was trained on")
    res = evaluate(model.to(info.device), data.test_loader, data.eval_transform, info)
    return dict(res, model=cfg["model"], dataset=dataset)


def _expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    if not files:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    return files


@torch.no_grad()
def predict(
    path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    topk: int = 3,
    batch_size: int = 64,
    device: str = "auto",
) -> list[dict]:
    """Top-k predictions for image files and folders.

    Each image is converted to the model's channels (``L``/``RGB``), resized and centre-cropped to its
    ``img_size`` and normalised with the training statistics.

    Returns:
        one dict per image: ``{"file", "labels": [k names], "indices": [k ints], "probs": [k floats]}``.
    """
    model, cfg = load_trained(path)
    info = init_distributed(device)
    model = model.to(info.device)
    k = min(topk, cfg["num_classes"])
    if k < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    tf = file_transform(cfg["img_size"], cfg["in_chans"], cfg["mean"], cfg["std"], train=False,
                        crop_pct=cfg.get("crop_pct", 1.0))
    mode = "L" if cfg["in_chans"] == 1 else "RGB"
    files = _expand(inputs)
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        x = torch.stack([tf(load_image(f, mode)) for f in chunk]).to(info.device)
        probs = model(x).float().softmax(-1)
        p, idx = probs.topk(k, dim=-1)
        for f, pi, ii in zip(chunk, p.tolist(), idx.tolist()):
            rows.append({"file": str(f), "indices": ii, "probs": pi,
                         "labels": [cfg["class_names"][j] for j in ii]})
    return rows


def write_predictions(rows: list[dict], out: str | os.PathLike | TextIO, topk: int) -> None:
    """CSV: ``file, label1, prob1, ..., labelK, probK``."""
    k = min(topk, len(rows[0]["labels"])) if rows else topk
    header = ["file"] + [c for i in range(1, k + 1) for c in (f"label{i}", f"prob{i}")]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([r["file"]] + [c for lab, pr in zip(r["labels"], r["probs"]) for c in (lab, f"{pr:.4f}")])
    if isinstance(out, (str, os.PathLike)):
        ckpt_io.atomic_write(out, lambda f: f.write(buf.getvalue().encode()))
    else:
        out.write(buf.getvalue())
