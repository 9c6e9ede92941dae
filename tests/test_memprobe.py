"""Measured stage memory and the plans made from it: the live-tensor counter is exact on known
allocations, the fitted costs predict a size they were not measured at, and on CPU a budget holds
for the process's peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcod_core.memory import TilePlan, plan_from_costs
from rcod_core.memprobe import LinearCost, LiveTensorBytes, StageCosts, peak_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_live_bytes_counts_new_storage_once_and_frees_it():
    x = torch.ones(1000)  # made outside: not counted, nor are its views

    def fn():
        a = x * 2  # 4000 B
        b = a + 1  # 8000 B alive
        v = b.view(10, 100)  # a view: no new memory
        v.add_(1)  # in place: none either
        del a  # 4000 B
        c = b * 3  # 8000 B again
        return c.sum()  # and the sum's 4 B beside b and c

    assert peak_bytes(fn) == 8004
    with LiveTensorBytes() as mode:
        y = x[:10].clone()  # 40 B
        z = y.reshape(2, 5)
    assert (mode.current, mode.peak) == (40, 40) and z.shape == (2, 5)
    del y, z


def test_linear_cost_fit():
    cost = LinearCost.fit([(100, 1500.0), (300, 3500.0)])
    assert (cost.fixed, cost.per_px) == (500.0, 10.0) and cost(200) == 2500.0
    assert LinearCost.fit([(100, 900.0), (200, 100.0)]).per_px == 0.0  # never negative


@pytest.fixture(scope="module")
def pipe():
    from rcod_core.testing.tiny import tiny_pipeline

    return tiny_pipeline("rcod_o", seed=0)


def test_measured_costs_predict_another_size(pipe):
    costs = pipe.stage_costs()
    assert pipe.stage_costs() is costs  # measured once
    assert all(c.per_px > 0 for c in vars(costs).values())
    side = 48  # not a probe size
    z = torch.zeros(1, 4, side, side)
    tokens = pipe.prompt(torch.full((1, 3, 224, 224), 0.5))
    unet = peak_bytes(lambda: pipe.model.denoise(z, tokens, torch.full((1,), 500)))
    decode = peak_bytes(lambda: pipe.model.decode(z))
    assert costs.unet(side * side) == pytest.approx(unet, rel=0.1)
    assert costs.decode(side * side * 64) == pytest.approx(decode, rel=0.1)


def test_plan_from_costs_is_monotone_and_untiled_when_it_fits():
    costs = StageCosts(unet=LinearCost(0, 3200), encode=LinearCost(0, 270), decode=LinearCost(0, 320),
                       encode_global=LinearCost(0, 900), decode_global=LinearCost(0, 1000))
    assert plan_from_costs(512, 512, costs, 2**34) == TilePlan()
    plans = [plan_from_costs(2048, 2048, costs, b * 2**20) for b in (800, 400, 200)]
    for big, small in zip(plans, plans[1:]):
        for stage in ("latent_tile", "vae_encode_tile_px", "vae_decode_tile_latent"):
            a, b = getattr(big, stage), getattr(small, stage)
            assert a is None or (b is not None and b <= a), (stage, big, small)  # smaller budget: tiles no larger
    assert plans[-1].vae_decode_tile_latent is not None and plans[-1].vae_encode_tile_px is not None
    with pytest.raises(ValueError, match="budget must be positive"):
        plan_from_costs(512, 512, costs, 0)
    # 16 MP: the output accumulator alone is 268 MB; the plan says it cannot be held, and runs smallest
    with pytest.warns(RuntimeWarning, match="cannot hold a 4096x4096 output"):
        tight = plan_from_costs(4096, 4096, costs, 200 * 2**20)
    assert tight.vae_decode_tile_latent == 32 and not tight.vae_global_mid
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roomy = plan_from_costs(4096, 4096, costs, 2**30)
    assert roomy.vae_decode_tile_latent > 32


RSS_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from rcod_core.devices import bound_cpu_heap
from rcod_core.testing.tiny import tiny_pipeline
torch.set_num_threads(2)
pipe = tiny_pipeline("rcod_o", seed=0)
budget = {budget}
pipe.stage_costs()
bounded = bound_cpu_heap()
lr = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
before = status("VmRSS:")
plan = pipe.plan_tiles(1024, 1024, "auto", max_memory=budget)
out = pipe(lr, realism=499, tile="auto", max_memory=budget)
print(json.dumps({{"delta": status("VmHWM:") - before, "tiled": plan is not None and plan.tiled,
                  "bounded": bounded, "untiled_estimate": pipe.stage_costs().decode(1024 * 1024),
                  "shape": list(out.shape)}}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_auto_tiles_keep_the_process_within_max_memory_on_cpu():
    budget = 100 * 2**20
    res = subprocess.run([sys.executable, "-c", RSS_CHILD.format(root=str(ROOT), budget=budget)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["shape"] == [1, 3, 1024, 1024] and out["tiled"]
    assert out["untiled_estimate"] > 2 * budget  # the untiled decoder alone would not fit
    if out["bounded"]:
        assert out["delta"] <= budget, f"peak RSS grew {out['delta'] / 2**20:.1f} MB for a {budget / 2**20:.0f} MB budget"


def test_a_tiled_run_grows_by_little_more_than_its_output(pipe):
    # Tiles of 16 latent px at 256² and 512² output: what grows with the image is the output
    # accumulator (12 B/px), the upscaled LR the encoder's tiles are cut from (12 B/px, freed before
    # the decode) and the latent-resolution features of the VAE's whole-latent mid block. Measured
    # live-tensor peak growth: 1.23x the output's growth; with the encoder's input and the blend's
    # weight sum as full-size buffers it was 1.90x.
    peaks = {}
    for side in (256, 512):
        lr = torch.rand(1, 3, side // 4, side // 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), LiveTensorBytes() as mode:
            out = pipe(lr, realism=499, tile=16, tile_overlap=4)
            assert out.shape == (1, 3, side, side)
            del out
        peaks[side] = mode.peak
    output_growth = (512**2 - 256**2) * 12
    assert peaks[512] - peaks[256] < 1.5 * output_growth, (peaks, output_growth)
