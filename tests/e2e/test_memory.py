"""RCOD models under ComfyUI's memory manager: through the server (/free) and in-process with the
real ``comfy.model_management`` (its list of loaded models, unload_all_models)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from conftest import ARTIFACTS, ROOT, TREE

DEMO_WORKFLOW = ROOT / "workflows" / "rcod_basic_x4.api.json"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _settled_rss(pid: int, seconds: float = 6.0) -> int:
    """The server's RSS once it stops falling (the prompt worker frees between prompts)."""
    end, last = time.time() + seconds, _rss(pid)
    while time.time() < end:
        time.sleep(0.5)
        now = _rss(pid)
        if abs(now - last) < 256 * 1024 and time.time() > end - seconds / 2:
            return now
        last = now
    return last


# Two core nodes, nothing of ours: the cheapest prompt that runs to the end.
TRIVIAL = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
           "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def _flush_worker_flags(server) -> None:
    """Wait until ComfyUI's prompt worker has acted on /free.

    /free only sets flags; the worker reads them after its queue wait returns (after the next prompt,
    or its periodic gc wake-up), so a prompt posted right after /free can still run on the old cache.
    The worker handles the flags in the same loop pass that finishes a prompt, before it takes the
    next one: once a trivial prompt has finished, the unload and the cache reset are done or under way
    in that pass, and the next prompt cannot start before them."""
    assert server.run(TRIVIAL)["status"]["status_str"] == "success"


def test_free_drops_our_model_and_the_next_run_loads_it_again(server):
    prompt = json.loads(DEMO_WORKFLOW.read_text())
    assert prompt["2"]["inputs"]["checkpoint"] == "demo (built-in)"
    assert server.run(prompt)["status"]["status_str"] == "success"
    log = server.log.read_text()
    assert "Requested to load ManagedRCOD" in log  # ComfyUI's load_models_gpu got our ModelPatcher
    loads = log.count("RCOD: loaded demo (built-in)")
    held = _settled_rss(server.proc.pid)
    code, _ = server.post("/free", {"unload_models": True, "free_memory": True})
    assert code == 200
    _flush_worker_flags(server)
    freed = _settled_rss(server.proc.pid)
    # nothing of ours pins the model: ComfyUI's cache was its only owner, so the next run loads it anew
    assert server.run(prompt)["status"]["status_str"] == "success"
    assert server.log.read_text().count("RCOD: loaded demo (built-in)") == loads + 1
    again = _settled_rss(server.proc.pid)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "memory_free.json").write_text(json.dumps(
        {"rss_with_model": held, "rss_after_free": freed, "rss_after_reload": again}, indent=1))
    print(f"server RSS: with the demo model {held / 2**20:.1f} MiB, after /free {freed / 2**20:.1f} MiB, "
          f"after the next run {again / 2**20:.1f} MiB")
    # the demo model's weights in float32 (ComfyUI's CPU precision): about 28 MB; most must be returned
    assert held - freed > 15 * 2**20, (held, freed)


IN_PROCESS = r"""
import gc, sys, weakref
sys.argv = ["main.py", "--cpu"]
sys.path[:0] = [{tree!r}, {root!r}]
import comfy.options
comfy.options.enable_args_parsing()  # as main.py does, so that --cpu is read
import torch
import comfy.model_management as mm
import importlib.util
spec = importlib.util.spec_from_file_location("rcod_ext", {init!r}, submodule_search_locations=[{root!r}])
ext = importlib.util.module_from_spec(spec); sys.modules["rcod_ext"] = ext; spec.loader.exec_module(ext)
managed = sys.modules["rcod_ext.nodes.managed"]
(pipe,) = ext.NODE_CLASS_MAPPINGS["RCODModelLoader"]().load("demo (built-in)", dtype="fp32")
patcher = pipe.comfy_patcher
assert patcher.model.rcod is pipe.model and patcher.model_size() > 10_000_000, patcher.model_size()
image = torch.rand(1, 24, 24, 3)
(out, t) = ext.NODE_CLASS_MAPPINGS["RCODUpscale"]().upscale(pipe, image)["result"]
assert tuple(out.shape) == (1, 96, 96, 3) and t == 500
loaded = [m.model for m in mm.current_loaded_models]
assert any(m is patcher for m in loaded), loaded
print("loaded:", [type(m.model).__name__ for m in loaded], patcher.loaded_size())
# another model asks for more memory than there is: ComfyUI's free_memory (what load_models_gpu runs
# on a GPU before loading) unloads ours; the next node call loads it again and gives the same image
mm.free_memory(10**15, patcher.load_device)
assert not any(m.model is patcher for m in mm.current_loaded_models), "free_memory kept our model loaded"
(again, _) = ext.NODE_CLASS_MAPPINGS["RCODUpscale"]().upscale(pipe, image)["result"]
assert any(m.model is patcher for m in mm.current_loaded_models) and torch.equal(again, out)
print("freed and reloaded: same image")
mm.unload_all_models()
assert not any(m.model is patcher for m in mm.current_loaded_models)
ref = weakref.ref(pipe.model)
del pipe, patcher, loaded, out, again
gc.collect()
assert ref() is None, "the model outlived ComfyUI's references"
print("OK")
"""


def test_comfyui_lists_unloads_and_frees_our_model_in_process():
    code = IN_PROCESS.format(tree=str(TREE), root=str(ROOT), init=str(ROOT / "__init__.py"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=TREE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "loaded: ['ManagedRCOD']" in proc.stdout and "freed and reloaded: same image" in proc.stdout
