"""Benchmark of hybridvision.ops.circular_conv against the official ParC formulation.

For each axis length L the input is (B, C, L, L) with B = 16 and C = 2688 / L (the ParC-ConvNeXt-XT stage widths
384 / 192 / 96 / 48 at L = 7 / 14 / 28 / 56, continued at constant C * L to 112 and 224), depthwise, fp32, along
the height (dim=2, the official ParC type 'H') and along the width (dim=3). Timed: the official-style reference
(``cat(x, x[:-1])`` + valid depthwise ``conv2d``), each method and ``auto``, forward (no grad) and forward+backward
(x and the kernel require grad), best of several interleaved runs, each timed call after up to three untimed calls of
the same function (:func:`timed_rounds`). The memory floor is (bytes in + bytes out) over the copy bandwidth, which
a 256 MiB ``Tensor.copy_`` measures beside each case's ``auto`` in the floor's rounds (:func:`floor_rounds`): one
phase after all the cases, each of its rounds timing every case's auto and, right beside it, the copy (the order
reversed every other round), so that a case's samples spread over the whole phase (about 18 s in a full run) instead
of the 1.5 s its rounds had when they ran right after the case, which one slow phase of this VM could cover whole
(2026-12-04 at b38ee61, Zen 4: the kernel's loops alone, one thread, in L1, took 0.295-0.402 ns per point in five
runs within a minute; scratch; six full runs that took the floor both ways in one process met it in 34 of 36 cells
this way, in 30 the old way: kernel log, session 30). A bandwidth taken once at the run's start could not see the
phase in which a case ran (68.0 GB/s in the run of 2026-12-02 at 541bcbc, whose last case's reference took 56 ms
against 37 ms in other runs). auto / floor is the best auto time of the case's rounds over the floor from its best
copy (the best of both spread over the same phase); in parentheses the median over the rounds of auto's time against
that round's copy. The copy's bandwidth depends on the pages torch's allocator uses (the header names them,
:func:`hybridvision.engine.runtime.large_tensor_pages`): with ``THP_MEM_ALLOC_ENABLE=1`` (2 MiB pages;
``THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_circular.py --threads 2``) it ran at 31.7-52.2 GB/s in a run on
2026-12-03 against 28.6-40.6 GB/s in the run before it on 4 KiB pages (``python
benchmarks/bench_circular.py --threads 2``; Zen 4 VM), a stricter floor.

Targets (forward, fp32): auto >= 3x the reference at L >= 56 and >= 1x at L <= 14, auto within 1.5x of the memory
floor at L >= 56; forward+backward: auto >= 2x the reference at L >= 56.

    python benchmarks/bench_circular.py            # full run (a few minutes), writes benchmarks/results/circular.*
    python benchmarks/bench_circular.py --quick    # two sizes, < 1 minute, writes benchmarks/results/circular_quick.*
    python benchmarks/bench_circular.py --threads 1 --clock cpu   # one thread, CPU time: robust to a loaded machine
    python benchmarks/bench_circular.py --batch 1  # single-image inference: writes benchmarks/results/circular_b1.*
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from hybridvision.engine.runtime import ENV_VAR, cpu_state, tune_cpu
from hybridvision.ops import native
from hybridvision.ops.circular import choose_method, circular_conv

BATCH = 16
C_TIMES_L = 2688  # 48 channels at 56, 384 at 7
METHODS = ("direct", "gemm", "fft", "native", "auto")  # "native" only where it builds and for float32
RESULTS = Path(__file__).resolve().parent / "results"
WARMUP, WARMUP_S = 3, 0.02  # untimed calls before each timed one: three, or fewer once they took 20 ms (timed_rounds)
# The floor's phase lasts this many times a case's budget per case (1.5 s a case in a full run) and runs at least
# this many times a case's minimum of rounds (10 in a full run).
FLOOR_BUDGET, FLOOR_REPS = 1.5, 2


def reference(x: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The official ParC op: cat(x, x[:-1]) along dim + valid depthwise conv2d. x: (B, C, H, W); weight: (C, 1, K)."""
    if dim == 2:
        return F.conv2d(torch.cat([x, x[:, :, :-1]], dim=2), weight.unsqueeze(3), groups=x.size(1))
    return F.conv2d(torch.cat([x, x[:, :, :, :-1]], dim=3), weight.unsqueeze(2), groups=x.size(1))


CLOCK: Callable[[], float] = time.perf_counter


def timed_rounds(fns: dict[str, Callable[[], object]], budget_s: float, min_reps: int, alternate: bool = False,
                 max_rounds: int = 200, between: Callable[[], object] | None = None, warmup: int = WARMUP,
                 warmup_s: float = WARMUP_S) -> dict[str, list[float]]:
    """Times in s (by :data:`CLOCK`) of each function per round: every round times every function (round-robin, so
    that machine load hits all alike; ``alternate``: in reversed order every other round), at least ``min_reps``
    rounds, more while ``budget_s`` lasts (at most ``max_rounds``). Each timed call directly follows untimed calls of
    the same function (``warmup`` of them, fewer once they have taken ``warmup_s``; at least one), so that every
    function is timed in the same state, with its own input and buffers in cache: timed right after a function that
    sweeps the caches, the same call is slower: before this rule, a full run of this script (2026-12-02) timed the
    native and the auto column, the same call, at 0.65 and 0.26 ms for L=14 along H (native came right after the FFT
    method, auto right after native). One untimed call does not always get there: right after a 256 MiB copy, the
    native kernel at L=56 and 112 (19 and 39 MB of input and output), 2 threads, ran 1.14-1.46x its steady time (back
    to back calls) when timed after one untimed call, 1.04-1.16x after two and 1.00-1.13x after three (2026-12-03,
    scratch; in a second run 1.03-1.09x after one, 0.97-1.04x after three). ``between``, if given, runs between the
    untimed calls and the timed one (untimed; e.g. a sweep of the caches, to time calls whose data comes from
    memory)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_reps or (time.perf_counter() - start < budget_s and rounds < max_rounds):
        for name in (names[::-1] if alternate and rounds % 2 else names):
            t_warm, calls = CLOCK(), 0
            while calls == 0 or (calls < warmup and CLOCK() - t_warm < warmup_s):
                fns[name]()
                calls += 1
            if between is not None:
                between()
            t0 = CLOCK()
            fns[name]()
            times[name].append(CLOCK() - t0)
        rounds += 1
    return times


def best_of(fns: dict[str, Callable[[], object]], budget_s: float, min_reps: int) -> dict[str, float]:
    """Best time in ms of each function over :func:`timed_rounds`."""
    return {k: min(v) * 1e3 for k, v in timed_rounds(fns, budget_s, min_reps).items()}


def copy_probe(mib: int = 256) -> tuple[Callable[[], object], int]:
    """A copy of ``mib`` MiB (far past the caches) and the bytes it moves (read + written): timed with a case's
    ``auto`` in the same rounds, its best time gives the copy bandwidth of the moment."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def floor_stats(auto_s: list[float], copy_s: list[float], nbytes: int, copy_bytes: int) -> dict[str, float]:
    """The memory floor of a case from the floor's rounds: ``auto_s`` / ``copy_s`` the times (s) of auto and of the
    copy in the same rounds, ``nbytes`` the case's bytes in + out, ``copy_bytes`` the copy's. Returns ``bw`` (bytes /
    s, from the best copy), ``floor`` (ms: nbytes at that bandwidth), ``floor_ratio`` (the best auto over the floor)
    and ``floor_median`` (the median over the rounds of auto over the time of nbytes at that round's copy)."""
    bw = copy_bytes / min(copy_s)
    return dict(bw=bw, floor=nbytes / bw * 1e3, floor_ratio=min(auto_s) * bw / nbytes,
                floor_median=statistics.median(a * copy_bytes / (c * nbytes) for a, c in zip(auto_s, copy_s)))


def run_case(length: int, dim: int, budget_s: float, min_reps: int, dtype: torch.dtype,
             batch: int = BATCH) -> tuple[dict, Callable[[], object]]:
    """One case's forward and forward+backward rounds. Returns its row (without the floor: :func:`floor_rounds`;
    ``nbytes``: what the forward reads and writes, x in and y out) and its auto forward for the floor's rounds (to
    be run without grad)."""
    g = torch.Generator().manual_seed(length * 10 + dim)
    c = C_TIMES_L // length
    x = torch.randn(batch, c, length, length, generator=g).to(dtype)
    w = (torch.randn(c, 1, length, generator=g) / length**0.5).to(dtype)
    fwd = {"reference": lambda: reference(x, w, dim)}
    methods = [m for m in METHODS if m != "native" or (dtype in (torch.float32, torch.float64) and native.available())]
    fwd.update({m: (lambda m=m: circular_conv(x, w, dim, method=m)) for m in methods})
    with torch.no_grad():
        t_fwd = best_of(fwd, budget_s, min_reps)

    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    gy = torch.randn(x.shape, generator=g).to(dtype)

    def train_step(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            fn(xg, wg).backward(gy)
            xg.grad = wg.grad = None

        return step

    bwd = {"reference": train_step(lambda a, b: reference(a, b, dim))}
    bwd.update({m: train_step(lambda a, b, m=m: circular_conv(a, b, dim, method=m)) for m in methods})
    t_bwd = best_of(bwd, budget_s, min_reps)
    with torch.no_grad():
        pick_fwd = choose_method(x, w, dim)
    pick_bwd = choose_method(xg, wg, dim)
    row = dict(L=length, C=c, dim=dim, fwd=t_fwd, bwd=t_bwd, pick_fwd=pick_fwd, pick_bwd=pick_bwd,
               nbytes=2 * x.numel() * x.element_size())  # x read, y written
    return row, fwd["auto"]


def floor_rounds(autos: list[Callable[[], object]], probe: tuple[Callable[[], object], int], budget_s: float,
                 min_reps: int) -> list[dict[str, list[float]]]:
    """The floor's phase: rounds that time each case's auto and the copy right beside it (``autos[i]`` then the
    copy, for every case in turn; every other round the whole order reversed), at least ``min_reps`` rounds, more
    while ``budget_s`` lasts. Returns per case the times in s of its auto and of its copies, in round order:
    ``{"auto": [...], "copy": [...]}`` (for :func:`floor_stats`)."""
    fns: dict[tuple[str, int], Callable[[], object]] = {}
    for i, fn in enumerate(autos):
        fns["auto", i], fns["copy", i] = fn, probe[0]
    t = timed_rounds(fns, budget_s, min_reps, alternate=True)
    return [{"auto": t["auto", i], "copy": t["copy", i]} for i in range(len(autos))]


def verdicts(r: dict) -> list[str]:
    """PASS / MISS / '-' (target does not apply) for the four targets."""
    length, f, b = r["L"], r["fwd"], r["bwd"]
    sp_f, sp_b, fl = f["reference"] / f["auto"], b["reference"] / b["auto"], r["floor_ratio"]
    big, small = length >= 56, length <= 14

    def v(applies: bool, ok: bool) -> str:
        return ("PASS" if ok else "MISS") if applies else "-"

    return [v(big, sp_f >= 3), v(small, sp_f >= 1), v(big, fl <= 1.5), v(big, sp_b >= 2)]


def ms(v: float) -> str:
    """A time in ms: two decimals from 1 ms, three significant digits below (batch-1 cases take microseconds)."""
    return f"{v:.2f}" if v >= 1 else f"{v:#.3g}"


def table(rows: list[dict]) -> list[str]:
    methods = [m for m in METHODS if m != "auto" and m in rows[0]["fwd"]]
    head = (
        f"| L | C | dim | pass | reference | {' | '.join(methods)} | auto (pick) | copy GB/s | floor | auto speed-up "
        "| auto / floor (median) | >=3x (L>=56) | >=1x (L<=14) | <=1.5x floor | fwd+bwd >=2x |"
    )
    lines = [head, "|" + "---|" * (14 + len(methods))]
    for r in rows:
        v = verdicts(r)
        for kind in ("fwd", "bwd"):
            t = r[kind]
            pick = r["pick_" + kind]
            floor = f"{r['bw'] / 1e9:.1f} | {ms(r['floor'])}" if kind == "fwd" else " | "
            ratio = f"{r['floor_ratio']:.2f} ({r['floor_median']:.2f})" if kind == "fwd" else ""
            checks = v[:3] + [""] if kind == "fwd" else ["", "", "", v[3]]
            lines.append(
                f"| {r['L']} | {r['C']} | {r['dim']} | {'fwd' if kind == 'fwd' else 'fwd+bwd'} "
                f"| {ms(t['reference'])} | " + "".join(f"{ms(t[m])} | " for m in methods) +
                f"{ms(t['auto'])} ({pick}) | {floor} | {t['reference'] / t['auto']:.2f}x | {ratio} | "
                + " | ".join(checks)
                + " |"
            )
    return lines


def plot(rows: list[dict], path: Path, clock: str, dtype: str, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for i, dim in enumerate((2, 3)):
        sub = [r for r in rows if r["dim"] == dim]
        ls = [r["L"] for r in sub]
        for j, kind in enumerate(("fwd", "bwd")):
            ax = axes[j][i]
            for name in ("reference", *[m for m in METHODS if m in sub[0][kind]]):
                ax.plot(ls, [r[kind][name] for r in sub], marker="o", label=name, lw=2.5 if name == "auto" else 1.2)
            if kind == "fwd":
                ax.plot(ls, [r["floor"] for r in sub], "k--", label="memory floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ls, [str(v) for v in ls])
            axis, what = "H" if dim == 2 else "W", "forward" if kind == "fwd" else "forward+backward"
            ax.set_title(f"dim={dim} ({axis}), {what}")
            ax.set_xlabel("L (kernel = axis length)")
            ax.set_ylabel("ms (best of runs)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"circular_conv, B={batch}, C={C_TIMES_L}/L, {dtype}, {torch.get_num_threads()} thread(s), {clock} time"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="L in {14, 56}, few runs (< 1 minute)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the markdown table and the PNG")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: process CPU time, needs --threads 1 -- robust on a loaded machine",
    )
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--batch", type=int, default=BATCH, help=f"B of every case (default {BATCH}; the targets are for it)")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch must be a positive number of samples, got {args.batch}")
    tune_cpu()  # HYBRIDVISION_MALLOC_TUNING=0 keeps glibc's defaults
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            ap.error("--clock cpu sums the CPU time of all threads; use it with --threads 1")
        global CLOCK
        CLOCK = time.process_time
    lengths = (14, 56) if args.quick else (7, 14, 28, 56, 112, 224)
    budget_s, min_reps = (0.3, 3) if args.quick else (1.0, 5)

    t_start = time.perf_counter()
    load = os.getloadavg()
    probe = copy_probe()
    rows, autos = [], []
    for length in lengths:
        for dim in (2, 3):
            row, auto = run_case(length, dim, budget_s, min_reps, getattr(torch, args.dtype), args.batch)
            rows.append(row)
            autos.append(auto)
            print(f"  L={length} dim={dim} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    t_floor = time.perf_counter()
    with torch.no_grad():
        floors = floor_rounds(autos, probe, FLOOR_BUDGET * budget_s * len(rows), FLOOR_REPS * min_reps)
    for row, fl in zip(rows, floors):
        row.update(floor_stats(fl["auto"], fl["copy"], row["nbytes"], probe[1]))
    n_rounds, floor_s = len(floors[0]["auto"]), time.perf_counter() - t_floor
    print(f"  the floor's rounds done: {n_rounds} in {floor_s:.0f} s ({time.perf_counter() - t_start:.0f} s)")
    lines = table(rows)
    stem = ("circular_quick" if args.quick else "circular") + ("" if args.dtype == "float32" else f"_{args.dtype}")
    stem += "" if args.batch == BATCH else f"_b{args.batch}"
    # the environment variables that change the memory system's settings (large_tensor_pages, tune_cpu), as set
    env = [f"{k}={os.environ[k]}" for k in ("THP_MEM_ALLOC_ENABLE", ENV_VAR) if k in os.environ]
    cmd = " ".join(env + ["python benchmarks/bench_circular.py"]) + (" --quick" if args.quick else "")
    cmd += f" --threads {args.threads}" if args.threads is not None else ""
    cmd += " --clock cpu" if args.clock == "cpu" else ""
    cmd += f" --dtype {args.dtype}" if args.dtype != "float32" else ""
    cmd += f" --batch {args.batch}" if args.batch != BATCH else ""
    header = [
        f"# circular_conv benchmark ({'quick' if args.quick else 'full'})",
        "",
        f"Command: `{cmd}`. Times in ms ({'process CPU time' if args.clock == 'cpu' else 'wall clock'}), best of "
        f"interleaved runs; B={args.batch}, C={C_TIMES_L}/L, depthwise, {args.dtype}.",
        f"Machine: {platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; "
        f"{cpu_state()}; copy bandwidth (read + write) {min(r['bw'] for r in rows) / 1e9:.1f}-"
        f"{max(r['bw'] for r in rows) / 1e9:.1f} GB/s (a 256 MiB copy_ timed beside each case's auto in the floor's "
        f"rounds, {n_rounds} rounds over {floor_s:.0f} s after all the cases, every round visiting every case: "
        "column copy GB/s).",
        "floor = (bytes in + bytes out) / that case's copy bandwidth. speed-up = reference / auto. auto / floor: the "
        "best auto of the floor's rounds over the floor from the case's best copy (in parentheses: the median over "
        "those rounds of auto against the same round's copy). "
        "Targets: fwd auto >= 3x reference at L >= 56, >= 1x at L <= 14, <= 1.5x floor at L >= 56; "
        "fwd+bwd >= 2x reference at L >= 56."
        + ("" if args.batch == BATCH else f" (The targets are set for B={BATCH}: here the verdicts are for reference; "
           "the floor assumes x and y in memory, where at this batch they stay in cache.)"),
        "",
    ]
    text = "\n".join(header + lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(text)
    plot(rows, args.out / f"{stem}.png", args.clock, args.dtype, args.batch)
    print(f"wrote {args.out / (stem + '.md')} and {stem}.png in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
