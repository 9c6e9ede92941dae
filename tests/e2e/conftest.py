"""A real ComfyUI server for the e2e tests (only with RCOD_E2E=1, i.e. from scripts/run_e2e.sh).

The server runs from .comfyui/ComfyUI (scripts/install_comfyui.sh) on 127.0.0.1 with this repo
symlinked into custom_nodes/, its models from an extra_model_paths.yaml that points at a scratch
folder holding the tiny set (so the extension's `rcod` folder must keep configured paths), and its
input/output/temp/user folders in .comfyui/e2e/. Stopped by the PID this fixture started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREE = Path(os.environ.get("RCOD_COMFY_TREE_DIR", ROOT / ".comfyui" / "ComfyUI"))
SCRATCH = ROOT / ".comfyui" / ("e2e-" + TREE.name)
ARTIFACTS = ROOT / "tests" / "e2e" / "artifacts"
EXTENSION = "comfyui-rcod"

if not os.environ.get("RCOD_E2E"):
    collect_ignore_glob = ["test_*.py"]  # the main test run: e2e only through scripts/run_e2e.sh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, output: Path):
        self.url, self.proc, self.log, self.output = url, proc, log, output

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """POST a prompt, wait for its history entry; returns it (status, outputs)."""
        code, body = self.post("/prompt", {"prompt": prompt, "client_id": "rcod-e2e"})
        assert code == 200, f"prompt refused ({code}): {json.dumps(body)[:2000]}"
        pid = body["prompt_id"]
        end = time.time() + timeout
        while time.time() < end:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            assert self.proc.poll() is None, "the server died: " + self.log.read_text()[-3000:]
            time.sleep(0.25)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")

    def alive(self) -> bool:
        return self.proc.poll() is None and "devices" in self.get("/system_stats")


@pytest.fixture(scope="session")
def server():
    if not (TREE / "main.py").is_file():
        pytest.skip(f"no ComfyUI tree at {TREE}; run scripts/install_comfyui.sh")
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import install_tiny_models

    for sub in ("input", "output", "temp", "user"):
        shutil.rmtree(SCRATCH / sub, ignore_errors=True)
        (SCRATCH / sub).mkdir(parents=True)
    install_tiny_models(SCRATCH / "models", ROOT / ".comfyui" / "tiny-set")
    # the input folder starts empty: the extension itself puts the workflows' example image there
    yaml = SCRATCH / "extra_model_paths.yaml"
    yaml.write_text(f"rcod_e2e:\n  base_path: {SCRATCH / 'models'}\n  checkpoints: checkpoints\n"
                    f"  diffusers: diffusers\n  clip_vision: clip_vision\n  rcod: rcod\n  vae: vae\n")
    link = TREE / "custom_nodes" / EXTENSION
    if link.is_symlink() or not link.exists():
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ROOT, target_is_directory=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = ARTIFACTS / f"server-{TREE.name}.log"
    args = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--extra-model-paths-config", str(yaml), "--input-directory", str(SCRATCH / "input"),
            "--output-directory", str(SCRATCH / "output"), "--temp-directory", str(SCRATCH / "temp")]
    if os.environ.get("RCOD_FRONT_END_ROOT"):  # another frontend build, e.g. the newest comfyui-frontend-package's static/
        args += ["--front-end-root", os.environ["RCOD_FRONT_END_ROOT"]]
    help_text = (TREE / "comfy" / "cli_args.py").read_text()  # flags the older tree lacks are left out
    for flag, value in (("--disable-api-nodes", None), ("--user-directory", str(SCRATCH / "user"))):
        if flag in help_text:
            args += [flag] + ([value] if value else [])
    # glibc returns freed blocks above this size to the system at once (without it the threshold grows
    # and freed weights stay in the heap), so the process's RSS shows what a test frees
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=TREE, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"http://127.0.0.1:{port}", proc, log, SCRATCH / "output")
    try:
        end = time.time() + 180
        while True:
            try:
                srv.get("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > end:
                    raise RuntimeError("ComfyUI did not start:\n" + log.read_text()[-4000:])
                time.sleep(0.5)
        text = log.read_text()
        assert "IMPORT FAILED" not in text or EXTENSION not in text.split("IMPORT FAILED")[1][:300], text[-3000:]
        yield srv
    finally:
        proc.terminate()  # only the PID this fixture started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
