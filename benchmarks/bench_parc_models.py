"""Latency overhead of the ParC models over their bases, CPU fp32, in one run with alternating A/B timing.

Pairs (base -> ParC, target overhead):
  convnext_xt -> parc_convnext_xt (<= +3%), convnext_xt -> fast_parc_convnext_xt (goal <= +15%, reported),
  mobilenetv2_100 -> parc_mobilenetv2 (<= +12%), resnet50 -> parc_resnet50 (<= +3%),
  vit_tiny_patch16_224 -> parcify(vit_tiny_patch16_224) (the ViT turned pure ConvNet, reported),
  mobilevit_s -> parc_net_s (reported; 256 px).
Each pair is timed in the same process, A and B alternating round by round (AB, BA, AB, ...); the result is the
median over rounds of the paired ratio B / A. Params and MACs per image (tools.profile.count_macs, FFT ops
included) beside it.
The ParC ConvNet rows are also timed with each circular_conv method forced (parc_method=...).

    python benchmarks/bench_parc_models.py            # batch 16, 7 rounds -> benchmarks/results/parc_models.md + .png
    python benchmarks/bench_parc_models.py --quick    # batch 8, 3 rounds, no method sweep (a smoke run)
    python benchmarks/bench_parc_models.py --threads 1  # fix the intra-op threads (recommended on a shared machine)
    python benchmarks/bench_parc_models.py --no-sweep --rounds 15 --only parc_resnet50  # one pair, method auto
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import timm

import hybridvision.models.parc_convnets  # noqa: F401  (registers the models)
import hybridvision.models.parc_net  # noqa: F401
from hybridvision.models.convert import parcify
from hybridvision.engine.runtime import cpu_state, tune_cpu
from hybridvision.ops import native
from hybridvision.tools.profile import count_macs

RESULTS = Path(__file__).resolve().parent / "results"

# label, base name, ParC factory name (or "parcify:<base>"), input size, target overhead (None = report only)
PAIRS: list[tuple[str, str, str, int, Optional[float]]] = [
    ("ParC-ConvNeXt-XT", "convnext_xt", "parc_convnext_xt", 224, 0.03),
    ("Fast-ParC-ConvNeXt-XT (ParC everywhere)", "convnext_xt", "fast_parc_convnext_xt", 224, 0.15),
    ("ParC-MobileNetV2", "mobilenetv2_100", "parc_mobilenetv2", 224, 0.12),
    ("ParC-ResNet50", "resnet50", "parc_resnet50", 224, 0.03),
    ("ViT-Ti -> ParC ConvNet (parcify)", "vit_tiny_patch16_224", "parcify:vit_tiny_patch16_224", 224, None),
    ("ParC-Net-S vs MobileViT-S", "mobilevit_s", "parc_net_s", 256, None),
]
METHOD_SWEEP = ["parc_convnext_xt", "fast_parc_convnext_xt", "parc_mobilenetv2", "parc_resnet50"]


def build(name: str, **kwargs) -> nn.Module:
    """A model in eval mode, random init (no downloads); ``parcify:<name>`` converts timm's ``<name>``."""
    torch.manual_seed(0)
    if name.startswith("parcify:"):
        return parcify(timm.create_model(name.split(":", 1)[1], **kwargs)).eval()
    return timm.create_model(name, **kwargs).eval()


def time_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int, warmup: int) -> tuple[float, float, float]:
    """Time ``a`` and ``b`` on ``x: (B, C, H, W)``, alternating A/B every round (ABBA order).

    Returns:
        median seconds of ``a``, median seconds of ``b``, and the median over rounds of the paired ratio
        ``t_b / t_a`` (each pair measured back to back, so slow drifts of a shared machine cancel).
    """
    ta: list[float] = []
    tb: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            a(x)
            b(x)
        for r in range(rounds):
            for m, out in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
                t0 = time.perf_counter()
                m(x)
                out.append(time.perf_counter() - t0)
    ratio = statistics.median(tb_i / ta_i for ta_i, tb_i in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), ratio


def params_m(m: nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def macs_g(m: nn.Module, size: int) -> float:
    return count_macs(m, (1, 3, size, size)) / 1e9


def verdict(overhead: float, target: Optional[float]) -> str:
    if target is None:
        return "report"
    return "PASS" if overhead <= target else "MISS"


def run(
    batch: int, rounds: int, warmup: int, sweep: bool, log: Callable[[str], None], only: Optional[list[str]] = None,
    img_size: Optional[int] = None,
) -> list[dict]:
    """Time every pair (``only``: these ParC models); ``img_size`` replaces each pair's input size, and then the
    targets (set for the models' own sizes) become reports."""
    rows = []
    for label, base_name, parc_name, size, target in PAIRS:
        if only and parc_name not in only:
            continue
        if img_size is not None and img_size != size:
            size, target = img_size, None
        base, parc = build(base_name), build(parc_name)
        x = torch.randn(batch, 3, size, size)
        t_base, t_parc, ratio = time_pair(base, parc, x, rounds, warmup)
        row = dict(
            label=label, base=base_name, parc=parc_name, method="auto", size=size, target=target,
            base_params=params_m(base), parc_params=params_m(parc), base_macs=macs_g(base, size),
            parc_macs=macs_g(parc, size), base_ms=t_base * 1e3, parc_ms=t_parc * 1e3,
        )
        row["ratio"] = ratio
        row["verdict"] = verdict(row["ratio"] - 1, target)
        rows.append(row)
        log(f"{label:42s} {base_name:>22s} {t_base * 1e3:9.1f} ms  {parc_name:>30s} {t_parc * 1e3:9.1f} ms  "
            f"ratio {row['ratio']:.3f}  {row['verdict']}")
        if sweep and parc_name in METHOD_SWEEP:
            for method in ("direct", "gemm", "fft", *(("native",) if native.available() else ())):
                forced = build(parc_name, parc_method=method)
                t_base_m, t_m, ratio_m = time_pair(base, forced, x, rounds, warmup)
                r = dict(row, method=method, base_ms=t_base_m * 1e3, parc_ms=t_m * 1e3, ratio=ratio_m)
                r["verdict"] = verdict(r["ratio"] - 1, target)
                rows.append(r)
                log(f"{'  method=' + method:42s} {base_name:>22s} {t_base_m * 1e3:9.1f} ms  "
                    f"{parc_name:>30s} {t_m * 1e3:9.1f} ms  ratio {r['ratio']:.3f}  {r['verdict']}")
        del base, parc
    return rows


def to_markdown(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# ParC models: latency overhead over the base (CPU fp32)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, {cpu_state()}, batch {args.batch}, {args.rounds} alternating rounds "
        f"(median), {args.warmup} warm-up.  ",
        "Ratio = median over rounds of the paired ParC / base latency (measured back to back in the same run); "
        "ms = median per model. Params in M; MACs in G per image "
        "(tools.profile.count_macs, FFT ops counted).",
        "",
        "| pair | px | method | base | params | MACs | ms | ParC model | params | MACs | ms | ratio | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = f"<= {1 + r['target']:.2f}" if r["target"] is not None else "-"
        lines.append(
            f"| {r['label']} | {r['size']} | {r['method']} | {r['base']} | {r['base_params']:.2f} | {r['base_macs']:.2f} | "
            f"{r['base_ms']:.1f} | {r['parc']} | {r['parc_params']:.2f} | {r['parc_macs']:.2f} | {r['parc_ms']:.1f} | "
            f"{r['ratio']:.3f} | {target} | {r['verdict']} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto = [r for r in rows if r["method"] == "auto"]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(auto) + 1.5))
    labels = [r["label"] for r in auto]
    over = [100 * (r["ratio"] - 1) for r in auto]
    colors = ["tab:gray" if r["verdict"] == "report" else ("tab:green" if r["verdict"] == "PASS" else "tab:red")
              for r in auto]
    ax.barh(labels, over, color=colors)
    for i, r in enumerate(auto):
        if r["target"] is not None:
            ax.plot([100 * r["target"]] * 2, [i - 0.4, i + 0.4], "k--")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("latency overhead over the base, % (dashed: target)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 8, 3 rounds, 1 warm-up, no method sweep")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--no-sweep", action="store_true", help="time each ParC model with method='auto' only")
    p.add_argument("--only", nargs="+", metavar="PARC_NAME", help="only these ParC models (third column of PAIRS)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input size for every pair instead of its own (224 / 256); targets then become reports")
    p.add_argument("--out", type=Path, default=RESULTS / "parc_models.md")
    args = p.parse_args(argv)
    tune_cpu()  # both models alike; HYBRIDVISION_MALLOC_TUNING=0 keeps glibc's defaults
    if args.quick:
        args.batch, args.rounds, args.warmup = 8, 3, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    print(f"# {command}  (batch {args.batch}, {torch.get_num_threads()} threads)")
    rows = run(args.batch, args.rounds, args.warmup, sweep=not (args.quick or args.no_sweep), log=print, only=args.only,
               img_size=args.img_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_markdown(rows, args, command))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
