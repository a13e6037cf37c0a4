"""The training engine: one function, :func:`train`, from a :class:`TrainConfig` to a trained run folder.

Built from library parts: timm's ``create_optimizer_v2`` (AdamW), ``create_scheduler_v2`` (cosine with warm-up,
stepped every iteration), ``Mixup``, label-smoothing losses, ``ModelEmaV3``, ``accuracy``; torch's DDP / FSDP2,
autocast (bf16), ``torch.compile``, TensorBoard's ``SummaryWriter``.

Run folder (``cfg.output``): ``metrics.json``, ``curves.png``, ``tb/`` (TensorBoard events),
``checkpoint-last.pt`` / ``checkpoint-best.pt`` (atomic, weights_only-loadable, bit-exact resume) and, at the end,
``model.safetensors`` + ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hybridvision.data.loaders import DATASETS, DataBundle, build_data
from hybridvision.engine import checkpoint as ckpt_io
from hybridvision.engine import distributed as hvdist
from hybridvision.engine.distributed import DistInfo

LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"


@dataclass
class TrainConfig:
    """Every ``hybridvision train`` flag (``--batch-size`` is ``batch_size``); YAML recipes use the same keys."""

    model: str = "coatnet_nano"
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    img_size: Optional[int] = None
    in_chans: Optional[int] = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    opt: str = "adamw"
    sched: str = "cosine"
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    reprob: float = 0.0
    translate: float = 0.125
    hflip: float = 0.5
    aa: Optional[str] = None
    drop_path: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.999
    grad_clip: Optional[float] = None
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    fsdp: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    output: str = "runs/train"
    resume: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    skip_bad_images: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        """Build from a dict (YAML recipe / CLI); keys may use ``-`` or ``_``. Unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**clean)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        checks = [
            (self.dataset in DATASETS, f"--dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}"),
            (self.epochs >= 1, f"--epochs {self.epochs}: need at least 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: need at least 1"),
            (self.lr > 0, f"--lr {self.lr}: must be positive"),
            (0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
             f"--warmup-epochs {self.warmup_epochs}: must be in [0, --epochs {self.epochs})"),
            (0 <= self.smoothing < 1, f"--smoothing {self.smoothing}: must be in [0, 1)"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup / --cutmix alphas must be >= 0"),
            (0 <= self.drop_path < 1, f"--drop-path {self.drop_path}: must be in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, f"--grad-clip {self.grad_clip}: must be positive"),
            (self.workers >= 0, f"--workers {self.workers}: must be >= 0"),
            (not (self.fsdp and self.model_ema), "--fsdp with --model-ema is not supported: drop one of them"),
            (not ((self.mixup or self.cutmix) and self.batch_size % 2),
             f"--mixup/--cutmix need an even --batch-size, got {self.batch_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped and the last good checkpoint was kept."""


def default_img_size(model: str) -> Optional[int]:
    """The image side to train ``model`` at when ``--img-size`` is not given.

    Small-image models (default input side <= :data:`hybridvision.models.registry.SMALL_IMAGE_MAX`, e.g.
    ``coatnet_nano`` at 32 px) declare the size their stride needs, so their default is used (Fashion-MNIST's 28 px
    images are resized to it). For every other model ``None``: the dataset's native size (28 px for Fashion-MNIST,
    112 for the cluttered variant).
    """
    import hybridvision.models  # noqa: F401  (registers the models)
    from hybridvision.models.registry import SMALL_IMAGE_MAX
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    side = getattr(cfg, "input_size", None) if cfg is not None else None
    if side and max(side[1:]) <= SMALL_IMAGE_MAX:
        return int(side[-1])
    return None


def build_model(name: str, num_classes: int, in_chans: int, img_size: int, drop_path: float = 0.0) -> nn.Module:
    """``create_model(name, num_classes, in_chans, img_size, drop_path_rate)`` through timm's registry.

    ``img_size`` sizes models that need it (CoAtNet's relative-bias tables); timm models whose constructor
    has no ``img_size`` argument are built without it.
    """
    from hybridvision.models.registry import create_model

    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        return create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown model {name!r}; `hybridvision models` lists the hybridvision models "
                             f"(any timm model name works too)") from e
        raise
    return create_model(name, **kwargs)


def build_loss(cfg: TrainConfig, num_classes: int) -> tuple[Callable, Optional[Callable]]:
    """``(train_loss_fn, mixup_fn)``: timm's Mixup + SoftTargetCrossEntropy, else label smoothing, else CE."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                    num_classes=num_classes)
        return SoftTargetCrossEntropy(), mix
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing), None
    return nn.CrossEntropyLoss(), None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    transform: Callable[[torch.Tensor], torch.Tensor],
    info: DistInfo = DistInfo(),
    amp: bool = False,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 / top-5 (percent) and mean cross-entropy over the loader, summed over ranks.

    Loader batches are ``(images, labels)``; ``transform`` maps images to the model input ``(B, C, H, W)``.
    """
    from timm.utils import accuracy

    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # correct@1, correct@5, loss sum
    count = 0
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not (progress and info.is_main)):
        x = transform(x.to(info.device, non_blocking=True))
        y = torch.as_tensor(y).to(info.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out = out.float()
        k5 = min(5, out.shape[1])
        top1, top5 = accuracy(out, y, topk=(1, k5))
        n = y.shape[0]
        sums += torch.stack([top1 * (n / 100), top5 * (n / 100), nn.functional.cross_entropy(out, y, reduction="sum")])
        count += n
    c1, c5, loss, n = hvdist.all_reduce_sum(sums.tolist() + [count], info)  # one host sync per evaluation
    model.train(was_training)
    if n == 0:
        raise ValueError("the test set is empty")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n, "count": int(n)}


def plot_curves(history: list[dict], path: str | os.PathLike) -> None:
    """A PNG with training loss and test top-1/top-5 per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["test_loss"] for h in history], "s-", label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=.3)
    b.plot(ep, [h["test_top1"] for h in history], "o-", label="top-1")
    b.plot(ep, [h["test_top5"] for h in history], "s-", label="top-5")
    if any("ema_top1" in h for h in history):
        b.plot(ep, [h.get("ema_top1", float("nan")) for h in history], "^-", label="EMA top-1")
    b.set_xlabel("epoch"), b.set_ylabel("test accuracy (%)"), b.legend(), b.grid(alpha=.3)
    fig.tight_layout()
    ckpt_io.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _resume_path(cfg: TrainConfig, out: Path) -> Optional[Path]:
    if cfg.resume == "auto" or (cfg.resume is None and hvdist.restart_count() > 0):
        last = out / LAST
        return last if last.is_file() else None
    return Path(cfg.resume) if cfg.resume else None


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.dataset``; single process, or one rank of a torchrun job.

    Returns:
        the metrics dict written to ``metrics.json`` (rank 0's view; identical numbers on every rank).
    Raises:
        NonFiniteLossError: NaN/inf loss (the last good checkpoint is kept).
        ValueError / RuntimeError / FileNotFoundError: bad flags, data or checkpoints, with the fix.
    """
    cfg.validate()
    info = hvdist.init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        hvdist.cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo) -> dict:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    out = Path(cfg.output)
    main = info.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(msg, flush=True)) if main else (lambda msg: None)
    resume = _resume_path(cfg, out)
    resumed = ckpt_io.load_checkpoint(resume, cfg.model) if resume is not None else None

    _seed_all(cfg.seed)
    data = build_data(
        cfg.dataset, cfg.data_dir, img_size=cfg.img_size or default_img_size(cfg.model), in_chans=cfg.in_chans,
        batch_size=cfg.batch_size, workers=cfg.workers, seed=cfg.seed, train_subset=cfg.train_subset, test_subset=cfg.test_subset,
        rank=info.rank, world_size=info.world_size, translate=cfg.translate, hflip=cfg.hflip, re_prob=cfg.reprob,
        auto_augment=cfg.aa, skip_bad_images=cfg.skip_bad_images, pin_memory=info.device.type == "cuda",
    )
    if resumed is not None and resumed.get("num_classes") not in (None, data.num_classes):
        raise RuntimeError(f"checkpoint {resume} has {resumed['num_classes']} classes but {cfg.dataset} has "
                           f"{data.num_classes}; use the data it was trained on, or drop --resume")
    model = build_model(cfg.model, data.num_classes, data.in_chans, data.img_size, cfg.drop_path).to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    _seed_all(cfg.seed + info.rank)  # augmentation streams differ per rank; init was identical
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    model = hvdist.wrap_model(model, info, cfg.fsdp)
    optimizer = create_optimizer_v2(hvdist.unwrap(model), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(data.train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                       step_on_epochs=False, updates_per_epoch=steps)
    loss_fn, mixup_fn = build_loss(cfg, data.num_classes)
    model_cfg = dict(model=cfg.model, num_classes=data.num_classes, in_chans=data.in_chans, img_size=data.img_size,
                     mean=list(data.mean), std=list(data.std), class_names=list(data.class_names),
                     dataset=cfg.dataset, crop_pct=1.0)

    start_epoch, history, best = 0, [], -1.0
    if resumed is not None:
        try:
            hvdist.load_full_state_dict(model, resumed["model"], optimizer, resumed.get("optimizer"))
        except (RuntimeError, KeyError, ValueError) as e:
            raise RuntimeError(f"checkpoint {resume} does not fit --model {cfg.model} with {data.num_classes} "
                               f"classes and in_chans={data.in_chans} ({str(e).splitlines()[0]}); resume with "
                               f"the flags it was trained with, or start a new --output") from e
        if resumed.get("scheduler"):
            scheduler.load_state_dict(resumed["scheduler"])
        if ema is not None and resumed.get("ema") is not None:
            ema.module.load_state_dict(resumed["ema"])
        start_epoch = int(resumed["epoch"]) + 1
        history = list(resumed.get("metrics", {}).get("epochs", []))
        best = float(resumed.get("best_top1", -1.0))
        states = resumed.get("rng") or []
        if len(states) == info.world_size:
            ckpt_io.set_rng_state(states[info.rank])
        else:
            warnings.warn(f"{resume} holds RNG states of {len(states)} process(es), this run has "
                          f"{info.world_size}: augmentation randomness will differ from an uninterrupted run")
        log(f"resumed from {resume} (continuing at epoch {start_epoch + 1} of {cfg.epochs})")
    if cfg.compile:
        model = torch.compile(model)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    log(f"{cfg.model}: {n_params / 1e6:.2f}M params | {cfg.dataset} {len(data.train_loader.dataset)} train / "
        f"{len(data.test_loader.dataset)} test images at {data.img_size}px, in_chans={data.in_chans} | "
        f"{info.world_size} process(es) on {info.device.type} | {steps} steps/epoch")

    def metrics_dict() -> dict:
        tput = [h["train_img_per_s"] for h in history]
        return {
            "model": cfg.model, "dataset": cfg.dataset, "params": n_params, "world_size": info.world_size,
            "epochs": history,
            "test_top1": history[-1]["test_top1"] if history else None,
            "test_top5": history[-1]["test_top5"] if history else None,
            "best_test_top1": max((h["test_top1"] for h in history), default=None),
            "ema_test_top1": history[-1].get("ema_top1") if history else None,
            "train_img_per_s": sum(tput) / len(tput) if tput else None,
            "train_seconds": sum(h["seconds"] for h in history),
            "args": _jsonable(cfg),
        }

    ema_source = hvdist.unwrap(model)  # the plain module behind DDP / FSDP / compile wrappers
    for epoch in range(start_epoch, cfg.epochs):
        data.train_sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(data.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and main), file=sys.stderr)
        for i, (x, y) in enumerate(bar):
            step = epoch * steps + i
            scheduler.step_update(step)
            x = data.train_transform(x.to(info.device, non_blocking=True))
            y = torch.as_tensor(y).to(info.device, non_blocking=True)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss = loss_fn(model(x), y)
            loss_value = loss.item()  # the step's one host sync
            finite = math.isfinite(loss_value)
            if info.enabled:
                flag = torch.tensor(float(finite), device=info.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                finite = flag.item() == 1
            if not finite:
                last = out / LAST
                kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was written"
                raise NonFiniteLossError(
                    f"the loss became {loss_value} at epoch {epoch + 1}, step {i + 1}; training stopped and "
                    f"{kept}. Lower --lr (now {cfg.lr}), set --grad-clip 1.0 or check the data, then resume "
                    f"with --resume {last} (or start again).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(ema_source, step=step + 1)
            loss_sum += loss_value * x.shape[0]
            seen += x.shape[0]
            if main and i % 50 == 0:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                writer.add_scalar("train/loss_step", loss_value, step)
        seconds = time.perf_counter() - t0
        loss_sum, seen = hvdist.all_reduce_sum([loss_sum, seen], info)
        ev = evaluate(model, data.test_loader, data.eval_transform, info, cfg.amp, cfg.channels_last, cfg.progress)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "test_top1": ev["top1"], "test_top5": ev["top5"],
               "test_loss": ev["loss"], "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
               "train_img_per_s": seen / seconds}
        if ema is not None:
            eev = evaluate(ema.module, data.test_loader, data.eval_transform, info, cfg.amp, cfg.channels_last)
            row.update(ema_top1=eev["top1"], ema_top5=eev["top5"])
        history.append(row)
        is_best = row["test_top1"] > best
        best = max(best, row["test_top1"])
        log(f"epoch {epoch + 1}/{cfg.epochs}: train_loss {row['train_loss']:.4f} | test top-1 {row['test_top1']:.2f}% "
            f"top-5 {row['test_top5']:.2f}%" + (f" | EMA top-1 {row['ema_top1']:.2f}%" if ema is not None else "")
            + f" | lr {row['lr']:.2e} | {seconds:.1f}s, {row['train_img_per_s']:.0f} img/s")

        model_state, optim_state = hvdist.full_state_dict(model, optimizer)  # collective under FSDP
        rngs = hvdist.all_gather_object(ckpt_io.rng_state(), info)  # collective
        if main:
            for k in ("train_loss", "test_top1", "test_top5", "test_loss", "lr", "train_img_per_s"):
                writer.add_scalar(f"epoch/{k}", row[k], epoch + 1)
            writer.flush()
            metrics = metrics_dict()
            state = {
                "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model_name": cfg.model,
                "num_classes": data.num_classes, "in_chans": data.in_chans, "epoch": epoch,
                "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None, "rng": rngs,
                "args": _jsonable(cfg), "metrics": metrics, "best_top1": best, "model_cfg": model_cfg,
            }
            ckpt_io.atomic_save(state, out / LAST)
            if is_best:
                ckpt_io.atomic_save(state, out / BEST)
            _write_json(out / "metrics.json", metrics)
            plot_curves(history, out / "curves.png")
        hvdist.barrier(info)

    metrics = metrics_dict()
    model_state, _ = hvdist.full_state_dict(model)
    if main:
        model_cfg["test_top1"] = metrics["test_top1"]
        ckpt_io.save_final(model_state, out, model_cfg)
        _write_json(out / "metrics.json", metrics)
        if history:
            plot_curves(history, out / "curves.png")
        writer.close()
    hvdist.barrier(info)
    return metrics


def _jsonable(cfg: TrainConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def _write_json(path: Path, obj: dict) -> None:
    ckpt_io.atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, allow_nan=True).encode()))


def summary(metrics: dict, output: str | os.PathLike) -> str:
    """A human summary of a finished run (printed at the end of ``train`` / ``demo``)."""
    out = Path(output)
    h = metrics["epochs"]
    lines = [
        "=" * 72,
        f"model {metrics['model']} ({metrics['params'] / 1e6:.2f}M params) on {metrics['dataset']}, "
        f"{len(h)} epochs, {metrics['world_size']} process(es)",
        f"test top-1 {metrics['test_top1']:.2f}%  top-5 {metrics['test_top5']:.2f}%  "
        f"(best top-1 {metrics['best_test_top1']:.2f}% at epoch "
        f"{max(h, key=lambda r: r['test_top1'])['epoch']})",
        *([f"EMA weights (checkpoint 'ema'): test top-1 {metrics['ema_test_top1']:.2f}%"]
          if metrics.get("ema_test_top1") is not None else []),
        f"training time {metrics['train_seconds']:.0f}s, throughput {metrics['train_img_per_s']:.0f} img/s",
        f"outputs in {out}/: metrics.json, curves.png, {LAST}, {BEST}, model.safetensors, config.json, tb/",
        "=" * 72,
    ]
    return "\n".join(lines)
