"""Accuracy where global context matters: each ParC ConvNet vs its base on cluttered Fashion-MNIST (112 px).

The task (``hybridvision.data.cluttered``): a Fashion-MNIST item pasted at a random place on a 112x112 canvas with
clutter patches cut from other items; the label is the item's. Each pair (ConvNeXt-XT / ParC-ConvNeXt-XT,
ResNet50 / ParC-ResNet50, MobileNetV2 / ParC-MobileNetV2) is trained with the SAME recipe, epochs, data subset and
seed through the library's engine (``hybridvision.engine.trainer.train``); ParC models are built for 112 px, so
their kernels are global on the task. With several ``--seeds`` the table gives mean +- std (sample std) and the
paired per-seed difference ParC - base. Goal of the issue: ParC >= +2 points. Whatever comes out is reported.

Recipe (all models): AdamW, lr 2e-3, weight decay 0.05, cosine schedule stepped per iteration, 1 warm-up epoch
when ``--epochs >= 3``, label smoothing 0.1, random translation 12.5% + horizontal flip, batch 64, fp32,
1 input channel, from scratch (no pretrained weights exist offline).

CPU budget at the committed setting (10,000 training images x 6 epochs, 2,000 test images, 2 threads, the 2-core
machine otherwise idle; per-epoch seconds in each run's ``metrics.json``): a MobileNetV2 pair takes ~14 min per seed,
a ConvNeXt-XT pair ~40 min (177-232 s per epoch and model) and a ResNet50 pair ~90 min (416-480 s per epoch and
model); the full run (all 60k images, 30+ epochs, 3 seeds) is a GPU job.
``--smoke`` (ConvNeXt pair, 128 training / 64 test images, 1 epoch): ~30 s on a quiet machine.

    python benchmarks/experiments/cluttered_parc_vs_base.py --pairs mobilenetv2 --seeds 1 2 3 \
        --train-subset 10000 --test-subset 2000 --epochs 6 --threads 2 --runs runs/cluttered_c   # committed
    python benchmarks/experiments/cluttered_parc_vs_base.py --seeds 1 2 3 --epochs 30          # full (GPU-sized)
    python benchmarks/experiments/cluttered_parc_vs_base.py --smoke
    # another seed for a committed result: its seeds and this run's in one table (same budget required)
    python benchmarks/experiments/cluttered_parc_vs_base.py --pairs convnext --seeds 2 --train-subset 10000 \
        --test-subset 2000 --epochs 6 --threads 2 --runs runs/cluttered_c \
        --merge benchmarks/results/experiments/cluttered_parc_vs_base_convnext.json \
        --output benchmarks/results/experiments/cluttered_parc_vs_base_convnext

Run folders go to ``--runs`` (default ``runs/cluttered``): ``RUNS/<model>/seed<k>/`` holds the engine's
``metrics.json``, ``curves.png``, checkpoints and ``model.safetensors`` + ``config.json``, which
``erf_parc_vs_base.py --trained RUNS`` and ``cam_grid.py --runs RUNS`` load. A run whose ``metrics.json`` was
written with the same recipe is reused, not retrained (``--retrain`` forces it); an unfinished one (stopped, killed,
the session ended) continues from its ``checkpoint-last.pt`` when the same command runs again.
Writes ``benchmarks/results/experiments/cluttered_parc_vs_base.md``, ``.png`` and ``.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import PAIRS, RESULTS, Timer  # noqa: E402

from hybridvision.engine.trainer import LAST, TrainConfig, train  # noqa: E402

GOAL = 2.0  # points of test top-1
CHANCE = 10.0  # 10 classes
#: below this top-1 (both models) a run is too short to say anything: the verdict is "chance level"
CHANCE_MARGIN = 10.0


def verdict(s: dict) -> str:
    """PASS / FAIL against :data:`GOAL`, or why no verdict can be given."""
    if max(mean_std(s["base_top1"])[0], mean_std(s["parc_top1"])[0]) < CHANCE + CHANCE_MARGIN:
        return f"none: both within {CHANCE_MARGIN:.0f} points of chance ({CHANCE:.0f}%), train longer"
    ok = "PASS" if mean_std(s["delta"])[0] >= GOAL else "FAIL"
    return ok + (" (1 seed: no spread)" if len(s["delta"]) == 1 else "")


def recipe(a: argparse.Namespace, model: str, seed: int) -> TrainConfig:
    """The shared recipe: only ``model`` and ``seed`` vary between runs."""
    return TrainConfig(
        model=model, dataset="fashion-mnist-cluttered", img_size=a.img_size, in_chans=1, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, weight_decay=0.05, warmup_epochs=1 if a.epochs >= 3 else 0,
        sched="cosine", smoothing=0.1, translate=0.125, hflip=0.5, seed=seed, workers=0,
        train_subset=a.train_subset, test_subset=a.test_subset, output=str(a.runs / model / f"seed{seed}"),
        progress=False,
    )


def _same_recipe(args: dict | None, cfg: TrainConfig) -> bool:
    """Whether a run's recorded ``args`` are ``cfg`` (``resume`` aside: a resumed run records how it restarted)."""
    if args is None:
        return False
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return dict(args, resume=None) == dict(want, resume=None)


def run_one(cfg: TrainConfig, retrain: bool) -> dict:
    """Train ``cfg``; reuse the finished run in ``cfg.output`` trained with exactly the same arguments, or continue an
    unfinished one from its last checkpoint (the engine's resume is bit-exact: the result equals an
    uninterrupted run). ``retrain`` starts from scratch whatever is there."""
    out = Path(cfg.output)
    old = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
    if not retrain and old is not None and _same_recipe(old.get("args"), cfg):
        done = len(old["epochs"])
        if done == cfg.epochs and (out / "model.safetensors").is_file():
            print(f"reusing {out} (finished, same recipe)", flush=True)
            return old
        if done < cfg.epochs and (out / LAST).is_file():
            print(f"continuing {out} after epoch {done} of {cfg.epochs} (unfinished, same recipe)", flush=True)
            return train(dataclasses.replace(cfg, resume="auto"))
    return train(cfg)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} +- {s:.2f}"


def plot(summary: dict, path: Path, title: str) -> Path:
    """Bars of test top-1 (mean, std error bars, seeds as dots) for each base / ParC pair."""
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(2.6 + 2.2 * len(summary), 3.8))
    for i, (label, s) in enumerate(summary.items()):
        for j, (key, colour) in enumerate((("base", "tab:gray"), ("parc", "tab:green"))):
            accs = s[f"{key}_top1"]
            m, sd = mean_std(accs)
            x = i + (j - 0.5) * 0.38
            ax.bar(x, m, width=0.36, yerr=sd if len(accs) > 1 else None, color=colour, capsize=4,
                   label=("base" if j == 0 else "ParC") if i == 0 else None)
            ax.plot([x] * len(accs), accs, "k.", ms=5)
            ax.text(x, m + max(sd, 0.5), f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(summary)), list(summary))
    ax.set_ylabel("test top-1 (%)")
    lo = min(min(s["base_top1"] + s["parc_top1"]) for s in summary.values())
    ax.set_ylim(max(0.0, lo - 10), None)
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _common.save_figure(fig, path, dpi=110)


PER_SEED = [f"{role}_{key}" for role in ("base", "parc") for key in ("top1", "train_loss", "seconds", "img_per_s")]


def with_delta(s: dict) -> dict:
    """Set a pair's per-seed ``delta`` (ParC - base) and its ``verdict`` from its top-1 lists; returns ``s``."""
    s["delta"] = [p_ - b_ for p_, b_ in zip(s["parc_top1"], s["base_top1"])]
    s["verdict"] = verdict(s)
    return s


def merge_previous(summary: dict, previous: dict, budget: str) -> None:
    """Add to ``summary`` (in place) the seeds of a previous result of this script that this run did not train.

    ``previous`` is that run's .json; its budget (everything but the seeds) must equal ``budget``, else ValueError.
    Seeds trained now replace the same seeds there; pairs absent from ``summary`` are ignored."""
    prev_budget = previous["budget"].rsplit(", seeds ", 1)[0]
    if prev_budget != budget:
        raise ValueError(f"--merge: the previous result's budget ({prev_budget}) differs from this run's ({budget}); "
                         "merge only runs of the same recipe")
    for label, s in summary.items():
        old = previous["pairs"].get(label)
        if old is None:
            continue
        rows = {seed: {k: s[k][i] for k in PER_SEED} for i, seed in enumerate(s["seeds"])}
        for i, seed in enumerate(old["seeds"]):
            rows.setdefault(seed, {k: old[k][i] for k in PER_SEED})
        s["seeds"] = sorted(rows)
        for k in PER_SEED:
            s[k] = [rows[seed][k] for seed in s["seeds"]]
        with_delta(s)


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    _common.add_training_args(p, epochs=3, train_subset=3000, batch_size=64)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--runs", type=Path, default=None, help="where the run folders go (runs/cluttered[_smoke])")
    p.add_argument("--retrain", action="store_true", help="train even when a finished identical run exists")
    p.add_argument("--merge", type=Path, default=None,
                   help="a previous result .json of this script with the same budget: its other seeds join the table")
    _common.add_run_args(p, output="...", smoke="ConvNeXt pair, 128/64 images, 1 epoch (< 60 s)")
    a = p.parse_args(argv)
    if a.smoke:
        a.pairs, a.seeds, a.epochs, a.train_subset, a.test_subset, a.batch_size = ["convnext"], [1], 1, 128, 64, 32
    a.runs = a.runs or Path("runs/cluttered" + ("_smoke" if a.smoke else ""))
    _common.setup_process(a.threads)
    stem = a.output or RESULTS / ("cluttered_parc_vs_base" + ("_smoke" if a.smoke else ""))
    timer = Timer()

    summary: dict = {}
    for key in a.pairs:
        label, base, parc = PAIRS[key]
        s = {"base": base, "parc": parc, "seeds": a.seeds}
        for role, name in (("base", base), ("parc", parc)):
            runs = [run_one(recipe(a, name, seed), a.retrain) for seed in a.seeds]
            s[f"{role}_top1"] = [r["test_top1"] for r in runs]
            s[f"{role}_train_loss"] = [r["epochs"][-1]["train_loss"] for r in runs]
            s[f"{role}_params"] = runs[0]["params"]
            s[f"{role}_seconds"] = [r["train_seconds"] for r in runs]
            s[f"{role}_img_per_s"] = [r["train_img_per_s"] for r in runs]
        summary[label] = with_delta(s)

    budget = (f"{a.train_subset or 60000} training / {a.test_subset or 10000} test images, {a.epochs} epoch(s), "
              f"batch {a.batch_size}, lr {a.lr}, {a.img_size} px")
    if a.merge:
        merge_previous(summary, json.loads(a.merge.read_text()), budget)
    seeds = sorted({seed for s in summary.values() for seed in s["seeds"]})
    budget += f", seeds {' '.join(map(str, seeds))}"
    lines = [
        "# Cluttered Fashion-MNIST (112 px): ParC models vs their bases at equal budget",
        "",
        f"Command: `{_common.command_line()}`  ",
        f"Budget: {budget}; recipe in the script's docstring (identical for base and ParC).  ",
        f"Machine: {_common.machine_line(timer)} (this invocation; finished runs with the same recipe are "
        "reused; training seconds in the table).  ",
        f"Run folders: `{a.runs}/<model>/seed<k>/`. Accuracy = test top-1 (%) after the last epoch; "
        "Delta = ParC - base per seed (mean +- sample std over seeds).",
        "",
        "| pair | base | params (M) | base top-1 | ParC model | params (M) | ParC top-1 | Delta (points) | goal >= +2 "
        "| final train loss base / ParC | train s summed over seeds (mean img/s) base / ParC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in summary.items():
        lines.append(
            f"| {label} | {s['base']} | {s['base_params'] / 1e6:.2f} | {fmt(s['base_top1'])} | {s['parc']} | "
            f"{s['parc_params'] / 1e6:.2f} | {fmt(s['parc_top1'])} | **{fmt(s['delta'])}** | "
            f"{s['verdict']} | {fmt(s['base_train_loss'])} / {fmt(s['parc_train_loss'])} | "
            f"{sum(s['base_seconds']):.0f} ({statistics.fmean(s['base_img_per_s']):.0f}) / "
            f"{sum(s['parc_seconds']):.0f} ({statistics.fmean(s['parc_img_per_s']):.0f}) |")
    png = plot(summary, stem.with_suffix(".png"), budget)
    return _common.write_report(stem, lines, png, "accuracy",
                                {"budget": budget, "pairs": summary, "seconds": timer.seconds})


if __name__ == "__main__":
    main()
