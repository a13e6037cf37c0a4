"""Shared by the experiment scripts: where results go, the machine line, the pairs, process set-up, the common
command-line options, figure saving and the results files."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from hybridvision.engine.runtime import cpu_state, tune_cpu

RESULTS = Path(__file__).resolve().parents[1] / "results" / "experiments"

#: (label, base model, ParC model): the ParC ConvNets of the ParC paper and the timm networks they start from
PAIRS: dict[str, tuple[str, str, str]] = {
    "convnext": ("ConvNeXt-XT", "convnext_xt", "parc_convnext_xt"),
    "resnet50": ("ResNet50", "resnet50", "parc_resnet50"),
    "mobilenetv2": ("MobileNetV2", "mobilenetv2_100", "parc_mobilenetv2"),
}


def setup_process(threads: int) -> None:
    """Fix torch's intra-op threads for this process (the machine is shared; results state the count) and apply
    the CLI's CPU settings (``hybridvision.engine.runtime.tune_cpu``)."""
    if threads < 1:
        raise ValueError(f"--threads {threads}: need at least 1")
    torch.set_num_threads(threads)
    tune_cpu()


def command_line() -> str:
    """The command that is running, as one would type it (for the results files)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


class Timer:
    """Wall-clock seconds since construction (``Timer().seconds``) and the 1-minute load average then."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.load0 = _load()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def machine_line(timer: Timer) -> str:
    """CPU/torch/threads, the wall time since ``timer`` started and the 1-minute load average at its start and now;
    says the machine was shared when either load exceeds this process's thread count by more than 0.5."""
    threads = torch.get_num_threads()
    load0, load1 = timer.load0, _load()
    shared = "; the machine was shared (load above the thread count)" if max(load0, load1) > threads + 0.5 else ""
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} intra-op thread(s), "
            f"{cpu_state()}; wall time {timer.seconds:.0f}s; load average {load0:.1f} at the start, "
            f"{load1:.1f} at the end{shared}")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's argument parser: the first paragraph of its docstring ``doc`` as description, the rest kept."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)


def add_training_args(p: argparse.ArgumentParser, *, epochs: int, train_subset: int, batch_size: int) -> None:
    """``--seeds --epochs --train-subset --test-subset --batch-size --lr`` of the scripts that train (defaults given)."""
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--train-subset", type=int, default=train_subset, help="training images (of 60,000); 0 = all")
    p.add_argument("--test-subset", type=int, default=2000, help="test images (of 10,000); 0 = all")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=2e-3)


def add_run_args(p: argparse.ArgumentParser, *, output: str, smoke: str) -> None:
    """``--threads --output --smoke``, the last options of every script (``output``: the default stem's name)."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=None, help=f"results stem (default results/experiments/{output})")
    p.add_argument("--smoke", action="store_true", help=smoke)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int) -> Path:
    """Lay out ``fig`` (``tight_layout``), save it to ``path`` (parents created), close it; the path.

    tight_layout reserves the suptitle's height at the top as if it sat there, but matplotlib places it at a
    fraction of the figure height (y=0.98: 0.77 in down a 38 in tall grid), so it is pinned 0.08 in below the top."""
    import matplotlib.pyplot as plt

    if fig._suptitle is not None:
        fig._suptitle.set_y(1 - 0.08 / fig.get_figheight())
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_report(stem: Path, lines: list[str], png: Path, alt: str, result: dict) -> dict:
    """Write ``stem``.md (``lines`` and then the figure ``png`` as ``![alt]``) and ``stem``.json (the running
    :func:`command_line` as ``"command"``, then ``result``), print the report and the written paths; return the json's
    dict."""
    result = {"command": command_line(), **result}
    lines = [*lines, "", f"![{alt}]({png.name})", ""]
    md = write_text(stem.with_suffix(".md"), "\n".join(lines))
    write_text(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    print("\n".join(lines))
    print(f"wrote {md}, {png}, {stem.with_suffix('.json')}")
    return result
