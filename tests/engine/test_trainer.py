import json

import pytest
import torch

from hybridvision.engine import checkpoint as ckpt_io
from hybridvision.engine import trainer
from hybridvision.engine.trainer import NonFiniteLossError, TrainConfig, train

TINY = "test_resnet"  # timm's 0.37M-parameter test network


def cfg(data_dir, out, **kw):
    base = dict(model=TINY, data_dir=str(data_dir), output=str(out), epochs=2, batch_size=8, lr=1e-3, img_size=16,
                warmup_epochs=0, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class Killed(Exception):
    pass


def run_until_first_checkpoint(c, monkeypatch):
    """Run ``c`` and 'kill' it right after the first epoch's checkpoint was written."""
    def die(*a, **k):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(trainer, "plot_curves", die)
        with pytest.raises(Killed):
            train(c)


def test_resume_is_bit_exact(fmnist_dir, tmp_path, monkeypatch):
    kw = dict(mixup=0.4, smoothing=0.1, model_ema=True, reprob=0.3, drop_path=0.1, grad_clip=1.0)
    straight = train(cfg(fmnist_dir, tmp_path / "straight", **kw))
    run_until_first_checkpoint(cfg(fmnist_dir, tmp_path / "cut", **kw), monkeypatch)
    last = tmp_path / "cut" / "checkpoint-last.pt"
    assert ckpt_io.load_checkpoint(last)["epoch"] == 0
    resumed = train(cfg(fmnist_dir, tmp_path / "cut", resume=str(last), **kw))
    a = ckpt_io.load_checkpoint(tmp_path / "straight" / "checkpoint-last.pt")
    b = ckpt_io.load_checkpoint(tmp_path / "cut" / "checkpoint-last.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert [e["train_loss"] for e in straight["epochs"]] == [e["train_loss"] for e in resumed["epochs"]]
    assert len(resumed["epochs"]) == 2
    assert resumed["ema_test_top1"] == resumed["epochs"][-1]["ema_top1"] == straight["ema_test_top1"]
    assert f"EMA weights (checkpoint 'ema'): test top-1 {straight['ema_test_top1']:.2f}%" in trainer.summary(
        straight, tmp_path / "straight")


def test_outputs_and_metrics_schema(fmnist_dir, tmp_path):
    out = tmp_path / "run"
    m = train(cfg(fmnist_dir, out, epochs=1, amp=True, channels_last=True))
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["model"] == TINY and on_disk["test_top1"] == m["test_top1"]
    row = on_disk["epochs"][0]
    assert {"epoch", "train_loss", "test_top1", "test_top5", "lr", "seconds"} <= row.keys()
    assert 0 <= row["test_top1"] <= row["test_top5"] <= 100 and on_disk["train_img_per_s"] > 0
    assert on_disk["ema_test_top1"] is None and "EMA" not in trainer.summary(on_disk, out)
    for name in ("checkpoint-last.pt", "checkpoint-best.pt", "model.safetensors", "config.json", "curves.png"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir())
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["num_classes"] == 10 and cfg_json["in_chans"] == 1 and cfg_json["img_size"] == 16


def test_nan_loss_stops_and_keeps_last_checkpoint(fmnist_dir, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    calls = {"n": 0}
    real = trainer.build_loss

    def poisoned(c, n):
        fn, mix = real(c, n)

        def loss(logits, y):
            calls["n"] += 1
            value = fn(logits, y)
            return value * float("nan") if calls["n"] > 4 else value  # 4 steps per epoch: NaN in epoch 2
        return loss, mix

    monkeypatch.setattr(trainer, "build_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"became nan at epoch 2, step 1.*checkpoint-last.pt is kept"):
        train(cfg(fmnist_dir, out))
    assert ckpt_io.load_checkpoint(out / "checkpoint-last.pt")["epoch"] == 0


def test_checkpoint_of_other_model_or_classes(fmnist_dir, tmp_path):
    out = tmp_path / "a"
    train(cfg(fmnist_dir, out, epochs=1))
    last = out / "checkpoint-last.pt"
    with pytest.raises(RuntimeError, match=rf"{last}.*'{TINY}' model, not 'resnet10t'.*--model {TINY}"):
        train(cfg(fmnist_dir, tmp_path / "b", model="resnet10t", resume=str(last)))
    state = ckpt_io.load_checkpoint(last)
    state["num_classes"] = 7
    other = tmp_path / "seven.pt"
    ckpt_io.atomic_save(state, other)
    with pytest.raises(RuntimeError, match=rf"{other} has 7 classes but fashion-mnist has 10.*drop --resume"):
        train(cfg(fmnist_dir, tmp_path / "c", resume=str(other)))


def test_elastic_restart_resumes_automatically(fmnist_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "elastic"
    run_until_first_checkpoint(cfg(fmnist_dir, out), monkeypatch)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    m = train(cfg(fmnist_dir, out))
    assert "resumed from" in capsys.readouterr().out and [e["epoch"] for e in m["epochs"]] == [1, 2]


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="mnist"), "--dataset 'mnist'"),
    (dict(epochs=0), "--epochs 0"),
    (dict(warmup_epochs=5), "--warmup-epochs 5"),
    (dict(mixup=0.2, batch_size=15), "even --batch-size"),
    (dict(fsdp=True, model_ema=True), "--fsdp with --model-ema"),
    (dict(batch_size=40), "fewer than one batch"),
    (dict(model="no_such_model"), "unknown model 'no_such_model'"),
])
def test_bad_flags(fmnist_dir, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        train(cfg(fmnist_dir, tmp_path / "x", **kw))


def test_unknown_recipe_key():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning-rate": 1.0}, source="demo.yaml")


def test_default_img_size_follows_small_image_models():
    from hybridvision.engine.trainer import default_img_size

    assert default_img_size("coatnet_nano") == 32  # its stride-8 stages need a multiple of 8
    assert default_img_size("coatnet_pico") == 28
    assert default_img_size("resnet18") is None  # ImageNet models train at the dataset's native size
    assert default_img_size("coatnet_0") is None
