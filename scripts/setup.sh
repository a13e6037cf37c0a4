#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned set (constraints.txt) + hybridvision in editable mode,
# torchvision made importable on CPU-only torch, and the Fashion-MNIST Debian package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.hybridvision-setup

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi

want="$(cat pyproject.toml constraints.txt scripts/setup.sh scripts/torchvision_cpu_shim.py | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "[setup] installing the pinned set (constraints.txt) and hybridvision (editable)"
    # Every install goes through the constraints file: pip never resolves a CUDA torch.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e ".[all]"

    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    rm -f "$site/hybridvision_tv_shim.pth" "$site/_hybridvision_tv_shim.py"
    if ! "$VENV/bin/python" -W ignore -c 'import torchvision' >/dev/null 2>&1; then
        # The torchvision wheel is a CUDA build; its compiled ops cannot load on CPU torch.
        # Keep its two op-registration modules from running (see scripts/torchvision_cpu_shim.py).
        echo "[setup] torchvision cannot load its compiled ops on this torch: installing the CPU start-up shim in $VENV"
        cp scripts/torchvision_cpu_shim.py "$site/_hybridvision_tv_shim.py"
        echo "import _hybridvision_tv_shim" > "$site/hybridvision_tv_shim.pth"
    fi
    "$VENV/bin/python" -W ignore -c 'import torchvision, timm' \
        || { echo "[setup] ERROR: 'import timm' still fails in $VENV"; exit 1; }
    echo "$want" > "$STAMP"
fi

# The native circular_conv CPU kernel: compiled once into torch's extension cache (a no-op when built; optional,
# so a missing compiler only warns).
"$VENV/bin/python" -c "from hybridvision.ops import native; native.prebuild()"

# Fashion-MNIST from Debian (real data for the demo and the training tests).
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    if ! apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
            || echo "[setup] WARNING: could not install dataset-fashion-mnist; see README (Data)"
    fi
else
    echo "[setup] Fashion-MNIST not found. Install it with 'sudo apt-get install dataset-fashion-mnist'" \
         "or fetch it with '.venv/bin/hybridvision download fashion-mnist --data-dir DIR' and pass --data-dir DIR."
fi
echo "[setup] ready: $VENV ($("$VENV/bin/python" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}")' 2>/dev/null))"
