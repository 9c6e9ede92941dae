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


# -- bad images: declared sizes, float, NaN, CMYK -------------------------------------------------

def _tiff_declaring(path: Path, width: int, height: int) -> Path:
    """A small 16-bit TIFF whose header is patched to declare width x height (a memory bomb)."""
    import struct

    import numpy as np
    import tifffile

    tifffile.imwrite(str(path), np.zeros((8, 8), np.uint16))
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, value)
    path.write_bytes(bytes(data))
    return path


def test_image_bombs_are_refused_before_decoding(tmp_path):
    import resource

    from rcod_core.imageio import load_image
    from trainer.data import DataError, image_size, load_image as train_load

    bomb = _tiff_declaring(tmp_path / "bomb.tif", 20480, 20480)
    assert bomb.stat().st_size < 10_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="declares 20480x20480 = 419,430,400 pixels"):
        load_image(bomb)
    with pytest.raises(DataError, match="bomb.tif.*declares 20480x20480"):
        image_size(bomb)
    with pytest.raises(DataError, match="declares"):
        train_load(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing near 800 MB


def test_float_and_nan_tiffs_and_cmyk_profiles(tmp_path):
    import numpy as np
    import tifffile
    from PIL import Image

    from rcod_core.imageio import load_image, save_image

    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    tifffile.imwrite(str(tmp_path / "gray.tif"), ramp)
    img = load_image(tmp_path / "gray.tif")
    assert img.grayscale and torch.allclose(img.rgb[0, 0], torch.from_numpy(ramp))  # not black
    rgb = np.stack([ramp, ramp[::-1], 1 - ramp], -1)
    tifffile.imwrite(str(tmp_path / "rgb.tif"), rgb, photometric="rgb")
    assert torch.allclose(load_image(tmp_path / "rgb.tif").rgb[0], torch.from_numpy(rgb).permute(2, 0, 1))
    bad = ramp.copy()
    bad[3, 4] = np.nan
    tifffile.imwrite(str(tmp_path / "nan.tif"), bad)
    with pytest.raises(ValueError, match="nan.tif.*1 pixel values are NaN or Inf"):
        load_image(tmp_path / "nan.tif")
    tifffile.imwrite(str(tmp_path / "hdr.tif"), ramp * 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_image(tmp_path / "hdr.tif")
    # a CMYK JPEG with a CMYK profile: RGB out, and no CMYK profile written into an RGB file
    fake_cmyk_icc = bytes(16) + b"CMYK" + bytes(108)
    Image.new("CMYK", (32, 24), (10, 200, 30, 5)).save(tmp_path / "cmyk.jpg", icc_profile=fake_cmyk_icc)
    img = load_image(tmp_path / "cmyk.jpg")
    assert img.icc_profile is None and img.rgb.shape == (1, 3, 24, 32)
    save_image(tmp_path / "out.png", img)
    assert Image.open(tmp_path / "out.png").info.get("icc_profile") is None


# -- lost outputs ----------------------------------------------------------------------------------

def _smoke(args):
    from rcod_core.tools.cli import main

    return main(["upscale", "--tiny-smoke", "--quiet", "--device", "cpu", "--tile", "none", *map(str, args)])


def test_same_stem_inputs_get_distinct_outputs(tmp_path):
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(src / "photo.png")
    Image.new("RGB", (16, 12), (10, 10, 200)).save(src / "photo.jpg")
    assert _smoke([src, "-o", tmp_path / "out"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["photo_jpg_rcod.png", "photo_png_rcod.png"]


def test_output_folder_equal_to_the_input_folder_and_stale_temp_files(tmp_path, capsys):
    from PIL import Image

    from rcod_core.files import TEMP_PREFIX

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (16, 12), (90, 90, 10)).save(folder / "a.png")
    dead = folder / f"{TEMP_PREFIX}999999999-x.png"  # what a killed run leaves (no such process)
    dead.write_bytes(b"")
    live = folder / f"{TEMP_PREFIX}{os.getpid()}-y.png"  # another live writer's file stays
    live.write_bytes(b"")
    assert _smoke([folder, "-o", folder]) == 0
    assert not dead.exists() and live.exists()
    assert _smoke([folder, "-o", folder]) == 0  # again: a_rcod.png is not reprocessed, no temp file read
    captured = capsys.readouterr()
    err = captured.out + captured.err
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert names == ["a.png", "a_rcod.png"] and "a_rcod_rcod" not in err
    assert "an output of an earlier run" in err


def test_one_failing_image_does_not_stop_the_batch(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from rcod_core.pipeline import RCODPipeline

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 12), (90, 90, 10)).save(src / f"{name}.png")
    run = RCODPipeline.run

    def flaky(self, images, **kw):
        if float(images.sum()) > 0 and flaky.calls == 1:
            flaky.calls += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 3.00 GiB\n(details...)")
        flaky.calls += 1
        return run(self, images, **kw)

    flaky.calls = 0
    monkeypatch.setattr(RCODPipeline, "run", flaky)
    assert _smoke([src, "-o", tmp_path / "out"]) == 1  # the exit code counts the failures
    err = capsys.readouterr().err
    assert "FAILED" in err and "RuntimeError: CUDA out of memory. Tried to allocate 3.00 GiB" in err
    assert "(details" not in err and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_rcod.png", "c_rcod.png"]


@pytest.mark.parametrize("args, message", [
    (["--device", "quantum"], "--device 'quantum': not a device"),
    (["--device", "meta"], "--device meta"),
    (["--scale", "9"], "--scale must be in [1, 8]"),
    (["--realism", "ultra"], "realism must be one of"),
])
def test_bad_arguments_fail_before_loading(tmp_path, capsys, monkeypatch, args, message):
    import rcod_core.tools.cli as cli

    monkeypatch.setattr(cli, "build_pipeline", lambda *a: pytest.fail("the model was loaded"))
    assert _smoke([ROOT_IMAGE, "-o", tmp_path / "out", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_output_folders_and_values_fail_before_loading(tmp_path, capsys, monkeypatch):
    import rcod_core.tools.cli as cli

    monkeypatch.setattr(cli, "build_pipeline", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    assert _smoke([ROOT_IMAGE, "-o", tmp_path / "file"]) == 2
    assert "-o" in capsys.readouterr().err
    assert _smoke([ROOT_IMAGE, "-o", tmp_path / "file" / "sub"]) == 2
    for flag, value in (("--seed", str(2 ** 64)), ("--max-memory", "inf"), ("--size", "400000x300000")):
        with pytest.raises(SystemExit):
            _smoke([ROOT_IMAGE, "-o", tmp_path / "out", flag, value])
        assert flag in capsys.readouterr().err


ROOT_IMAGE = Path(__file__).resolve().parents[1] / "rcod_core" / "assets" / "astronaut_lr96.png"


def test_checkpoint_paths_that_are_not_files_say_what_they_are(tmp_path, capsys):
    from rcod_core.tools.cli import main

    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "gone.pkl")
    for name, words in (("folder", "is a folder"), ("pipe", "named pipe"), ("link", "symbolic link to a missing file"),
                        ("nothing", "does not exist")):
        assert main(["info", str(tmp_path / name)]) == 2
        assert words in capsys.readouterr().err, name


def test_convert_write_failure_is_one_line(ours, tmp_path, capsys):
    from rcod_core.tools.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
            target = tmp_path / "afile"
            target.write_text("x")
            out = target / "m.safetensors"
        else:
            out = locked / "m.safetensors"
        assert main(["convert", str(ours / "rcod_o.pkl"), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write the checkpoint" in err
    finally:
        locked.chmod(0o700)


def test_written_files_get_the_usual_permissions(ours, tmp_path):
    from rcod_core.checkpoints import convert

    old = os.umask(0o022)
    try:
        convert(ours / "rcod_o.pkl", tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


def test_resume_does_not_repeat_logged_steps(tmp_path):
    cfg = _config(tmp_path, train={"max_steps": 2})
    path = _write(tmp_path, cfg)
    assert _cli(["train", "--config", path, "--quiet"]) == 0
    # as if the run had been killed after logging step 2 but before its checkpoint completed
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step_0000002")
    (tmp_path / "out" / "latest.json").write_text(json.dumps({"checkpoint": "checkpoints/step_0000001", "step": 1}))
    with open(tmp_path / "out" / "log.jsonl", "a") as f:
        f.write('{"step": 2, "cut')  # a line the kill cut short
    assert _cli(["train", "--config", path, "--quiet", "--resume", str(tmp_path / "out")]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_colon_names_are_names(tmp_path):
    from rcod_core.loader import safe_model_path

    (tmp_path / "a:b.pkl").write_bytes(b"x")
    assert safe_model_path(tmp_path, "a:b.pkl") == tmp_path / "a:b.pkl"
    for bad in ("C:/x.pkl", "c:\\x.pkl", "/etc/passwd", "../x.pkl"):
        with pytest.raises(ValueError):
            safe_model_path(tmp_path, bad)


def test_a_link_to_a_non_checkpoint_shows_none_of_its_bytes(tmp_path):
    from rcod_core.checkpoints import CheckpointError, load_checkpoint

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRET-TOKEN-1234")
    (tmp_path / "m.pkl").symlink_to(secret)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "m.pkl")
    assert "TOPSECRET" not in str(info.value) and "544f50" not in str(info.value).lower()


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A small PNG whose IHDR is patched (CRC fixed) to declare width x height."""
    import struct
    import zlib

    from PIL import Image

    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_a_bomb_in_the_training_data_is_a_clear_error(tmp_path, capsys):
    cfg = _config(tmp_path)
    # 10000² is past our limit but below the size at which Pillow itself refuses (it would only warn)
    _png_declaring(Path(cfg["data"]["train"][0]["path"]) / "huge.png", 10000, 10000)
    assert _cli(["train", "--config", _write(tmp_path, cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcod-train: error:") and "huge.png" in err and "declares 10000x10000" in err
    assert not (tmp_path / "out").exists()


def test_a_start_checkpoint_missing_a_group_is_a_clear_error(ours, tmp_path, capsys):
    bad = _rewrite(ours / "rcod_o.safetensors", tmp_path / "start.safetensors",
                   lambda t: {k: v for k, v in t.items() if not k.startswith("vae.")})
    cfg = _config(tmp_path, init={"checkpoint": str(bad)})
    assert _cli(["train", "--config", _write(tmp_path, cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcod-train: error:") and "['vae']" in err and "Traceback" not in err


def test_cuda_out_of_memory_is_retried_tiled_once(tmp_path, monkeypatch):
    from PIL import Image

    from rcod_core.pipeline import RCODPipeline

    src = tmp_path / "a.png"
    Image.new("RGB", (24, 20), (90, 20, 10)).save(src)
    run = RCODPipeline.run
    tiles = []

    def oom_untiled(self, images, **kw):
        tiles.append(kw.get("tile"))
        if kw.get("tile") in (None, "none", "auto"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return run(self, images, **kw)

    monkeypatch.setattr(RCODPipeline, "run", oom_untiled)
    assert _smoke([src, "-o", tmp_path / "out"]) == 0
    assert tiles == ["none", 64] and (tmp_path / "out" / "a_rcod.png").is_file()
