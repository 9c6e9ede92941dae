"""The ComfyUI nodes on the tiny model set, without ComfyUI: minimal stand-ins for ``folder_paths``,
``comfy.model_management`` and ``comfy.utils`` are put in ``sys.modules`` for this module only.

Checks the ComfyUI contract (BHWC in/out, [0, 1], LATENT/MASK shapes, tooltips), that the nodes
call rcod_core (the node results equal rcod_core's on the same model), caching, and errors.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from tiny_models import install_tiny_models  # noqa: E402


class FakeProgressBar:
    instances: list = []

    def __init__(self, total):
        self.total, self.updates = total, []
        FakeProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.updates.append((value, self.total))


def _fake_comfy(models_dir: Path) -> dict:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models_dir)
    fp.supported_pt_extensions = {".ckpt", ".pt", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    fp.folder_names_and_paths = {k: ([str(models_dir / k)], fp.supported_pt_extensions)
                                 for k in ("checkpoints", "diffusers", "clip_vision")}
    fp.folder_names_and_paths["diffusers"] = ([str(models_dir / "diffusers")], {"folder"})
    # as after extra_model_paths.yaml: an rcod path configured before the extension loads
    fp.folder_names_and_paths["rcod"] = ([str(models_dir.parent / "elsewhere" / "rcod")], set())

    def get_folder_paths(kind):
        return fp.folder_names_and_paths[kind][0][:]

    def get_filename_list(kind):
        paths, exts = fp.folder_names_and_paths[kind]
        out = []
        for root in paths:
            for d, _, files in os.walk(root, followlinks=True):
                out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for f in files
                        if not exts or os.path.splitext(f)[1] in exts]
        return sorted(set(out))

    fp.get_folder_paths, fp.get_filename_list = get_folder_paths, get_filename_list
    fp.get_input_directory = lambda: str(models_dir.parent / "input")
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.calls = []
    mm.interrupted = False

    class InterruptProcessingException(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        if mm.interrupted:
            mm.interrupted = False
            raise InterruptProcessingException()

    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.free_memory = lambda size, device, keep_loaded=(): mm.calls.append(("free_memory", size, str(device)))
    mm.soft_empty_cache = lambda force=False: mm.calls.append(("soft_empty_cache",))
    mm.unet_offload_device = lambda: torch.device("cpu")

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        mm.calls.append(("load_models_gpu", models, memory_required, force_full_load))

    mm.load_models_gpu = load_models_gpu
    patcher_mod = types.ModuleType("comfy.model_patcher")

    class ModelPatcher:  # what the loader hands its model to (ComfyUI's signature)
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            model.device = offload_device  # ComfyUI writes these on the module
            model.model_loaded_weight_memory = 0

    patcher_mod.ModelPatcher = ModelPatcher
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = FakeProgressBar
    comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, patcher_mod
    return {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
            "comfy.model_patcher": patcher_mod}


@pytest.fixture(scope="module")
def ext(tmp_path_factory, request):
    """The extension imported as ComfyUI imports a custom node folder, over the tiny set."""
    base = tmp_path_factory.mktemp("comfy")
    # the tiny set is deterministic (seed 0): made once, kept in pytest's cache between runs
    install_tiny_models(base / "models", request.config.cache.mkdir("rcod-tiny-set"), sd_vae=False)
    fakes = _fake_comfy(base / "models")
    saved = {k: sys.modules.get(k) for k in fakes}
    sys.modules.update(fakes)
    spec = importlib.util.spec_from_file_location("comfyui_rcod_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.fakes = fakes
    yield module
    for name in [n for n in sys.modules if n.startswith(spec.name)]:
        del sys.modules[name]
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def node(ext, name):
    return ext.NODE_CLASS_MAPPINGS[name]()


def load(ext, checkpoint="rcod_o.pkl", base="diffusers/base-sd21", clip="clip_vision/clip-vision", **kw):
    return node(ext, "RCODModelLoader").load(checkpoint, base, clip, "fp32", "auto", **kw)[0]


@pytest.fixture(scope="module")
def rcod_o(ext):
    return load(ext)


@pytest.fixture(scope="module")
def rcod_s(ext):
    return load(ext, "rcod_s.safetensors", "diffusers/base-sd-turbo")


@pytest.fixture
def lr():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 24, 32, 3, generator=g)  # BHWC, not square, not a multiple of 8


def test_example_image_is_installed_for_load_image_and_a_users_file_is_kept(ext):
    from rcod_core.demo import EXAMPLE_LR

    common = sys.modules[ext.__name__ + ".nodes.common"]
    target = Path(ext.fakes["folder_paths"].get_input_directory()) / common.EXAMPLE_IMAGE
    assert target.read_bytes() == EXAMPLE_LR.read_bytes()  # copied when the extension was imported
    target.write_bytes(b"a user's own file")
    assert common.install_example_image() == str(target)
    assert target.read_bytes() == b"a user's own file"  # never replaced
    target.unlink()
    assert common.install_example_image() == str(target) and target.read_bytes() == EXAMPLE_LR.read_bytes()


def test_registration_and_widgets(ext):
    assert ext.WEB_DIRECTORY == "./web"
    assert set(ext.NODE_CLASS_MAPPINGS) == set(ext.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in ext.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("RCOD") and cls.CATEGORY == "RCOD"
        assert callable(getattr(cls, cls.FUNCTION)) and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        spec = cls.INPUT_TYPES()
        for group in spec.values():
            for name, (kind, *opts) in group.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
                if kind in ("INT", "FLOAT"):
                    assert {"default", "min", "max", "step"} <= set(opts[0]), f"{node_id}.{name}"
    loader = ext.NODE_CLASS_MAPPINGS["RCODModelLoader"].INPUT_TYPES()["required"]
    assert "rcod_o.pkl" in loader["checkpoint"][0]
    assert {"diffusers/base-sd21", "checkpoints/base-sd21.safetensors"} <= set(loader["base"][0])
    assert {"clip_vision/clip-vision", "clip_vision/clip-vision.safetensors"} <= set(loader["clip_vision"][0])


def test_rcod_folder_keeps_configured_paths(ext):
    paths, exts = ext.fakes["folder_paths"].folder_names_and_paths["rcod"]
    assert paths[0].endswith(os.path.join("elsewhere", "rcod")) and paths[1].endswith(os.path.join("models", "rcod"))
    assert {".pkl", ".pth", ".safetensors"} <= exts


def test_loader_caches_and_uses_model_management(ext, rcod_o):
    assert load(ext) is rcod_o
    single = load(ext, base="checkpoints/base-sd21.safetensors", clip="clip_vision/clip-vision.safetensors")
    assert single is not rcod_o and single.spec.kind == "rcod_o"
    assert load(ext) is rcod_o  # still cached (two entries)


def test_every_node_lets_comfyui_load_the_model_first(ext, rcod_o, lr):
    """The model is held by a ModelPatcher, and each node calls load_models_gpu with it before it
    runs (room for the output's activations, whole-model loads)."""
    managed = sys.modules[ext.__name__ + ".nodes.managed"]
    patcher = rcod_o.comfy_patcher
    assert isinstance(patcher.model, managed.ManagedRCOD) and patcher.model.rcod is rcod_o.model
    assert patcher.model.device == torch.device("cpu") and rcod_o.device == torch.device("cpu")
    calls = ext.fakes["comfy.model_management"].calls
    calls.clear()
    (up, _) = node(ext, "RCODUpscale").upscale(rcod_o, lr, scale=2.0, tiling="none")["result"]
    latent = node(ext, "RCODEncode").encode(rcod_o, lr, scale=2.0)[0]
    den = node(ext, "RCODDenoise").denoise(rcod_o, latent)["result"][0]
    node(ext, "RCODDecode").decode(rcod_o, den)
    node(ext, "RCODVisualPrompt").encode(rcod_o, lr)
    loads = [c for c in calls if c[0] == "load_models_gpu"]
    assert len(loads) == 5 and all(c[1] == [patcher] and c[3] is True for c in loads)
    pixels = 2 * 48 * 64  # batch 2, 24x32 at x2
    assert loads[0][2] == pixels * managed.ACTIVATION_BYTES_PER_PX and tuple(up.shape) == (2, 48, 64, 3)
    assert loads[4][2] == 0  # CLIP only


def test_loader_does_not_pin_models_comfyui_has_dropped(ext):
    """The loader's cache holds models weakly: once ComfyUI drops its reference (/free clears its
    output cache), the model is freed; while held, a second load is the same object."""
    import gc
    import weakref

    pipe = load(ext, "osediff.pkl", clip="auto (from checkpoint)")
    assert load(ext, "osediff.pkl", clip="auto (from checkpoint)") is pipe
    ref = weakref.ref(pipe)
    del pipe
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("name, message", [
    ("../rcod/rcod_o.pkl", "must not contain '..'"),
    ("/etc/passwd", "absolute path"),
    ("missing.pkl", "not found in the 'rcod' model folders"),
])
def test_loader_refuses_bad_names(ext, name, message):
    with pytest.raises(ValueError, match=message) as info:
        load(ext, checkpoint=name)
    assert str(info.value).startswith("RCOD Model Loader: ")


def test_loader_wrong_base_family_is_a_clear_error(ext):
    with pytest.raises(ValueError, match="RCOD Model Loader: .*(SD-Turbo|sd_turbo)"):
        load(ext, "rcod_s.safetensors", "diffusers/base-sd21")


def test_upscale_is_rcod_core_run(ext, rcod_o, lr, monkeypatch):
    calls = []
    run = rcod_o.run
    monkeypatch.setattr(rcod_o, "run", lambda *a, **k: calls.append(k) or run(*a, **k), raising=False)
    out = node(ext, "RCODUpscale").upscale(rcod_o, lr, 2.0, "Fidelity", 250)
    image, t = out["result"]
    assert image.shape == (2, 48, 64, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert t == 249 and out["ui"]["rcod_t"] == [249, 249]  # the release's preset (spec.preset_style)
    assert len(calls) == 1 and calls[0]["realism"] == "fidelity" and calls[0]["scale"] == 2.0
    expected = run(lr.permute(0, 3, 1, 2), realism="fidelity", scale=2.0).images.permute(0, 2, 3, 1)
    torch.testing.assert_close(image, expected)


def test_upscale_release_processing_is_rcod_core_release(ext, rcod_o, lr):
    lr8 = (lr * 255).round() / 255  # an 8-bit image, as a file gives
    out = node(ext, "RCODUpscale").upscale(rcod_o, lr8, 2.0, "Custom", 750, color_fix="adain",
                                           processing="release", seed=11)
    image, t = out["result"]
    assert t == 749  # the release's mapping of 750
    expected = rcod_o.run(lr8.permute(0, 3, 1, 2), realism=750, scale=2, processing="release", color_fix="adain",
                          generator=torch.Generator().manual_seed(11)).images.permute(0, 2, 3, 1)
    assert torch.equal(image, expected) and torch.equal(image * 255, (image * 255).round())  # 8-bit values
    with pytest.raises(ValueError, match="RCOD Upscale: .*integer scale"):
        node(ext, "RCODUpscale").upscale(rcod_o, lr8, 2.5, "Custom", 750, processing="release")


def test_stages_equal_upscale(ext, rcod_o, lr):
    (latent,) = node(ext, "RCODEncode").encode(rcod_o, lr, 2.0, "bicubic")
    assert latent["samples"].ndim == 4 and latent["samples"].shape[0] == 2
    out = node(ext, "RCODDenoise").denoise(rcod_o, latent, "Custom", 600)
    z, t = out["result"]
    assert t == 600 and out["ui"]["rcod_t"] == [600, 600]
    (image,) = node(ext, "RCODDecode").decode(rcod_o, z)
    ref = node(ext, "RCODUpscale").upscale(rcod_o, lr, 2.0, "Custom", 600)["result"][0]
    assert image.shape == (2, 48, 64, 3)
    torch.testing.assert_close(image, ref)


def test_stage_tiling_equals_upscale_tiling(ext, rcod_o, lr):
    """Encode, Denoise and Decode each tile their own stage as RCOD Upscale tiles the whole run; the
    Sweep tiles like Upscale too; each node's bar has one total that counts its tiles."""
    tiles = {"tiling": "custom", "tile_size": 16, "tile_overlap": 8}
    big = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(2))  # x4: 160x192, several tiles
    FakeProgressBar.instances.clear()
    (latent,) = node(ext, "RCODEncode").encode(rcod_o, big, 4.0, "bicubic", **tiles)
    z = node(ext, "RCODDenoise").denoise(rcod_o, latent, "Custom", 600, **tiles)["result"][0]
    (image,) = node(ext, "RCODDecode").decode(rcod_o, z, **tiles)
    for bar in FakeProgressBar.instances:  # encode, UNet, decode: tiles counted, one total, forward only
        assert bar.updates[0][1] > 3 and len({t for _, t in bar.updates}) == 1, bar.updates
        assert [d for d, _ in bar.updates] == sorted(d for d, _ in bar.updates)
    ref = node(ext, "RCODUpscale").upscale(rcod_o, big, 4.0, "Custom", 600, **tiles)["result"][0]
    torch.testing.assert_close(image, ref, rtol=0, atol=1e-5)
    untiled = node(ext, "RCODUpscale").upscale(rcod_o, big, 4.0, "Custom", 600, tiling="none")["result"][0]
    assert (untiled - ref).abs().max() > 1e-3  # the tiles really were used (seams differ)
    (sweep,) = node(ext, "RCODRealismSweep").sweep(rcod_o, big, "600", 4.0, **tiles)["result"]
    torch.testing.assert_close(sweep, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="^RCOD Decode: tiling must be one of"):
        node(ext, "RCODDecode").decode(rcod_o, z, tiling="tiles")


def test_visual_prompt_conditions_denoise(ext, rcod_o, lr):
    (latent,) = node(ext, "RCODEncode").encode(rcod_o, lr, 2.0, "bicubic")
    (tokens,) = node(ext, "RCODVisualPrompt").encode(rcod_o, torch.ones(1, 40, 40, 3))
    assert tokens.ndim == 3 and tokens.shape[0] == 1
    own = node(ext, "RCODDenoise").denoise(rcod_o, latent, "Neutral", 500)["result"][0]["samples"]
    other = node(ext, "RCODDenoise").denoise(rcod_o, latent, "Neutral", 500, prompt=tokens)["result"][0]["samples"]
    assert not torch.allclose(own, other)


def test_latent_from_other_nodes(ext, rcod_o, lr):
    (latent,) = node(ext, "RCODEncode").encode(rcod_o, lr, 2.0, "bicubic")
    blended = {**latent, "samples": latent["samples"] * 0.9}  # shape kept (e.g. LatentMultiply): works
    node(ext, "RCODDenoise").denoise(rcod_o, blended, "Neutral", 500)
    resized = {**latent, "samples": torch.nn.functional.interpolate(latent["samples"], scale_factor=2)}
    with pytest.raises(ValueError, match="RCOD One-Step Denoise: .*resize the IMAGE before RCOD Encode"):
        node(ext, "RCODDenoise").denoise(rcod_o, resized, "Neutral", 500)
    with pytest.raises(ValueError, match="^RCOD One-Step Denoise: this LATENT carries no RCOD data.*connect the LR image"):
        node(ext, "RCODDenoise").denoise(rcod_o, {"samples": latent["samples"]}, "Neutral", 500)
    # a plain VAE latent decodes (uncropped): 8x the latent size
    (image,) = node(ext, "RCODDecode").decode(rcod_o, {"samples": latent["samples"]})
    assert image.shape[1:3] == (latent["samples"].shape[2] * 8, latent["samples"].shape[3] * 8)


def test_latents_are_raw_vae_latents_as_core_nodes_make_them(ext, rcod_o, lr):
    """RCOD Encode's samples are what the VAE encoder gives (no scaling factor): core VAE Decode reads
    them; a core latent (no RCOD data) denoises with the LR image given, as RCOD Encode's does."""
    from rcod_core.imageops import pad_to_multiple, resize

    lr = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(4))  # x2 = 64²: no padding
    (latent,) = node(ext, "RCODEncode").encode(rcod_o, lr, 2.0, "bicubic")
    x = resize(lr.permute(0, 3, 1, 2), (64, 64))
    padded, _ = pad_to_multiple(x, rcod_o.size_multiple)
    with torch.no_grad():
        raw = rcod_o.vae.encode(padded * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latent["samples"], raw, rtol=1e-6, atol=1e-6)  # core VAE Encode's values (float round trip of the scale)
    assert padded.shape[-2:] == (64, 64)  # no padding here, so a core latent of x is the same latent
    with_data = node(ext, "RCODDenoise").denoise(rcod_o, latent, "Custom", 600)["result"][0]
    core = node(ext, "RCODDenoise").denoise(rcod_o, {"samples": raw.clone()}, "Custom", 600, image=lr)["result"][0]
    torch.testing.assert_close(core["samples"], with_data["samples"], rtol=0, atol=1e-6)
    (a,) = node(ext, "RCODDecode").decode(rcod_o, with_data)
    (b,) = node(ext, "RCODDecode").decode(rcod_o, {"samples": core["samples"]})
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # a raw latent decoded by the VAE directly (what core VAE Decode does) equals RCOD Decode
    with torch.no_grad():
        direct = ((rcod_o.vae.decode(with_data["samples"]).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(a, direct, rtol=0, atol=1e-5)
    nan = {"samples": torch.full_like(raw, float("nan"))}
    with pytest.raises(ValueError, match="^RCOD Decode: the LATENT holds NaN or Inf"):
        node(ext, "RCODDecode").decode(rcod_o, nan)
    with pytest.raises(ValueError, match="^RCOD One-Step Denoise: the LATENT holds NaN or Inf"):
        node(ext, "RCODDenoise").denoise(rcod_o, nan, "Neutral", 500, image=lr)


def test_mask_realism_map(ext, rcod_o, lr):
    mask = torch.zeros(1, 48, 64)
    mask[:, :, 32:] = 1.0
    out = node(ext, "RCODUpscale").upscale(rcod_o, lr, 2.0, "Realism", 750, mask=mask, mask_t0=250)
    assert out["ui"]["rcod_t"] == [250, 749] and out["result"][1] == 749  # mask_t0 is a t, not a preset
    (latent,) = node(ext, "RCODEncode").encode(rcod_o, lr, 2.0, "bicubic")
    z = node(ext, "RCODDenoise").denoise(rcod_o, latent, "Realism", 750, mask=mask, mask_t0=250)["result"][0]
    torch.testing.assert_close(node(ext, "RCODDecode").decode(rcod_o, z)[0], out["result"][0])
    with pytest.raises(ValueError, match="RCOD Upscale: mask is 32x32 .*aspect ratios differ"):
        node(ext, "RCODUpscale").upscale(rcod_o, lr, 2.0, "Realism", 750, mask=torch.ones(1, 32, 32))


def test_sweep(ext, rcod_o, lr):
    out = node(ext, "RCODRealismSweep").sweep(rcod_o, lr[:1], "250, neutral,750", 2.0)
    (images,) = out["result"]
    assert images.shape == (3, 48, 64, 3) and out["ui"]["rcod_t"] == [250, 499, 750]  # digits are t, names presets
    with pytest.raises(ValueError, match="RCOD Realism Sweep: .*realism"):
        node(ext, "RCODRealismSweep").sweep(rcod_o, lr[:1], "250,banana", 2.0)


def test_latent_metric_and_adaptive(ext, rcod_o, rcod_s, lr):
    metric = node(ext, "RCODLatentMetric")
    out = metric.measure(rcod_s, lr)
    m_l, t, m_true = out["result"]
    assert isinstance(m_l, float) and t in (249, 499, 749) and m_true != m_true  # NaN without HR
    assert out["ui"]["rcod_t"][0] == t and len(out["ui"]["rcod_m_l"]) == 2
    expected = rcod_s.estimate_metric(lr.permute(0, 3, 1, 2))
    assert m_l == pytest.approx(float(expected[0]), abs=1e-6)
    hr = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    out = metric.measure(rcod_o, lr, hr)  # RCOD_O has no MEM: the true M_L picks t
    m_l, t, m_true = out["result"]
    assert -1.0 <= m_true <= 1.0 and m_l == m_true and "rcod_m_l_true" in out["ui"]
    with pytest.raises(ValueError, match="RCOD Latent Metric: .*MEM"):
        metric.measure(rcod_o, lr)
    adaptive = node(ext, "RCODUpscale").upscale(rcod_s, lr, 2.0, "Adaptive", 500)
    assert adaptive["ui"]["rcod_m_l"] == out_ml(rcod_s, lr)


def out_ml(pipe, lr):
    return [round(float(v), 4) for v in pipe.estimate_metric(lr.permute(0, 3, 1, 2))]


def test_rcod_s_stages_keep_their_own_degradation_state(ext, rcod_s, lr):
    other = torch.rand(2, 24, 32, 3, generator=torch.Generator().manual_seed(5)) * 0.2
    (latent,) = node(ext, "RCODEncode").encode(rcod_s, lr, 2.0, "bicubic")
    node(ext, "RCODEncode").encode(rcod_s, other, 2.0, "bicubic")  # re-conditions the shared model
    z = node(ext, "RCODDenoise").denoise(rcod_s, latent, "Neutral", 500)["result"][0]
    image = node(ext, "RCODDecode").decode(rcod_s, z)[0]
    torch.testing.assert_close(image, node(ext, "RCODUpscale").upscale(rcod_s, lr, 2.0, "Neutral", 500)["result"][0])


def test_osediff_through_the_same_nodes(ext, lr):
    pipe = load(ext, "osediff.pkl", "diffusers/base-sd21", "clip_vision/clip-vision")
    out = node(ext, "RCODUpscale").upscale(pipe, lr[:1], 2.0, "Neutral", 500)
    assert out["result"][0].shape == (1, 48, 64, 3) and out["ui"]["rcod_t"] == [999]


def test_progress_and_interrupt(ext, rcod_o, lr):
    FakeProgressBar.instances.clear()
    node(ext, "RCODUpscale").upscale(rcod_o, lr[:1], 2.0, "Neutral", 500)
    bar = FakeProgressBar.instances[-1]
    assert bar.updates and bar.updates[-1][0] == bar.updates[-1][1]
    big = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    node(ext, "RCODUpscale").upscale(rcod_o, big, 4.0, "Neutral", 500, tiling="custom", tile_size=16, tile_overlap=8)
    bar = FakeProgressBar.instances[-1]  # one total, planned before the first tile, tiles counted
    assert len({t for _, t in bar.updates}) == 1 and bar.updates[0][1] > 3
    assert [d for d, _ in bar.updates] == sorted(d for d, _ in bar.updates) and bar.updates[-1][0] == bar.updates[0][1]
    mm = ext.fakes["comfy.model_management"]
    mm.interrupted = True
    with pytest.raises(mm.InterruptProcessingException):
        node(ext, "RCODUpscale").upscale(rcod_o, lr[:1], 2.0, "Neutral", 500, tiling="custom", tile_size=16,
                                         tile_overlap=8)
    out = node(ext, "RCODUpscale").upscale(rcod_o, lr[:1], 2.0, "Neutral", 500)  # still usable
    assert out["result"][0].shape == (1, 48, 64, 3)


def test_workflows_are_up_to_date_and_match_the_nodes(ext):
    """workflows/*.json are generated (tests/e2e/build_workflows.py) and name only real widgets."""
    import json

    import build_workflows

    assert build_workflows.main(["--check"]) == 0
    # the generator's picture of each node is the node's: connections and widgets in the frontend's order
    for kind, (connections, widgets, _) in build_workflows.SPEC.items():
        cls = ext.NODE_CLASS_MAPPINGS.get(kind)
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        inputs = [(name, opts[0]) for group in ("required", "optional") for name, opts in spec.get(group, {}).items()]
        is_widget = [isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN") for _, t in inputs]
        assert widgets == [n for (n, _), w in zip(inputs, is_widget) if w], kind
        assert connections == [(n, t) for (n, t), w in zip(inputs, is_widget) if not w], kind
    for path in sorted((ROOT / "workflows").glob("*.api.json")):
        for node_def in json.loads(path.read_text()).values():
            cls = ext.NODE_CLASS_MAPPINGS.get(node_def["class_type"])
            if cls is None:
                continue
            spec = cls.INPUT_TYPES()
            known = {k for group in spec.values() for k in group}
            assert set(node_def["inputs"]) <= known, (path.name, node_def)
            assert set(spec["required"]) <= set(node_def["inputs"]), (path.name, node_def)


def test_loader_auto_paths_from_a_file_stay_inside_the_model_folders(ext, tmp_path):
    """A file's stored base/CLIP path passes the same containment check as a chosen name: one into
    the model folders loads, one outside them is refused naming the key."""
    import shutil

    from rcod_core.checkpoints import convert

    fp = ext.fakes["folder_paths"]
    rcod_dir = Path(fp.folder_names_and_paths["rcod"][0][-1])
    models = rcod_dir.parent
    convert(rcod_dir / "rcod_o.pkl", rcod_dir / "named.safetensors",
            metadata={"base": "../diffusers/base-sd21", "clip": "../clip_vision/clip-vision"})
    loader = node(ext, "RCODModelLoader")
    auto = "auto (from checkpoint)"
    assert loader.load("named.safetensors", auto, auto, "fp32", "auto")[0].spec.kind == "rcod_o"
    # rcod make-tiny's file stores its base and CLIP relative to where it was written ("base-sd-turbo"):
    # auto finds them by name in ComfyUI's model folders
    assert loader.load("rcod_s.safetensors", auto, auto, "fp32", "auto")[0].spec.kind == "rcod_s"
    outside = tmp_path / "elsewhere-base"
    shutil.copytree(models / "diffusers" / "base-sd21", outside)
    convert(rcod_dir / "rcod_o.pkl", rcod_dir / "escape.safetensors",
            metadata={"base": str(outside), "clip": "../clip_vision/clip-vision"})
    with pytest.raises(ValueError, match="RCOD Model Loader: .*base model .*outside the model folders"):
        loader.load("escape.safetensors", auto, auto, "fp32", "auto")


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loader_node_refuses_a_malicious_pickle(ext, tmp_path):
    import pickle

    fp = ext.fakes["folder_paths"]
    rcod_dir = Path(fp.folder_names_and_paths["rcod"][0][-1])
    marker = tmp_path / "ran"
    (rcod_dir / "evil.pkl").write_bytes(pickle.dumps({"state_dict_unet": _RunsCode(marker)}))
    with pytest.raises(ValueError, match="RCOD Model Loader: .*evil.pkl: refused to load"):
        node(ext, "RCODModelLoader").load("evil.pkl", "diffusers/base-sd21", "clip_vision/clip-vision", "fp32", "auto")
    assert not marker.exists()


def test_smaller_contract_items(ext, rcod_o, lr):
    # RGBA keeps its alpha (upscaled classically), as the CLI does
    rgba = torch.cat([lr, torch.linspace(0, 1, lr.shape[2]).expand(2, lr.shape[1], -1)[..., None]], dim=-1)
    image, _ = node(ext, "RCODUpscale").upscale(rcod_o, rgba, 2.0, "Custom", 600)["result"]
    rgb, _ = node(ext, "RCODUpscale").upscale(rcod_o, lr, 2.0, "Custom", 600)["result"]
    assert image.shape == (2, 48, 64, 4) and torch.equal(image[..., :3], rgb)
    assert image[0, 0, 0, 3] < 0.05 and image[0, 0, -1, 3] > 0.95
    # the Latent Metric refuses an HR that is not this LR at one scale
    with pytest.raises(ValueError, match="RCOD Latent Metric: the HR image .* is not the LR"):
        node(ext, "RCODLatentMetric").measure(rcod_o, lr, torch.rand(2, 40, 40, 3))
    # x0 mode 'base' on an RCOD model
    with pytest.raises(ValueError, match="RCOD Upscale: x0 mode 'base'.*14.6"):
        node(ext, "RCODUpscale").upscale(rcod_o, lr, 2.0, "Custom", 600, x0_mode="base")


def test_visual_prompt_refuses_a_text_conditioned_model(ext):
    osediff = load(ext, "osediff.pkl", clip="auto (from checkpoint)")
    with pytest.raises(ValueError, match="RCOD Visual Prompt: this osediff model is text-conditioned"):
        node(ext, "RCODVisualPrompt").encode(osediff, torch.rand(1, 16, 16, 3))


def test_loader_lists_loadable_checkpoints_and_each_model_once(ext):
    spec = ext.NODE_CLASS_MAPPINGS["RCODModelLoader"].INPUT_TYPES()
    checkpoints = spec["required"]["checkpoint"][0]
    assert {"rcod_o.pkl", "rcod_s.pkl", "osediff.pkl", "rcod_s.safetensors"} <= set(checkpoints)
    assert "rcod_s_mem.pkl" not in checkpoints and not any(n.endswith("de_net.pth") for n in checkpoints)
    mem = spec["optional"]["mem"][0]
    assert "rcod_s_mem.pkl" in mem and "rcod_o.pkl" not in mem
    clip = spec["required"]["clip_vision"][0]
    assert len(clip) == len(set(clip)) and not any(c.startswith("clip_vision/clip-vision/") for c in clip)
    assert {"clip_vision/clip-vision", "clip_vision/clip-vision.safetensors"} <= set(clip)


def test_loader_precision_follows_comfyui(ext, monkeypatch):
    mm = ext.fakes["comfy.model_management"]
    asked = []
    monkeypatch.setattr(mm, "unet_dtype", lambda device, **kw: asked.append(kw) or torch.bfloat16, raising=False)
    monkeypatch.setattr(mm, "vae_dtype", lambda device, allowed_dtypes=(): torch.float32, raising=False)
    pipe = node(ext, "RCODModelLoader").load("osediff.pkl", "diffusers/base-sd21", "auto (from checkpoint)",
                                             "auto", "auto")[0]
    assert pipe.dtype == torch.bfloat16 and pipe.vae_dtype == torch.float32
    assert asked and torch.float32 in asked[0]["supported_dtypes"]
    monkeypatch.setattr(mm, "vae_dtype", lambda device, allowed_dtypes=(): torch.bfloat16, raising=False)
    pipe = node(ext, "RCODModelLoader").load("osediff.pkl", "diffusers/base-sd21", "auto (from checkpoint)",
                                             "fp32", "auto")[0]
    assert pipe.dtype == torch.float32 and pipe.vae_dtype == torch.bfloat16  # --bf16-vae, say


def test_loader_offers_the_built_in_demo_model_first(ext, tmp_path):
    """'demo (built-in)' loads the package's model with its own base and CLIP (no copied files, no
    base/CLIP widgets needed), and gives the same image as the library's load_pipeline('demo')."""
    from rcod_core.loader import load_pipeline

    spec = ext.NODE_CLASS_MAPPINGS["RCODModelLoader"].INPUT_TYPES()
    assert spec["required"]["checkpoint"][0][0] == "demo (built-in)"
    pipe = load(ext, "demo (built-in)", base="auto (from checkpoint)", clip="auto (from checkpoint)")
    assert pipe.spec.kind == "rcod_o" and pipe.spec.x0_mode == "paper"
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = load_pipeline("demo").run(lr, realism="realism").images
    assert torch.equal(pipe.run(lr, realism="realism").images, ref)
