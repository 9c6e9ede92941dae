import math

import pytest
import torch

from rcod_core import schedule
from rcod_core.grouping import OFFICIAL_PRESETS, PRESETS


def scaled_linear_alphas():
    # Independent closed form of the SD schedule: betas linear in sqrt space.
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def test_alphas_cumprod_matches_closed_form():
    ac = schedule.alphas_cumprod()
    ref = scaled_linear_alphas()
    assert ac.shape == (1000,)
    assert torch.allclose(ac, ref, rtol=0, atol=1e-6)


def test_official_constants_are_schedule_values():
    ac = schedule.alphas_cumprod()
    assert abs(ac[200].item() - schedule.OFFICIAL_ALPHA_BAR["rcod_o"]) < 1e-4
    assert abs(ac[249].item() - schedule.OFFICIAL_ALPHA_BAR["rcod_s"]) < 1e-4


def test_turbo_schedule_has_the_same_betas():
    from rcod_core.models import config_path

    turbo = schedule.alphas_cumprod(config_path("sd_turbo", "scheduler"))
    assert torch.equal(turbo, schedule.alphas_cumprod())


@pytest.mark.parametrize("t", sorted(set(PRESETS.values()) | set(OFFICIAL_PRESETS.values()) | {1, 999}))
@pytest.mark.parametrize("mode", ["paper", "official", "base"])
def test_x0_closed_form(t, mode):
    g = torch.Generator().manual_seed(t)
    z = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    ac = schedule.alphas_cumprod()
    ab = schedule.x0_alpha_bar(t, mode, ac, fixed_alpha_bar=0.7537)
    expected_ab = {"paper": ac[t].item(), "official": 0.7537, "base": ac[999].item()}[mode]
    assert ab.item() == pytest.approx(expected_ab, abs=1e-12)
    x0 = schedule.x0_from_eps(z, eps, ab)
    assert torch.allclose(x0, (z - math.sqrt(1 - expected_ab) * eps) / math.sqrt(expected_ab), atol=1e-12)


def test_official_vs_paper_factor_at_749():
    # With eps = 0 the conversion is a pure scaling by 1/sqrt(ab): the ratio of the two modes is
    # sqrt(ab_749 / 0.7537) (the paper formula scales the latent ~3.6x more at t = 749).
    ac = schedule.alphas_cumprod()
    z = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    eps = torch.zeros_like(z)
    paper = schedule.x0_from_eps(z, eps, schedule.x0_alpha_bar(749, "paper", ac))
    official = schedule.x0_from_eps(z, eps, schedule.x0_alpha_bar(749, "official", ac, 0.7537))
    ratio = (official / paper).mean().item()
    assert ratio == pytest.approx(math.sqrt(ac[749].item() / 0.7537), rel=1e-9)
    assert 0.25 < ratio < 0.3


def test_x0_inverts_forward_process_per_sample():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    ab = schedule.x0_alpha_bar([10, 500, 990], "paper", schedule.alphas_cumprod())
    zt = schedule.add_noise(z0, eps, ab)
    assert torch.allclose(schedule.x0_from_eps(zt, eps, ab), z0, atol=1e-9)


def test_base_mode_equals_diffusers_one_step_ddpm():
    # OSEDiff/S3Diff: DDPMScheduler with one inference step at t = 999; its prev_sample is x0.
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(schedule.load_scheduler_config())
    sched.set_timesteps(timesteps=[999])  # one step at t = 999: prev_t = -1, ᾱ_prev = 1
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=g)
    eps = torch.randn(1, 4, 8, 8, generator=g)
    ref = sched.step(eps, 999, z, generator=torch.Generator().manual_seed(0)).prev_sample
    ours = schedule.x0_from_eps(z, eps, schedule.x0_alpha_bar(999, "base", schedule.alphas_cumprod()))
    assert torch.allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize("bad", [0, 1000, -5, 3.5, [1, 1000], True])
def test_timestep_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\[1, 999\]|integer"):
        schedule.x0_alpha_bar(bad, "paper", schedule.alphas_cumprod())


def test_bad_mode_and_missing_fixed_value():
    ac = schedule.alphas_cumprod()
    with pytest.raises(ValueError, match="x0 mode must be one of"):
        schedule.x0_alpha_bar(500, "v-pred", ac)
    with pytest.raises(ValueError, match="fixed_alpha_bar"):
        schedule.x0_alpha_bar(500, "official", ac)
    with pytest.raises(ValueError, match="one value per sample"):
        schedule.x0_from_eps(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0.5, 0.5, 0.5]))
