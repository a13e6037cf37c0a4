"""The set-up contract: .venv imports timm/torchvision on CPU torch; every install is pinned."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"


@pytest.mark.skipif(not VENV_PY.exists(), reason="no .venv: run `make setup` (CI always has one via `make test`)")
def test_import_timm_and_torchvision_in_venv():
    code = (
        "import torch, torchvision, timm\n"
        "from torchvision.transforms import v2\n"
        "m = timm.create_model('resnet18', num_classes=3).eval()\n"
        "print(torch.__version__, torchvision.__version__, timm.__version__, tuple(m(torch.randn(2, 3, 64, 64)).shape))\n"
    )
    out = subprocess.run([str(VENV_PY), "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_v, tv_v, timm_v, shape = out.stdout.split(maxsplit=3)
    assert torch_v.startswith("2.13.0") and tv_v.startswith("0.28.0") and timm_v == "1.0.31"
    assert shape.strip() == "(2, 3)"


def test_constraints_pin_torch_stack():
    pins = dict(
        re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line).groups()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"
    assert pins["torchvision"] == "0.28.0"
    assert pins["timm"] == "1.0.31"


def test_every_pip_install_uses_the_constraints_file():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    installs = [line for line in setup.splitlines() if "pip\" install" in line or "pip install" in line]
    assert installs, "setup.sh installs nothing?"
    assert all("-c constraints.txt" in line for line in installs), installs


def test_library_never_patches_torchvision():
    src = ROOT / "src" / "hybridvision"
    offenders = [p for p in src.rglob("*.py") if "_meta_registrations" in p.read_text()]
    assert not offenders, offenders


def test_running_python_is_the_venv():
    # `make test` runs pytest from .venv: the shim must be active there, never needed in library code.
    if VENV_PY.exists() and Path(sys.executable).resolve().parent == VENV_PY.resolve().parent:
        import timm  # noqa: F401
