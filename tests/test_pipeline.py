import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from rcod_core.build import assemble
from rcod_core.testing.tiny import tiny_pipeline
from rcod_core.models import build_models
from rcod_core.spec import ModelSpec

# CPU conv/matmul kernels pick other blockings for other batch sizes: fp32 results differ in the
# last bits (measured 2.3e-5 max here; the release notes 1.5e-4 between 1 and 2 threads).
BATCH_TOL = 1e-4


def test_output_shape_odd_sizes(tiny_merged, lr_images):
    out = tiny_merged(lr_images, realism="neutral", scale=4)
    assert out.shape == (3, 3, 84, 108)
    assert out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    out = tiny_merged(lr_images[:1, :, :13, :17], scale=2.5)
    assert out.shape == (1, 3, 32, 42)  # round(13 * 2.5), round(17 * 2.5)
    out = tiny_merged(lr_images[:1], size=(50, 61))
    assert out.shape == (1, 3, 50, 61)


def test_output_changes_with_t(tiny_merged, lr_images):
    outs = [tiny_merged(lr_images[:1], realism=t) for t in ("fidelity", "neutral", "realism")]
    for a, b in zip(outs, outs[1:]):
        assert (a - b).abs().max() > 1e-3, "the timestep must reach the UNet"
    # the x0 mode matters too: paper mode at t=749 rescales the latent very differently
    paper = tiny_merged(lr_images[:1], realism=749, x0_mode="paper")
    assert (paper - outs[2]).abs().max() > 1e-2


def test_per_sample_timesteps(tiny_merged, lr_images):
    mixed = tiny_merged.run(lr_images, realism=[249, 499, 749])
    assert mixed.timesteps.tolist() == [249, 499, 749]
    for i, t in enumerate([249, 499, 749]):
        single = tiny_merged(lr_images[i : i + 1], realism=t)
        assert (mixed.images[i : i + 1] - single).abs().max() < BATCH_TOL


def test_merged_equals_unmerged(tiny_merged, tiny_unmerged, lr_images):
    from rcod_core.adapters import has_lora

    assert not has_lora(tiny_merged.unet) and not has_lora(tiny_merged.vae)
    assert has_lora(tiny_unmerged.unet) and has_lora(tiny_unmerged.vae)
    a = tiny_merged(lr_images, realism="realism")
    b = tiny_unmerged(lr_images, realism="realism")
    assert (a - b).abs().max() < 1e-4


def test_lora_changes_output(tiny_unmerged, lr_images):
    with_lora = tiny_unmerged(lr_images[:1])
    tiny_unmerged.unet.disable_adapters()
    try:
        without = tiny_unmerged(lr_images[:1])
    finally:
        tiny_unmerged.unet.enable_adapters()
    assert (with_lora - without).abs().max() > 1e-3
    assert torch.equal(tiny_unmerged(lr_images[:1]), with_lora)


def test_batch_equals_singles(tiny_merged, lr_images):
    batch = tiny_merged(lr_images, realism="realism")
    singles = torch.cat([tiny_merged(lr_images[i : i + 1], realism="realism") for i in range(3)])
    assert (batch - singles).abs().max() < BATCH_TOL


def test_deterministic_sampling_given_seed(tiny_merged, lr_images):
    run = lambda seed: tiny_merged(lr_images[:1], latent="sample", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(tiny_merged(lr_images[:1]), tiny_merged(lr_images[:1]))  # mode: no randomness


def _osediff_reference_lists(unet, vae):
    """OSEDiff's module-list loops, written out independently of rcod_core.adapters."""
    patterns = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
    enc, dec, oth = [], [], []
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in patterns:
            if ("down_blocks" in n or "conv_in" in n) and pattern in n:
                enc.append(n.replace(".weight", ""))
                break
            elif ("up_blocks" in n or "conv_out" in n) and pattern in n:
                dec.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                oth.append(n.replace(".weight", ""))
                break
    vae_patterns = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]
    vae_modules = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in vae_patterns:  # no break: the release's list has repeats
            if pattern in n and "encoder" in n:
                vae_modules.append(n.replace(".weight", ""))
            elif "quant_conv" in n and "post_quant_conv" not in n:
                vae_modules.append(n.replace(".weight", ""))
    return enc, dec, oth, vae_modules


def test_parity_with_plain_diffusers_reference(tiny_unmerged, lr_images):
    """The engine against a reference written with plain diffusers / peft / transformers calls."""
    from peft import LoraConfig

    ref = build_models("tiny", seed=0)  # same random base weights as the fixture
    unet, vae, clip = ref.unet, ref.vae, ref.clip_vision
    enc, dec, oth, vae_modules = _osediff_reference_lists(unet, vae)
    with warnings.catch_warnings():  # peft warns on every adapter after the first; three is the layout
        warnings.simplefilter("ignore", UserWarning)
        for name, modules in (("default_encoder", enc), ("default_decoder", dec), ("default_others", oth)):
            unet.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=modules), adapter_name=name)
    unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
    vae.add_adapter(LoraConfig(r=4, init_lora_weights="gaussian", target_modules=sorted(set(vae_modules))),
                    adapter_name="default_encoder")
    # same trained weights: the layout must match key for key (strict load)
    unet.load_state_dict(tiny_unmerged.unet.state_dict(), strict=True)
    vae.load_state_dict(tiny_unmerged.vae.state_dict(), strict=True)
    proj = torch.nn.Linear(32, 32)
    proj.load_state_dict(tiny_unmerged.prompt_encoder.projection.state_dict())

    x = lr_images[:2]
    t, ab = 499, 0.7537
    with torch.no_grad():
        up = F.interpolate(x, size=(84, 108), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        clip_in = F.interpolate(up * 2 - 1, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        tokens = proj(clip(pixel_values=clip_in).last_hidden_state)
        padded = F.pad(up, (0, 128 - 108, 0, 96 - 84), mode="reflect")  # to the UNet's multiple, 32 px here
        z = vae.encode(padded * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
        eps = unet(z, torch.tensor([t, t]), encoder_hidden_states=tokens).sample
        z0 = (z - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        expected = ((vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) / 2)[..., :84, :108]
    ours = tiny_unmerged(x, realism=t)
    # channels_last (the CPU default, measured faster) takes other conv kernels: measured 2.6e-5
    assert (ours - expected).abs().max() < 1e-4
    tiny_unmerged.set_channels_last(False)  # the reference's layout: the same arithmetic
    try:
        assert (tiny_unmerged(x, realism=t) - expected).abs().max() < 1e-5
    finally:
        tiny_unmerged.set_channels_last(True)


def test_osediff_base_mode_runs_at_999():
    pipe = tiny_pipeline(kind="osediff", seed=0)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = pipe.run(x, realism="fidelity")  # the base ignores realism: one fixed timestep
    assert result.timesteps.tolist() == [999]
    assert result.images.shape == (1, 3, 64, 64)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), {}, "floating-point"),
        (torch.rand(1, 4, 8, 8), {}, r"\(B, 3, H, W\)"),
        (torch.rand(3, 8, 8), {}, r"\(B, 3, H, W\)"),
        (torch.rand(1, 3, 8, 8) * 255, {}, r"in \[0, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), {}, "NaN"),
        (torch.rand(1, 3, 8, 8), {"realism": 0}, r"\[1, 999\]"),
        (torch.rand(1, 3, 8, 8), {"realism": 1000}, r"\[1, 999\]"),
        (torch.rand(1, 3, 8, 8), {"realism": "ultra"}, "realism must be one of"),
        (torch.rand(1, 3, 8, 8), {"realism": [100, 200]}, "2 timesteps for a batch of 1"),
        (torch.rand(1, 3, 8, 8), {"scale": 9}, r"scale must be in \[1, 8\]"),
        (torch.rand(1, 3, 8, 8), {"x0_mode": "v"}, "x0 mode"),
        (torch.rand(1, 3, 8, 8), {"resampler": "lanczos9"}, "resampler"),
    ],
)
def test_bad_input(tiny_merged, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_merged(images, **kwargs)


def test_mismatched_clip_and_unet_dims():
    from rcod_core.model import RCODModel
    from rcod_core.prompting import VisualPromptEncoder

    base = build_models("tiny", seed=0)
    encoder = VisualPromptEncoder(base.clip_vision, cross_attention_dim=48)
    with pytest.raises(ValueError, match="cross_attention_dim is 32"):
        RCODModel(base.unet, base.vae, encoder, ModelSpec.for_kind("rcod_o"), base.scheduler_config)


def test_rcod_o_refuses_turbo_base():
    base = build_models("sd_turbo", device="meta", with_clip=False)
    with pytest.raises(ValueError, match="needs a SD 2.1-base base, but the given base is SD-Turbo"):
        assemble(base, ModelSpec.for_kind("rcod_o"))
