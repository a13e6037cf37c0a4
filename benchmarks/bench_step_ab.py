"""A/B of the hybridvision package itself: the working copy against the package at another git revision, the same
model step timed alternately in two worker processes.

For changes to Python code (a block's forward, an autograd Function) on a machine whose speed drifts by more than
the few percent such a change is worth: each side runs in its own process (``src/`` of REV is exported with
``git archive`` and put first on that worker's ``PYTHONPATH``; its native kernels build into their own extension
directory), both build the same model with the same seed and input, and the driver asks them for one step at a
time, alternating the order (AB, BA, ...), so load hits both alike and only one side runs at any moment. Prints the
best step time of each, the ratio of the bests (base / work, > 1: the working copy is faster) and the median of
the per-round ratios. The step is ``bench_models.py``'s (training: batch 8, cross-entropy, AdamW; inference:
``fuse()`` + ``inference_mode``, batch 16) on hybridvision's ``coatnet_0`` with timm's paper-like choices.
Both sides use the working copy's ``bench_models.py``, so REV's package must provide what it imports.

    python benchmarks/bench_step_ab.py --base HEAD                    # uncommitted changes, training step
    python benchmarks/bench_step_ab.py --base HEAD~3 --mode infer --rounds 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def export_src(rev: str) -> Path:
    """``src/`` of git revision ``rev`` in a temporary folder (reused when it exists); returns the folder."""
    sha = subprocess.run(["git", "rev-parse", "--short=10", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()
    root = Path(tempfile.gettempdir()) / f"hv_step_ab_{sha}"
    if not (root / "src" / "hybridvision").is_dir():
        root.mkdir(exist_ok=True)
        tar = subprocess.run(["git", "archive", "--format=tar", sha, "src"], cwd=REPO, check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=tar, check=True)
    return root


def worker(args: argparse.Namespace) -> None:
    """One side: builds the step, warms it up, then times one step per line on stdin (prints seconds)."""
    import torch

    import hybridvision
    from bench_models import WARMUP, _coatnet0_paper_like, _inference_fn, _train_fn
    from hybridvision.engine.runtime import tune_cpu

    tune_cpu()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = _coatnet0_paper_like()
    x = torch.randn(args.batch, 3, args.size, args.size)
    step = _train_fn(model, x) if args.mode == "train" else _inference_fn(model, x)
    for _ in range(WARMUP):
        step()
    print(json.dumps({"package": str(Path(hybridvision.__file__).parent)}), flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        step()
        print(time.perf_counter() - t0, flush=True)


def start(args: argparse.Namespace, src: Path, ext_dir: Path | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(BENCH), os.environ.get("PYTHONPATH", "")]))
    if ext_dir is not None:  # the base's kernels must not overwrite the working copy's build (same extension name)
        env["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", args.mode, "--batch",
           str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"worker for {src} exited during set-up (exit code {proc.wait()}); see its error above")
    return proc, json.loads(line)["package"]


def step(proc: subprocess.Popen) -> float:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="git revision whose package is the baseline (e.g. HEAD)")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--rounds", type=int, default=12, help="timed steps per side (default 12)")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 for train, 16 for infer (bench_models)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch is None:
        args.batch = 8 if args.mode == "train" else 16
    if args.worker:
        worker(args)
        return
    if not args.base:
        ap.error("--base REV is required")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    base_src = export_src(args.base)
    base, base_pkg = start(args, base_src / "src", base_src / "torch_extensions")
    work, work_pkg = start(args, REPO / "src", None)
    print(f"base = {base_pkg} ({args.base}), work = {work_pkg}; {args.mode} step, batch {args.batch}, "
          f"{args.size} px, {args.threads} thread(s), {args.rounds} rounds")
    tb, tw, ratio = [], [], []
    for r in range(args.rounds):
        if r % 2 == 0:
            b, w = step(base), step(work)
        else:
            w, b = step(work), step(base)
        tb.append(b), tw.append(w), ratio.append(b / w)
        print(f"round {r + 1}: base {b:.3f} s, work {w:.3f} s, base / work {b / w:.3f}", flush=True)
    for proc in (base, work):
        proc.stdin.close()
        proc.wait()
    print(f"best: base {min(tb):.3f} s, work {min(tw):.3f} s; base / work {min(tb) / min(tw):.3f}x best, "
          f"{statistics.median(ratio):.3f}x paired median")


if __name__ == "__main__":
    main()
