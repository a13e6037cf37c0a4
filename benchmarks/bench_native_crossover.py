"""Where the native kernel's FFT path overtakes its direct sum (sets FFT_MIN_K in ops/csrc/circular_cpu.cpp).

For each K of a sweep, input (B, C, K, K) with B = 16 and C = 2688 / K (as bench_circular.py), float32: the native
forward (``circular_dw_forward``) and weight gradient (``circular_dw_wgrad``) with the direct sum (algo=1) and with
the FFT (algo=2), along dim 2 and dim 3, best of interleaved runs. Prints and writes the table and, per op and dim,
the first K from which the FFT is faster at every larger K of the sweep.

    python benchmarks/bench_native_crossover.py   # under a minute; writes benchmarks/results/native_crossover.md
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from bench_circular import BATCH, C_TIMES_L, RESULTS, best_of
from hybridvision.engine.runtime import cpu_state, tune_cpu
from hybridvision.ops import native

SWEEP = (12, 14, 16, 20, 21, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 224)  # no prime factors above 7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for native_crossover.md")
    args = ap.parse_args()
    tune_cpu()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    native.build()
    load = os.getloadavg()
    t0 = time.perf_counter()
    rows, ratios = [], {}
    for k in SWEEP:
        g = torch.Generator().manual_seed(k)
        c = max(1, C_TIMES_L // k)
        x, gy = torch.randn(BATCH, c, k, k, generator=g), torch.randn(BATCH, c, k, k, generator=g)
        w, add = torch.randn(c, k, generator=g), torch.randn(c, k, generator=g)
        for dim in (2, 3):
            t = best_of({
                "fwd direct": lambda: native.forward(x, w, add, dim, 1),
                "fwd fft": lambda: native.forward(x, w, add, dim, 2),
                "wgrad direct": lambda: native.wgrad(gy, x, dim, 1),
                "wgrad fft": lambda: native.wgrad(gy, x, dim, 2),
            }, budget_s=1.5, min_reps=10)
            for op in ("fwd", "wgrad"):
                ratios[op, dim, k] = t[f"{op} direct"] / t[f"{op} fft"]
            rows.append(f"| {k} | {c} | {dim} | {t['fwd direct']:.2f} | {t['fwd fft']:.2f} | {ratios['fwd', dim, k]:.2f}x "
                        f"| {t['wgrad direct']:.2f} | {t['wgrad fft']:.2f} | {ratios['wgrad', dim, k]:.2f}x |")
            print(rows[-1], flush=True)
    cross = []
    for op in ("fwd", "wgrad"):
        for dim in (2, 3):
            first = None
            for k in reversed(SWEEP):
                if ratios[op, dim, k] <= 1:
                    break
                first = k
            cross.append(f"{op} dim {dim}: {first if first is not None else 'never in the sweep'}")
    text = "\n".join([
        "# native circular_conv: direct sum vs FFT",
        "",
        "Command: `python benchmarks/bench_native_crossover.py" + (f" --threads {args.threads}" if args.threads else "")
        + "`. Times in ms (wall clock), best of interleaved runs, each timed call after up to three untimed ones; "
        f"B={BATCH}, C={C_TIMES_L}/K, float32, with the (C, K) addend in the forward.",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; {cpu_state()}.",
        "",
        "| K | C | dim | forward direct | forward fft | fft speed-up | wgrad direct | wgrad fft | fft speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "First K from which the FFT is faster at every larger K of the sweep: " + "; ".join(cross) + ".",
        "",
    ])
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "native_crossover.md").write_text(text)
    print(f"wrote {args.out / 'native_crossover.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
