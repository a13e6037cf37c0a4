"""benchmarks/bench_step_ab.py end to end (slow: it builds the base revision's native kernels in their own folder)."""
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_step_ab_runs_the_base_revision_beside_the_working_copy():
    """Each worker imports its own package (the exported revision's, the working copy's), both step alternately,
    and the summary line comes out (no timing asserted)."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "benchmarks/bench_step_ab.py", "--base", "HEAD", "--rounds", "2", "--batch",
                          "2", "--size", "64", "--threads", "1"], cwd=root, check=True, timeout=900,
                         capture_output=True, text=True).stdout
    head = out.splitlines()[0]
    base_pkg, work_pkg = head.split("base = ")[1].split(" (HEAD)")[0], head.split("work = ")[1].split(";")[0]
    assert "hv_step_ab_" in base_pkg and Path(work_pkg) == root / "src" / "hybridvision"
    assert sum(line.startswith("round ") for line in out.splitlines()) == 2
    assert "x best" in out.splitlines()[-1] and "paired median" in out.splitlines()[-1]


def test_step_ab_rejects_bad_arguments():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_step_ab.py"
    for args, msg in ((["--rounds", "3"], "--base REV is required"), (["--base", "HEAD", "--rounds", "0"], "--rounds")):
        res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and msg in res.stderr
