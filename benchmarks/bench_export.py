"""ONNX export of every family, verified in onnxruntime: relative error and latency beside eager PyTorch.

For each (model, resolution, ParC form): ``hybridvision.export_onnx`` at batch 1 (dynamic batch), then onnxruntime
(CPU execution provider, as many threads as torch) and eager PyTorch (``torch.inference_mode``, fp32) on the same random
input. Reported: relative error max|ort - torch| / max|torch| (goal <= 1e-4), the median latency of each (the anchor
is eager PyTorch measured in the same run: the ratio column is ort / eager, < 1 means onnxruntime is faster), the
export time and the ONNX op census (Resize / BatchNormalization left in the graph).

    python benchmarks/bench_export.py            # all families at their default and another resolution
    python benchmarks/bench_export.py --quick    # one small model per family at 64x64 and 96x64, < 3 min
    python benchmarks/bench_export.py --threads 1  # on a shared, loaded machine (oversubscribed pools distort both)

Writes benchmarks/results/export.md (export_quick.md with --quick) and the PNG beside it.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

import hybridvision as hv
from hybridvision.tools.export import export_onnx, onnx_op_types, verify_onnx

RESULTS = Path(__file__).resolve().parent / "results"

# (model, (H, W), ParC form) — every family at its default resolution and at another one (the examples)
FULL = [
    ("coatnet_0", (224, 224), "conv"),
    ("coatnet_0", (288, 256), "conv"),
    ("parc_convnext_xt", (224, 224), "conv"),
    ("parc_convnext_xt", (224, 224), "matmul"),
    ("parc_convnext_xt", (320, 256), "conv"),
    ("fast_parc_convnext_xt", (224, 224), "conv"),
    ("convnext_xt", (224, 224), "conv"),
    ("parc_net_s", (256, 256), "conv"),
    ("parc_net_s", (256, 256), "matmul"),
    ("parc_net_s", (320, 256), "conv"),
    ("parc_mobilenetv2", (224, 224), "conv"),
    ("parc_mobilenetv2", (256, 192), "conv"),
    ("parc_resnet50", (224, 224), "conv"),
    ("parc_resnet50", (256, 192), "conv"),
]
QUICK = [
    (m, hw, "conv")
    for m in ("coatnet_pico", "parc_convnext_xt", "parc_net_s", "parc_mobilenetv2", "parc_resnet50")
    for hw in ((64, 64), (96, 64))
]


def run(cases: list[tuple[str, tuple[int, int], str]], iters: int, threads: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (h, w), method in cases:
            torch.manual_seed(0)
            model = hv.create_model(name).eval()
            path = Path(tmp) / f"{name}_{h}x{w}_{method}.onnx"
            t0 = time.perf_counter()
            export_onnx(model, path, (1, 3, h, w), method=method)
            export_s = time.perf_counter() - t0
            ops = onnx_op_types(path)
            res = verify_onnx(model, path, (1, 3, h, w), iters=iters, warmup=3, ort_threads=threads)
            row = dict(
                model=name, size=f"{h}x{w}", method=method, export_s=export_s, resize=ops.get("Resize", 0),
                bn=ops.get("BatchNormalization", 0), nodes=sum(ops.values()), mb=path.stat().st_size / 2**20, **res,
            )
            rows.append(row)
            print(
                f"{name:24s} {h}x{w:<8} {method:6s} rel_err {res['rel_err']:.2e}  eager {res['torch_ms']:8.1f} ms  "
                f"ort {res['ort_ms']:8.1f} ms  ({res['ort_ms'] / res['torch_ms']:.2f}x)  export {export_s:.0f}s",
                flush=True,
            )
    return rows


def write(rows: list[dict], out: Path, command: str) -> None:
    lines = [
        "# ONNX export: onnxruntime vs eager PyTorch",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads for torch and onnxruntime, torch "
        f"{torch.__version__}; batch 1, fp32, CPU. Latency: median; ratio = onnxruntime / eager (anchor: eager "
        "PyTorch in the same run). Goal: rel. error <= 1e-4.",
        "",
        "| model | H×W | ParC form | rel. error | eager ms | onnxruntime ms | ort / eager | Resize | BN left | nodes | MB | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size']} | {r['method']} | {r['rel_err']:.1e} | {r['torch_ms']:.1f} | {r['ort_ms']:.1f} "
            f"| {r['ort_ms'] / r['torch_ms']:.2f}× | {r['resize']} | {r['bn']} | {r['nodes']} | {r['mb']:.1f} | {r['export_s']:.0f} |"
        )
    worst = max(r["rel_err"] for r in rows)
    lines += ["", f"Worst relative error: {worst:.1e} ({'meets' if worst <= 1e-4 else 'MISSES'} the 1e-4 goal)."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['size']} {r['method']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["torch_ms"] for r in rows], 0.4, label="eager PyTorch")
    ax.bar([i + 0.2 for i in x], [r["ort_ms"] for r in rows], 0.4, label="onnxruntime")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("latency, batch 1 (ms)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, small inputs")
    ap.add_argument("--iters", type=int, default=10, help="timed runs per latency (median)")
    ap.add_argument(
        "--threads", type=int, default=0,
        help="threads for both PyTorch and onnxruntime (0 = torch's default, also given to onnxruntime); "
        "use 1 on a shared, loaded machine, where oversubscribed thread pools distort both",
    )
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = run(QUICK if args.quick else FULL, args.iters, threads)
    cmd = "python benchmarks/bench_export.py" + (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads else "")
    write(rows, RESULTS / ("export_quick.md" if args.quick else "export.md"), cmd)


if __name__ == "__main__":
    main()
