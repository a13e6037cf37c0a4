"""Grad-CAM grid on cluttered Fashion-MNIST: base model vs ParC model, on the same test images.

Loads the final weights written by ``cluttered_parc_vs_base.py`` (``RUNS/<model>/seed<k>/model.safetensors`` +
``config.json``) and explains each model's top-1 prediction with Grad-CAM (``hybridvision.tools.cam.grad_cam``,
automatic target layer = the last stage). One row per test canvas: the input, then base and ParC overlays,
titled with the predicted class (true label in the row title; a wrong prediction is marked with x).
Besides the picture, the script reports how much CAM mass falls on the Fashion-MNIST item rather than on the
clutter: the item's 28x28 box is found by matching the item image on the canvas (the item is pasted whole, on
top), and "CAM on item" is the CAM's sum inside that box over its total sum (uniform CAM: 784 / 112^2 = 6%).

CPU budget: a few seconds per model (one batched Grad-CAM of ``--num-images`` canvases at 112 px); the default
(ConvNeXt pair, 8 images) runs in < 1 min plus model loading. ``--smoke``: 2 images.

    python benchmarks/experiments/cam_grid.py                    # after cluttered_parc_vs_base.py (default runs)
    python benchmarks/experiments/cam_grid.py --pairs convnext mobilenetv2 --runs runs/cluttered_c \
        --num-images 16                                          # the committed grid (README, make science)
    python benchmarks/experiments/cam_grid.py --smoke --runs runs/cluttered_smoke

Writes ``benchmarks/results/experiments/cam_grid.png``, ``.md`` and ``.json``.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import PAIRS, RESULTS, Timer  # noqa: E402

from erf_parc_vs_base import build_trained  # noqa: E402
from hybridvision.data.cluttered import ClutteredFashionMNIST  # noqa: E402
from hybridvision.data.fashion_mnist import CLASS_NAMES  # noqa: E402
from hybridvision.data.transforms import BatchTransform  # noqa: E402
from hybridvision.tools.cam import grad_cam, overlay  # noqa: E402


def item_box(canvas: np.ndarray, item: np.ndarray) -> tuple[int, int]:
    """Top-left ``(y, x)`` of the 28x28 ``item`` on the ``canvas: (S, S)`` (uint8): the placement where every item
    pixel is matched or exceeded (the item is pasted with a pixel-wise max over the clutter); the best match."""
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(canvas.astype(np.int16), item.shape)  # (S-27, S-27, 28, 28)
    item16 = item.astype(np.int16)
    under = np.clip(item16 - win, 0, None).sum(axis=(2, 3))  # 0 where the item fits below the canvas
    excess = (win - item16).sum(axis=(2, 3))  # clutter on top inside the box: smaller is better
    score = under * 1_000_000 + excess
    y, x = np.unravel_index(np.argmin(score), score.shape)
    return int(y), int(x)


def plot_grid(canvases: np.ndarray, boxes: list[tuple[int, int]], labels, idx: list[int],
              columns: list[tuple[str, np.ndarray, np.ndarray]], on_item: dict[str, list[float]], path: Path,
              title: str) -> Path:
    """One row per canvas: the input ``canvases: (N, S, S)`` uint8 with the item's box (``boxes``: top-left
    ``(y, x)``), then each model's CAM overlay; ``columns``: (model, cams (N, S, S) in [0, 1], classes (N,)),
    ``labels``: (N,) true classes, ``idx``: the test canvas numbers, ``on_item``: per model the N "CAM on item"
    fractions. Saved to ``path``; returns it."""
    plt = _common.pyplot()
    import matplotlib.patches as patches

    n, ncol = len(idx), 1 + len(columns)
    fig, axes = plt.subplots(n, ncol, figsize=(2.3 * ncol, 2.4 * n), squeeze=False)
    for r in range(n):
        rgb = np.repeat(canvases[r][..., None], 3, -1).astype(np.float32) / 255.0
        y, x0 = boxes[r]
        axes[r, 0].imshow(rgb)
        axes[r, 0].add_patch(patches.Rectangle((x0 - 0.5, y - 0.5), 28, 28, fill=False, ec="cyan", lw=1))
        axes[r, 0].set_title(f"#{idx[r]}: {CLASS_NAMES[int(labels[r])]}", fontsize=8)
        for c, (name, cams, classes) in enumerate(columns, start=1):
            ok = int(classes[r]) == int(labels[r])
            axes[r, c].imshow(overlay(rgb, cams[r]))
            axes[r, c].set_title(f"{name}\n{'' if ok else 'x '}{CLASS_NAMES[int(classes[r])]}  "
                                 f"on item {on_item[name][r]:.2f}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=8, wrap=True)
    return _common.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--runs", type=Path, default=Path("runs/cluttered"), help="RUNS of cluttered_parc_vs_base.py")
    p.add_argument("--pairs", nargs="+", default=["convnext"], choices=list(PAIRS))
    p.add_argument("--seed", type=int, default=1, help="which training seed's weights")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--first", type=int, default=0, help="index of the first test canvas")
    _common.add_run_args(p, output="cam_grid", smoke="2 images")
    a = p.parse_args(argv)
    if a.smoke:
        a.num_images = 2
    _common.setup_process(a.threads)
    stem = a.output or RESULTS / ("cam_grid" + ("_smoke" if a.smoke else ""))
    timer = Timer()

    ds = ClutteredFashionMNIST("test", seed=a.seed)
    idx = list(range(a.first, a.first + a.num_images))
    raw, labels = ds.__getitems__(idx)  # (N, 1, 112, 112) uint8
    canvases = raw[:, 0].numpy()
    boxes = [item_box(canvases[i], ds.images[j]) for i, j in enumerate(idx)]

    columns: list[tuple[str, np.ndarray, np.ndarray]] = []  # (model, cams (N, H, W), classes (N,))
    on_item: dict[str, list[float]] = {}
    for key in a.pairs:
        for name in PAIRS[key][1:]:
            model, cfg = build_trained(a.runs, name, a.seed)
            x = BatchTransform(cfg["img_size"], tuple(cfg["mean"]), tuple(cfg["std"]), cfg["in_chans"], False)(raw)
            cams, classes, layer = grad_cam(model, x)
            if cams.shape[-2:] != canvases.shape[-2:]:
                cams = torch.nn.functional.interpolate(torch.from_numpy(cams)[:, None], size=canvases.shape[-2:],
                                                       mode="bilinear", align_corners=False)[:, 0].numpy()
            columns.append((name, cams, classes))
            fr = []
            for c, (y, x0) in zip(cams, boxes):
                total = float(c.sum())
                fr.append(float(c[y:y + 28, x0:x0 + 28].sum()) / total if total > 0 else float("nan"))
            on_item[name] = fr
            print(f"{name}: Grad-CAM at {layer}, {sum(int(k) == int(t) for k, t in zip(classes, labels))}/"
                  f"{len(idx)} correct, CAM on item {statistics.fmean(fr):.3f}", flush=True)

    title = f"Grad-CAM, cluttered Fashion-MNIST test canvases, weights {a.runs}/<model>/seed{a.seed}"
    png = plot_grid(canvases, boxes, labels, idx, columns, on_item, stem.with_suffix(".png"), title)
    n = len(idx)

    lines = [
        "# Grad-CAM: base vs ParC on cluttered Fashion-MNIST",
        "",
        f"Command: `{_common.command_line()}`  ",
        f"Weights: `{a.runs}/<model>/seed{a.seed}` (cluttered_parc_vs_base.py); test canvases "
        f"#{idx[0]}..#{idx[-1]}.  ",
        f"Machine: {_common.machine_line(timer)}.  ",
        "CAM on item = CAM mass inside the item's 28x28 box / total CAM mass (uniform CAM: 0.06).",
        "",
        "| model | correct | CAM on item (mean) |",
        "|---|---|---|",
    ]
    for name, cams, classes in columns:
        correct = sum(int(k) == int(t) for k, t in zip(classes, labels))
        lines.append(f"| {name} | {correct}/{n} | {statistics.fmean(on_item[name]):.3f} |")
    return _common.write_report(
        stem, lines, png, "Grad-CAM grid",
        {"images": idx, "labels": [int(v) for v in labels],
         "models": {name: {"classes": [int(k) for k in classes], "cam_on_item": on_item[name]}
                    for name, _, classes in columns}},
    )


if __name__ == "__main__":
    main()
