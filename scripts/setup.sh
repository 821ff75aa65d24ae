#!/usr/bin/env bash
# Set up hpsearch in ./.venv: PyTorch, the package with its test extras, and (where apt works)
# Debian's Fashion-MNIST so nothing needs downloading. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # The pinned pair is on this project's build machines' disk; elsewhere any torch>=2.4 works.
  pip install torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -c "import torch, torchvision" 2>/dev/null || pip install 'torch>=2.4' 'torchvision>=0.19'
fi
pip install -e '.[test]'
.venv/bin/python -c "import hpsearch, optuna, torch" || { echo "setup failed: see pip output above" >&2; exit 1; }
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; hpsearch will download datasets through torchvision" >&2
fi
echo "hpsearch is set up in .venv (activate with: source .venv/bin/activate)"
