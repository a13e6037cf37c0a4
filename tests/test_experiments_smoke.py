"""The smallest setting (``--smoke``) of every science experiment in benchmarks/experiments/ runs end to end.

Slow (each script trains or differentiates real models): run with ``pytest -m slow tests/test_experiments_smoke.py``.
Every script writes into ``tmp_path`` (``--output`` / ``--runs``), never into benchmarks/results/.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hybridvision.data.fashion_mnist import find_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "benchmarks" / "experiments"

pytestmark = pytest.mark.slow


def _has_data() -> bool:
    try:
        find_fashion_mnist()
    except (FileNotFoundError, ValueError, RuntimeError):
        return False
    return True


needs_data = pytest.mark.skipif(not _has_data(), reason="Fashion-MNIST is not installed")


def run(script: str, *args: str | Path) -> None:
    """Run ``benchmarks/experiments/<script>`` with 1 thread; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, str(EXP / script), "--threads", "1", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} {' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def read_json(stem: Path) -> dict:
    for suffix in (".md", ".png", ".json"):
        assert stem.with_suffix(suffix).is_file(), f"{stem.with_suffix(suffix)} was not written"
    return json.loads(stem.with_suffix(".json").read_text())


def test_erf_untrained_smoke(tmp_path):
    run("erf_parc_vs_base.py", "--smoke", "--output", tmp_path / "erf")
    res = read_json(tmp_path / "erf")
    ratios = res["area_ratio"]
    assert set(ratios) == {"timm/convnext_xt", "timm/parc_convnext_xt"}
    for r in ratios.values():
        vals = [r[k] for k in ("0.2", "0.3", "0.5", "0.99")]
        assert all(0 < v <= 1 for v in vals) and vals == sorted(vals)


@needs_data
def test_cluttered_cam_and_trained_erf_smoke(tmp_path):
    runs = tmp_path / "runs"
    run("cluttered_parc_vs_base.py", "--smoke", "--runs", runs, "--output", tmp_path / "acc")
    res = read_json(tmp_path / "acc")
    pair = res["pairs"]["ConvNeXt-XT"]
    assert len(pair["base_top1"]) == len(pair["parc_top1"]) == 1
    assert all(0 <= v <= 100 for v in pair["base_top1"] + pair["parc_top1"])
    for model in ("convnext_xt", "parc_convnext_xt"):
        assert (runs / model / "seed1" / "model.safetensors").is_file()

    run("cam_grid.py", "--smoke", "--runs", runs, "--output", tmp_path / "cam")
    cam = read_json(tmp_path / "cam")
    assert set(cam["models"]) == {"convnext_xt", "parc_convnext_xt"}
    for m in cam["models"].values():
        assert len(m["classes"]) == 2 and all(0 <= f <= 1 for f in m["cam_on_item"])

    run("erf_parc_vs_base.py", "--smoke", "--trained", runs, "--output", tmp_path / "erf_trained")
    erf = read_json(tmp_path / "erf_trained")
    assert set(erf["area_ratio"]) == {"trained/convnext_xt", "trained/parc_convnext_xt"}


@needs_data
def test_coatnet_layouts_smoke(tmp_path):
    run("coatnet_layouts.py", "--smoke", "--runs", tmp_path / "runs", "--output", tmp_path / "layouts")
    res = read_json(tmp_path / "layouts")
    assert set(res["layouts"]) == {"C-C-C-C", "ViT_rel"}
    for r in res["layouts"].values():
        assert r["train_loss"][0] > 0 and 0 <= r["top1"][0] <= 100
