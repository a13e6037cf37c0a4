"""Shared by the experiment scripts: where results go, the machine line, the pairs, thread control."""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results" / "experiments"

#: (label, base model, ParC model): the ParC ConvNets of the ParC paper and the timm networks they start from
PAIRS: dict[str, tuple[str, str, str]] = {
    "convnext": ("ConvNeXt-XT", "convnext_xt", "parc_convnext_xt"),
    "resnet50": ("ResNet50", "resnet50", "parc_resnet50"),
    "mobilenetv2": ("MobileNetV2", "mobilenetv2_100", "parc_mobilenetv2"),
}


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads for this process (the machine is shared; results state the count)."""
    if threads < 1:
        raise ValueError(f"--threads {threads}: need at least 1")
    torch.set_num_threads(threads)


def command_line() -> str:
    """The command that is running, as one would type it (for the results files)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def machine_line() -> str:
    """CPU/torch/threads and the 1-minute load average when the run ended (a shared machine says so)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op thread(s), load average {load:.1f} at the end of the run")


class Timer:
    """Wall-clock seconds since construction: ``Timer().seconds``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
