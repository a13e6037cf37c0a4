"""Where a CoAtNet-0 training step spends its time, op by op, ours vs timm (torch.profiler, CPU fp32).

Builds hybridvision ``coatnet_0(stride_mode="dw", pool="avg")`` and timm ``coatnet_0_224`` (the pair of
``bench_models.py``), runs one warm-up step and one profiled step each (batch 8, 224 px, cross-entropy, AdamW) and
prints the ops with the most self CPU time, plus GELU's backward per input shape (where denormal gradients show).
The process applies ``hybridvision.engine.runtime.tune_cpu()`` like the CLI; ``--keep-denormals`` then turns the
denormal flush off again, ``HYBRIDVISION_MALLOC_TUNING=0`` turns both settings off.

    python benchmarks/profile_train_step.py
    python benchmarks/profile_train_step.py --keep-denormals
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hybridvision
from hybridvision.engine.runtime import cpu_state, tune_cpu

MODELS = {
    "ours coatnet_0 (dw, avg)": lambda: hybridvision.create_model("coatnet_0", stride_mode="dw", pool="avg"),
    "timm coatnet_0_224": lambda: timm.create_model("coatnet_0_224"),
}


def profile_step(model: torch.nn.Module, batch: int, size: int):
    """One warm-up and one profiled training step; returns the profiler's key averages grouped by input shape."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--top", type=int, default=12, help="ops listed per model")
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush denormals (tune the allocator only)")
    args = ap.parse_args()
    tune_cpu()
    if args.keep_denormals:
        torch.set_flush_denormal(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_state()}; batch {args.batch}, "
          f"{args.size} px, one profiled step after one warm-up")
    for name, build in MODELS.items():
        torch.manual_seed(0)
        prof = profile_step(build(), args.batch, args.size)
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops) / 1e3
        print(f"\n== {name}: self CPU time {total:.0f} ms")
        for e in ops[: args.top]:
            print(f"  {e.key:45s} {e.self_cpu_time_total / 1e3:9.1f} ms  {e.count:5d} calls")
        print("  GELU backward by input shape:")
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key == "aten::gelu_backward":
                print(f"    {str(e.input_shapes[0]):30s} {e.self_cpu_time_total / 1e3:8.1f} ms  {e.count} calls")


if __name__ == "__main__":
    main()
