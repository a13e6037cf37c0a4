"""Fast checks of helpers inside benchmarks/experiments/ scripts (their end-to-end runs are the slow smoke tests)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXP = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(seeds: list[int], base: list[float], parc: list[float]) -> dict:
    """A pair's summary as cluttered_parc_vs_base writes it (per-seed lists, in seed order)."""
    s = {"base": "convnext_xt", "parc": "parc_convnext_xt", "seeds": seeds, "base_params": 7.0e6, "parc_params": 7.0e6}
    for role, top1 in (("base", base), ("parc", parc)):
        s[f"{role}_top1"] = top1
        s[f"{role}_train_loss"] = [2.0 - t / 100 for t in top1]
        s[f"{role}_seconds"] = [100.0 + t for t in top1]
        s[f"{role}_img_per_s"] = [50.0] * len(top1)
    s["delta"] = [p - b for p, b in zip(parc, base)]
    return s


def test_cluttered_merge_previous_seeds():
    mod = load("cluttered_parc_vs_base")
    budget = "10000 training / 2000 test images, 6 epoch(s), batch 64, lr 0.002, 112 px"
    previous = {"budget": budget + ", seeds 1 3", "pairs": {"ConvNeXt-XT": result([1, 3], [30.0, 34.0], [38.0, 33.0]),
                                                            "ResNet50": result([1], [50.0], [51.0])}}
    summary = {"ConvNeXt-XT": result([2, 3], [31.0, 35.0], [36.0, 40.0])}  # seed 3 trained again: this run wins
    mod.merge_previous(summary, previous, budget)
    s = summary["ConvNeXt-XT"]
    assert s["seeds"] == [1, 2, 3]
    assert s["base_top1"] == [30.0, 31.0, 35.0] and s["parc_top1"] == [38.0, 36.0, 40.0]
    assert s["delta"] == [8.0, 5.0, 5.0]
    assert s["base_seconds"] == [130.0, 131.0, 135.0] and s["parc_train_loss"] == pytest.approx([1.62, 1.64, 1.6])
    assert s["verdict"] == "PASS"
    assert set(summary) == {"ConvNeXt-XT"}  # pairs not run now are not added
    with pytest.raises(ValueError, match="budget .* differs"):
        mod.merge_previous(summary, {"budget": budget.replace("6 epoch", "3 epoch") + ", seeds 1", "pairs": {}}, budget)


def test_run_one_reuses_continues_or_trains(tmp_path, monkeypatch):
    """run_one: a finished run with the same recipe is reused, an unfinished one continues from its last checkpoint
    (also after it was itself resumed: ``resume`` is not part of the recipe), anything else trains from scratch."""
    import dataclasses
    import json

    mod = load("cluttered_parc_vs_base")
    calls = []
    monkeypatch.setattr(mod, "train", lambda cfg: calls.append(cfg) or {"trained": cfg.resume})
    cfg = mod.TrainConfig(model="convnext_xt", dataset="fashion-mnist-cluttered", epochs=3, seed=1,
                          output=str(tmp_path / "run"))
    out = Path(cfg.output)

    def record(epochs: int, **changes) -> None:
        out.mkdir(exist_ok=True)
        args = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, **changes))))
        (out / "metrics.json").write_text(json.dumps({"args": args, "epochs": [{"epoch": e + 1} for e in range(epochs)]}))

    assert mod.run_one(cfg, retrain=False) == {"trained": None}  # nothing there
    record(2)
    assert mod.run_one(cfg, retrain=False) == {"trained": None}  # unfinished but no checkpoint to continue from
    (out / mod.LAST).write_bytes(b"")
    assert mod.run_one(cfg, retrain=False) == {"trained": "auto"}
    assert calls[-1] == dataclasses.replace(cfg, resume="auto")
    assert mod.run_one(cfg, retrain=True) == {"trained": None}
    record(2, lr=0.1)  # another recipe: never continued
    assert mod.run_one(cfg, retrain=False) == {"trained": None}
    record(3, resume="auto")  # finished after a resume
    assert mod.run_one(cfg, retrain=False) == {"trained": None}  # no model.safetensors: not finished cleanly
    (out / "model.safetensors").write_bytes(b"")
    n = len(calls)
    assert mod.run_one(cfg, retrain=False)["epochs"][-1] == {"epoch": 3} and len(calls) == n


@pytest.mark.parametrize("script", ["cluttered_parc_vs_base", "erf_parc_vs_base", "coatnet_layouts", "cam_grid"])
def test_plot_titles_fit_the_figure(script, tmp_path, monkeypatch):
    """Each experiment's figure title, however long, renders narrower than its figure and keeps every word."""
    mod = load(script)
    title = ("16 cluttered Fashion-MNIST test canvases at 448 px (trained at 112 px; items at training scale), "
             "weights runs/cluttered_c/<model>/seed1, 10000 training / 2000 test images, 6 epoch(s), batch 64")
    drawn = []

    def keep(fig, path, dpi):  # _common.save_figure without closing the figure
        save(fig, path, dpi)
        fig.canvas.draw()
        drawn.append(fig)
        return path

    save, close = mod._common.save_figure, mod._common.pyplot().close
    monkeypatch.setattr(mod._common.pyplot(), "close", lambda fig: None)
    monkeypatch.setattr(mod._common, "save_figure", keep)
    png = tmp_path / "fig.png"
    if script == "cluttered_parc_vs_base":
        mod.plot({"ConvNeXt-XT": result([1, 2], [30.0, 32.0], [35.0, 36.0])}, png, title)
    elif script == "erf_parc_vs_base":
        erf = np.random.default_rng(0).random((16, 16)) + 0.1
        mod.plot_grid([[("base", erf, {"0.2": 0.1, "0.99": 0.9}), ("parc", erf, {"0.2": 0.2, "0.99": 0.9})]], png,
                      title)
    elif script == "cam_grid":
        rng, n = np.random.default_rng(0), 16  # as tall as the committed grids
        canvases = rng.integers(0, 256, (n, 112, 112), dtype=np.uint8)
        cams = rng.random((n, 112, 112)).astype(np.float32)
        columns = [("convnext_xt", cams, np.arange(n) % 10), ("parc_convnext_xt", cams, np.zeros(n, int))]
        mod.plot_grid(canvases, [(5, 7)] * n, np.zeros(n, int), list(range(n)), columns,
                      {"convnext_xt": [0.1] * n, "parc_convnext_xt": [0.3] * n}, png, title)
    else:
        mod.plot({"C-C-T-T": {"train_loss": [0.9, 0.92], "top1": [79.0, 80.0]},
                  "ViT_rel": {"train_loss": [1.2, 1.25], "top1": [65.0, 64.0]}}, png, title)
    (fig,) = drawn
    text = fig._suptitle if fig._suptitle is not None else fig.axes[0].title
    extent = text.get_window_extent()
    width_in = fig.get_figwidth()
    assert text.get_text().split() == title.split()
    assert extent.x0 >= 0 and extent.x1 / fig.dpi <= width_in, (extent.x0, extent.x1 / fig.dpi, width_in)
    if fig._suptitle is not None:  # above every panel and its title (3 px of slack: the boxes include padding)
        renderer = fig.canvas.get_renderer()
        tops = [ax.get_tightbbox(renderer).y1 for ax in fig.axes]
        assert max(tops) <= extent.y0 + 3, (max(tops), extent.y0)
    close(fig)
