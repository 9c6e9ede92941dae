"""CUDA graphs, on the CPU: the forward's stages launch only shape-dependent device work (what one
CUDA graph per input shape needs), checked on the meta device with the capture-hazard detector,
which finds each kind of hazard it names; and the capture / replay plumbing of the pipeline, run with
a stand-in that replays from the static buffers the way a graph does."""

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


class ReplayStandIn:
    """What a CUDA graph does, on the CPU: the capture fixes the output buffer, a replay recomputes
    it from the static input buffers (so whatever the graph reads must be in those buffers)."""

    def _check_device(self, device):
        pass

    def _capture(self, warmup, pool):
        self.captures = getattr(self, "captures", 0) + 1
        with torch.no_grad():
            return self._forward().clone()

    def _replay(self):
        slot = self.slot
        live = None if slot is None else slot.matrices
        if slot is not None:  # a graph reads the buffers it was captured with, never the live attribute
            slot.matrices = torch.full_like(live, float("nan"))
        try:
            with torch.no_grad():
                self.output.copy_(self._forward())
        finally:
            if slot is not None:
                slot.matrices = live


def _stand_in():
    from rcod_core.capture import CapturedDenoise

    return type("StandInCapturedDenoise", (ReplayStandIn, CapturedDenoise), {})


def _conditioned(kind, seed):
    from rcod_core.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline(kind, seed=0)
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(2, 3, 32, 32, generator=g)
    state = pipe.condition(lr) if pipe.model.conditioning is not None else {}
    return pipe, state, torch.randn(2, 4, 16, 16, generator=g), pipe.prompt(torch.rand(2, 3, 128, 128, generator=g))


@pytest.mark.parametrize("kind", ["rcod_o", "rcod_s"])
def test_a_replay_computes_from_the_new_inputs(kind):
    """Captured with one batch, replayed with another (new latents, tokens, timesteps and, for RCOD_S,
    the other sample's degradation matrices): equal to the eager denoise of the new batch."""
    pipe, state, z, tokens = _conditioned(kind, 1)
    model = pipe.model
    pipe.select_sample(state, 0)
    graph = _stand_in()(model, z[:1], tokens[:1], torch.tensor([249]))
    pipe.select_sample(state, 1)
    out = graph(z[1:], tokens[1:], torch.tensor([749]))
    assert torch.equal(out, model.denoise(z[1:], tokens[1:], torch.tensor([749])))
    assert not torch.equal(out, model.denoise(z[:1], tokens[:1], torch.tensor([249])))
    out.zero_()  # a copy: the next replay's result is not the caller's tensor
    assert not torch.equal(graph.output, out)
    with pytest.raises(ValueError, match="this capture is for inputs"):
        graph(z, tokens, torch.tensor([249, 249]))


@pytest.mark.parametrize("tile", ["none", 16])
def test_pipeline_with_cuda_graphs_equals_eager(monkeypatch, tile):
    """The pipeline's replayed denoise gives the eager pipeline's images, untiled and tiled (one
    RCOD_S sample at a time, per-sample t), capturing once per shape and keeping the most recent."""
    from rcod_core import pipeline as P

    stand_in = _stand_in()
    monkeypatch.setattr(P, "CapturedDenoise", stand_in)
    monkeypatch.setattr(P.RCODPipeline, "_cuda_graph_device", lambda self: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    pipe, _, _, _ = _conditioned("rcod_s", 2)
    lr = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(3))  # tiled: 6 tiles, batches of 4 and 2
    kwargs = dict(realism=torch.tensor([250, 750]), scale=4, tile=tile, tile_overlap=8)
    eager = pipe.run(lr, **kwargs).images
    pipe.use_cuda_graphs(max_graphs=2)
    assert torch.equal(pipe.run(lr, **kwargs).images, eager)
    assert torch.equal(pipe.run(lr, **kwargs).images, eager)  # replays of the same captures
    graphs = list(pipe._graphs.values())
    assert len(graphs) == (1 if tile == "none" else 2) and all(g.captures == 1 for g in graphs)
    pipe.run(lr[..., :20, :20], realism=500, scale=4, tile=tile, tile_overlap=8)  # a new shape: the oldest goes
    assert len(pipe._graphs) <= 2 and list(pipe._graphs.values())[-1] not in graphs
    with pytest.raises(ValueError, match=r"must be in \[1, 999\]"):
        pipe.denoise(torch.zeros(1, 4, 8, 8), torch.zeros(1, 257, 32), torch.tensor([1000]))


def test_cuda_graphs_are_refused_where_they_cannot_run():
    from rcod_core.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline("rcod_o", seed=0)
    with pytest.raises(ValueError, match="CUDA graphs need the pipeline on a CUDA device; it is on cpu"):
        pipe.use_cuda_graphs()
    from rcod_core.capture import CapturedDenoise

    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        CapturedDenoise(pipe.model, torch.zeros(1, 4, 8, 8), torch.zeros(1, 257, 32), torch.tensor([499]))
    assert pipe.use_cuda_graphs(False)._graphs is None


def test_cli_cuda_graphs_flag_is_checked_before_loading(tmp_path, capsys):
    from PIL import Image

    from rcod_core.tools.cli import main

    src = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(src)
    base = ["upscale", str(src), "-o", str(tmp_path / "o"), "--tiny-smoke", "--quiet", "--device", "cpu", "--cuda-graphs"]
    assert main(base) == 2
    assert "--cuda-graphs needs a CUDA device; the run is on cpu" in capsys.readouterr().err
    assert main([*base, "--compile", "default"]) == 2
    assert "with --compile use --compile reduce-overhead" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*"))  # nothing written


def test_moved_weights_drop_every_capture(monkeypatch):
    """A capture holds the weights' addresses: after the UNet's weights move (as a host application's
    memory manager moves them), the pipeline frees all captures and captures afresh."""
    from rcod_core import pipeline as P

    monkeypatch.setattr(P, "CapturedDenoise", _stand_in())
    monkeypatch.setattr(P.RCODPipeline, "_cuda_graph_device", lambda self: True)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    pipe, _, z, tokens = _conditioned("rcod_o", 4)
    pipe.use_cuda_graphs()
    t = torch.tensor([499, 499])
    pipe.denoise(z, tokens, t)
    pipe.denoise(z[:1], tokens[:1], t[:1])
    first, pool = list(pipe._graphs.values()), pipe._graph_pool
    assert len(first) == 2
    pipe.model.place("cpu", torch.float64, torch.float32)  # new storage for every weight
    pipe.model.place("cpu", torch.float32, torch.float32)
    out = pipe.denoise(z, tokens, t)
    assert list(pipe._graphs.values()) != first and len(pipe._graphs) == 1 and pipe._graph_pool is not pool
    assert torch.equal(out, pipe.model.denoise(z, tokens, t))
    with pytest.raises(ValueError, match="on moved weights"):
        first[0](z, tokens, t)
