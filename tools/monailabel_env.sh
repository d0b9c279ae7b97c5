#!/usr/bin/env bash
# Build (or reuse) the separate virtual environment MONAI Label needs.
#
# MONAI Label 0.8.5 pins a newer torch (with CUDA libraries) and torchvision than
# the bundle's own environment, so it lives in its own venv.  Facts measured on
# this project's machines: the server starts only with pydicom<3 and
# dicomweb-client[gcp]==0.59.3.
#
#   tools/monailabel_env.sh [VENV_DIR]      (default: .venv-monailabel)
#
# The bundle package itself is installed without dependencies (its torch/monai
# ranges are for the training environment; MONAI Label brings its own).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${MONAILABEL_VENV:-$REPO/.venv-monailabel}}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.bundle-monailabel-ready"
if [[ -f "$STAMP" && "$VENV/bin/monailabel" -nt "$REPO/tools/monailabel_env.sh" ]]; then
    echo "reusing $VENV"
else
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "monailabel==0.8.5" "pydicom<3" "dicomweb-client[gcp]==0.59.3" \
        pytorch-ignite fire einops nibabel "mlflow" pyyaml
    touch "$STAMP"
fi
"$VENV/bin/pip" install --quiet --no-deps -e "$REPO"
"$VENV/bin/python" -c "import monailabel, torch, monai, bundle; print('monailabel', monailabel.__version__, 'torch', torch.__version__, 'monai', monai.__version__)"
