"""Training-mode BatchNorm + GELU: the native kernel pair (hybridvision.ops.norm_act) against torch's ops, CPU fp32.

Three measurements, each alternating the two sides in the same run:

1. the op alone on CoAtNet-0's MBConv activations (batch 8, 224 px, channels-last): forward, and forward + backward,
   against ``F.gelu(bn(x))`` (best of interleaved rounds);
2. a whole CoAtNet-0 training step (``coatnet_0`` with ``stride_mode="dw", pool="avg"``, batch 8, AdamW: the step of
   ``bench_models.py``), the kernel switched on and off between steps with ``HYBRIDVISION_NATIVE``, which every
   call reads (same model, same weights; best step of each side and the median of the paired ratios);
3. the activation memory autograd keeps for that model's forward (bytes of the distinct storages saved for the
   backward, counted with ``torch.autograd.graph.saved_tensors_hooks``).

    python benchmarks/bench_norm_act.py             # a few minutes -> benchmarks/results/norm_act.md

The process applies ``hybridvision.engine.runtime.tune_cpu()`` (both sides alike).
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from hybridvision.engine.runtime import cpu_state, tune_cpu
from hybridvision.ops import native
from hybridvision.ops.norm_act import batch_norm_act

from bench_circular import best_of
from bench_models import _coatnet0_paper_like, _train_fn, paired

RESULTS = Path(__file__).resolve().parent / "results"
# (B, C, H, W) of CoAtNet-0's BatchNorm + GELU inputs at batch 8, 224 px (dw stride mode): S1's first expansion at
# 112 px, S1's other norms at 56, S2's first expansion at 56 and the rest at 28; the stem's 64 channels at 112
SHAPES = [(8, 64, 112, 112), (8, 384, 112, 112), (8, 384, 56, 56), (8, 768, 56, 56), (8, 768, 28, 28)]


def op_rows(budget_s: float) -> list[dict]:
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        bn = torch.nn.BatchNorm2d(shape[1])
        fns = {
            "torch fwd": lambda: F.gelu(bn(x.detach())),
            "native fwd": lambda: batch_norm_act(x.detach(), bn),
            "torch fwd+bwd": lambda: F.gelu(bn(x)).backward(g),
            "native fwd+bwd": lambda: batch_norm_act(x, bn).backward(g),
        }
        t = best_of(fns, budget_s, min_reps=5)
        rows.append({"shape": shape, **t})
    return rows


def step_ab(rounds: int) -> tuple[float, float, float]:
    """(best s with the kernel, best s without, median paired ratio without / with), by ``bench_models.paired``."""
    torch.manual_seed(0)
    step = _train_fn(_coatnet0_paper_like(), torch.randn(8, 3, 224, 224))

    def with_flag(flag: str):
        def run() -> None:
            os.environ["HYBRIDVISION_NATIVE"] = flag
            step()
        return run

    try:
        off, on, ratio = paired(with_flag("0"), with_flag("1"), rounds)
    finally:
        os.environ.pop("HYBRIDVISION_NATIVE", None)
    return on, off, ratio


def saved_mb(flag: str) -> float:
    """MB of distinct storages autograd saves in one training-mode forward of the benchmark model."""
    os.environ["HYBRIDVISION_NATIVE"] = flag
    try:
        torch.manual_seed(0)
        model = _coatnet0_paper_like().train()
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(8, 3, 224, 224))
    finally:
        os.environ.pop("HYBRIDVISION_NATIVE", None)
    return sum(storages.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="training steps per side")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of op timing per shape")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    tune_cpu()
    if not native.available():
        raise SystemExit("the native kernels are not available here (see the warning above): nothing to compare")
    head = (f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{cpu_state()}.")
    print(head)
    lines = ["# Training-mode BatchNorm + GELU: native kernel pair vs torch's ops (CPU fp32)", "",
             "Command: `python benchmarks/bench_norm_act.py" + (f" --rounds {a.rounds}" if a.rounds != 8 else "") + "`  ",
             head, "", "## The op on CoAtNet-0's activations (channels-last; ms, best of interleaved rounds)", "",
             "| (B, C, H, W) | torch fwd | native fwd | speed-up | torch fwd+bwd | native fwd+bwd | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in op_rows(a.budget):
        line = (f"| {r['shape']} | {r['torch fwd']:.2f} | {r['native fwd']:.2f} | "
                f"{r['torch fwd'] / r['native fwd']:.2f}x | {r['torch fwd+bwd']:.2f} | {r['native fwd+bwd']:.2f} | "
                f"{r['torch fwd+bwd'] / r['native fwd+bwd']:.2f}x |")
        print(line)
        lines.append(line)
    on, off, paired = step_ab(a.rounds)
    mem_on, mem_off = saved_mb("1"), saved_mb("0")
    lines += ["", "## CoAtNet-0 (dw, avg) training step, batch 8, 224 px, AdamW", "",
              "| | kernel on | kernel off (torch's ops) | ratio |", "|---|---|---|---|",
              f"| best step (s) | {on:.3f} | {off:.3f} | {off / on:.3f}x (paired median {paired:.3f}x) |",
              f"| activations saved for the backward (MB) | {mem_on:.0f} | {mem_off:.0f} | "
              f"{mem_on / mem_off:.2f} |", ""]
    print("\n".join(lines[-5:]))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "norm_act.md").write_text("\n".join(lines))
    print(f"wrote {a.out / 'norm_act.md'}")


if __name__ == "__main__":
    main()
