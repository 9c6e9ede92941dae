"""Write workflows/*.json (UI format) and workflows/*.api.json (API format) from one description.

    python tests/e2e/build_workflows.py          # rewrite
    python tests/e2e/build_workflows.py --check  # exit 1 when a file differs (run by the e2e tests)

The workflows run as shared: LoadImage reads rcod_astronaut_lr96.png, which the extension puts
into ComfyUI's input folder; the RCOD_O workflows use the built-in demo model (nothing to
download); the others name the weights users download by their usual file names, list them in the
workflow's `models` metadata (name, URL, folder) so the frontend offers the missing ones, and say
in a Note node where each file goes. The end-to-end tests install the tiny model set under those
names (tests/e2e/tiny_models.py). Nodes are laid out in columns by depth, below the frontend's
top bar, without overlap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "workflows"
IMAGE = "rcod_astronaut_lr96.png"  # nodes/common.py EXAMPLE_IMAGE
AUTO = "auto (from checkpoint)"
DEMO = "demo (built-in)"

# the bases and CLIP by the names users download them under (see MODELS for the files' sources)
SD21_FILE = "checkpoints/v2-1_512-ema-pruned.safetensors"
SD21_DIR = "diffusers/stable-diffusion-2-1-base"  # OSEDiff needs the text encoder: the diffusers folder
TURBO_FILE = "checkpoints/sd_turbo.safetensors"
CLIP_FILE = "clip_vision/clip-vit-large-patch14.safetensors"
#: files the frontend can offer for download, in the workflow's top-level ``models`` list (it takes
#: .safetensors from huggingface.co only; the .pkl checkpoints and diffusers folders are described in
#: each workflow's Note instead). ``name`` is the file name inside ``directory``, which is how the
#: frontend checks whether the file is there (per-node entries would have to repeat the loader's
#: folder-prefixed widget value, which that check never finds). SD 2.1-base's single file is left
#: out because its official repository is gone.
MODELS = {
    TURBO_FILE: {"name": "sd_turbo.safetensors", "directory": "checkpoints",
                 "url": "https://huggingface.co/stabilityai/sd-turbo/resolve/main/sd_turbo.safetensors"},
    CLIP_FILE: {"name": "clip-vit-large-patch14.safetensors", "directory": "clip_vision",
                "url": "https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors"},
}

#: the tiling widgets of the stage nodes and the sweep, at their defaults
TILES = dict(tiling="auto", tile_size=64, tile_overlap=16)
TILE_WIDGETS = list(TILES)
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
    "RCODEncode": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE")], ["scale", "resampler", *TILE_WIDGETS],
                   [("LATENT", "LATENT")]),
    "RCODDenoise": ([("rcod_model", "RCOD_MODEL"), ("latent", "LATENT"), ("mask", "MASK"), ("prompt", "RCOD_PROMPT"),
                     ("image", "IMAGE")],
                    ["preset", "t", "x0_mode", "mask_t0", *TILE_WIDGETS], [("latent", "LATENT"), ("t", "INT")]),
    "RCODDecode": ([("rcod_model", "RCOD_MODEL"), ("latent", "LATENT")], [*TILE_WIDGETS], [("IMAGE", "IMAGE")]),
    "RCODUpscale": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE"), ("mask", "MASK")],
                    ["scale", "preset", "t", "x0_mode", "tiling", "tile_size", "tile_overlap", "color_fix", "mask_t0",
                     "processing", "seed"],
                    [("image", "IMAGE"), ("t", "INT")]),
    "RCODRealismSweep": ([("rcod_model", "RCOD_MODEL"), ("image", "IMAGE")],
                         ["timesteps", "scale", "x0_mode", "resampler", *TILE_WIDGETS], [("IMAGE", "IMAGE")]),
    "Note": ([], ["text"], []),
}
NOT_IN_API = {"upload"}  # UI-only widgets
VIRTUAL = {"Note"}  # frontend-only nodes: not in the API format
#: node heights in the UI (px): enough for the widgets, LoadImage with its preview
HEIGHT = {"LoadImage": 400, "RCODModelLoader": 230, "RCODUpscale": 360, "RCODDenoise": 310, "RCODEncode": 200,
          "RCODDecode": 160, "RCODRealismSweep": 260, "Note": 200, "SaveImage": 300, "PreviewImage": 300}
WIDTH = 340
TOP, LEFT, GAP_X, GAP_Y = 0, 0, 60, 60
#: where the graph's top-left corner opens on screen (px): right of the side bar (60 px) and below the
#: menu, tab and breadcrumb bars (about 130 px in frontend 1.32)
SCREEN_ORIGIN = (80, 170)
#: the graph is zoomed (at most 0.8) to fit this much screen (px): a 1600x1000 view less the bars and the
#: minimap in the bottom-right corner
FIT = (1250, 740)


def note(text):
    return ("Note", {"text": text}, {})


def loader(checkpoint, base=AUTO, clip=AUTO, mem="none"):
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
    return ("RCODDenoise", dict(preset=preset, t=t, x0_mode="model default", mask_t0=mask_t0, **TILES), links)


def save(image, prefix):
    return ("SaveImage", {"filename_prefix": prefix}, {"images": image})


RCOD_S_NOTE = ("RCOD_S: put the RCOD_S checkpoint (the authors' release, or one trained with rcod-train) in "
               "models/rcod. Base: SD-Turbo, sd_turbo.safetensors in models/checkpoints. CLIP vision: "
               "clip-vit-large-patch14.safetensors (OpenAI's model.safetensors) in models/clip_vision. "
               "The workflow's model list lets the frontend download the base and CLIP.")
WORKFLOWS = {
    "rcod_basic_x4": {
        1: load_image(),
        2: loader(DEMO),
        3: upscale(2, (1, 0)),
        4: save((3, 0), "rcod_basic_x4"),
    },
    "rcod_presets_side_by_side": {  # encode once, three timesteps
        1: load_image(),
        2: loader(DEMO),
        3: ("RCODEncode", dict(scale=4.0, resampler="bicubic", **TILES), {"rcod_model": (2, 0), "image": (1, 0)}),
        4: ("RCODVisualPrompt", {}, {"rcod_model": (2, 0), "image": (1, 0)}),
        5: denoise(2, 3, "Fidelity", 250, prompt=4),
        6: denoise(2, 3, "Neutral", 500, prompt=4),
        7: denoise(2, 3, "Realism", 750, prompt=4),
        8: ("RCODDecode", dict(TILES), {"rcod_model": (2, 0), "latent": (5, 0)}),
        9: ("RCODDecode", dict(TILES), {"rcod_model": (2, 0), "latent": (6, 0)}),
        10: ("RCODDecode", dict(TILES), {"rcod_model": (2, 0), "latent": (7, 0)}),
        11: save((8, 0), "rcod_fidelity"),
        12: save((9, 0), "rcod_neutral"),
        13: save((10, 0), "rcod_realism"),
    },
    "rcod_realism_sweep_grid": {
        1: load_image(),
        2: loader(DEMO),
        3: ("RCODRealismSweep", dict(timesteps="250,500,750", scale=4.0, x0_mode="model default",
                                     resampler="bicubic", **TILES), {"rcod_model": (2, 0), "image": (1, 0)}),
        4: ("PreviewImage", {}, {"images": (3, 0)}),
        5: save((3, 0), "rcod_sweep"),
    },
    "rcod_adaptive_realism": {  # RCOD_S with MEM: M_L and t shown on the nodes
        1: load_image(),
        2: loader("rcod_s.safetensors", TURBO_FILE, CLIP_FILE),
        3: ("RCODLatentMetric", {}, {"rcod_model": (2, 0), "image": (1, 0)}),
        4: ("RCODEncode", dict(scale=4.0, resampler="bicubic", **TILES), {"rcod_model": (2, 0), "image": (1, 0)}),
        5: denoise(2, 4, "Adaptive", 500),
        6: ("RCODDecode", dict(TILES), {"rcod_model": (2, 0), "latent": (5, 0)}),
        7: save((6, 0), "rcod_adaptive"),
        8: note(RCOD_S_NOTE + " Adaptive realism needs the MEM (inside an rcod_s.safetensors, or its own file "
                "in the loader's mem widget)."),
    },
    "rcod_spatial_realism_mask": {  # left half Fidelity (mask 0), right half Realism (mask 1)
        1: load_image(),
        2: loader(DEMO),
        3: ("SolidMask", dict(value=0.0, width=384, height=384), {}),
        4: ("SolidMask", dict(value=1.0, width=192, height=384), {}),
        5: ("MaskComposite", dict(x=192, y=0, operation="add"), {"destination": (3, 0), "source": (4, 0)}),
        6: ("RCODEncode", dict(scale=4.0, resampler="bicubic", **TILES), {"rcod_model": (2, 0), "image": (1, 0)}),
        7: denoise(2, 6, "Realism", 750, mask=(5, 0), mask_t0=250),
        8: ("RCODDecode", dict(TILES), {"rcod_model": (2, 0), "latent": (7, 0)}),
        9: save((8, 0), "rcod_spatial"),
    },
    "rcod_large_image_tiled": {  # a classical 2x first, then RCOD 2x in latent tiles
        1: load_image(),
        2: loader(DEMO),
        3: ("ImageScaleBy", dict(upscale_method="lanczos", scale_by=2.0), {"image": (1, 0)}),
        4: upscale(2, (3, 0), "Neutral", 500, scale=2.0, tiling="custom", tile_size=16, tile_overlap=8),
        5: save((4, 0), "rcod_tiled"),
    },
    "rcod_s_x4": {  # official RCOD_S pickle + separate MEM file; de_net.pth beside it is found automatically
        1: load_image(),
        2: loader("rcod_s.pkl", TURBO_FILE, CLIP_FILE, "rcod_s_mem.pkl"),
        3: upscale(2, (1, 0), "Realism", 750),
        4: save((3, 0), "rcod_s_x4"),
        5: note(RCOD_S_NOTE + " The official RCOD_S pickle needs S3Diff's de_net.pth beside it in models/rcod."),
    },
    "rcod_osediff_x4": {  # OSEDiff through the same nodes (text-conditioned: diffusers base; t fixed at 999)
        1: load_image(),
        2: loader("osediff.pkl", SD21_DIR),
        3: upscale(2, (1, 0)),
        4: save((3, 0), "rcod_osediff_x4"),
        5: note("OSEDiff: osediff.pkl (the OSEDiff release) in models/rcod. It is text-conditioned, so its base "
                "must be the diffusers folder of SD 2.1-base with its text encoder: models/diffusers/"
                "stable-diffusion-2-1-base (huggingface-cli download stabilityai/stable-diffusion-2-1-base "
                "--local-dir ...)."),
    },
}


def api_format(nodes: dict) -> dict:
    out = {}
    for nid, (kind, widgets, links) in nodes.items():
        if kind in VIRTUAL:
            continue
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
        y = rows.get(col, TOP)
        height = HEIGHT.get(kind, 160)
        rows[col] = y + height + GAP_Y
        node = {
            "id": nid, "type": kind, "pos": [LEFT + (WIDTH + GAP_X) * col, y], "size": [WIDTH, height],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": by_target.get((nid, i))} for i, (n, t) in enumerate(conn_in)],
            "outputs": [{"name": n, "type": t, "links": outputs[nid][i] or None, "slot_index": i}
                        for i, (n, t) in enumerate(outs)],
            "properties": {"Node name for S&R": kind},
            "widgets_values": [widgets[w] for w in widget_names],
        }
        ui_nodes.append(node)
    right = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    bottom = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    scale = round(min(0.8, FIT[0] / right, FIT[1] / bottom), 3)
    # the frontend draws graph point p at (p + offset) * scale; the title bar sits above pos
    offset = [round(SCREEN_ORIGIN[0] / scale, 1), round(SCREEN_ORIGIN[1] / scale, 1)]
    graph = {"last_node_id": max(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
             "groups": [], "config": {}, "extra": {"ds": {"scale": scale, "offset": offset}}, "version": 0.4}
    models = models_of(nodes)
    if models:
        graph["models"] = models
    return graph


def models_of(nodes: dict) -> list[dict]:
    """The frontend's ``models`` list: each downloadable file a loader names, with its URL and folder."""
    out = []
    for kind, widgets, _ in nodes.values():
        if kind != "RCODModelLoader":
            continue
        for value in (widgets["base"], widgets["clip_vision"]):
            if value in MODELS and MODELS[value] not in out:
                out.append(MODELS[value])
    return out


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
