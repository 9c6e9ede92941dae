"""One model core: the trainer and the pipeline run the same forward; LDG's M_L never moves while the
model trains; MEM trained by the trainer drives adaptive inference; rcod_core has no import cycle."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from test_trainer import _config  # the tiny training config of the trainer tests

ROOT = Path(__file__).resolve().parents[1]


def _generator_and_bundle(tmp_path, kind):
    from trainer import config as C
    from trainer.models import build_rcod_o, build_rcod_s, load_base_models

    cfg = C.build(_config(tmp_path, kind))
    bundle = load_base_models(cfg)
    model = build_rcod_o(cfg, bundle)[0] if kind == "rcod_o" else build_rcod_s(cfg, bundle)
    return model.train(), bundle


@pytest.mark.parametrize("kind", ["rcod_o", "rcod_s"])
def test_trainer_and_pipeline_compute_the_same_forward_bitwise(tmp_path, kind):
    """z_L, tokens, ε and x0 of the trainer's forward (with gradients, unmerged LoRA) equal the
    pipeline's stages (no_grad) on the same model and inputs, bit for bit in fp32."""
    from rcod_core.pipeline import RCODPipeline

    model, _ = _generator_and_bundle(tmp_path, kind)
    g = torch.Generator().manual_seed(3)
    lr = torch.rand(2, 3, 16, 16, generator=g)
    t = torch.tensor([249, 749])
    pipe = RCODPipeline(model)  # the very modules the trainer optimises
    assert pipe.size_multiple <= 64
    prepared = pipe.prepare(lr, size=(64, 64))
    eps_pipe = pipe.model.eps(prepared.z_l, t, prepared.tokens)
    x0_pipe = pipe.denoise(prepared.z_l, prepared.tokens, t)

    model.train()
    from rcod_core.imageops import resize

    lr_up = resize(lr, (64, 64), "bicubic")  # what prepare encoded (it keeps lr_up only for a colour fix)
    out = model(lr_up, t, lr=lr)  # the trainer's call (trainer/engine.py: self.generator(...))
    assert out.x_pred.requires_grad and out.z_pred.requires_grad
    assert torch.equal(out.z_l, prepared.z_l)
    assert torch.equal(out.tokens, prepared.tokens)
    assert torch.equal(out.eps.detach(), eps_pipe.detach())
    assert torch.equal(out.z_pred.detach(), x0_pipe)
    # and the images: the pipeline's finish is the trainer's prediction in [0, 1]
    image = pipe.finish(prepared, x0_pipe)
    assert torch.equal(image, ((out.x_pred.detach().float() + 1) * 0.5).clamp(0, 1))


def test_a_samples_group_stays_put_while_the_vae_lora_trains(tmp_path, monkeypatch):
    """LDG measures M_L with the frozen base VAE: after training steps that move the VAE LoRA, every
    sample's M_L (and so its group) is bitwise what it was; the LoRA VAE's own cosine did move."""
    from rcod_core.grouping import select_timestep
    from rcod_core.model import measure_metric
    from trainer import config as C
    from trainer.data import generator
    from trainer.engine import SALT_DEGRADE, Trainer, latent_shape, sample_draws, upscale
    from trainer.models import load_base_models

    cfg = C.build(_config(tmp_path, "rcod_o", train={"max_steps": 3, "batch_size": 2},
                          optim={"lr": 5e-2, "lr_reg": 1e-3}, checkpoint={"every": 0}))
    tr = Trainer(cfg, log_stdout=False)
    batch = [tr.dataset[k] for k in range(2)]
    hr = torch.stack([b["hr"] for b in batch])
    lr = tr.degrade(hr, [generator(cfg["seed"], k, SALT_DEGRADE) for k in range(2)])
    lr_up = upscale(lr, hr.shape[-2:], "bicubic")
    clean = load_base_models(cfg).clean_vae  # what the trainer's metric VAE is before training
    draws = sample_draws(cfg["seed"], [0, 1], latent_shape(clean, hr), "sample")
    before = measure_metric(clean, lr_up, hr, draws["noise_lr"], draws["noise_hr"])
    import trainer.engine as engine

    seen = []  # every M_L the training loop groups by, and the VAE it was measured with

    def spy(vae, *args):
        seen.append((vae, engine_measure(vae, *args)))
        return seen[-1][1]

    engine_measure = engine.measure_metric
    monkeypatch.setattr(engine, "measure_metric", spy)
    tr.build()
    gen = tr.accelerator.unwrap_model(tr.generator)
    lora_before = measure_metric(gen.vae, lr_up, hr, draws["noise_lr"], draws["noise_hr"])
    vae_lora = {n: p.detach().clone() for n, p in gen.vae.named_parameters() if p.requires_grad}
    tr.run()
    gen = tr.accelerator.unwrap_model(tr.generator)
    assert any(not torch.equal(p, vae_lora[n]) for n, p in gen.vae.named_parameters() if n in vae_lora)
    lora_after = measure_metric(gen.vae, lr_up, hr, draws["noise_lr"], draws["noise_hr"])
    assert not torch.equal(lora_after, lora_before)  # what the old trainer grouped by moved ...
    after = measure_metric(tr.metric_vae, lr_up, hr, draws["noise_lr"], draws["noise_hr"])
    assert torch.equal(after, before)  # ... LDG's M_L did not
    assert torch.equal(select_timestep(after, tr.spec.grouping), select_timestep(before, tr.spec.grouping))
    # the loop itself: step 1 (samples 0, 1) grouped by exactly these values, always with the LoRA-free VAE
    assert len(seen) == 3 and torch.equal(seen[0][1], before)
    assert all(vae is tr.metric_vae and not any("lora" in n for n, _ in vae.named_parameters()) for vae, _ in seen)


def test_mem_trains_saves_and_drives_adaptive_realism(tmp_path):
    """rcod-train with model: mem on the CPU, a few steps: the file loads as a pipeline whose adaptive
    realism uses the trained MEM and the generator's grouping rule."""
    from rcod_core.checkpoints import load_checkpoint
    from rcod_core.grouping import select_timestep
    from rcod_core.loader import load_pipeline
    from test_trainer import _cli, _write

    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"m_min": 0.1, "m_max": 0.95, "quantile_edges": [0.4, 0.7]}))
    gen_cfg = _config(tmp_path, "rcod_s", grouping={"rule": "paper", "bounds": str(scan)})
    assert _cli(["train", "--config", _write(tmp_path, gen_cfg, "gen.yaml"), "--quiet"]) == 0
    gen_file = tmp_path / "out" / "checkpoints" / "step_0000001" / "model.safetensors"
    mem_cfg = _config(tmp_path, "mem", output_dir=str(tmp_path / "mem"), mem={"generator": str(gen_file)},
                      train={"max_steps": 3, "batch_size": 2}, checkpoint={"every": 3})
    mem_cfg.pop("init", None)
    assert _cli(["train", "--config", _write(tmp_path, mem_cfg, "mem.yaml"), "--quiet"]) == 0
    log = [json.loads(line) for line in (tmp_path / "mem" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    pipe = load_pipeline(tmp_path / "mem" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert pipe.has_mem and pipe.grouping_rule().kind == "paper" and pipe.grouping_rule().m_min == 0.1
    out = pipe.run(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), realism="adaptive")
    assert out.metric.shape == (2,) and torch.isfinite(out.metric).all()
    assert torch.equal(out.timesteps, select_timestep(out.metric, pipe.grouping_rule()))
    # the MEM weights are the trained ones, not the generator file's (which has none)
    assert "mem" not in load_checkpoint(gen_file).groups


# -- the package's shape -------------------------------------------------------------------------

def _imports(path: Path, package: str) -> set[str]:
    """rcod_core modules a file imports, anywhere in it (function-level imports count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = package.split(".")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("rcod_core")}
    return found


def _module_graph() -> dict[str, set[str]]:
    files = {}
    for path in sorted((ROOT / "rcod_core").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        files[name] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, package) if m in files and m != name}
    return graph


def test_rcod_core_has_no_import_cycle():
    graph = _module_graph()
    assert len(graph) > 20
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_library_never_imports_its_tools_or_fixtures():
    graph = _module_graph()
    library = [m for m in graph if not m.startswith(("rcod_core.tools", "rcod_core.testing")) and m != "rcod_core.cli"]
    bad = {m: sorted(d for d in graph[m] if d.startswith(("rcod_core.tools", "rcod_core.testing"))) for m in library}
    assert not {m: d for m, d in bad.items() if d}


def test_scan_metric_measures_what_training_groups_by(tmp_path, monkeypatch, capsys):
    """``scan-metric --out`` writes Eq. 5's M_L bounds of exactly the values the training loop groups
    the same samples by (same LR synthesis, latent draws and frozen VAE); a config names the file."""
    import trainer.engine as engine
    from test_trainer import _cli, _write
    from trainer import config as C
    from trainer.models import grouping_rule

    cfg = _config(tmp_path, "rcod_o", train={"max_steps": 2, "batch_size": 2}, checkpoint={"every": 0})
    path = _write(tmp_path, cfg)
    out = tmp_path / "scan" / "metric_scan.json"
    assert _cli(["scan-metric", "--config", path, "--samples", "4", "--batch", "2", "--out", out]) == 0
    scan = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == scan and scan["samples"] == 4
    seen = []
    real = engine.measure_metric
    monkeypatch.setattr(engine, "measure_metric", lambda *a: seen.append(real(*a)) or seen[-1])
    engine.train(C.build(cfg), log_stdout=False)
    trained = torch.cat(seen)
    assert trained.numel() == 4
    assert (scan["m_min"], scan["m_max"]) == (float(trained.double().min()), float(trained.double().max()))
    rule = grouping_rule(C.build({**cfg, "grouping": {"rule": "paper", "bounds": str(out)}}))
    assert (rule.kind, rule.m_min, rule.m_max) == ("paper", scan["m_min"], scan["m_max"])


@pytest.mark.parametrize("kind", ["rcod_o", "rcod_s"])
def test_the_one_step_forward_traces_as_one_graph(kind):
    """ε and the x0 step (Eq. 3/4) trace as one graph with no break: no value is read back to the
    host inside (ᾱ is looked up on the UNet's device), what capturing it as one CUDA graph needs."""
    from rcod_core.testing.tiny import tiny_pipeline

    pipe = tiny_pipeline(kind, seed=0)
    if pipe.model.conditioning is not None:
        pipe.select_sample(pipe.condition(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))), None)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = pipe.prompt(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)))
    t = torch.tensor([499])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(pipe.model.denoise)(z, tokens, t)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert pipe.model.alphas_on_device.device == pipe.device
    with pytest.raises(ValueError, match=r"must be in \[1, 999\]"):
        pipe.model.denoise(z, tokens, torch.tensor([1000]))  # eager calls still check their timesteps
