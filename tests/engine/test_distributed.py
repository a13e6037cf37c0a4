"""torchrun runs on CPU (gloo): DDP, FSDP2 with checkpoint/resume, and an elastic restart after a killed worker."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hybridvision.engine import checkpoint as ckpt_io
from hybridvision.engine.distributed import block_modules

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ARGS = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "8", "--warmup-epochs", "0", "--no-progress"]


def torchrun(args, extra=(), timeout=300):
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it a restarted gloo group reads the previous attempt's
    # addresses from torchrun's shared store and cannot connect (pytorch/pytorch#135712)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.run(TORCHRUN + list(extra) + args, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_ddp_and_fsdp_two_processes(fmnist_dir, tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    common = ["-m", "hybridvision", "train", "--data-dir", str(fmnist_dir)] + ARGS
    out = torchrun(common + ["--epochs", "2", "--output", str(ddp)])
    assert "2 process(es)" in out and out.count("epoch 2/2:") == 1  # rank 0 logs alone
    torchrun(common + ["--epochs", "2", "--output", str(fsdp), "--fsdp"])
    m_ddp = json.loads((ddp / "metrics.json").read_text())
    m_fsdp = json.loads((fsdp / "metrics.json").read_text())
    assert m_ddp["world_size"] == 2 and len(m_ddp["epochs"]) == 2
    # the same data, init and optimizer: sharding changes only reduction order
    for a, b in zip(m_ddp["epochs"], m_fsdp["epochs"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    # FSDP checkpoints hold the gathered, unsharded state: loadable into a plain model
    ck = ckpt_io.load_checkpoint(fsdp / "checkpoint-last.pt", "test_resnet", 10)
    import timm
    plain = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    plain.load_state_dict(ck["model"])
    assert all(type(v) is torch.Tensor for v in ck["model"].values())
    # and a sharded run resumes from it
    out = torchrun(common + ["--epochs", "3", "--output", str(fsdp), "--fsdp", "--resume",
                             str(fsdp / "checkpoint-last.pt")])
    assert "resumed from" in out
    assert [e["epoch"] for e in json.loads((fsdp / "metrics.json").read_text())["epochs"]] == [1, 2, 3]


def test_block_modules_innermost_first():
    import timm
    m = timm.create_model("test_resnet")
    blocks = block_modules(m)
    assert blocks and all(type(b).__name__ in ("BasicBlock", "Bottleneck") for b in blocks)
    assert block_modules(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))[0].__class__ is torch.nn.Linear


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes(fmnist_dir, tmp_path):
    out = tmp_path / "elastic"
    script = tmp_path / "kill_once.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from hybridvision.engine import trainer
        from hybridvision.cli import main
        real = trainer.plot_curves
        def plot_then_die(history, path):
            real(history, path)
            if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and len(history) == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # rank 0 dies right after the epoch-1 checkpoint
        trainer.plot_curves = plot_then_die
        sys.exit(main())
    """))
    log = torchrun([str(script), "train", "--data-dir", str(fmnist_dir), "--epochs", "3", "--output", str(out)]
                   + ARGS, extra=["--max-restarts=1"])
    assert "resumed from" in log and "epoch 2 of 3" in log
    m = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3]
