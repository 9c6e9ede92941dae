"""processing="release" against a reference written here from the release scripts' documented steps
(PIL resizes, 8-bit truncation, colour fix on the 8-bit image, timestep mapping), calling the
network's modules directly; compared at uint8 level on the tiny official-format checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rcod_core.release import release_timestep


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from rcod_core.testing.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny-release")
    make_tiny(root)
    return root


def _photo(w: int, h: int) -> np.ndarray:
    from pathlib import Path

    import rcod_core

    img = Image.open(Path(rcod_core.__file__).parent / "assets" / "astronaut_lr96.png").convert("RGB")
    return np.array(img.crop((10, 5, 10 + w, 5 + h)), dtype=np.uint8)


def _u8_tensor(a: np.ndarray) -> torch.Tensor:  # ToTensor
    return torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255


def _to_u8(x: torch.Tensor) -> torch.Tensor:  # ToPILImage on a float tensor
    return (x * 255).to(torch.uint8)


def _adain(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    def stats(x):
        flat = x.reshape(1, 3, -1)
        return flat.mean(-1).view(1, 3, 1, 1), (flat.var(-1) + 1e-5).sqrt().view(1, 3, 1, 1)

    (tm, ts), (sm, ss) = stats(target), stats(source)
    return ((target - tm) / ts * ss + sm).clamp(0, 1)


def _wavelet(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    k = k.expand(3, 1, 3, 3)

    def split(x):
        high = torch.zeros_like(x)
        for i in range(5):
            r = 2 ** i
            low = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k, groups=3, dilation=r)
            high, x = high + (x - low), low
        return high, x

    return (split(target)[0] + split(source)[1]).clamp(0, 1)


def _network(m, x, t_in: int, alpha_bar: float, noise_for):
    """The scripts' network call on x in [-1, 1]: CLIP (Resize 224) → projection; sampled latent;
    UNet at the mapped t; x0 with the fixed ᾱ; decode, clamped."""
    clip_in = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    tokens = m.prompt_encoder.projection(m.prompt_encoder.vision_model(pixel_values=clip_in).last_hidden_state)
    dist = m.vae.encode(x).latent_dist
    sf = m.vae.config.scaling_factor
    z = (dist.mean + dist.std * noise_for(dist.mean.shape)) * sf
    t = torch.tensor([{250: 249, 500: 499, 750: 749}.get(t_in, t_in)])
    eps = m.unet(z, t, encoder_hidden_states=tokens).sample
    x0 = (z - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return m.vae.decode(x0 / sf).sample.clamp(-1, 1), int(t)


def _reference_rcod_o(pipe, lr8: np.ndarray, t_in: int, noise_for):
    """inference_rcod_o.py's steps, around the network's own modules."""
    m = pipe.model
    img = Image.fromarray(lr8)
    ori_w, ori_h = img.size
    flag = False
    if ori_w < 512 // 4 or ori_h < 512 // 4:
        s = (512 // 4) / min(ori_w, ori_h)
        img = img.resize((int(s * ori_w), int(s * ori_h)))
        flag = True
    img = img.resize((img.size[0] * 4, img.size[1] * 4))
    img = img.resize((img.width - img.width % 8, img.height - img.height % 8), Image.LANCZOS)
    lq = _u8_tensor(np.array(img)) * 2 - 1
    out, t = _network(m, lq, t_in, 0.7537, noise_for)
    out8 = _to_u8(out * 0.5 + 0.5)
    out8 = _to_u8(_adain(out8.float() / 255, _u8_tensor(np.array(img))))
    result = Image.fromarray(out8[0].permute(1, 2, 0).numpy())
    if flag:
        result = result.resize((4 * ori_w, 4 * ori_h))
    return np.array(result), t


def _reference_rcod_s(pipe, lr8: np.ndarray, t_in: int, noise_for):
    """inference_rcod_s.py's steps (fixed t), around the network's own modules."""
    m, c = pipe.model, pipe.model.conditioning
    lr = _u8_tensor(lr8)
    h, w = lr.shape[-2:]
    up = F.interpolate(lr, size=(h * 4, w * 4), mode="bilinear", align_corners=False)
    x = (up * 2 - 1).clamp(-1, 1)
    H, W = x.shape[-2:]
    x = F.pad(x, (0, math.ceil(W / 64) * 64 - W, 0, math.ceil(H / 64) * 64 - H), mode="reflect")
    scores = c.de_net(lr)
    proj = scores[..., None] * c.w[None, None, :] * 2 * np.pi
    proj = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
    emb = torch.cat([proj[:, 0], proj[:, 1]], dim=-1)
    for g, slot in ((c.unet_guidance, c.unet_slot), (c.vae_guidance, c.vae_slot)):
        de, blocks = g.de_mlp(emb), g.block_mlp(g.block_embeddings.weight)
        fused = g.fuse_mlp(torch.cat([de.unsqueeze(1).repeat(1, blocks.shape[0], 1), blocks.unsqueeze(0).repeat(1, 1, 1)], -1))
        slot.matrices = fused.reshape(1, blocks.shape[0], g.rank, g.rank)
    out, t = _network(m, x, t_in, 0.6754, noise_for)
    out = out[:, :, :H, :W]
    out8 = _to_u8(out * 0.5 + 0.5)
    ref8 = _to_u8(up)
    out8 = _to_u8(_wavelet(out8.float() / 255, ref8.float() / 255))
    return out8[0].permute(1, 2, 0).numpy(), t


CASES = {
    # file, base folder, extras, reference; sizes: a small LR (RCOD_O enlarges it first) and one not
    "rcod_o": ("rcod_o.pkl", "base-sd21", (), _reference_rcod_o),
    "rcod_s": ("rcod_s.pkl", "base-sd-turbo", ("de_net.pth",), _reference_rcod_s),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("size, t", [((28, 20), 250), ((36, 33), 750), ((40, 36), 600)])
def test_release_processing_matches_the_scripts_steps(tiny_set, kind, size, t):
    from rcod_core.loader import load_pipeline

    file, base, extras, reference = CASES[kind]
    pipe = load_pipeline(tiny_set / file, base=tiny_set / base, clip=tiny_set / "clip-vision",
                         extras=[tiny_set / e for e in extras], merge=False)
    lr8 = _photo(*size)
    noises = {}

    def noise_for(shape):  # the release's latent_dist.sample(), drawn here from a seeded generator
        noises["eps"] = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        return noises["eps"]

    with torch.no_grad():
        expected, t_used = reference(pipe, lr8, t, noise_for)
        out = pipe.run(_u8_tensor(lr8), realism=t, processing="release", noise=noises["eps"],
                       color_fix=pipe.spec.default_color_fix)
    got = (out.images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert got.shape == expected.shape == (size[1] * 4, size[0] * 4, 3)
    assert out.timesteps.tolist() == [t_used] == [release_timestep(t)]
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 2e-3, (diff.max(), diff.mean())
    # and the release's output is not ours: a different processing, measurably
    ours = pipe.run(_u8_tensor(lr8), realism=t, noise=None, latent="mode", color_fix=pipe.spec.default_color_fix)
    assert (ours.images - out.images).abs().mean() > 1e-3


def test_release_processing_refuses_what_the_scripts_lack(tiny_set):
    from rcod_core.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("rcod_o")
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="integer scale"):
        pipe.run(x, processing="release", scale=2.5)
    with pytest.raises(ValueError, match="no tile"):
        pipe.run(x, processing="release", tile=32)
    with pytest.raises(ValueError, match="no size"):
        pipe.run(x, processing="release", size=(64, 64))
    with pytest.raises(ValueError, match="processing must be one of"):
        pipe.run(x, processing="theirs")


def test_noise_argument_is_the_seeded_draw_and_the_seed_is_the_only_randomness():
    from rcod_core.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("rcod_s")
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    a = pipe.run(x, realism=499, latent="sample", generator=torch.Generator().manual_seed(5))
    b = pipe.run(x, realism=499, latent="sample", generator=torch.Generator().manual_seed(5))
    c = pipe.run(x, realism=499, latent="sample", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    with pipe.model.recording() as rec:
        pipe.run(x, realism=499, latent="mode")
    shape = rec["z_l"].shape
    # documented order: one torch.randn of the padded latent's shape per batch, from the generator
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    d = pipe.run(x, realism=499, noise=eps)
    assert torch.equal(a.images, d.images)
    with pytest.raises(ValueError, match="noise must have the latent's shape"):
        pipe.run(x, realism=499, noise=eps[:, :, :-1])


def test_cli_release_mode_dump_and_no_merge(tiny_set, tmp_path):
    from rcod_core.loader import load_pipeline
    from rcod_core.tools.cli import main

    src = tmp_path / "in"
    src.mkdir()
    lr8 = _photo(30, 24)
    Image.fromarray(lr8).save(src / "photo.png")
    args = ["upscale", str(src), "-o", str(tmp_path / "out"), "--model", str(tiny_set / "rcod_o.pkl"),
            "--base", str(tiny_set / "base-sd21"), "--clip", str(tiny_set / "clip-vision"), "--realism", "750",
            "--processing", "release", "--no-merge", "--seed", "4", "--dump", str(tmp_path / "dump"), "--quiet",
            "--dtype", "fp32"]
    assert main(args) == 0
    got = np.array(Image.open(tmp_path / "out" / "photo_rcod.png"))
    pipe = load_pipeline(tiny_set / "rcod_o.pkl", base=tiny_set / "base-sd21", clip=tiny_set / "clip-vision", merge=False)
    with pipe.model.recording() as rec:
        out = pipe.run(_u8_tensor(lr8), realism=750, processing="release",
                       generator=torch.Generator().manual_seed(4), color_fix="adain")
    assert out.timesteps.tolist() == [749]
    assert np.array_equal(got, (out.images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    for name in ("clip_hidden", "tokens", "z_l", "eps", "x0"):
        saved = np.load(tmp_path / "dump" / f"photo_rcod_{name}.npy")
        assert saved.dtype == np.float32 and np.array_equal(saved, rec[name].numpy()), name
    assert np.load(tmp_path / "dump" / "photo_rcod_tokens.npy").shape[1] == 257  # CLIP's 256 patches + class
    no_dump = args[: args.index("--dump")]
    assert main([*no_dump, "--tile", "32", "--overwrite", "--quiet"]) == 2  # release mode has no tiling
