"""A/B of the native circular-conv kernel: the working copy of ops/csrc/circular_cpu.cpp against the same file at
another git revision, both loaded in one process and timed interleaved.

On a noisy machine (a shared VM whose speed drifts by tens of percent between runs) two separate benchmark runs
cannot tell a 10-20% kernel change from the drift; round-robin timing in one process can. The base revision's file
is built (``hybridvision.ops.native.compile_and_load``, the kernels' own build) with its ops registered
as ``torch.ops.hvbase_<rev>.*`` instead of ``torch.ops.hybridvision.*``, so both versions coexist. Every case
first checks that the two give the same result (forward and weight gradient), then times them in rounds (each
round times both, in alternating order, each timed call right after an untimed call of the same function) and
reports the best time of each, their ratio base / working copy (> 1: the working copy is faster) and the median over
rounds of the per-round ratio. The median is the steadier of the two where the machine's speed drifts within a run:
both sides of a round see the same state (in the 2026-12-02 session's A/B runs the two differed by up to 0.05,
e.g. 1.08x by best times against 1.04x per-round median for one change at 56 x 56 along W).

Cases: input (B, C, K, other) along dim 2 or (B, C, other, K) along dim 3, B = 16 (``--batch``) and C = 2688 / K as
in bench_circular.py, float32, with the (C, K) addend. ``--algo`` 0 is what ``method="native"`` runs (the kernel's own
choice between direct sum and FFT), 1 the direct sum, 2 the FFT. ``--cold`` reads a buffer of 3x the L3 size
(96 MiB) before each timed call, so that x comes from memory and y's lines are not in cache (the regime of a layer
whose input was written long before; a change of the kernel's prefetches can look better or worse there than warm:
2026-12-02).

    python benchmarks/bench_native_ab.py --base HEAD                 # uncommitted changes vs the last commit
    python benchmarks/bench_native_ab.py --base HEAD~1 --cases 56x56 112x112 --algo 2
    python benchmarks/bench_native_ab.py --base HEAD~1 --cases 7x7 14x14 --batch 1   # single-image inference
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from bench_circular import BATCH, C_TIMES_L, timed_rounds
from hybridvision.engine.runtime import tune_cpu
from hybridvision.ops import native

REPO = Path(__file__).resolve().parent.parent
SOURCE = "src/hybridvision/ops/csrc/circular_cpu.cpp"
DEFAULT_CASES = ("56x56", "56x64", "112x112", "224x224", "48x48", "80x80")
COLD_MIB = 96  # --cold: MiB read between the untimed and the timed call (3x the 32 MiB L3 of the development VM)


def build_base(rev: str) -> object:
    """Builds ``SOURCE`` as of git revision ``rev`` under the op namespace ``hvbase_<sha>``; returns that namespace
    (``torch.ops.hvbase_<sha>``)."""
    sha = subprocess.run(["git", "rev-parse", "--short=10", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    text = subprocess.run(["git", "show", f"{sha}:{SOURCE}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout
    ns = f"hvbase_{sha}"
    marks = ("TORCH_LIBRARY(hybridvision,", "TORCH_LIBRARY_IMPL(hybridvision,")
    if not all(m in text for m in marks):
        raise SystemExit(f"{SOURCE} at {rev} does not register its ops with TORCH_LIBRARY(hybridvision, ...)")
    for m in marks:
        text = text.replace(m, m.replace("hybridvision", ns))
    folder = Path(tempfile.gettempdir()) / f"{ns}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    folder.mkdir(exist_ok=True)
    csrc = str(Path(SOURCE).parent)
    names = subprocess.run(["git", "ls-tree", "--name-only", sha, csrc + "/"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in (n for n in names if n.endswith(".h")):  # the headers it includes, as of that revision
        header = subprocess.run(["git", "show", f"{sha}:{name}"], cwd=REPO, check=True, capture_output=True,
                                text=True).stdout
        (folder / Path(name).name).write_text(header)
    (folder / "circular_cpu.cpp").write_text(text)
    native.compile_and_load(f"{ns}_ext", [str(folder / "circular_cpu.cpp")], build_directory=str(folder))
    return getattr(torch.ops, ns)


def parse_case(text: str) -> tuple[int, int]:
    try:
        k, other = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is KxOTHER, e.g. 56x56, got {text!r}") from None
    if k < 1 or other < 1:
        raise argparse.ArgumentTypeError(f"K and OTHER must be >= 1, got {text!r}")
    return k, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose kernel is the baseline (e.g. HEAD)")
    ap.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES],
                    metavar="KxOTHER", help=f"K (the conv axis) x the other axis (default: {' '.join(DEFAULT_CASES)})")
    ap.add_argument("--algo", type=int, choices=(0, 1, 2), default=0, help="0 choose (default), 1 direct, 2 FFT")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--batch", type=int, default=BATCH, help=f"B of every case (default {BATCH})")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per case and op (default 2)")
    ap.add_argument("--cold", action="store_true", help="sweep the caches before each timed call")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch must be a positive number of samples, got {args.batch}")
    tune_cpu()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    native.build()
    base, work = build_base(args.base), torch.ops.hybridvision
    sweep = torch.ones(COLD_MIB << 18) if args.cold else None
    swept = f", caches swept ({COLD_MIB} MiB read) before each timed call" if args.cold else ""
    print(f"base = {SOURCE} at {args.base}, work = the working copy; {torch.get_num_threads()} thread(s), "
          f"B={args.batch}, algo={args.algo}{swept}; ms, best of interleaved rounds; base / work of the best times "
          "and the median of the per-round ratios")
    print("| K | other | dim | op | base | work | base / work | per-round median |")
    print("|---|---|---|---|---|---|---|---|")
    for k, other in args.cases:
        c = max(1, C_TIMES_L // k)
        g = torch.Generator().manual_seed(k * 1000 + other)
        for dim in (2, 3):
            shape = (args.batch, c, k, other) if dim == 2 else (args.batch, c, other, k)
            x, gy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
            w, add = torch.randn(c, k, generator=g), torch.randn(c, k, generator=g)
            for op, call in (("fwd", lambda ns: ns.circular_dw_forward(x, w, add, dim, args.algo)),
                             ("wgrad", lambda ns: ns.circular_dw_wgrad(gy, x, dim, args.algo))):
                torch.testing.assert_close(call(work), call(base), rtol=1e-4, atol=1e-4 * k,
                                           msg=lambda m: f"K={k} other={other} dim={dim} {op}: results differ\n{m}")
                t = timed_rounds({"base": lambda: call(base), "work": lambda: call(work)}, args.budget, min_reps=10,
                                 alternate=True, max_rounds=400, between=sweep.sum if args.cold else None)
                tb, tw = t["base"], t["work"]
                median = statistics.median(b / w for b, w in zip(tb, tw))
                print(f"| {k} | {other} | {dim} | {op} | {min(tb) * 1e3:.3f} | {min(tw) * 1e3:.3f} | "
                      f"{min(tb) / min(tw):.2f}x | {median:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
