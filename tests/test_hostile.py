"""Hostile and broken inputs through the public entry points: each gets one clear line naming the
problem, nothing runs code from a file, nothing is lost. Files are made here, not committed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from test_trainer import _cli, _config, _write


class _RunsCode:
    """Unpickling this creates the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A finished one-step RCOD_O run with EMA on (its checkpoint is copied per test and tampered with)."""
    tmp = tmp_path_factory.mktemp("ema-run")
    cfg = _config(tmp, train={"max_steps": 1, "ema": {"enabled": True, "decay": 0.9}})
    path = _write(tmp, cfg)
    assert _cli(["train", "--config", path, "--quiet"]) == 0
    return tmp, cfg


def _resume(tmp_path, ema_run, tamper, capsys):
    src, cfg = ema_run
    run = tmp_path / "run"
    shutil.copytree(src / "out", run)
    ckpt = run / "checkpoints" / "step_0000001"
    tamper(ckpt)
    cfg = {**cfg, "output_dir": str(run), "train": {**cfg["train"], "max_steps": 2}}
    code = _cli(["train", "--config", _write(tmp_path, cfg, "resume.yaml"), "--resume", str(run), "--quiet"])
    return code, capsys.readouterr().err


def test_ema_state_is_tensors_and_resume_continues(tmp_path, ema_run, capsys):
    src, _ = ema_run
    ckpt = src / "out" / "checkpoints" / "step_0000001"
    assert (ckpt / "ema.safetensors").is_file()
    assert not list(ckpt.glob("custom_checkpoint_*"))
    code, err = _resume(tmp_path, ema_run, lambda c: None, capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "ema.safetensors").is_file()


def test_a_pickle_in_the_checkpoint_is_refused_and_never_runs(tmp_path, ema_run, capsys):
    marker = tmp_path / "ran"
    code, err = _resume(tmp_path, ema_run, lambda c: (c / "custom_checkpoint_0.pkl").write_bytes(
        pickle.dumps(_RunsCode(marker))), capsys)
    assert code == 2 and "rcod-train: error:" in err and "custom_checkpoint_0.pkl" in err and "pickle" in err
    assert not marker.exists()


def _nan_weights(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    f = ckpt / "trainable_0.safetensors"
    state = load_file(str(f))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(f))


@pytest.mark.parametrize("case, tamper, message", [
    ("truncated weights", lambda c: (c / "trainable_0.safetensors").write_bytes(
        (c / "trainable_0.safetensors").read_bytes()[:100]), "trainable weights unreadable"),
    ("empty EMA", lambda c: (c / "ema.safetensors").write_bytes(b""), "EMA weights unreadable"),
    ("garbage EMA", lambda c: (c / "ema.safetensors").write_bytes(os.urandom(256)), "EMA weights unreadable"),
    ("NaN weights", _nan_weights, "holds NaN or Inf"),
    ("missing weights", lambda c: (c / "trainable_0.safetensors").unlink(), "trainable weights missing"),
    ("garbage state", lambda c: (c / "trainer_state.json").write_text("{not json"), "trainer_state.json: unreadable"),
    ("mis-typed state", lambda c: (c / "trainer_state.json").write_text(json.dumps(
        {**json.loads((c / "trainer_state.json").read_text()), "step": "one"})), "field 'step' must be int"),
    ("latest escapes", lambda c: (c.parents[1] / "latest.json").write_text(json.dumps({"checkpoint": "../../x"})),
     "outside the run folder"),
])
def test_a_broken_resume_folder_is_one_clear_error(tmp_path, ema_run, capsys, case, tamper, message):
    code, err = _resume(tmp_path, ema_run, tamper, capsys)
    assert code == 2, (case, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("rcod-train: error:") and message in lines[-1], (case, err[-1500:])
    assert "Traceback" not in err


# -- a silently wrong model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny RCOD_O in our .safetensors format (tensors and metadata to tamper with)."""
    from rcod_core.checkpoints import convert
    from rcod_core.testing.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny-hostile")
    make_tiny(root)
    convert(root / "rcod_o.pkl", root / "rcod_o.safetensors")
    return root


def _rewrite(src: Path, dst: Path, edit_tensors=None, edit_meta=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        tensors = edit_tensors(tensors)
    if edit_meta:
        meta = edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _spec_edit(**changes):
    def edit(meta):
        spec = json.loads(meta["spec"])
        spec.update(changes)
        return {**meta, "spec": json.dumps(spec)}
    return edit


def _first(tensors, group):
    return next(k for k in sorted(tensors) if k.startswith(group + "."))


@pytest.mark.parametrize("case, tensors, meta, message", [
    ("no projection", lambda t: {k: v for k, v in t.items() if not k.startswith("projection.")}, None,
     r"needs the weight group\(s\) \['projection'\]"),
    ("no unet", lambda t: {k: v for k, v in t.items() if not k.startswith("unet.")}, None, r"\['unet'\]"),
    ("NaN", lambda t: {**t, _first(t, "vae"): torch.full_like(t[_first(t, "vae")], float("nan"))}, None, "NaN or Inf"),
    ("Inf", lambda t: {**t, _first(t, "projection"): torch.full_like(t[_first(t, "projection")], float("inf"))}, None,
     "NaN or Inf"),
    ("integers", lambda t: {**t, _first(t, "unet"): t[_first(t, "unet")].to(torch.int32)}, None, "must be floating point"),
    ("groups as a list", None, _spec_edit(unet_lora_groups=["conv_in"]), "unet_lora_groups must map"),
    ("groups as an int", None, _spec_edit(vae_lora_groups=3), "vae_lora_groups must map"),
    ("alpha a string", None, _spec_edit(lora_alpha="eight"), "lora_alpha must be a positive number"),
])
def test_a_damaged_model_file_is_refused_naming_file_and_tensor(ours, tmp_path, capsys, case, tensors, meta, message):
    from rcod_core.checkpoints import CheckpointError, load_checkpoint
    from rcod_core.tools.cli import main

    bad = _rewrite(ours / "rcod_o.safetensors", tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "Traceback" not in err
    out = tmp_path / "out"
    src = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (90, 120, 30)).save(src)
    assert main(["upscale", str(src), "-o", str(out), "--model", str(bad), "--base", str(ours / "base-sd21"),
                 "--clip", str(ours / "clip-vision"), "--quiet"]) != 0
    assert not out.exists() or not list(out.glob("*.png"))
