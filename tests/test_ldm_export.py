"""LDM single-file export: round trip through diffusers' own single-file loaders (no downloads)."""

import pytest
import torch

from rcod_core.loader import own_storage_
from rcod_core.testing.ldm_export import (
    UNET_PREFIX,
    VAE_PREFIX,
    ldm_state_dict,
    unet_key_map,
    unet_to_ldm,
    vae_key_map,
    vae_to_ldm,
    write_single_file,
)
from rcod_core.models import build_models, family_dir, load_config


@pytest.fixture(scope="module")
def tiny_models():
    """Tiny UNet + VAE with every tensor distinct random values (norms included: default init
    gives all norm weights the same ones/zeros, which would hide swapped keys)."""
    models = build_models("tiny", seed=0, with_clip=False)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module in (models.unet, models.vae):
            for _, p in sorted(module.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return models


def _load_back(path, family="tiny"):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = str(family_dir(family))  # must be a str: diffusers rejects a Path here
    unet = UNet2DConditionModel.from_single_file(str(path), config=config, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(path), config=config, subfolder="vae", local_files_only=True)
    return unet, vae


def _assert_bitwise_equal(expected, actual):
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert not b[k].is_meta, f"{k} was not loaded"
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_tiny_round_trip_bitwise(tiny_models, tmp_path, suffix):
    path = write_single_file(tmp_path / f"tiny{suffix}", tiny_models.unet, tiny_models.vae, metadata={"note": "t"})
    assert path.exists()
    unet, vae = _load_back(path)
    _assert_bitwise_equal(tiny_models.unet, unet)
    _assert_bitwise_equal(tiny_models.vae, vae)
    if suffix != ".safetensors":
        return  # a .ckpt loads into ordinary allocations; the outputs are checked once, below

    # Same outputs as well. Straight from a memory-mapped .safetensors the weights sit at 8-byte
    # aligned addresses and CPU kernels then round differently in the last bits; with their own
    # (aligned) storage they give exactly the outputs of the original models.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(tiny_models.unet(x, 10, ctx).sample, unet(x, 10, ctx).sample, rtol=0, atol=1e-5)
    own_storage_(unet)
    own_storage_(vae)
    _assert_bitwise_equal(tiny_models.unet, unet)
    with torch.no_grad():
        assert torch.equal(tiny_models.unet(x, 10, ctx).sample, unet(x, 10, ctx).sample)
        img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
        assert torch.equal(tiny_models.vae.encode(img).latent_dist.mean, vae.encode(img).latent_dist.mean)
        assert torch.equal(tiny_models.vae.decode(x).sample, vae.decode(x).sample)


def test_file_layout_and_extra(tiny_models, tmp_path):
    from safetensors import safe_open

    extra = {"cond_stage_model.dummy.weight": torch.arange(3.0)}
    path = write_single_file(tmp_path / "t.safetensors", tiny_models.unet, tiny_models.vae, extra=extra)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"
        assert torch.equal(f.get_tensor("cond_stage_model.dummy.weight"), extra["cond_stage_model.dummy.weight"])
        # LDM VAE attention projections are 1x1 convs
        assert f.get_tensor(VAE_PREFIX + "encoder.mid.attn_1.q.weight").shape == (32, 32, 1, 1)
    n_unet = len(tiny_models.unet.state_dict())
    n_vae = len(tiny_models.vae.state_dict())
    assert sum(k.startswith(UNET_PREFIX) for k in keys) == n_unet
    assert sum(k.startswith(VAE_PREFIX) for k in keys) == n_vae
    assert len(keys) == n_unet + n_vae + 1
    # tiny: 3 blocks, 1 layer each; the last down block has no attention and no downsampler
    for k in (
        "time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
        "input_blocks.2.0.op.weight", "input_blocks.4.0.op.weight", "input_blocks.5.0.in_layers.2.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.emb_layers.1.weight",
        "output_blocks.1.1.conv.weight", "output_blocks.3.2.conv.weight", "output_blocks.5.1.proj_out.weight",
        "out.0.weight", "out.2.bias",
    ):
        assert UNET_PREFIX + k in keys, k
    for k in (
        "encoder.down.3.block.0.conv1.weight", "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.0.downsample.conv.weight", "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight",
        "decoder.up.3.block.1.conv2.weight", "decoder.up.1.block.0.nin_shortcut.weight", "decoder.up.3.upsample.conv.weight", "decoder.mid.attn_1.proj_out.bias",
        "quant_conv.weight", "post_quant_conv.bias",
    ):
        assert VAE_PREFIX + k in keys, k
    assert VAE_PREFIX + "encoder.down.3.downsample.conv.weight" not in keys
    assert VAE_PREFIX + "decoder.up.0.upsample.conv.weight" not in keys

    with pytest.raises(ValueError, match="collides"):
        ldm_state_dict(tiny_models.unet, None, extra={UNET_PREFIX + "out.2.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="suffix"):
        write_single_file(tmp_path / "t.bin", tiny_models.unet, None)


def test_unknown_keys_raise():
    cfg = load_config("tiny", "unet")
    with pytest.raises(KeyError):
        unet_key_map(["time_embedding.cond_proj.weight"], cfg)
    with pytest.raises(KeyError):
        vae_key_map(["encoder.something.weight"], load_config("tiny", "vae"))


def _meta_shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_sd21_shapes_match_diffusers_converters():
    """Real SD 2.1-base configs on the meta device: our export fed through diffusers' own
    LDM->diffusers converters gives back exactly the diffusers key set and shapes."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    models = build_models("sd21_base", device="meta", with_clip=False)
    unet_cfg, vae_cfg = load_config("sd21_base", "unet"), load_config("sd21_base", "vae")
    unet_sd, vae_sd = models.unet.state_dict(), models.vae.state_dict()

    ldm_unet = unet_to_ldm(unet_sd, unet_cfg)
    ldm_vae = vae_to_ldm(vae_sd, vae_cfg)
    # the real SD 1.x/2.x single files hold 686 UNet and 248 VAE tensors
    assert len(ldm_unet) == 686 and len(ldm_vae) == 248
    checkpoint = {**ldm_unet, **ldm_vae}
    assert all(v.is_meta for v in checkpoint.values())

    back_unet = convert_ldm_unet_checkpoint(checkpoint, unet_cfg)
    back_vae = convert_ldm_vae_checkpoint(checkpoint, vae_cfg)
    assert _meta_shapes(back_unet) == _meta_shapes(unet_sd)
    assert _meta_shapes(back_vae) == _meta_shapes(vae_sd)

    shapes = _meta_shapes(checkpoint)
    u, v = UNET_PREFIX, VAE_PREFIX
    # known keys/shapes of v2-1_512-ema-pruned
    assert shapes[u + "input_blocks.1.1.proj_in.weight"] == (320, 320)  # Linear in SD2
    assert shapes[u + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes[u + "input_blocks.9.0.op.weight"] == (1280, 1280, 3, 3)
    assert shapes[u + "input_blocks.11.0.out_layers.3.weight"] == (1280, 1280, 3, 3)
    assert shapes[u + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[u + "output_blocks.8.2.conv.weight"] == (640, 640, 3, 3)
    assert shapes[u + "output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert shapes[u + "middle_block.1.proj_out.weight"] == (1280, 1280)
    assert shapes[v + "encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[v + "decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes[v + "decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    # without a config diffusers would detect the model type from the keys: SD2 here
    assert infer_diffusers_model_type(checkpoint) == "v2"

    with pytest.raises(ValueError, match="meta"):
        write_single_file("/nonexistent/never_written.safetensors", models.unet, None)
