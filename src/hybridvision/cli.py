"""``hybridvision`` command line: argument parsing and calls, no logic.

Each sub-command is one ``add_<name>(subparsers)`` function that registers its parser and sets
``func``; :data:`COMMANDS` lists them. To add a sub-command, write such a function (in this file or next to its
tool) and append it to :data:`COMMANDS`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)


def _train_args(p: argparse.ArgumentParser) -> None:
    """The training flags. Defaults live in TrainConfig; only flags given on the command line override a recipe."""
    S = argparse.SUPPRESS
    p.add_argument("--config", default=None, help="YAML recipe (keys = flag names); command-line flags override it")
    p.add_argument("--model", default=S, help="model name (hybridvision or timm); default coatnet_nano")
    p.add_argument("--dataset", default=S, help="fashion-mnist | fashion-mnist-cluttered | folder")
    p.add_argument("--data-dir", default=S, help="data folder (Fashion-MNIST files, or ROOT with train/ and val/)")
    p.add_argument("--img-size", type=int, default=S, help="input side (default: the data's native size)")
    p.add_argument("--in-chans", type=int, default=S, help="model input channels (default: the data's)")
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--batch-size", type=int, default=S, help="per process")
    p.add_argument("--lr", type=float, default=S, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr", type=float, default=S)
    p.add_argument("--weight-decay", type=float, default=S)
    p.add_argument("--warmup-epochs", type=int, default=S)
    p.add_argument("--opt", default=S, help="timm optimizer name (default adamw)")
    p.add_argument("--sched", default=S, help="timm scheduler name (default cosine)")
    p.add_argument("--smoothing", type=float, default=S, help="label smoothing")
    p.add_argument("--mixup", type=float, default=S, help="mixup alpha (0 = off)")
    p.add_argument("--cutmix", type=float, default=S, help="cutmix alpha (0 = off)")
    p.add_argument("--reprob", type=float, default=S, help="random-erasing probability")
    p.add_argument("--translate", type=float, default=S, help="max random shift, fraction of the side")
    p.add_argument("--hflip", type=float, default=S, help="horizontal-flip probability")
    p.add_argument("--aa", default=S, help="timm auto-augment policy for image folders, e.g. rand-m9-mstd0.5")
    p.add_argument("--drop-path", type=float, default=S, help="stochastic depth rate")
    _bool_flag(p, "model-ema", "keep and evaluate an EMA of the weights (timm ModelEmaV3)")
    p.add_argument("--model-ema-decay", type=float, default=S)
    p.add_argument("--grad-clip", type=float, default=S, help="clip the gradient norm to this value")
    _bool_flag(p, "amp", "bf16 autocast")
    _bool_flag(p, "channels-last", "channels-last memory format")
    _bool_flag(p, "compile", "torch.compile the model")
    _bool_flag(p, "fsdp", "shard the model with FSDP2 per block (under torchrun)")
    p.add_argument("--device", default=S, help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--workers", type=int, default=S, help="DataLoader worker processes")
    p.add_argument("--output", default=S, help="run folder (default runs/train)")
    p.add_argument("--resume", default=S, help="checkpoint to resume from, or 'auto' (OUTPUT/checkpoint-last.pt)")
    p.add_argument("--train-subset", type=int, default=S, help="train on N random training images")
    p.add_argument("--test-subset", type=int, default=S, help="evaluate on N random test images")
    _bool_flag(p, "skip-bad-images", "skip and count unreadable images instead of stopping")
    _bool_flag(p, "progress", "tqdm progress bars")


def _load_recipe(path: Optional[str]) -> dict:
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {p} does not exist (recipes live in configs/, e.g. configs/demo.yaml)")
    values = yaml.safe_load(p.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {p}: expected a mapping of flag names to values, got {type(values).__name__}")
    return values


def train_config(args: argparse.Namespace):
    """TrainConfig from defaults < ``--config`` recipe < explicit command-line flags."""
    from hybridvision.engine.trainer import TrainConfig

    values = _load_recipe(args.config)
    TrainConfig.from_dict(values, source=f"--config {args.config}")  # reject unknown keys early
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values)


def _run_train(args: argparse.Namespace) -> int:
    from hybridvision.engine.trainer import summary, train

    cfg = train_config(args)
    metrics = train(cfg)
    if _is_main_process():
        print(summary(metrics, cfg.output))
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (single process or under torchrun)")
    _train_args(p)
    p.set_defaults(func=_run_train)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the default recipe: coatnet_nano on Fashion-MNIST, outputs in runs/demo/")
    _train_args(p)
    p.set_defaults(func=_run_demo, config=str(DEMO_CONFIG))


def _run_demo(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"demo recipe {args.config} not found; run from a source checkout or pass "
                                f"--config configs/demo.yaml")
    return _run_train(args)


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list hybridvision models")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'coatnet*'")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from hybridvision.models.registry import list_models

    names = list_models(args.pattern)
    print("\n".join(names) if names else f"no model matches {args.pattern!r}")
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (.pt) or model.safetensors on a test set")
    p.add_argument("checkpoint", help="checkpoint-*.pt, model.safetensors or a run folder")
    p.add_argument("--dataset", default=None, help="default: the one it was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-bad-images", action="store_true")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from hybridvision.engine.inference import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
                              batch_size=args.batch_size, workers=args.workers, test_subset=args.test_subset,
                              ema=args.ema, device=args.device, skip_bad_images=args.skip_bad_images)
    print(f"{res['model']} on {res['dataset']} ({res['count']} images): top-1 {res['top1']:.2f}%  "
          f"top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}")
    return 0


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k labels for image files or folders, written as CSV")
    p.add_argument("checkpoint", help="checkpoint-*.pt, model.safetensors or a run folder")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--output", default=None, help="CSV file (default: print to stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from hybridvision.engine.inference import predict, write_predictions

    rows = predict(args.checkpoint, args.inputs, topk=args.topk, batch_size=args.batch_size, device=args.device)
    write_predictions(rows, args.output if args.output else sys.stdout, args.topk)
    if args.output:
        print(f"wrote {len(rows)} predictions to {args.output}")
    return 0


def add_download(sub) -> None:
    p = sub.add_parser("download", help="download a dataset explicitly (nothing else ever downloads)")
    p.add_argument("name", choices=["fashion-mnist"])
    p.add_argument("--data-dir", required=True, help="folder to write the files to")
    p.add_argument("--base-url", default=None, help="mirror URL (default: Zalando's)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check (for files you trust)")
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from hybridvision.data.fashion_mnist import DEFAULT_BASE_URL, download_fashion_mnist

    folder = download_fashion_mnist(args.data_dir, args.base_url or DEFAULT_BASE_URL, verify=not args.no_verify)
    print(f"Fashion-MNIST in {folder}; use --data-dir {folder}")
    return 0


def _analysis_model(name: str, checkpoint: Optional[str]):
    """``--model`` (a hybridvision or timm name, ``timm:`` prefix allowed) or the model of ``--checkpoint``."""
    if checkpoint:
        from hybridvision.engine.inference import load_trained

        return load_trained(checkpoint)[0]
    from hybridvision.models.registry import create_model

    return create_model(name.removeprefix("timm:"))


def add_erf(sub) -> None:
    p = sub.add_parser("erf", help="effective receptive field (RepLKNet protocol): erf.png + erf.json")
    p.add_argument("--model", required=True, help="model name (untrained unless --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="checkpoint-*.pt, model.safetensors or a run folder")
    p.add_argument("--images", required=True, help="folder of images (png/jpg), read with PIL")
    p.add_argument("--img-size", type=int, default=224, help="input side (RepLKNet uses 1024)")
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="image order and the initialisation of untrained models")
    p.add_argument("--output", default="runs/erf", help="folder for erf.png and erf.json")
    p.add_argument("--compare", default=None, help="a second model drawn beside the first (same seed)")
    p.set_defaults(func=_run_erf)


def _run_erf(args: argparse.Namespace) -> int:
    import json

    import torch

    from hybridvision.tools.erf import run_erf

    models = {}
    for name, ckpt in ((args.model, args.checkpoint), (args.compare, None)):
        if name:
            torch.manual_seed(args.seed)
            models[name] = _analysis_model(name, ckpt)
    res = run_erf(models, args.images, args.output, img_size=args.img_size, num_images=args.num_images, seed=args.seed)
    print(json.dumps(res, indent=2))
    print(f"wrote {Path(args.output) / 'erf.png'} and {Path(args.output) / 'erf.json'}")
    return 0


def add_cam(sub) -> None:
    p = sub.add_parser("cam", help="Grad-CAM overlay of one image (pytorch-grad-cam)")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoint-*.pt, model.safetensors or a run folder")
    p.add_argument("--image", required=True)
    p.add_argument("--target-layer", default="auto", help="'auto' (last stage) or a module name, e.g. stages.2")
    p.add_argument("--class", dest="target_class", type=int, default=None, help="class to explain (default: top-1)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="initialisation of an untrained model")
    p.add_argument("--output", default="cam.png", help="overlay PNG")
    p.set_defaults(func=_run_cam)


def _run_cam(args: argparse.Namespace) -> int:
    import torch

    from hybridvision.tools.cam import run_cam

    torch.manual_seed(args.seed)
    res = run_cam(_analysis_model(args.model, args.checkpoint), args.image, args.output, img_size=args.img_size,
                  target_layer=args.target_layer, target_class=args.target_class)
    print(f"class {res['class']} explained at layer {res['target_layer']}; wrote {res['output']}")
    return 0


def add_profile(sub) -> None:
    p = sub.add_parser("profile", help="params, MACs, inference/training img/s and MFU")
    p.add_argument("--model", required=True)
    p.add_argument("--img-size", type=int, nargs="+", default=[224], metavar=("H", "W"), help="H [W]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compare", action="append", default=[], metavar="timm:NAME",
                   help="another model profiled the same way (repeatable)")
    p.add_argument("--iters", type=int, default=5, help="timed steps (median)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--no-speed", action="store_true", help="params and MACs only")
    p.set_defaults(func=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from hybridvision.tools.profile import format_results, gemm_peak_flops, profile_model

    size = tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    peak = None if args.no_speed else gemm_peak_flops(args.device)
    results = [
        profile_model(_analysis_model(name, None).to(args.device), size, batch_size=args.batch_size, name=name,
                      peak_flops=peak, iters=args.iters, measure_speed=not args.no_speed)
        for name in [args.model, *args.compare]
    ]
    print(format_results(results))
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="ONNX export at a fixed resolution (optionally verified in onnxruntime)")
    p.add_argument("--model", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoint-*.pt, model.safetensors or a run folder")
    p.add_argument("--img-size", type=int, nargs="+", required=True, metavar=("H", "W"), help="H [W]")
    p.add_argument("--batch-size", type=int, default=1, help="example batch (the batch axis stays dynamic)")
    _bool_flag(p, "dynamic-batch", "symbolic batch axis (default on)")
    p.add_argument("--method", choices=["conv", "matmul", "fft"], default=None, help="ParC form (default conv)")
    p.add_argument("--output", required=True, help="the .onnx file")
    p.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch on random input")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from hybridvision.tools.export import export_onnx, verify_onnx
    from hybridvision.tools.profile import model_in_chans

    if len(args.img_size) > 2:
        raise ValueError(f"--img-size takes H or H W, got {args.img_size}")
    h, w = (args.img_size * 2)[:2]
    model = _analysis_model(args.model, args.checkpoint)
    size = (args.batch_size, model_in_chans(model), h, w)
    path = export_onnx(model, args.output, size, dynamic_batch=getattr(args, "dynamic_batch", True), method=args.method)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) for input {size}")
    if args.verify:
        res = verify_onnx(model, path, size)
        print(f"onnxruntime vs PyTorch: relative error {res['rel_err']:.2e} (max abs {res['max_abs_err']:.2e}); "
              f"latency PyTorch {res['torch_ms']:.1f} ms, onnxruntime {res['ort_ms']:.1f} ms (batch {size[0]})")
    return 0


#: the sub-command registrations, in help order; append yours
COMMANDS: list[Callable] = [
    add_models, add_train, add_eval, add_predict, add_download, add_demo, add_erf, add_cam, add_profile, add_export,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridvision", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hybridvision`` console script and ``python -m hybridvision``."""
    args = build_parser().parse_args(argv)
    from hybridvision.engine.runtime import tune_cpu

    tune_cpu()  # no page fault per 4 KiB at every large allocation; denormals flushed
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"hybridvision {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
