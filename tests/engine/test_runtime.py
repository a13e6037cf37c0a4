"""The allocator tuning: counted page faults (not timings) in fresh subprocesses, since it is process-wide."""
import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from hybridvision.engine.runtime import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tuned" else False
x = torch.randn(10, 1024, 1024)  # 40 MiB: above glibc's largest mmap threshold (32 MiB)
for _ in range(5):  # let the heap grow to its steady state
    x.clone()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x.clone()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 10)
"""


def _faults(mode: str, env: dict | None = None) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    applied, faults = out.stdout.split()
    return applied, float(faults)


GLIBC = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


@GLIBC
def test_tuning_removes_the_page_faults_of_large_allocations():
    applied, default = _faults("default")
    assert applied == "False" and default > 5000  # one fault per 4 KiB page: 10240 for 40 MiB
    applied, tuned = _faults("tuned")
    assert applied == "True" and tuned < 100


def test_environment_variable_opts_out():
    env = dict(os.environ, HYBRIDVISION_MALLOC_TUNING="0")
    applied, _ = _faults("tuned", env)
    assert applied == "False"


@GLIBC
def test_tune_cpu_flushes_denormals_and_says_so():
    code = ("import torch; from hybridvision.engine.runtime import cpu_state, tune_cpu; before = cpu_state(); "
            "tune_cpu(); print(before, '|', cpu_state(), '|', (torch.tensor([1e-30]) * 1e-10).item())")
    env = dict(os.environ)
    env.pop("HYBRIDVISION_MALLOC_TUNING", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    before, after, tiny = (p.strip() for p in out.split("|"))
    assert "glibc malloc defaults, denormals kept" in before
    assert "malloc tuned, denormals flushed" in after and float(tiny) == 0.0
