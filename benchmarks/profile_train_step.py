"""Where a CoAtNet-0 training step spends its time, op by op, ours vs timm (torch.profiler, CPU fp32).

Builds hybridvision ``coatnet_0(stride_mode="dw", pool="avg")`` and timm ``coatnet_0_224`` (the pair of
``bench_models.py``), runs ``--warmup`` steps (3) and one profiled step each (bench_models' training step: batch 8,
224 px, cross-entropy, AdamW) and prints the ops with the most self CPU time, plus the minor page faults of the last
warm-up step and of the profiled step.
Faults mark allocations that got fresh pages from the kernel: the op that first writes them pays for the faulting
(a 77 MB activation gradient is ~19k faults); with few faults in the warm-up step but thousands in the profiled one,
the profiler itself moved the heap and the times of the ops that allocate are inflated.
The process applies ``hybridvision.engine.runtime.tune_cpu()`` like the CLI; ``--keep-denormals`` then turns the
denormal flush off again, ``HYBRIDVISION_MALLOC_TUNING=0`` turns both settings off.

    python benchmarks/profile_train_step.py
    python benchmarks/profile_train_step.py --keep-denormals
"""
from __future__ import annotations

import argparse
import resource

import torch
from torch.profiler import ProfilerActivity, profile

from hybridvision.engine.runtime import cpu_state, tune_cpu

from bench_models import _coatnet0_paper_like, _timm_coatnet0, _train_fn  # the benchmark's pair and training step

MODELS = {"ours coatnet_0 (dw, avg)": _coatnet0_paper_like, "timm coatnet_0_224": _timm_coatnet0}


def profile_step(model: torch.nn.Module, batch: int, size: int, warmup: int):
    """``warmup`` unprofiled training steps, then one profiled step.

    Returns (profiler, minor page faults of the last warm-up step, minor page faults of the profiled step).
    """
    step = _train_fn(model, torch.randn(batch, 3, size, size))

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    warm_faults = 0
    for _ in range(warmup):
        f0 = faults()
        step()
        warm_faults = faults() - f0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        f0 = faults()
        step()
    return prof, warm_faults, faults() - f0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--top", type=int, default=12, help="ops listed per model")
    ap.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (the allocator settles)")
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormals (tune the allocator only)")
    args = ap.parse_args()
    tune_cpu()
    if args.keep_denormals:
        torch.set_flush_denormal(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_state()}; batch {args.batch}, "
          f"{args.size} px, one profiled step after {args.warmup} warm-up steps")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        prof, warm_faults, prof_faults = profile_step(build(), args.batch, args.size, args.warmup)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops) / 1e3
        print(f"\n== {name}: self CPU time {total:.0f} ms; minor page faults: {warm_faults} in the last warm-up step, "
              f"{prof_faults} in the profiled step")
        for e in ops[: args.top]:
            print(f"  {e.key:45s} {e.self_cpu_time_total / 1e3:9.1f} ms  {e.count:5d} calls")


if __name__ == "__main__":
    main()
