"""trainer/: config and data errors, DAS, LDG per sample, degradations, one step per model, resume, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int = 3, size=(48, 40), seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = size[1], size[0]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (3 + i)), np.cos(yy / (4 + i)), np.sin((xx + yy) / 5)], -1) * 100 + 128
        arr = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


def _config(tmp_path: Path, model: str = "rcod_o", **over) -> dict:
    data = _images(tmp_path / "data")
    cfg = {
        "model": model, "seed": 1, "output_dir": str(tmp_path / "out"),
        "base": {"family": "tiny", "seed": 0},
        "data": {"train": [{"type": "hr", "path": str(data)}], "crop": 32},
        "lpips": {"mode": "random-init"},
        "optim": {"lr": 1e-3, "lr_reg": 1e-3, "lr_disc": 1e-3},
        "train": {"batch_size": 1, "max_steps": 1, "threads": 1},
        "log": {"every": 1, "tensorboard": "off"}, "checkpoint": {"every": 1}, "validation": {"every": 0},
    }
    if model == "rcod_s":
        cfg["init"] = {"allow_random_de_net": True}
        cfg["gan"] = {"backbone": "tiny", "random_init": True, "image_size": 32}
        cfg["spec"] = {"rank_unet": 4, "rank_vae": 4}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _cli(args) -> int:
    from trainer.cli import main

    return main([str(a) for a in args])


# -- bad inputs: clear errors, nothing written ---------------------------------------------------

@pytest.mark.parametrize("case", ["unknown_key", "empty_folder", "unreadable", "too_small", "missing_weights",
                                  "missing_resume", "lpips_weights"])
def test_bad_inputs_fail_before_writing(tmp_path, case, capsys):
    cfg = _config(tmp_path)
    resume = []
    if case == "unknown_key":
        cfg["train"]["batchsize"] = 2
        match = "batchsize"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        cfg["data"]["train"] = [{"type": "hr", "path": str(tmp_path / "empty")}]
        match = "holds no images"
    elif case == "unreadable":
        (tmp_path / "data" / "broken.png").write_bytes(b"not an image")
        match = "unreadable image"
    elif case == "too_small":
        cfg["data"]["crop"] = 64
        match = "smaller than the 64px crop"
    elif case == "missing_weights":
        cfg["init"] = {"checkpoint": str(tmp_path / "nope.pkl")}
        match = "does not exist"
    elif case == "missing_resume":
        resume = ["--resume", tmp_path / "no_such_run"]
        match = "does not exist"
    else:
        cfg["lpips"] = {"mode": "pretrained"}
        match = "LPIPS needs pretrained"
    code = _cli(["train", "--config", _write(tmp_path, cfg), *resume])
    err = capsys.readouterr().err
    assert code == 2 and match in err, err
    assert not (tmp_path / "out").exists()


def test_gan_backbone_needs_weights(tmp_path, capsys):
    cfg = _config(tmp_path, "rcod_s", gan={"random_init": False})
    assert _cli(["train", "--config", _write(tmp_path, cfg)]) == 2
    assert "DINO ViT backbone needs pretrained weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- DAS and LDG ------------------------------------------------------------------------------------

def test_das_draws_per_sample_over_eq7s_whole_range(tmp_path):
    """The trainer's regulariser timesteps: each sample's from its own stream (the same whatever batch
    it is in) and, over many samples, exactly Eq. 7's range {t-k .. t+k} (paper) / [20, 980) (release)."""
    from trainer import config as C
    from trainer.engine import Trainer

    for mode, t, support in (("paper", 499, range(249, 750)), ("official", 249, range(20, 980)),
                             ("official", 749, range(200, 980))):
        tr = Trainer(C.build(_config(tmp_path, das={"mode": mode})), log_stdout=False)
        tr.device = torch.device("cpu")
        pair = tr._das([5, 9], torch.tensor([t, t]))
        assert pair[1] == tr._das([9], torch.tensor([t]))[0] and pair[0] == tr._das([5], torch.tensor([t]))[0]
        many = tr._das(list(range(12000)), torch.full((12000,), t))
        assert set(many.tolist()) == set(support), (mode, t)


def test_ldg_groups_each_sample(tmp_path):
    import json

    from rcod_core.grouping import select_timestep
    from trainer import config as C
    from trainer.models import grouping_rule

    metric = torch.tensor([0.2, 0.55, 0.9, 0.69])
    rule = grouping_rule(C.build({**_config(tmp_path), "grouping": {"rule": "official"}}))
    assert select_timestep(metric, rule).tolist() == [749, 499, 249, 499]
    # Eq. 5 with the bounds a scan-metric file gives: [0.2, 0.9] → edges 0.433 / 0.667
    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"m_min": 0.2, "m_max": 0.9, "quantile_edges": [0.6, 0.7, 0.8]}))
    rule = grouping_rule(C.build({**_config(tmp_path), "grouping": {"rule": "paper", "bounds": str(scan)}}))
    assert (rule.m_min, rule.m_max) == (0.2, 0.9)
    assert select_timestep(metric, rule).tolist() == [750, 500, 250, 250]
    rule = grouping_rule(C.build({**_config(tmp_path), "grouping": {"rule": "edges", "bounds": str(scan)}}))
    assert select_timestep(metric, rule).tolist() == [999, 999, 250, 750]
    rule = grouping_rule(C.build({**_config(tmp_path), "grouping": {"rule": "quantiles", "quantiles": [0.6, 0.7, 0.8]}}))
    assert select_timestep(metric, rule).tolist() == [999, 999, 250, 750]
    with pytest.raises(C.ConfigError, match="scan-metric"):
        C.build({**_config(tmp_path), "grouping": {"rule": "paper"}})


# -- degradations -----------------------------------------------------------------------------------

def test_degradation_per_sample_determinism():
    from trainer.data import generator
    from trainer.realesrgan import RealESRGANDegradation

    deg = RealESRGANDegradation()
    hr = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    gens = lambda ks: [generator(5, k, 3) for k in ks]
    batch = deg(hr, gens([0, 1, 2]))
    assert batch.shape == (3, 3, 16, 16) and batch.min() >= 0 and batch.max() <= 1
    single = deg(hr[1:2], gens([1]))
    assert torch.equal(batch[1:2], single)
    assert not torch.equal(batch[0], batch[2])


def test_kernels_normalised():
    from trainer.realesrgan import DegradationConfig, RealESRGANDegradation

    deg = RealESRGANDegradation(DegradationConfig(sinc_prob=0.5))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        (k1, _), (k2, _), (k3, _) = deg.draw_kernels(g)
        for k in (k1, k2, k3):
            assert k.shape == (21, 21) and abs(float(k.sum()) - 1) < 1e-6


# -- one step changes exactly the trainable parameters ------------------------------------------------

def _snapshot(modules):
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


@pytest.mark.parametrize("model", ["rcod_o", "rcod_s"])
def test_one_step_changes_exactly_trainable(tmp_path, model):
    from trainer import config as C
    from trainer.engine import Trainer

    cfg = C.build(_config(tmp_path, model, checkpoint={"every": 0}))
    tr = Trainer(cfg, log_stdout=False)
    tr.build()
    modules = [tr.accelerator.unwrap_model(m) for m in (tr.generator, tr.regulariser, tr.discriminator) if m is not None]
    trainable = {f"{i}.{n}" for i, m in enumerate(modules) for n, p in m.named_parameters() if p.requires_grad}
    before = _snapshot(modules)
    batch = tr.dataset[0]
    hr, lr, lr_up, idx = tr._prepare_batch({"hr": batch["hr"][None], "index": torch.tensor([0])})
    step = tr._step_rcod_o if model == "rcod_o" else tr._step_rcod_s
    for m in modules:
        m.train()
    step(hr, lr, lr_up, idx, {})
    after = _snapshot(modules)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable  # the frozen base never moves
    # every trainable tensor moves, except RCOD_S's zero-initialised guidance biases: with LoRA B = 0 (peft /
    # S3Diff init) the r×r matrices get no gradient on the first step, and weight decay keeps zeros at zero
    still = trainable - changed
    assert all("guidance" in k and k.endswith("bias") and not before[k].any() for k in still), sorted(still)[:5]
    assert any("lora" in k for k in changed) and any("projection" in k for k in changed)
    base_like = [k for k in trainable if "lora" not in k and "conv_in" not in k and "projection" not in k
                 and "guidance" not in k and "heads" not in k]
    assert not base_like, base_like[:5]


# -- kill and resume equals an uninterrupted run (bitwise, CPU fp32) -------------------------------------

def _model(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_kill_and_resume_is_bitwise(tmp_path):
    n = 1
    cfg = _config(tmp_path, train={"max_steps": 2 * n})
    # the uninterrupted reference runs in a fresh process too: earlier tests in this process may have
    # changed global torch / transformers state that alters the last bits of float results
    ref_path = _write(tmp_path, {**cfg, "output_dir": str(tmp_path / "ref")}, "ref.yaml")
    ref = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", "--config", str(ref_path), "--quiet"],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = _write(tmp_path, cfg)
    env = {**os.environ, "RCOD_TRAIN_PAUSE_AFTER_SAVE": "30"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", "--config", str(path), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "out" / "checkpoints" / f"step_{n:07d}" / "trainer_state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert state.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "checkpoints" / f"step_{2 * n:07d}").exists()
    resumed = subprocess.run([sys.executable, "-m", "trainer.cli", "train", "--config", str(path), "--quiet",
                              "--resume", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    a = _model(tmp_path / "out" / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors")
    b = _model(tmp_path / "ref" / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the saved model loads as a pipeline
    from rcod_core.loader import load_pipeline

    pipe = load_pipeline(tmp_path / "out" / "checkpoints" / f"step_{2 * n:07d}" / "model.safetensors")
    out = pipe(torch.rand(1, 3, 8, 8), realism=250)
    assert out.shape == (1, 3, 32, 32)


# -- two processes (gloo) == one process with the doubled batch ----------------------------------------

def test_two_processes_match_doubled_batch(tmp_path):
    pytest.importorskip("accelerate")
    from trainer import config as C
    from trainer.engine import train

    # Adam normalises each gradient element: where two samples' gradients nearly cancel, the ~1e-7 difference
    # between gloo's average and a batched mean can flip an element's sign and move it by ±lr. A large eps
    # makes the update proportional to the gradient, so the weights compare the gradients themselves.
    cfg = _config(tmp_path, train={"max_steps": 2, "batch_size": 1}, optim={"eps": 1.0, "lr": 1e-2, "lr_reg": 1e-2})
    path = _write(tmp_path, cfg)
    # torchrun, not `accelerate launch --cpu --num_processes 2`: accelerate 1.15 starts ONE process for that
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                          "-m", "trainer.cli", "train", "--config", str(path), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    single = C.build({**cfg, "output_dir": str(tmp_path / "single"), "train": {**cfg["train"], "batch_size": 2}})
    threads = torch.get_num_threads()
    try:
        train(single, log_stdout=False)
    finally:
        torch.set_num_threads(threads)
    a = _model(tmp_path / "out" / "checkpoints" / "step_0000002" / "model.safetensors")
    b = _model(tmp_path / "single" / "checkpoints" / "step_0000002" / "model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    first = _model(tmp_path / "single" / "checkpoints" / "step_0000001" / "model.safetensors")
    moved = max(float((b[k] - first[k]).abs().max()) for k in b)
    assert worst < 1e-6 and moved > 1e-4, (worst, moved)


def test_vae_feature_distance_is_lpips_like_and_leaves_the_vae_frozen():
    from diffusers import AutoencoderKL

    from trainer.losses import VAEFeatureDistance, build_lpips

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).requires_grad_(False)
    dist = build_lpips({"loss": {"lpips": 2.0}, "lpips": {"mode": "vae"}, "seed": 0}, vae)
    assert isinstance(dist, VAEFeatureDistance) and list(dist.parameters()) == []  # shares, never copies
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    x = y.clone().requires_grad_(True)
    d0 = dist(x, y)
    assert d0.shape == (2,) and float(d0.abs().max()) < 1e-6
    blurred = torch.nn.functional.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
    d1 = dist(blurred.requires_grad_(True), y)
    assert float(d1.min()) > 0.0
    d1.sum().backward()
    assert all(p.grad is None for p in vae.parameters())
    # per tap: summed over channels of unit vectors, so each tap's term lies in [0, 4]
    assert float(dist(-y, y).max()) <= 4.0 + 1e-5
    with pytest.raises(ValueError, match="base VAE"):
        build_lpips({"loss": {"lpips": 1.0}, "lpips": {"mode": "vae"}, "seed": 0})


def test_l2_weighting_follows_alpha_bar_of_each_samples_t(tmp_path):
    from types import SimpleNamespace

    from rcod_core.schedule import alphas_cumprod
    from trainer import config as C
    from trainer.engine import Trainer

    assert C.build(_config(tmp_path))["loss"]["l2_weighting"] == "none"  # the paper's plain L2 by default
    with pytest.raises(C.ConfigError, match="l2_weighting"):
        C.build({**_config(tmp_path), "loss": {"l2_weighting": "snr"}})
    cfg = C.build({**_config(tmp_path), "loss": {"l2_weighting": "alpha_bar"}})
    ab = alphas_cumprod(None)
    gen = SimpleNamespace(alphas_cumprod=ab)
    t = torch.tensor([249, 499, 749])
    w = Trainer._l2_weights(SimpleNamespace(cfg=cfg), gen, t)
    assert torch.allclose(w, ab[t].sqrt().float()) and w[0] > w[1] > w[2]
    assert float(w[2]) == pytest.approx(0.057 ** 0.5, abs=0.01)  # ᾱ_749 ≈ 0.057
    ones = Trainer._l2_weights(SimpleNamespace(cfg=C.build(_config(tmp_path))), gen, t)
    assert ones.tolist() == [1.0, 1.0, 1.0]
