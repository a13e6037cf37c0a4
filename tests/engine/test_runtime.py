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


def _flush_state(code: str) -> list[str]:
    env = dict(os.environ)
    env.pop("HYBRIDVISION_MALLOC_TUNING", None)
    prelude = "import torch; torch.set_num_threads(2); from hybridvision.engine.runtime import cpu_state, tune_cpu; "
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, check=True, env=env)
    return [p.strip() for p in out.stdout.split("|")]


@GLIBC
def test_tune_cpu_flushes_denormals_in_every_thread_and_says_so():
    tiny = "((torch.full((1 << 20,), 1e-30) * 1e-10) == 0).float().mean().item()"
    after, zeros = _flush_state(f"tune_cpu(); print(cpu_state(), '|', {tiny})")
    assert "malloc tuned, denormals flushed, large tensors on " in after and float(zeros) == 1.0
    # called after the worker threads exist, the flush reaches the main thread only, and cpu_state says so
    before, after, zeros = _flush_state(f"b = cpu_state(); tune_cpu(); print(b, '|', cpu_state(), '|', {tiny})")
    assert "glibc malloc defaults, denormals kept" in before
    assert "denormals flushed in the main thread only" in after and 0.0 < float(zeros) < 1.0


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (the bracketed word), or None where there is none to read."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "never"), reason="THP mode 'madvise' or 'never' only")
@pytest.mark.parametrize("thp", ["0", "1"])
def test_cpu_state_names_the_pages_of_large_tensors(thp):
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
    code = "from hybridvision.engine.runtime import cpu_state; print(cpu_state())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    huge = thp == "1" and _thp_mode() == "madvise"  # torch madvises its large blocks only when asked to
    assert f"large tensors on {'2 MiB' if huge else '4 KiB'} pages (" in out
