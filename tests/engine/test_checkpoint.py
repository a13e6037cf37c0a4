import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hybridvision.engine import checkpoint as ckpt_io


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pt"
    ckpt_io.atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    ck = ckpt_io.load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pt"]


def test_process_killed_mid_save_leaves_previous_file(tmp_path):
    path = tmp_path / "ck.pt"
    ckpt_io.atomic_save({"model": {"w": torch.full((4,), 7.0)}, "epoch": 3}, path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from hybridvision.engine import checkpoint as c
        def slow_save(obj, f):
            f.write(b"partial")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = slow_save
        c.atomic_save({{"model": {{"w": torch.zeros(4)}}, "epoch": 4}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    ck = ckpt_io.load_checkpoint(path)
    assert ck["epoch"] == 3 and torch.equal(ck["model"]["w"], torch.full((4,), 7.0))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": Evil()}, path)
    with pytest.raises(RuntimeError, match=rf"checkpoint {path} is corrupt or truncated"):
        ckpt_io.load_checkpoint(path)


def test_truncated_and_garbage_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    ckpt_io.atomic_save({"model": {"w": torch.randn(100)}, "epoch": 0}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(RuntimeError, match=rf"{cut} is corrupt or truncated.*checkpoint-best.pt"):
        ckpt_io.load_checkpoint(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeError, match="junk.pt is corrupt"):
        ckpt_io.load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        ckpt_io.load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(RuntimeError, match="not a hybridvision checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "list.pt")


def test_bare_state_dict_and_model_mismatch(tmp_path):
    m = torch.nn.Linear(3, 2)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    ck = ckpt_io.load_checkpoint(tmp_path / "sd.pt")
    other = torch.nn.Linear(3, 5)
    with pytest.raises(RuntimeError, match=r"sd.pt do not fit this model.*--model"):
        ckpt_io.load_model_state(other, ck["model"], tmp_path / "sd.pt")


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leave a cached gaussian
    state = ckpt_io.rng_state()
    expected = (torch.rand(3), np.random.randn(3), random.random())
    ckpt_io.atomic_save({"model": {}, "rng": [state]}, tmp_path / "r.pt")
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt_io.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"][0])
    got = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_final_safetensors_roundtrip(tmp_path):
    m = torch.nn.Conv2d(2, 3, 3)
    ckpt_io.save_final(m.state_dict(), tmp_path, {"model": "x", "num_classes": 3})
    state, cfg = ckpt_io.load_final(tmp_path)
    assert cfg["num_classes"] == 3 and torch.equal(state["weight"], m.weight.detach())
    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 10)
    with pytest.raises(RuntimeError, match="model.safetensors is corrupt"):
        ckpt_io.load_final(tmp_path / "model.safetensors")
