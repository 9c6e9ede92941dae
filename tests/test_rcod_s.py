"""RCOD_S: degradation-guided LoRA, MEM / adaptive realism, sweeps and spatial realism maps."""

import pytest
import torch

from rcod_core.testing.tiny import tiny_pipeline
from rcod_core.guided_lora import DegradationLoraConv2d, DegradationLoraLinear, MatrixSlot, fourier_embedding
from rcod_core.grouping import GroupingRule, select_timestep

BATCH_TOL = 1e-4  # CPU kernels differ in the last bits between batch sizes (see test_pipeline)


@pytest.fixture(scope="module")
def rcod_s():
    return tiny_pipeline("rcod_s", seed=0)


@pytest.fixture(scope="module")
def photo():
    from rcod_core.imageio import load_image
    from importlib.resources import files

    return load_image(files("rcod_core") / "assets" / "astronaut_lr96.png").rgb  # (1, 3, 96, 96)


def blur(x, sigma=2.5):
    from rcod_core.realism import gaussian_blur

    return gaussian_blur(x, sigma)


def test_fourier_embedding_layout():
    scores = torch.tensor([[0.25, 0.5]])
    w = torch.tensor([1.0, 2.0])
    e = fourier_embedding(scores, w)
    two_pi = 2 * torch.pi
    expected = torch.tensor([[torch.sin(torch.tensor(0.25 * two_pi)), torch.sin(torch.tensor(0.5 * two_pi)),
                              torch.cos(torch.tensor(0.25 * two_pi)), torch.cos(torch.tensor(0.5 * two_pi)),
                              torch.sin(torch.tensor(0.5 * two_pi)), torch.sin(torch.tensor(1.0 * two_pi)),
                              torch.cos(torch.tensor(0.5 * two_pi)), torch.cos(torch.tensor(1.0 * two_pi))]])
    assert torch.allclose(e, expected, atol=1e-6)


def test_degradation_lora_formula():
    g = torch.Generator().manual_seed(0)
    slot = MatrixSlot()
    lin = DegradationLoraLinear(torch.nn.Linear(6, 5), torch.nn.Linear(6, 3, bias=False), torch.nn.Linear(3, 5, bias=False),
                                "default", 0.25, slot, block=1)
    conv = DegradationLoraConv2d(torch.nn.Conv2d(4, 5, 3, padding=1), torch.nn.Conv2d(4, 3, 3, padding=1, bias=False),
                                 torch.nn.Conv2d(3, 5, 1, bias=False), "default", 0.5, slot, block=0)
    for m in (lin, conv):
        torch.nn.init.normal_(m.lora_B["default"].weight, generator=g)
    slot.matrices = torch.randn(2, 2, 3, 3, generator=g)  # (B, blocks, r, r)
    x = torch.randn(2, 7, 6, generator=g)
    a = x @ lin.lora_A["default"].weight.T
    expected = lin.base_layer(x) + 0.25 * torch.stack([a[i] @ slot.matrices[i, 1] for i in range(2)]) @ lin.lora_B["default"].weight.T
    assert torch.allclose(lin(x), expected, atol=1e-5)
    xc = torch.randn(2, 4, 5, 5, generator=g)
    ac = conv.lora_A["default"](xc)
    mixed = torch.einsum("bkhw,bkr->brhw", ac, slot.matrices[:, 0])
    assert torch.allclose(conv(xc), conv.base_layer(xc) + 0.5 * conv.lora_B["default"](mixed), atol=1e-5)


def test_different_degradations_give_different_matrices(rcod_s, photo):
    sharp = photo[:, :, :48, :48]
    blurred = blur(sharp)
    noisy = (sharp + 0.2 * torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    state = rcod_s.condition(torch.cat([sharp, blurred, noisy]))
    c = rcod_s.model.conditioning
    m_unet, m_vae = c.unet_slot.matrices, c.vae_slot.matrices
    assert m_unet.shape == (3, 10, 8, 8) and m_vae.shape == (3, 6, 4, 4)
    assert state["scores"].shape == (3, 2) and ((state["scores"] >= 0) & (state["scores"] <= 1)).all()
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert (m_unet[i] - m_unet[j]).abs().max() > 1e-6
        assert (m_vae[i] - m_vae[j]).abs().max() > 1e-6


def test_batch_of_two_equals_two_single_calls(rcod_s, photo):
    x = torch.cat([photo[:, :, :32, :40], blur(photo[:, :, 40:72, 50:90])])
    batch = rcod_s(x, realism=499)
    singles = torch.cat([rcod_s(x[i : i + 1], realism=499) for i in range(2)])
    assert (batch - singles).abs().max() < BATCH_TOL
    assert (batch[0] - batch[1]).abs().max() > 1e-3


def test_one_unet_pass_per_image(rcod_s, photo):
    calls = []
    handle = rcod_s.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        rcod_s(torch.cat([photo[:, :, :32, :32]] * 3), realism="realism")
    finally:
        handle.remove()
    assert calls == [3], "one UNet call for the batch of 3: no second (CFG) pass"


def test_mem_range_and_adaptive_follows_the_rule(rcod_s, photo, monkeypatch):
    x = torch.cat([photo[:, :, :32, :32], blur(photo[:, :, 32:64, 32:64])])
    out = rcod_s.run(x, realism="adaptive")
    assert out.metric.shape == (2,) and ((out.metric >= 0) & (out.metric <= 1)).all()
    assert torch.equal(out.timesteps, select_timestep(out.metric, GroupingRule.official(3)))
    hand = torch.tensor([0.2, 0.55, 0.69, 0.7, 0.95])
    monkeypatch.setattr(rcod_s, "estimate_metric", lambda lr, state=None: hand)
    out = rcod_s.run(torch.cat([photo[:, :, :16, :16]] * 5), realism="adaptive")
    assert out.timesteps.tolist() == [749, 499, 499, 249, 249]
    assert torch.equal(out.metric, hand)


def test_paper_rule_in_adaptive_mode(photo, monkeypatch):
    pipe = tiny_pipeline("rcod_s", seed=0, grouping=GroupingRule.paper(m_min=0.3, m_max=0.9))
    monkeypatch.setattr(pipe, "estimate_metric", lambda lr, state=None: torch.tensor([0.45, 0.621, 0.85]))
    assert pipe.run(torch.cat([photo[:, :, :16, :16]] * 3), realism="adaptive").timesteps.tolist() == [750, 500, 250]


def test_mem_missing_is_a_clear_error(photo):
    pipe = tiny_pipeline("rcod_o", seed=0)
    with pytest.raises(ValueError, match="adaptive realism needs MEM weights.*rcod_o model has none"):
        pipe(photo[:, :, :16, :16], realism="adaptive")
    with pytest.raises(ValueError, match="MEM"):
        pipe(photo[:, :, :16, :16], realism="auto-map")


@pytest.mark.parametrize("kind", ["rcod_s", "rcod_o"])
def test_sweep_equals_single_calls_bitwise(kind, photo):
    pipe = tiny_pipeline(kind, seed=0)
    x = torch.cat([photo[:, :, :24, :28], photo[:, :, 30:54, 40:68]])
    ts = [100, "fidelity", 600, "realism"]
    sweep = pipe.sweep(x, ts)
    assert sweep.images.shape == (4, 2, 3, 96, 112)
    for k, t in enumerate(ts):
        assert torch.equal(sweep.images[k], pipe(x, realism=t)), f"sweep entry {k} (t={t})"


def test_sweep_encodes_once(rcod_s, photo):
    calls = {"encode": 0, "unet": 0}
    enc = rcod_s.vae.encoder.register_forward_hook(lambda *a: calls.__setitem__("encode", calls["encode"] + 1))
    unet = rcod_s.unet.register_forward_hook(lambda *a: calls.__setitem__("unet", calls["unet"] + 1))
    try:
        rcod_s.sweep(photo[:, :, :16, :16], [249, 499, 749])
    finally:
        enc.remove()
        unet.remove()
    assert calls == {"encode": 1, "unet": 3}


def test_mask_extremes_equal_the_presets(rcod_s, photo):
    x = photo[:, :, 8:40, 16:56]  # 32 x 40 -> 128 x 160
    fid, real = rcod_s(x, realism="fidelity"), rcod_s(x, realism="realism")
    assert torch.equal(rcod_s(x, mask=torch.zeros(128, 160)), fid)
    assert torch.equal(rcod_s(x, mask=torch.ones(32, 40)), real)  # input-sized mask: resized


def test_half_mask_changes_only_near_the_boundary(rcod_s, photo):
    x = photo[:, :, 8:40, 16:80]  # 32 x 64 -> 128 x 256
    fid, real = rcod_s(x, realism="fidelity"), rcod_s(x, realism="realism")
    mask = torch.zeros(128, 256)
    mask[:, 128:] = 1
    out = rcod_s.run(x, mask=mask)
    assert out.timesteps.tolist() == [249, 749]
    img = out.images
    scale = (fid - real).abs().mean()
    left = (img[..., :48] - fid[..., :48]).abs().mean()
    right = (img[..., 208:] - real[..., 208:]).abs().mean()
    border = (img[..., 120:136] - torch.where(torch.arange(120, 136) < 128, fid[..., 120:136], real[..., 120:136])).abs().mean()
    # Far from the edge each half is its preset, up to the VAE decoder's global parts (mid-block
    # self-attention and GroupNorm statistics see the whole latent); the change sits at the edge.
    assert left < 0.15 * scale and right < 0.15 * scale
    assert left < 0.25 * border and right < 0.25 * border


def test_bad_masks(rcod_s, photo):
    x = photo[:, :, :32, :40]
    with pytest.raises(ValueError, match="aspect ratios differ"):
        rcod_s(x, mask=torch.zeros(40, 40))
    with pytest.raises(ValueError, match="one channel"):
        rcod_s(x, mask=torch.zeros(1, 3, 32, 40))
    with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\]"):
        rcod_s(x, mask=torch.full((32, 40), 2.0))
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        rcod_s(x, mask=torch.zeros(2, 1, 32, 40))
    with pytest.raises(ValueError, match="either mask or t_map"):
        rcod_s(x, mask=torch.zeros(32, 40), t_map=torch.zeros(32, 40))


def _fit_mem(pipe, photo):
    """Fit the MEM's linear layer by least squares on sharp vs blurred crops (a miniature of MEM
    training: in the release the targets are latent cosine similarities; here 0.8 / 0.35)."""
    crops = [photo[:, :, y : y + 32, x : x + 32] for y in (0, 32, 64) for x in (0, 32, 64)]
    sharp, blurred = torch.cat(crops), blur(torch.cat(crops), sigma=3.0)
    feats = pipe.model.conditioning.degradation(torch.cat([sharp, blurred]))[1]
    targets = torch.cat([torch.full((9,), 0.8), torch.full((9,), 0.35)])
    design = torch.cat([feats, torch.ones(18, 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, targets.double()[:, None], driver="gelsd").solution.float()
    with torch.no_grad():
        pipe.model.mem.linear.weight.copy_(solution[:-1].T)
        pipe.model.mem.linear.bias.copy_(solution[-1])


def test_automatic_map_differs_between_differently_degraded_halves(photo):
    pipe = tiny_pipeline("rcod_s", seed=0)
    _fit_mem(pipe, photo)
    left, right = photo[:, :, :, :48], blur(photo[:, :, :, 48:], sigma=3.0)
    x = torch.cat([left, right], dim=-1)  # a sharp half and a blurred half
    rmap = pipe.realism_map(x, tile=32, overlap=16)
    assert rmap.t_map.shape == (1, 1, 96, 96) and rmap.levels == [249, 499, 749]
    t_left, t_right = rmap.t_map[..., 8:88, 4:28].mean(), rmap.t_map[..., 8:88, 68:92].mean()
    m_left, m_right = rmap.metric_map[..., 8:88, 4:28].mean(), rmap.metric_map[..., 8:88, 68:92].mean()
    assert m_left > m_right, "the sharp half must look closer to its HR latent"
    assert t_right - t_left > 200, f"blurred half needs more realism: t {t_left:.0f} vs {t_right:.0f}"
    out = pipe.run(x, realism="auto-map")
    assert out.images.shape == (1, 3, 384, 384) and out.t_map.shape == (1, 1, 384, 384)
    # the user can edit the map and pass it back
    edited = pipe.run(x, t_map=torch.full((96, 96), 499.0))
    assert torch.equal(edited.images, pipe(x, realism=499))


def test_s3diff_base_mode_through_the_same_path(photo):
    pipe = tiny_pipeline("s3diff", seed=0)
    out = pipe.run(photo[:, :, :16, :16], realism="realism")
    assert out.timesteps.tolist() == [999]
    assert pipe.spec.x0_mode == "base"
