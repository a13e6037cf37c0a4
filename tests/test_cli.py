import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hybridvision.cli import COMMANDS, build_parser, main


@pytest.fixture
def fmnist_dir(make_fmnist):
    return make_fmnist(16, 8)


def test_train_eval_predict_end_to_end(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: test_resnet\nepochs: 3\nbatch_size: 8\nimg_size: 16\nwarmup_epochs: 0\n")
    # 2 steps: 16 images / batch 8, one epoch (the command line overrides the recipe's 3 epochs)
    rc = main(["train", "--config", str(recipe), "--data-dir", str(fmnist_dir), "--epochs", "1",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 steps/epoch" in text and "test top-1" in text and "outputs in" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "test_resnet" and len(metrics["epochs"]) == 1 and metrics["args"]["img_size"] == 16

    for target in (out / "checkpoint-best.pt", out):
        assert main(["eval", str(target), "--data-dir", str(fmnist_dir)]) == 0
        assert "(8 images): top-1" in capsys.readouterr().out

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 30), 40 * i, np.uint8)).save(imgs / f"{i}.png")
    csv_path = tmp_path / "pred.csv"
    assert main(["predict", str(out), str(imgs), str(imgs / "0.png"), "--topk", "2", "--output", str(csv_path)]) == 0
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["file", "label1", "prob1", "label2", "prob2"] and len(rows) == 5
    assert rows[1][1] in ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                          "Bag", "Ankle boot")
    assert 0 <= float(rows[1][2]) <= 1 and float(rows[1][2]) >= float(rows[1][4])


def test_errors_speak_to_the_user(fmnist_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 3\n")
    assert main(["train", "--config", str(bad)]) == 1
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml does not exist" in capsys.readouterr().err
    broken = tmp_path / "ck.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["eval", str(broken)]) == 1
    assert f"checkpoint {broken} is corrupt or truncated" in capsys.readouterr().err


def test_missing_data_message(tmp_path, capsys, monkeypatch):
    from hybridvision.data import fashion_mnist as fm

    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(fm, "_dpkg_dirs", lambda: [])
    assert main(["train", "--data-dir", str(tmp_path / "empty"), "--model", "test_resnet",
                 "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "hybridvision download fashion-mnist" in err


def test_parser_lists_every_command_and_models():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "eval", "predict", "models", "download", "demo"} <= set(sub.choices)
    assert len(COMMANDS) >= 6
    demo = sub.choices["demo"].parse_args([])
    assert demo.config.endswith("configs/demo.yaml")


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "hybridvision", "models", "coatnet_n*"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "coatnet_nano" in proc.stdout
