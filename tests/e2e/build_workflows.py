"""Write workflows/*.json (UI format) and workflows/*.api.json (API format) from one description.

    python tests/e2e/build_workflows.py          # rewrite
    python tests/e2e/build_workflows.py --check  # exit 1 when a file differs (run by the e2e tests)

Every workflow names the files that `rcod make-tiny` writes, placed as tests/e2e/tiny_models.py
places them, and LoadImage reads astronaut_lr96.png (rcod_core/assets) from ComfyUI's input folder.
Real use: pick your real checkpoint, base and CLIP in the loader's combos.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "workflows"
IMAGE = "astronaut_lr96.png"

# node type → (connection inputs [(name, type)], widget names in order, outputs [(name, type)])
SPEC = {
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "ImageScaleBy": ([("image", "IMAGE")], ["upscale_method", "scale_by"], [("IMAGE", "IMAGE")]),
    "SolidMask": ([], ["value", "width", "height"], [("MASK", "MASK")]),
    "MaskComposite": ([("destination", "MASK"), ("source", "MASK")], ["x", "y", "operation"], [("MASK", "MASK")]),
    "RCODModelLoader": ([], ["checkpoint", "base", "clip_vision", "dtype", "device", "mem"],
                        [("rcod_model", "RCOD_MODEL")]),
    "RCODVisualPrompt": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE")], [], [("prompt", "RCOD_PROMPT")]),
    "RCODLatentMetric": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE"), ("hr_image", "IMAGE")], [],
                         [("M_L", "FLOAT"), ("t", "INT"), ("M_L_true", "FLOAT")]),
    "RCODEncode": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE")], ["scale", "resampler"], [("LATENT", "LATENT")]),
    "RCODDenoise": ([("rcod_model", "RCOD_MODEL"), ("latent", "LATENT"), ("mask", "MASK"), ("prompt", "RCOD_PROMPT")],
                    ["preset", "t", "x0_mode", "mask_t0"], [("latent", "LATENT"), ("t", "INT")]),
    "RCODDecode": ([("rcod_model", "RCOD_MODEL"), ("latent", "LATENT")], [], [("IMAGE", "IMAGE")]),
    "RCODUpscale": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE"), ("mask", "MASK")],
                    ["scale", "preset", "t", "x0_mode", "tiling", "tile_size", "tile_overlap", "color_fix", "mask_t0",
                     "processing", "seed"],
                    [("image", "IMAGE"), ("t", "INT")]),
    "RCODRealismSweep": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE")],
                         ["timesteps", "scale", "x0_mode", "resampler"], [("IMAGE", "IMAGE")]),
}
NOT_IN_API = {"upload"}  # UI-only widgets


def loader(checkpoint, base, clip="clip_vision/clip-vision", mem="none"):
    return ("RCODModelLoader", dict(checkpoint=checkpoint, base=base, clip_vision=clip, dtype="auto", device="auto",
                                    mem=mem), {})


def load_image():
    return ("LoadImage", {"image": IMAGE, "upload": "image"}, {})


def upscale(model, image, preset="Neutral", t=500, scale=4.0, tiling="auto", tile_size=64, tile_overlap=16,
            color_fix="none", mask=None, mask_t0=250):
    links = {"rcod_model": (model, 0), "image": image}
    if mask:
        links["mask"] = mask
    return ("RCODUpscale", dict(scale=scale, preset=preset, t=t, x0_mode="model default", tiling=tiling,
                                tile_size=tile_size, tile_overlap=tile_overlap, color_fix=color_fix,
                                mask_t0=mask_t0, processing="ours", seed=0), links)


def denoise(model, latent, preset="Neutral", t=500, mask=None, prompt=None, mask_t0=250):
    links = {"rcod_model": (model, 0), "latent": (latent, 0)}
    if mask:
        links["mask"] = mask
    if prompt:
        links["prompt"] = (prompt, 0)
    return ("RCODDenoise", dict(preset=preset, t=t, x0_mode="model default", mask_t0=mask_t0), links)


def save(image, prefix):
    return ("SaveImage", {"filename_prefix": prefix}, {"images": image})


RCOD_O = ("rcod_o.pkl", "diffusers/base-sd21")
WORKFLOWS = {
    "rcod_basic_x4": {
        1: load_image(),
        2: loader(*RCOD_O),
        3: upscale(2, (1, 0)),
        4: save((3, 0), "rcod_basic_x4"),
    },
    "rcod_presets_side_by_side": {  # encode once, three timesteps; single-file base
        1: load_image(),
        2: loader("rcod_o.pkl", "checkpoints/base-sd21.safetensors"),
        3: ("RCODEncode", dict(scale=4.0, resampler="bicubic"), {"rcod_model": (2, 0), "image": (1, 0)}),
        4: ("RCODVisualPrompt", {}, {"rcod_model": (2, 0), "image": (1, 0)}),
        5: denoise(2, 3, "Fidelity", 250, prompt=4),
        6: denoise(2, 3, "Neutral", 500, prompt=4),
        7: denoise(2, 3, "Realism", 750, prompt=4),
        8: ("RCODDecode", {}, {"rcod_model": (2, 0), "latent": (5, 0)}),
        9: ("RCODDecode", {}, {"rcod_model": (2, 0), "latent": (6, 0)}),
        10: ("RCODDecode", {}, {"rcod_model": (2, 0), "latent": (7, 0)}),
        11: save((8, 0), "rcod_fidelity"),
        12: save((9, 0), "rcod_neutral"),
        13: save((10, 0), "rcod_realism"),
    },
    "rcod_realism_sweep_grid": {
        1: load_image(),
        2: loader(*RCOD_O),
        3: ("RCODRealismSweep", dict(timesteps="250,500,750", scale=4.0, x0_mode="model default",
                                     resampler="bicubic"), {"rcod_model": (2, 0), "image": (1, 0)}),
        4: ("PreviewImage", {}, {"images": (3, 0)}),
        5: save((3, 0), "rcod_sweep"),
    },
    "rcod_adaptive_realism": {  # RCOD_S with MEM: M_L and t shown on the nodes
        1: load_image(),
        2: loader("rcod_s.safetensors", "diffusers/base-sd-turbo"),
        3: ("RCODLatentMetric", {}, {"rcod_model": (2, 0), "image": (1, 0)}),
        4: ("RCODEncode", dict(scale=4.0, resampler="bicubic"), {"rcod_model": (2, 0), "image": (1, 0)}),
        5: denoise(2, 4, "Adaptive", 500),
        6: ("RCODDecode", {}, {"rcod_model": (2, 0), "latent": (5, 0)}),
        7: save((6, 0), "rcod_adaptive"),
    },
    "rcod_spatial_realism_mask": {  # left half Fidelity (mask 0), right half Realism (mask 1)
        1: load_image(),
        2: loader(*RCOD_O),
        3: ("SolidMask", dict(value=0.0, width=384, height=384), {}),
        4: ("SolidMask", dict(value=1.0, width=192, height=384), {}),
        5: ("MaskComposite", dict(x=192, y=0, operation="add"), {"destination": (3, 0), "source": (4, 0)}),
        6: ("RCODEncode", dict(scale=4.0, resampler="bicubic"), {"rcod_model": (2, 0), "image": (1, 0)}),
        7: denoise(2, 6, "Realism", 750, mask=(5, 0), mask_t0=250),
        8: ("RCODDecode", {}, {"rcod_model": (2, 0), "latent": (7, 0)}),
        9: save((8, 0), "rcod_spatial"),
    },
    "rcod_large_image_tiled": {  # a classical 2x first, then RCOD 2x in latent tiles
        1: load_image(),
        2: loader(*RCOD_O),
        3: ("ImageScaleBy", dict(upscale_method="lanczos", scale_by=2.0), {"image": (1, 0)}),
        4: upscale(2, (3, 0), "Neutral", 500, scale=2.0, tiling="custom", tile_size=16, tile_overlap=8),
        5: save((4, 0), "rcod_tiled"),
    },
    "rcod_s_x4": {  # official RCOD_S pickle + separate MEM file; de_net.pth beside it is found automatically
        1: load_image(),
        2: loader("rcod_s.pkl", "diffusers/base-sd-turbo", "clip_vision/clip-vision.safetensors", "rcod_s_mem.pkl"),
        3: upscale(2, (1, 0), "Realism", 750),
        4: save((3, 0), "rcod_s_x4"),
    },
    "rcod_osediff_x4": {  # OSEDiff through the same nodes (text-conditioned: diffusers base; t fixed at 999)
        1: load_image(),
        2: loader("osediff.pkl", "diffusers/base-sd21"),
        3: upscale(2, (1, 0)),
        4: save((3, 0), "rcod_osediff_x4"),
    },
}


def api_format(nodes: dict) -> dict:
    out = {}
    for nid, (kind, widgets, links) in nodes.items():
        inputs = {k: v for k, v in widgets.items() if k not in NOT_IN_API}
        inputs.update({k: [str(src), slot] for k, (src, slot) in links.items()})
        out[str(nid)] = {"class_type": kind, "inputs": inputs, "_meta": {"title": kind}}
    return out


def ui_format(nodes: dict) -> dict:
    # columns by depth, so the graph reads left to right
    depth: dict[int, int] = {}

    def d(nid):
        if nid not in depth:
            depth[nid] = 1 + max((d(src) for src, _ in nodes[nid][2].values()), default=-1)
        return depth[nid]

    for nid in nodes:
        d(nid)
    links, ui_nodes, rows = [], [], {}
    outputs = {nid: [[] for _ in SPEC[kind][2]] for nid, (kind, _, _) in nodes.items()}
    for nid, (kind, _, link_map) in nodes.items():
        conn = [name for name, _ in SPEC[kind][0]]
        for name, (src, slot) in link_map.items():
            links.append([len(links) + 1, src, slot, nid, conn.index(name), SPEC[nodes[src][0]][2][slot][1]])
            outputs[src][slot].append(len(links))
    by_target = {(l[3], l[4]): l[0] for l in links}
    for order, (nid, (kind, widgets, _)) in enumerate(sorted(nodes.items(), key=lambda kv: (depth[kv[0]], kv[0]))):
        conn_in, widget_names, outs = SPEC[kind]
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        node = {
            "id": nid, "type": kind, "pos": [40 + 380 * col, 40 + 330 * row], "size": [340, 280],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": by_target.get((nid, i))} for i, (n, t) in enumerate(conn_in)],
            "outputs": [{"name": n, "type": t, "links": outputs[nid][i] or None, "slot_index": i}
                        for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": kind},
            "widgets_values": [widgets[w] for w in widget_names],
        }
        ui_nodes.append(node)
    return {"last_node_id": max(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def render() -> dict[str, str]:
    files = {}
    for name, nodes in WORKFLOWS.items():
        files[f"{name}.json"] = json.dumps(ui_format(nodes), indent=1) + "\n"
        files[f"{name}.api.json"] = json.dumps(api_format(nodes), indent=1) + "\n"
    return files


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        stale = [n for n, text in files.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text]
        if stale:
            print("stale workflows (run python tests/e2e/build_workflows.py):", ", ".join(stale))
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for n, text in files.items():
        (OUT / n).write_text(text)
    print(f"wrote {len(files)} files to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
