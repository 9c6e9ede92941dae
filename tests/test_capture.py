"""The forward's stages launch only shape-dependent device work (what one CUDA graph per input shape
needs), checked on the meta device with the capture-hazard detector; the detector finds each kind
of hazard it names."""

from __future__ import annotations

import pytest
import torch

from rcod_core.capture import CaptureHazards, capture_hazards
from rcod_core.schedule import values_unreadable, x0_alpha_bar


def _on_meta(kind):
    from rcod_core.testing.tiny import tiny_pipeline

    model = tiny_pipeline(kind, seed=0).model
    return model.place("meta", torch.float32, torch.float32)


@pytest.mark.parametrize("kind", ["rcod_o", "rcod_s", "osediff", "s3diff"])
def test_every_stage_is_free_of_capture_hazards(kind):
    """Conditioning, tokens, encode, the one-step denoise (ε + Eq. 3/4) and decode make no host read
    and no CPU→device copy: ᾱ is gathered on the device and the timestep checks are skipped where
    values cannot be read (meta here; a CUDA graph capture or a compiled graph on a GPU)."""
    model = _on_meta(kind)
    images = torch.empty(1, 3, 128, 128, device="meta")
    if model.conditioning is not None:
        _, hazards = capture_hazards(model.condition, torch.empty(1, 3, 32, 32, device="meta"))
        assert hazards == []
    tokens, hazards = capture_hazards(model.tokens, images)
    assert hazards == []
    z_l, hazards = capture_hazards(model.encode, images)
    assert hazards == [] and z_l.shape == (1, 4, 16, 16)
    timesteps = torch.full((1,), 499, dtype=torch.int64, device="meta")
    z_h, hazards = capture_hazards(model.denoise, z_l, tokens, timesteps)
    assert hazards == [] and z_h.shape == z_l.shape and z_h.dtype == torch.float32
    out, hazards = capture_hazards(model.decode, z_h)
    assert hazards == [] and out.shape == images.shape


def test_the_x0_table_lookup_stays_on_the_device():
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64, device="meta")
    t = torch.full((2,), 499, dtype=torch.int64, device="meta")
    ab, hazards = capture_hazards(x0_alpha_bar, t, "paper", alphas)
    assert hazards == [] and ab.shape == (2,) and ab.device.type == "meta"
    assert values_unreadable(t) and not values_unreadable(t.new_empty(0, device="cpu"))
    with pytest.raises(ValueError, match=r"must be in \[1, 999\]"):  # values that can be read are checked
        x0_alpha_bar(torch.tensor([0]), "paper", alphas.new_empty(1000, device="cpu"))


@pytest.mark.parametrize("call, what", [
    (lambda x: x.sum().item(), "_local_scalar_dense"),
    (lambda x: bool((x > 0).any()), "_local_scalar_dense"),
    (lambda x: torch.equal(x, x), "equal"),
    (lambda x: x.nonzero(), "nonzero"),
    (lambda x: x[x > 0.5], "index"),
    (lambda x: x.unique(), "unique"),
])
def test_host_reads_are_found(call, what):
    x = torch.rand(8, generator=torch.Generator().manual_seed(0))
    _, hazards = capture_hazards(call, x)
    assert hazards and all("host" in h for h in hazards), hazards
    if what != "index":
        assert any(what in h for h in hazards), hazards


def test_host_copies_are_found_and_can_raise():
    table = torch.arange(4.0)
    target = torch.empty(4, device="meta")
    _, hazards = capture_hazards(lambda: table.to("meta"))
    assert len(hazards) == 1 and "copies a CPU tensor of shape (4,) to meta" in hazards[0]
    _, hazards = capture_hazards(lambda: target.copy_(table))
    assert len(hazards) == 1 and "into meta" in hazards[0]
    _, hazards = capture_hazards(lambda: target * 2 + torch.tensor(1.0).to("meta").expand(4))
    assert len(hazards) == 1
    _, hazards = capture_hazards(lambda: target * 2 + 1)  # a Python scalar is no copy
    assert hazards == []
    with pytest.raises(RuntimeError, match="not capturable as a CUDA graph: .*reads device values"):
        with torch.no_grad(), CaptureHazards(raise_on_first=True):
            torch.ones(2).sum().item()
