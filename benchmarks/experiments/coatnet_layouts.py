"""CoAtNet's layout ablation (paper Figure 1 / Table 1) on Fashion-MNIST: capacity vs generalisation.

Five models share one small-image CoAtNet (``coatnet_nano`` with the stages fixed in ``ARCH``: S0..S4 depths
2,2,2,2,2, widths 16,32,64,96,128, total stride 4: 28 -> 14 -> 7x7 for S1..S4, stride on the 1x1 conv; pinned here so
the ablation does not change when the demo's ``coatnet_nano`` preset does) and differ only in the block type of each stage:
C-C-C-C, C-C-C-T, C-C-T-T (CoAtNet), C-T-T-T, and ViT_rel (``layout="VIT_REL"``: a 4x4 patch embedding, then the
S1..S3 blocks all Transformer blocks at S3's width, S4 as usual; stride 4 like the others). Same depth per stage,
same widths, same recipe, data subset and seed, trained through the library's engine
(``hybridvision.engine.trainer.train``). Reported like the paper: the final training loss (capacity: lower fits
better) and the test accuracy (generalisation). The paper's findings: generalisation (ImageNet-1K)
C-C-C-C ~ C-C-C-T >= C-C-T-T > C-T-T-T >> ViT_rel, capacity (JFT) C-C-T-T ~ C-T-T-T > ViT_rel > C-C-C-T > C-C-C-C
(more Transformer blocks do not by themselves mean more capacity).

Recipe: AdamW, lr 2e-3, weight decay 0.05, cosine per iteration, 1 warm-up epoch when ``--epochs >= 3``,
label smoothing 0.1, random translation 12.5% + horizontal flip, batch 128, fp32, 28 px, 1 channel, no
stochastic depth (``drop_path`` 0, so the training loss measures fit).

CPU budget, measured: with 1 thread per process and the three seeds as three processes side by side on the
2 cores, the five layouts trained at 91-138 img/s at 28 px (ViT_rel slowest), ~8-11 min per layout, 50 min for
``--seeds 1 2 3 --train-subset 10000 --test-subset 5000 --epochs 6 --threads 1`` (the committed run; one seed alone,
beside a 2-thread job, took 31 min); the full data (``--train-subset 0 --epochs 30``) is a GPU job.
``--smoke`` (C-C-C-C and ViT_rel, 256 / 128 images, 1 epoch): ~30 s on a quiet machine.

    python benchmarks/experiments/coatnet_layouts.py --seeds 1 2 3 --train-subset 10000 --test-subset 5000 --epochs 6 \
        --threads 1   # committed; seeds may run as separate processes first (finished runs are reused)
    python benchmarks/experiments/coatnet_layouts.py --train-subset 0 --test-subset 0 --epochs 30 --seeds 1 2 3
    python benchmarks/experiments/coatnet_layouts.py --smoke

Each layout is registered in timm as ``coatnet_nano_<layout>`` (e.g. ``coatnet_nano_cctt``) for the run, so the
engine's run folders ``RUNS/coatnet_nano_<layout>/seed<k>/`` are ordinary training runs.
Writes ``benchmarks/results/experiments/coatnet_layouts.md``, ``.png`` and ``.json``.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import RESULTS, Timer  # noqa: E402

import timm  # noqa: E402
from timm.models import register_model  # noqa: E402

import hybridvision  # noqa: E402,F401
from hybridvision.engine.trainer import TrainConfig  # noqa: E402
from cluttered_parc_vs_base import fmt, run_one  # noqa: E402

BASE = "coatnet_nano"
#: the ablation's fixed architecture (create_model overrides of the base preset, applied before the layout's)
ARCH: dict = {"depths": (2, 2, 2, 2, 2), "dims": (16, 32, 64, 96, 128), "strides": (2, 2, 1, 1, 1),
              "stride_mode": "1x1", "img_size": 28}
#: layout label -> create_model overrides of the base preset
LAYOUTS: dict[str, dict] = {
    "C-C-C-C": {"layout": "CCCC"},
    "C-C-C-T": {"layout": "CCCT"},
    "C-C-T-T": {"layout": "CCTT"},
    "C-T-T-T": {"layout": "CTTT"},
    "ViT_rel": {"layout": "VIT_REL", "patch_size": 4},
}
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def model_name(label: str) -> str:
    """``"C-C-T-T"`` -> ``"coatnet_nano_cctt"``; ``"ViT_rel"`` -> ``"coatnet_nano_vit_rel"``."""
    return f"{BASE}_{label.replace('-', '').lower()}"


def register_layouts() -> None:
    """Register ``coatnet_nano_<layout>`` in timm for every layout (idempotent)."""
    for label, overrides in LAYOUTS.items():
        name = model_name(label)
        if name in timm.list_models(name):
            continue

        def entry(pretrained: bool = False, _o: dict = overrides, **kwargs):
            for k in _TIMM_ARGS:
                kwargs.pop(k, None)
            return timm.create_model(BASE, pretrained=pretrained, **{**ARCH, **_o, **kwargs})

        entry.__name__ = entry.__qualname__ = name
        entry.__doc__ = f"{BASE} with {ARCH} and {overrides} (layout ablation)."
        register_model(entry)


def plot(rows: dict, path: Path, title: str) -> Path:
    """Two panels like the paper's Figure 1: final training loss and test accuracy per layout."""
    plt = _common.pyplot()
    labels = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, ylabel, colour in ((axes[0], "train_loss", "final training loss (capacity)", "tab:blue"),
                                    (axes[1], "top1", "test top-1 % (generalisation)", "tab:orange")):
        vals = [rows[lb][key] for lb in labels]
        means = [statistics.fmean(v) for v in vals]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.bar(labels, means, yerr=[s if s else None for s in sds] if any(sds) else None, color=colour,
               capsize=4, alpha=0.85)
        for i, v in enumerate(vals):
            ax.plot([i] * len(v), v, "k.", ms=5)
            ax.text(i, means[i], f"{means[i]:.3f}" if key == "train_loss" else f"{means[i]:.1f}",
                    ha="center", va="bottom", fontsize=8)
        lo, hi = min(min(v) for v in vals), max(max(v) for v in vals)
        pad = max(hi - lo, 1e-3)
        ax.set_ylim(max(0.0, lo - 1.5 * pad), hi + 0.6 * pad)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=8, wrap=True)
    return _common.save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    _common.add_training_args(p, epochs=2, train_subset=5000, batch_size=128)
    p.add_argument("--runs", type=Path, default=None, help="where the run folders go (runs/coatnet_layouts[_smoke])")
    p.add_argument("--retrain", action="store_true", help="train even when a finished identical run exists")
    _common.add_run_args(p, output="...", smoke="C-C-C-C and ViT_rel, 256 / 128 images, 1 epoch (< 60 s)")
    a = p.parse_args(argv)
    if a.smoke:
        a.layouts, a.seeds, a.epochs, a.train_subset, a.test_subset = ["C-C-C-C", "ViT_rel"], [1], 1, 256, 128
    a.runs = a.runs or Path("runs/coatnet_layouts" + ("_smoke" if a.smoke else ""))
    _common.setup_process(a.threads)
    register_layouts()
    stem = a.output or RESULTS / ("coatnet_layouts" + ("_smoke" if a.smoke else ""))
    timer = Timer()

    rows: dict = {}
    for label in a.layouts:
        name = model_name(label)
        runs = []
        for seed in a.seeds:
            cfg = TrainConfig(
                model=name, dataset="fashion-mnist", img_size=28, in_chans=1, epochs=a.epochs,
                batch_size=a.batch_size, lr=a.lr, weight_decay=0.05, warmup_epochs=1 if a.epochs >= 3 else 0,
                sched="cosine", smoothing=0.1, translate=0.125, hflip=0.5, drop_path=0.0, seed=seed, workers=0,
                train_subset=a.train_subset or None, test_subset=a.test_subset or None,
                output=str(a.runs / name / f"seed{seed}"), progress=False,
            )
            runs.append(run_one(cfg, a.retrain))
        rows[label] = {
            "model": name, "params": runs[0]["params"],
            "train_loss": [r["epochs"][-1]["train_loss"] for r in runs],
            "top1": [r["test_top1"] for r in runs],
            "img_per_s": statistics.fmean(r["train_img_per_s"] for r in runs),
        }

    budget = (f"Fashion-MNIST {a.train_subset or 60000} training / {a.test_subset or 10000} test images, "
              f"{a.epochs} epoch(s), batch {a.batch_size}, lr {a.lr}, 28 px, seeds {' '.join(map(str, a.seeds))}")
    lines = [
        "# CoAtNet layout ablation (coatnet_nano widths/depths) on Fashion-MNIST",
        "",
        f"Command: `{_common.command_line()}`  ",
        f"Budget: {budget}; recipe in the script's docstring (identical for every layout).  ",
        f"Machine: {_common.machine_line(timer)}.  ",
        "Final train loss = mean label-smoothed loss over the last epoch's training batches (with augmentation); "
        "test top-1 after the last epoch. Mean +- sample std over seeds where there are several.",
        "",
        "| layout | model | params (M) | final train loss | test top-1 (%) | train img/s |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['model']} | {r['params'] / 1e6:.3f} | {fmt(r['train_loss'])} | "
                     f"{fmt(r['top1'])} | {r['img_per_s']:.0f} |")
    png = plot(rows, stem.with_suffix(".png"), budget)
    return _common.write_report(stem, lines, png, "layouts",
                                {"budget": budget, "layouts": rows, "seconds": timer.seconds})


if __name__ == "__main__":
    main()
