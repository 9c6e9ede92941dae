"""Every node and API workflow through the real server's HTTP API; bad graphs come back as node errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.api.json"))
NODES = {"RCODModelLoader": "RCOD Model Loader", "RCODVisualPrompt": "RCOD Visual Prompt (VPIM)",
         "RCODLatentMetric": "RCOD Latent Metric", "RCODEncode": "RCOD Encode",
         "RCODDenoise": "RCOD One-Step Denoise", "RCODDecode": "RCOD Decode", "RCODUpscale": "RCOD Upscale",
         "RCODRealismSweep": "RCOD Realism Sweep"}
#: SaveImage prefix → number of images, size (W, H)
EXPECTED = {"rcod_basic_x4": (1, (384, 384)), "rcod_fidelity": (1, (384, 384)), "rcod_neutral": (1, (384, 384)),
            "rcod_realism": (1, (384, 384)), "rcod_sweep": (3, (384, 384)), "rcod_adaptive": (1, (384, 384)),
            "rcod_spatial": (1, (384, 384)), "rcod_tiled": (1, (384, 384)), "rcod_s_x4": (1, (384, 384)),
            "rcod_osediff_x4": (1, (384, 384))}


def load(name: str) -> dict:
    return json.loads((ROOT / "workflows" / name).read_text())


def test_object_info_lists_every_node(server):
    info = server.get("/object_info")
    for node_id, display in NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["display_name"] == display and info[node_id]["category"] == "RCOD"
    loader = info["RCODModelLoader"]["input"]["required"]
    assert {"rcod_o.pkl", "rcod_s.pkl", "osediff.pkl", "rcod_s.safetensors"} <= set(loader["checkpoint"][0])
    assert "diffusers/base-sd21" in loader["base"][0] and "checkpoints/base-sd21.safetensors" in loader["base"][0]
    assert "clip_vision/clip-vision" in loader["clip_vision"][0]
    assert any("comfyui-rcod/js/rcod.js" in e for e in server.get("/extensions"))


def _outputs_by_class(prompt: dict, history: dict, cls: str) -> list[dict]:
    return [history["outputs"][nid] for nid, n in prompt.items() if n["class_type"] == cls and nid in history["outputs"]]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name.removesuffix(".api.json"))
def test_workflow_runs(server, path):
    prompt = json.loads(path.read_text())
    hist = server.run(prompt)
    status = hist["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[:3000]
    for nid, node in prompt.items():
        if node["class_type"] != "SaveImage":
            continue
        images = hist["outputs"][nid]["images"]
        count, size = EXPECTED[node["inputs"]["filename_prefix"]]
        assert len(images) == count
        for im in images:
            with Image.open(server.output / im.get("subfolder", "") / im["filename"]) as img:
                assert img.size == size and img.mode == "RGB"
                lo, hi = img.convert("L").getextrema()
                assert 0 <= lo <= hi <= 255
    for cls in ("RCODDenoise", "RCODUpscale", "RCODLatentMetric", "RCODRealismSweep"):
        for ui in _outputs_by_class(prompt, hist, cls):
            assert ui["rcod_t"] and all(1 <= t <= 999 for t in ui["rcod_t"]), ui
    if path.name == "rcod_adaptive_realism.api.json":
        (metric,) = _outputs_by_class(prompt, hist, "RCODLatentMetric")
        (den,) = _outputs_by_class(prompt, hist, "RCODDenoise")
        assert metric["rcod_t"] == den["rcod_t"] and metric["rcod_t"][0] in (249, 499, 749)
        assert -1 <= metric["rcod_m_l"][0] <= 1 and metric["rcod_m_l"] == den["rcod_m_l"]
    if path.name == "rcod_realism_sweep_grid.api.json":
        (sweep,) = _outputs_by_class(prompt, hist, "RCODRealismSweep")
        assert sweep["rcod_t"] == [250, 500, 750]


def _node_error(server, prompt: dict) -> str:
    code, body = server.post("/prompt", {"prompt": prompt})
    assert code == 400, body
    return json.dumps(body["node_errors"])


def test_missing_model_is_a_node_error(server):
    prompt = load("rcod_basic_x4.api.json")
    prompt["2"]["inputs"]["checkpoint"] = "no_such_model.pkl"
    text = _node_error(server, prompt)
    assert "checkpoint" in text and "no_such_model.pkl" in text
    assert server.alive()


def test_t_zero_is_a_node_error(server):
    prompt = load("rcod_basic_x4.api.json")
    prompt["3"]["inputs"].update(preset="Custom", t=0)
    text = _node_error(server, prompt)
    assert '"t"' in text or "t:" in text or "'t'" in text, text
    assert "smaller than min" in text or "min" in text
    assert server.alive()


def test_wrong_mask_size_is_an_execution_error_and_the_model_stays_usable(server):
    prompt = load("rcod_spatial_realism_mask.api.json")
    prompt["3"]["inputs"].update(width=300, height=100)  # 3:1 mask for a square output
    hist = server.run(prompt)
    assert hist["status"]["status_str"] == "error"
    err = [m for m in hist["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert err["node_type"] == "RCODDenoise"
    assert err["exception_message"].startswith("RCOD One-Step Denoise: mask is 300x100")
    assert "aspect ratios differ" in err["exception_message"]
    assert server.alive()
    good = copy.deepcopy(load("rcod_spatial_realism_mask.api.json"))
    assert server.run(good)["status"]["status_str"] == "success"
