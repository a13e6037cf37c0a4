"""Model speed against a timm anchor, CPU fp32, same input, same run, alternating A/B.

Each row of ``ROWS`` is (name, build the model under test, build its anchor). For every row the script times
inference (eval, ``torch.inference_mode``, batch 16 at 224 by default) and one training step (train mode,
cross-entropy, AdamW, batch 8), the two models alternating round by round (AB, BA, AB, ...) so machine load hits
both alike; img/s come from each model's best round (load only slows a run down), the speed-up is the ratio of the
best times, and the median of the per-round paired ratios is printed beside it. MFU =
achieved FLOP/s (FLOPs per image from ``hybridvision.tools.profile.count_flops``) over the fp32 matmul peak measured
in the same run: the larger of ``torch.mm`` and oneDNN's GEMM (the kernel of the fused inference path;
``tools.profile.gemm_peaks``), so the fast path cannot flatter its own MFU.

CoAtNet rows: hybridvision ``coatnet_0`` with timm's paper-like choices (``stride_mode="dw", pool="avg"``) against
timm ``coatnet_0_224`` (same architecture: stem, MBConv with stride on the depthwise conv, avg-pool shortcuts,
relative-bias attention, 25M params), both with stochastic depth 0.2 (:data:`COATNET0_DROP_PATH`); ours runs
channels-last with SDPA and the cached bias, and for inference ``fuse()`` (BatchNorm folded into the convs, same
outputs). The anchor is run as timm ships it (NCHW) and, as a
second anchor row, in channels-last. ``--compile`` adds rows with both models of the first pair under
``torch.compile`` (opt-in, measured separately; written to ``models_compile.md``).
Other families append their (name, model, anchor) rows to ``ROWS``.

    python benchmarks/bench_models.py             # 5 rounds -> benchmarks/results/models.md + models.png
    python benchmarks/bench_models.py --quick     # 2 rounds, inference batch 8 (< 2 min) -> models_quick.md
    python benchmarks/bench_models.py --compile   # + torch.compile rows -> models_compile.md
    python benchmarks/bench_models.py --adamw fused   # fused AdamW for both models -> models_adamw_fused.md

The process runs with ``hybridvision.engine.runtime.tune_cpu()`` (both models alike; the header says
so); ``HYBRIDVISION_MALLOC_TUNING=0`` keeps glibc's malloc defaults.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import hybridvision
from hybridvision.engine.runtime import cpu_state, tune_cpu
from hybridvision.tools.profile import count_flops, gemm_peaks

RESULTS = Path(__file__).resolve().parent / "results"
Builder = Callable[[], nn.Module]


COATNET0_DROP_PATH = 0.2
"""Stochastic depth of both CoAtNet-0s: the paper's value (Table 10) and hybridvision's default; timm's
``coatnet_0_224`` ships without it, which would leave the anchor's training step 18 DropPath passes short."""


def _coatnet0_paper_like() -> nn.Module:
    return hybridvision.create_model("coatnet_0", stride_mode="dw", pool="avg", drop_path_rate=COATNET0_DROP_PATH)


def _timm_coatnet0() -> nn.Module:
    return timm.create_model("coatnet_0_224", drop_path_rate=COATNET0_DROP_PATH)


def _timm_coatnet0_cl() -> nn.Module:
    return _timm_coatnet0().to(memory_format=torch.channels_last)


TARGETS = {"inference": 1.5, "train step": 1.3}
"""Speed-up targets of the CoAtNet rows (issue 3: inference >= 1.5x timm's img/s, a training step >= 1.3x). The
table prints the MFU each target asks of our model in that run: (our FLOPs/img) x target x (anchor img/s) / peak."""

# (row name, model under test, anchor). "fuse" rows call .fuse() on the model for inference.
ROWS: list[tuple[str, Builder, Builder]] = [
    ("coatnet_0 (dw, avg) vs timm coatnet_0_224", _coatnet0_paper_like, _timm_coatnet0),
    ("coatnet_0 (dw, avg) vs timm coatnet_0_224 channels_last", _coatnet0_paper_like, _timm_coatnet0_cl),
]


def _inference_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.eval()
    if hasattr(model, "fuse"):
        model.fuse()

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


ADAMW_IMPLS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
"""``torch.optim.AdamW`` implementations (``--adamw``); "for-loop" is torch's default for CPU parameters."""


def _train_fn(model: nn.Module, x: torch.Tensor, adamw: str = "for-loop") -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **ADAMW_IMPLS[adamw])
    y = torch.randint(0, 1000, (x.shape[0],))

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


WARMUP = 3
"""Untimed calls of each side before the rounds: the first training steps of a model still grow the heap and fault
fresh pages in (two runs of ``python benchmarks/profile_train_step.py``: 29,698 and 3 minor faults in our third
step, 47,040 and 0 in timm's)."""


def paired(fn_a: Callable[[], None], fn_b: Callable[[], None], rounds: int) -> tuple[float, float, float]:
    """Alternating A/B timing after :data:`WARMUP` untimed calls of each. Returns (best s of A, best s of B, median of
    the paired ratios A/B).

    Best-of (not median) for the absolute numbers: load on a shared machine only ever slows a run down.
    """
    for _ in range(WARMUP):
        fn_a(), fn_b()
    ta, tb, ratio = [], [], []
    for r in range(rounds):
        order = [(0, fn_a), (1, fn_b)] if r % 2 == 0 else [(1, fn_b), (0, fn_a)]
        t = [0.0, 0.0]
        for i, fn in order:
            t0 = time.perf_counter()
            fn()
            t[i] = time.perf_counter() - t0
        ta.append(t[0]), tb.append(t[1]), ratio.append(t[0] / t[1])
    return min(ta), min(tb), statistics.median(ratio)


def bench_row(
    name: str, make_model: Builder, make_anchor: Builder, *, infer_batch: int, train_batch: int, size: int,
    rounds: int, peak: float, compile_model: bool = False, adamw: str = "for-loop",
) -> list[dict]:
    """Time one (model, anchor) pair for inference and a training step; returns one dict per mode."""
    out = []
    for mode, batch in (("inference", infer_batch), ("train step", train_batch)):
        torch.manual_seed(0)
        model, anchor = make_model(), make_anchor()
        x = torch.randn(batch, 3, size, size)
        flops_img = count_flops(model, (1, 3, size, size), train=mode != "inference")
        flops_anchor = count_flops(anchor, (1, 3, size, size), train=mode != "inference")
        if mode == "inference":
            fn_m, fn_a = _inference_fn(model, x), _inference_fn(anchor, x)
        else:  # the same optimizer for both
            fn_m, fn_a = _train_fn(model, x, adamw), _train_fn(anchor, x, adamw)
        if compile_model:  # both sides; after fuse(): compile the inference graph that will run
            for m in (model, anchor):
                m.forward = torch.compile(m.forward)  # type: ignore[method-assign]
        t_anchor, t_model, paired_ratio = paired(fn_a, fn_m, rounds)
        out.append(dict(
            row=name + (" [torch.compile, both]" if compile_model else ""), mode=mode, batch=batch,
            anchor_ips=batch / t_anchor, model_ips=batch / t_model, speedup=t_anchor / t_model,
            paired=paired_ratio,
            mfu=flops_img * batch / t_model / peak, gflops_img=flops_img / 1e9,
            anchor_mfu=flops_anchor * batch / t_anchor / peak,
            target=TARGETS[mode] if name.startswith("coatnet") else None,
        ))
        if out[-1]["target"]:
            out[-1]["target_mfu"] = flops_img * out[-1]["target"] * batch / t_anchor / peak
        print(f"{out[-1]['row']:60s} {mode:10s} b={batch:2d} anchor {batch / t_anchor:6.2f} img/s  "
              f"ours {batch / t_model:6.2f} img/s  x{t_anchor / t_model:.2f} (paired median x{paired_ratio:.2f})  "
              f"MFU {out[-1]['mfu'] * 100:.0f}% (anchor {out[-1]['anchor_mfu'] * 100:.0f}%"
              + (f"; x{out[-1]['target']:.1f} needs {out[-1]['target_mfu'] * 100:.0f}%)" if out[-1]["target"] else ")"),
              flush=True)
        del model, anchor, fn_m, fn_a
    return out


def write(rows: list[dict], peaks: tuple[float, float], cmd: str, path: Path, adamw: str) -> None:
    mm_peak, dnn_peak = peaks
    peak = max(peaks)
    lines = [
        "# Model speed vs timm (CPU fp32, same run, alternating A/B)", "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_state()}. fp32 matmul peak measured in this run: torch.mm {mm_peak / 1e9:.1f}, "
        f"oneDNN GEMM {dnn_peak / 1e9:.1f} GFLOP/s; MFU is against the larger ({peak / 1e9:.1f}).  ",
        "MFU = FLOPs/img (torch.utils.flop_counter, train = forward+backward) x img/s / peak. "
        f"Training step: cross-entropy + torch.optim.AdamW ({adamw} implementation), the same for both models.", "",
        "img/s from the best round of each model; speed-up = ratio of the best times; paired = median over rounds "
        "of the per-round ratio (A and B timed back to back). target: the speed-up asked of the row (issue 3); "
        "MFU at target: the MFU our model would need to run at that speed-up in this run "
        "(our FLOPs/img x target x anchor img/s / peak).", "",
        "| row | mode | batch | anchor img/s | ours img/s | speed-up | paired | GFLOPs/img | MFU | anchor MFU "
        "| target | MFU at target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = f"{r['target']:.1f}x | {r['target_mfu'] * 100:.0f}%" if r["target"] else "- | -"
        lines.append(
            f"| {r['row']} | {r['mode']} | {r['batch']} | {r['anchor_ips']:.2f} | {r['model_ips']:.2f} | "
            f"{r['speedup']:.2f}x | {r['paired']:.2f}x | {r['gflops_img']:.2f} | {r['mfu'] * 100:.0f}% | "
            f"{r['anchor_mfu'] * 100:.0f}% | {target} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
        labels = [f"{r['row']}\n{r['mode']}" for r in rows]
        ax.barh(labels, [r["speedup"] for r in rows], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("speed-up over the anchor (x)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    print(f"wrote {path.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds, inference batch 8, first row only (< 2 min)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models (opt-in)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--adamw", choices=tuple(ADAMW_IMPLS), default="for-loop",
                    help="AdamW implementation of the training step, both models (default: torch's CPU default)")
    args = ap.parse_args()
    tune_cpu()  # both models alike; HYBRIDVISION_MALLOC_TUNING=0 keeps glibc's defaults
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 5)
    infer_batch, train_batch = (8, 8) if args.quick else (16, 8)
    rows = ROWS[:1] if args.quick else ROWS
    peaks = gemm_peaks("cpu")
    mm_peak, dnn_peak = peaks["torch.mm"], peaks["oneDNN GEMM"]
    peak = max(mm_peak, dnn_peak)
    print(f"fp32 matmul peak: torch.mm {mm_peak / 1e9:.1f}, oneDNN GEMM {dnn_peak / 1e9:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads); MFU uses the larger")
    results = []
    for name, make_model, make_anchor in rows:
        results += bench_row(name, make_model, make_anchor, infer_batch=infer_batch, train_batch=train_batch,
                             size=args.size, rounds=rounds, peak=peak, adamw=args.adamw)
        if args.compile and name == rows[0][0]:  # the pair with the anchor as shipped
            results += bench_row(name, make_model, make_anchor, infer_batch=infer_batch, train_batch=train_batch,
                                 size=args.size, rounds=rounds, peak=peak, compile_model=True, adamw=args.adamw)
    cmd = "python benchmarks/bench_models.py" + "".join(
        f" {a}" for a, on in (("--quick", args.quick), ("--compile", args.compile)) if on
    ) + (f" --threads {args.threads}" if args.threads else "") + (f" --rounds {args.rounds}" if args.rounds else "") + (
        f" --adamw {args.adamw}" if args.adamw != "for-loop" else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = ("models_quick" if args.quick else "models") + ("" if args.adamw == "for-loop" else f"_adamw_{args.adamw}") \
        + ("_compile" if args.compile else "")
    write(results, (mm_peak, dnn_peak), cmd, RESULTS / stem, args.adamw)


if __name__ == "__main__":
    main()
