"""Effective receptive field: each ParC ConvNet vs the network it starts from (ParC paper's ERF claim).

Pairs: ConvNeXt-XT -> ParC-ConvNeXt-XT, ResNet50 -> ParC-ResNet50, MobileNetV2 (timm ``mobilenetv2_100``) ->
ParC-MobileNetV2. Protocol (RepLKNet, ``hybridvision.tools.erf``): last-stage feature map, ReLU'd centre pixel,
input gradient, ReLU, sum over channels, mean over images, ``log10(x + 1)``, normalised; area ratio at
t = 0.2 / 0.3 / 0.5 / 0.99 = the smallest centred square holding t of the total, over H*W. Goal of the issue:
area ratio at t=0.2 of each ParC model >= 3x its base.

Two modes:
  untrained (default): every model random-initialised with the same seed (``torch.manual_seed(seed)`` before
    each build), ParC models built with ``img_size`` = the analysis resolution so their kernels are global there;
    images: photos from ``skimage.data`` (16 photos, centre-square crop; image i >= 16 is a seeded random
    3/4-side crop of photo i mod 16), RGB, resized to ``--img-size``, ImageNet-normalised.
  trained (``--trained RUNS``): the weights of ``benchmarks/experiments/cluttered_parc_vs_base.py``
    (``RUNS/<model>/seed<k>/model.safetensors`` + ``config.json``), rebuilt at their training size; images:
    cluttered Fashion-MNIST test canvases (the data they were trained on), normalised as in training; with
    ``--img-size S`` larger canvases (items at their training scale, clutter scaled with the area), on which the
    trained ParC kernels are resized as everywhere else -- at the training size both ERFs already fill the canvas.

CPU budget, measured (2 threads): the paper protocol ``--num-images 50 --img-size 1024`` (3 pairs x 2 inits)
took 9 min 26 s wall (17-97 s per model, ResNet50 slowest; load 2, my compile jobs beside it); 16 images at
224 px took 1170 s on a machine loaded by other jobs (load 6-10); ``--smoke`` (ConvNeXt pair, 2 images, 64 px,
timm init) ~10-20 s. The trained mode takes seconds.

    python benchmarks/experiments/erf_parc_vs_base.py                       # untrained, 16 photos at 224 px
    python benchmarks/experiments/erf_parc_vs_base.py --num-images 50 --img-size 1024 --output \
        benchmarks/results/experiments/erf_parc_vs_base_1024                # the paper's protocol
    python benchmarks/experiments/erf_parc_vs_base.py --trained runs/cluttered_c --pairs mobilenetv2 --num-images 16 --threads 2
    python benchmarks/experiments/erf_parc_vs_base.py --smoke

Writes ``benchmarks/results/experiments/erf_parc_vs_base[_trained].md``, ``.png`` (heatmap grid) and ``.json``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import PAIRS, RESULTS, Timer  # noqa: E402

import timm  # noqa: E402

import hybridvision  # noqa: E402,F401  (registers the models)
from hybridvision.tools.erf import THRESHOLDS, normalise_erf, compute_erf, erf_area_ratios  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: photos bundled with scikit-image (no download); grayscale ones are repeated to RGB
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
    "immunohistochemistry", "camera", "coins", "moon", "brick", "grass", "gravel", "cell", "clock",
)
GOAL = 3.0


def skimage_photos(num_images: int, img_size: int, seed: int) -> list[torch.Tensor]:
    """``num_images`` ImageNet-normalised ``(3, img_size, img_size)`` float32 images from ``skimage.data``.

    Image ``i < 16``: centre-square crop of photo ``i``; ``i >= 16``: a random square crop (3/4 of the short side,
    position from ``seed`` and ``i``) of photo ``i mod 16``.
    """
    import skimage.data
    from PIL import Image

    if num_images < 1:
        raise ValueError(f"--num-images {num_images}: need at least 1")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_images):
        arr = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        arr = arr[0] if isinstance(arr, tuple) else arr
        arr = np.repeat(arr[..., None], 3, -1) if arr.ndim == 2 else arr[..., :3]
        h, w = arr.shape[:2]
        side = min(h, w) if i < len(PHOTOS) else (3 * min(h, w)) // 4
        y = (h - side) // 2 if i < len(PHOTOS) else int(rng.integers(0, h - side + 1))
        x = (w - side) // 2 if i < len(PHOTOS) else int(rng.integers(0, w - side + 1))
        im = Image.fromarray(np.ascontiguousarray(arr[y:y + side, x:x + side])).resize((img_size, img_size), Image.BICUBIC)
        t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((t - mean) / std)
    return out


def cluttered_canvases(num_images: int, img_size: int, in_chans: int, mean, std, seed: int,
                       canvas: int = 112) -> list[torch.Tensor]:
    """``num_images`` cluttered Fashion-MNIST test canvases, normalised as the trained models saw them
    (training ``mean``/``std``): ``(in_chans, img_size, img_size)`` float32.

    ``canvas`` != 112 composes larger canvases with the items at their training scale and the clutter count scaled
    with the area (6 patches per 112x112), so an ERF can be measured where the training canvas would not bound it.
    """
    from hybridvision.data.cluttered import ClutteredFashionMNIST
    from hybridvision.data.transforms import BatchTransform

    ds = ClutteredFashionMNIST("test", seed=seed, size=canvas, num_clutter=round(6 * (canvas / 112) ** 2))
    x, _ = ds.__getitems__(list(range(num_images)))
    x = BatchTransform(img_size, tuple(mean), tuple(std), in_chans, False)(x)
    return list(x)


#: ``--init active``: residual branches that start switched on (timm zero-inits ResNet's last BN gamma and
#: starts ConvNeXt's layer scale at 1e-6, so at init the blocks, ParC or not, hardly touch the ERF)
ACTIVE_INIT = {"convnext_xt": {"ls_init_value": 1.0}, "resnet50": {"zero_init_last": False}}


def build_untrained(name: str, img_size: int, seed: int, init: str = "timm") -> nn.Module:
    """``name`` random-initialised after ``torch.manual_seed(seed)``; ParC models sized for ``img_size``.

    ``init="timm"``: the architecture's own init; ``"active"``: :data:`ACTIVE_INIT` (same for base and ParC).
    """
    torch.manual_seed(seed)
    kwargs = {"img_size": img_size} if name.startswith("parc_") else {}
    if init == "active":
        kwargs.update(ACTIVE_INIT.get(name.removeprefix("parc_"), {}))
    return timm.create_model(name, **kwargs).eval()


def build_trained(runs: Path, name: str, seed: int) -> tuple[nn.Module, dict]:
    """The final weights of ``runs/<name>/seed<seed>`` (written by ``cluttered_parc_vs_base.py``) and their config."""
    from hybridvision.engine.checkpoint import load_final, load_model_state
    from hybridvision.engine.trainer import build_model

    folder = runs / name / f"seed{seed}"
    state, cfg = load_final(folder)
    model = build_model(name, cfg["num_classes"], cfg["in_chans"], cfg["img_size"])
    load_model_state(model, state, folder / "model.safetensors")
    return model.eval(), cfg


def plot_grid(rows: list[list[tuple[str, np.ndarray, dict]]], path: Path, title: str) -> Path:
    """A grid of normalised log-ERF heatmaps: ``rows[r] = [(panel title, (H, W) raw map, area ratios), ...]``."""
    plt = _common.pyplot()
    ncols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.8 * ncols, 3.8 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (name, erf, ar) in enumerate(row):
            ax = axes[r, c]
            im = ax.imshow(normalise_erf(erf), cmap="RdYlGn", vmin=0, vmax=1)
            ax.set_title(f"{name}\nt=0.2: {ar['0.2']:.4f}   t=0.99: {ar['0.99']:.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=10, wrap=True)  # a one-pair figure is too narrow for the title on one line
    return _common.save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS), help="which base/ParC pairs")
    p.add_argument("--img-size", type=int, default=None,
                   help="analysis resolution: untrained mode photos (default 224); with --trained, the cluttered "
                        "canvas size (default: the training size; larger canvases keep the items' scale)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="init seed of every model (untrained) and crop seed")
    p.add_argument("--inits", nargs="+", default=["timm", "active"], choices=["timm", "active"],
                   help="untrained mode: timm's init and/or residual branches switched on (see ACTIVE_INIT)")
    p.add_argument("--trained", type=Path, default=None,
                   help="RUNS folder of cluttered_parc_vs_base.py: use RUNS/<model>/seed<k> weights")
    p.add_argument("--trained-seed", type=int, default=1, help="which training seed's weights (with --trained)")
    _common.add_run_args(p, output="erf_...", smoke="ConvNeXt pair, 2 images, 64 px, timm init (< 60 s)")
    a = p.parse_args(argv)
    if a.smoke:
        a.pairs, a.num_images, a.img_size, a.inits = ["convnext"], 2, 64, ["timm"]
    if a.img_size is None and not a.trained:
        a.img_size = 224
    _common.setup_process(a.threads)
    stem = a.output or RESULTS / ("erf_parc_vs_base" + ("_trained" if a.trained else "") + ("_smoke" if a.smoke else ""))
    timer = Timer()
    inits = ["trained"] if a.trained else a.inits

    maps: dict[tuple[str, str], np.ndarray] = {}
    image_cache: dict[tuple, list[torch.Tensor]] = {}
    images_desc = f"{a.num_images} skimage.data photos at {a.img_size} px, random init (seed {a.seed})"
    for init in inits:
        for key in a.pairs:
            for name in PAIRS[key][1:]:
                t = Timer()
                if a.trained:
                    model, cfg = build_trained(a.trained, name, a.trained_seed)
                    size = a.img_size or cfg["img_size"]
                    ck = (size, cfg["in_chans"], tuple(cfg["mean"]), tuple(cfg["std"]))
                    if ck not in image_cache:
                        image_cache[ck] = cluttered_canvases(a.num_images, *ck, seed=a.trained_seed, canvas=size)
                    imgs = image_cache[ck]
                    images_desc = (f"{a.num_images} cluttered Fashion-MNIST test canvases at {size} px (trained at "
                                   f"{cfg['img_size']} px; items at training scale), weights "
                                   f"{a.trained}/<model>/seed{a.trained_seed}")
                else:
                    model = build_untrained(name, a.img_size, a.seed, init)
                    if "photos" not in image_cache:
                        image_cache["photos"] = skimage_photos(a.num_images, a.img_size, a.seed)
                    imgs = image_cache["photos"]
                maps[init, name] = compute_erf(model, imgs)
                print(f"[{init}] {name}: ERF over {len(imgs)} images in {t.seconds:.1f}s", flush=True)

    ratios = {k: erf_area_ratios(m) for k, m in maps.items()}
    lines = [
        f"# ERF: ParC models vs their bases ({'trained on cluttered Fashion-MNIST' if a.trained else 'untrained'})",
        "",
        f"Command: `{_common.command_line()}`  ",
        f"Images: {images_desc}.  ",
        f"Machine: {_common.machine_line(timer)}.  ",
        "Protocol: RepLKNet (hybridvision.tools.erf): last-stage map, ReLU'd centre pixel's input gradient, ReLU, "
        "sum over channels, mean over images, log10(x+1), normalised. Area ratio at t = smallest centred square "
        "holding t of the total, over H*W (bigger = wider ERF).  ",
        "Init `timm`: each architecture's own init (ResNet's last BN gamma in each bottleneck is 0 and ConvNeXt's "
        "layer scale starts at 1e-6, so the residual branches, ParC or not, barely reach the ERF). Init `active`: "
        f"the same with those branches switched on ({ACTIVE_INIT}); MobileNetV2 has no such init.",
        "",
        "| init | model | " + " | ".join(f"t={t}" for t in THRESHOLDS) + " | ParC/base at t=0.2 | goal >= 3x |",
        "|---|---|" + "---|" * (len(THRESHOLDS) + 2),
    ]
    summary: dict = {}
    rows = []
    for key in a.pairs:
        label, base, parc = PAIRS[key]
        row = []
        for init in inits:
            rel = ratios[init, parc]["0.2"] / ratios[init, base]["0.2"]
            summary[f"{init}/{label}"] = {"base": base, "parc": parc, "ratio_t0.2": rel, "pass": rel >= GOAL}
            verdict = f"| **{rel:.2f}x** | {'PASS' if rel >= GOAL else 'FAIL'} |"
            for name, tail in ((base, "| - | - |"), (parc, verdict)):
                lines.append(f"| {init} | {name} | " + " | ".join(f"{ratios[init, name][str(t)]:.4f}" for t in THRESHOLDS)
                             + f" {tail}")
                row.append((f"{name} [{init}]", maps[init, name], ratios[init, name]))
        rows.append(row)
    png = plot_grid(rows, stem.with_suffix(".png"), images_desc)
    return _common.write_report(
        stem, lines, png, "ERF heatmaps",
        {"images": images_desc, "area_ratio": {f"{i}/{n}": r for (i, n), r in ratios.items()}, "pairs": summary,
         "seconds": timer.seconds},
    )


if __name__ == "__main__":
    main()
