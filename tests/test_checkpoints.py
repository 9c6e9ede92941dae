"""Every official format, written synthetically in the release's key layout, loaded and run."""

import os
import pickle

import pytest
import torch

from rcod_core.checkpoints import (
    CheckpointError, Checkpoint, convert, detect_format, load_checkpoint, merge_checkpoints, read_file,
)
from rcod_core.loader import load_pipeline, pipeline_from_checkpoint, safe_model_path


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    from rcod_core.testing.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    return root


@pytest.fixture(scope="module")
def lr():
    return torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(5))


FORMATS = {
    # file: (format, kind, base folder, needs clip, top-level key count)
    "osediff.pkl": ("osediff", "osediff", "base-sd21", False, 8),
    "rcod_o.pkl": ("rcod_o", "rcod_o", "base-sd21", True, 9),
    "s3diff.pkl": ("s3diff", "s3diff", "base-sd-turbo", False, 14),
    "rcod_s.pkl": ("rcod_s", "rcod_s", "base-sd-turbo", True, 15),
}


def _kwargs(root, file):
    _, _, base, clip, _ = FORMATS[file]
    return {"base": root / base, "clip": root / "clip-vision" if clip else None}


@pytest.mark.parametrize("file", sorted(FORMATS))
def test_format_detected_by_keys_not_name(tiny_set, tmp_path, file):
    fmt, kind, _, _, n_keys = FORMATS[file]
    obj, _ = read_file(tiny_set / file)
    assert len(obj) == n_keys
    assert detect_format(obj) == fmt
    renamed = tmp_path / "model.bin"  # the name says nothing
    renamed.write_bytes((tiny_set / file).read_bytes())
    assert load_checkpoint(renamed).spec.kind == kind


def test_parts_detected(tiny_set):
    assert load_checkpoint(tiny_set / "rcod_s_mem.pkl").source_format == "rcod_s_mem"
    assert load_checkpoint(tiny_set / "de_net.pth").source_format == "de_net"
    # the same top-level key means the VPIM projection in rcod_s.pkl and MEM in the MEM file
    assert "projection" in load_checkpoint(tiny_set / "rcod_s.pkl").groups


def test_release_vae_list_has_duplicates_and_is_deduped(tiny_set):
    obj, _ = read_file(tiny_set / "osediff.pkl")
    names = obj["vae_lora_encoder_modules"]
    assert len(names) > len(set(names)) and names.count("quant_conv") == 10
    spec = load_checkpoint(tiny_set / "osediff.pkl").spec
    assert sorted(spec.vae_lora_groups["default_encoder"]) == sorted(set(names))


def _zero_lora_b(ckpt: Checkpoint) -> Checkpoint:
    groups = {g: {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in sd.items()} for g, sd in ckpt.groups.items()}
    return Checkpoint(ckpt.spec, groups, ckpt.source_format, ckpt.path)


def _no_lora_reference(root, ckpt: Checkpoint, file, x):
    """The base with only the checkpoint's trained conv_in (and projection): no LoRA at all."""
    from rcod_core.loader import load_base, encode_prompt
    from rcod_core.model import RCODModel
    from rcod_core.pipeline import RCODPipeline
    from rcod_core.prompting import VisualPromptEncoder

    kw = _kwargs(root, file)
    base = load_base(kw["base"], ckpt.spec.base, with_clip=kw["clip"] is not None, clip=kw["clip"])
    unet_sd = ckpt.groups["unet"]
    w = unet_sd.get("conv_in.base_layer.weight", unet_sd.get("conv_in.weight"))
    b = unet_sd.get("conv_in.base_layer.bias", unet_sd.get("conv_in.bias"))
    with torch.no_grad():
        base.unet.conv_in.weight.copy_(w)
        base.unet.conv_in.bias.copy_(b)
    encoder, embeds = None, None
    if kw["clip"] is not None:
        encoder = VisualPromptEncoder(base.clip_vision, base.unet.config.cross_attention_dim)
        encoder.projection.load_state_dict(ckpt.groups["projection"])
    else:
        embeds = encode_prompt(kw["base"], "")
    pipe = RCODPipeline(RCODModel(base.unet, base.vae, encoder, ckpt.spec, base.scheduler_config, prompt_embeds=embeds))
    return pipe(x, realism=499)


@pytest.mark.parametrize("file", sorted(FORMATS))
def test_each_format_runs_and_lora_matters(tiny_set, lr, file):
    ckpt = load_checkpoint(tiny_set / file)
    if ckpt.spec.kind in ("s3diff", "rcod_s"):
        ckpt = merge_checkpoints(ckpt, load_checkpoint(tiny_set / "de_net.pth"))
    kw = _kwargs(tiny_set, file)
    full = pipeline_from_checkpoint(ckpt, **kw).run(lr, realism=499)
    assert full.images.shape == (2, 3, 80, 112)
    assert full.timesteps.tolist() == ([999, 999] if ckpt.spec.kind in ("osediff", "s3diff") else [499, 499])
    zeroed = pipeline_from_checkpoint(_zero_lora_b(ckpt), **kw)(lr, realism=499)
    assert (full.images - zeroed).abs().max() > 1e-3, "the LoRA weights must change the output"
    reference = _no_lora_reference(tiny_set, ckpt, file, lr)
    assert (zeroed - reference).abs().max() < 1e-5, "with LoRA B = 0 the model is the base + trained conv_in"


@pytest.mark.parametrize("file, extras", [("rcod_o.pkl", ()), ("osediff.pkl", ()),
                                          ("rcod_s.pkl", ("de_net.pth", "rcod_s_mem.pkl"))])
def test_convert_round_trip(tiny_set, tmp_path, lr, file, extras):
    out = tmp_path / "converted.safetensors"
    original = load_checkpoint(tiny_set / file)
    convert(tiny_set / file, out, tuple(tiny_set / e for e in extras))
    back = load_checkpoint(out)
    assert back.spec == original.spec
    for group, sd in original.groups.items():
        assert set(sd) == set(back.groups[group])
        for k, v in sd.items():
            assert torch.equal(v, back.groups[group][k]), (group, k)
    kw = _kwargs(tiny_set, file)
    a = load_pipeline(tiny_set / file, extras=[tiny_set / e for e in extras], **kw)(lr)
    b = load_pipeline(out, **kw)(lr)
    assert torch.equal(a, b)


def test_our_file_names_its_base_and_clip(tiny_set, lr):
    pipe = load_pipeline(tiny_set / "rcod_o.safetensors")  # no base/clip arguments: metadata names them
    assert pipe(lr).shape == (2, 3, 80, 112)


def test_single_file_base_equals_folder_base(tiny_set, lr):
    a = load_pipeline(tiny_set / "rcod_o.pkl", base=tiny_set / "base-sd21", clip=tiny_set / "clip-vision")(lr)
    b = load_pipeline(tiny_set / "rcod_o.pkl", base=tiny_set / "base-sd21.safetensors",
                      clip=tiny_set / "clip-vision.safetensors")(lr)
    assert torch.equal(a, b)


@pytest.mark.parametrize("prefix", ["", "vision_model.", "full"])
def test_clip_single_file_layouts(tiny_set, tmp_path, prefix):
    from safetensors.torch import load_file, save_file

    from rcod_core.loader import load_clip_vision

    state = load_file(str(tiny_set / "clip-vision.safetensors"))
    if prefix == "":
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    elif prefix == "full":  # a whole CLIPModel file: text tower and projections beside the vision tower
        state = {**state, "text_model.embeddings.token_embedding.weight": torch.zeros(10, 4),
                 "visual_projection.weight": torch.zeros(4, 32), "logit_scale": torch.tensor(1.0)}
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    model = load_clip_vision(path)
    reference = load_clip_vision(tiny_set / "clip-vision")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, reference(pixel_values=x).last_hidden_state)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    for name, save in (("zip.pkl", lambda p, o: torch.save(o, p)),
                       ("legacy.pkl", lambda p, o: p.write_bytes(pickle.dumps(o, protocol=2)))):
        path = tmp_path / name
        save(path, {"rank_unet": 4, "payload": _Exploit(marker)})
        with pytest.raises(CheckpointError, match=f"{name}.*refused"):
            load_checkpoint(path)
        assert not marker.exists(), "the pickle's command must never run"


def test_truncated_and_random_files(tiny_set, tmp_path):
    data = (tiny_set / "rcod_o.pkl").read_bytes()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pkl.*truncated or corrupt"):
        load_checkpoint(truncated)
    st = (tiny_set / "rcod_o.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st[: len(st) // 3])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_checkpoint(cut)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy().tobytes())
    with pytest.raises(CheckpointError, match="noise.bin.*not a checkpoint"):
        load_checkpoint(noise)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pkl")


def test_checkpoint_for_the_other_base(tiny_set):
    with pytest.raises(ValueError, match="rcod_s model needs a SD-Turbo base, but the given base is SD 2.1-base"):
        load_pipeline(tiny_set / "rcod_s.pkl", base=tiny_set / "base-sd21", clip=tiny_set / "clip-vision")
    with pytest.raises(ValueError, match="rcod_o model needs a SD 2.1-base base, but the given base is SD-Turbo"):
        load_pipeline(tiny_set / "rcod_o.pkl", base=tiny_set / "base-sd-turbo", clip=tiny_set / "clip-vision")


def _modified(tiny_set, tmp_path, edit):
    obj, _ = read_file(tiny_set / "rcod_o.pkl")
    edit(obj)
    path = tmp_path / "edited.pkl"
    torch.save(obj, path)
    return path


def test_missing_top_level_key(tiny_set, tmp_path):
    path = _modified(tiny_set, tmp_path, lambda o: o.pop("rank_vae"))
    with pytest.raises(CheckpointError, match=r"edited.pkl: looks like RCOD_O.*lacks key\(s\) \['rank_vae'\]"):
        load_checkpoint(path)


def test_missing_lora_tensor(tiny_set, tmp_path):
    def drop(o):
        key = next(k for k in o["state_dict_unet"] if ".lora_B." in k)
        del o["state_dict_unet"][key]
    with pytest.raises(CheckpointError, match="edited.pkl: state_dict_unet lacks key .*lora_B"):
        load_checkpoint(_modified(tiny_set, tmp_path, drop))


def test_wrong_lora_rank(tiny_set, tmp_path):
    path = _modified(tiny_set, tmp_path, lambda o: o.update(rank_unet=8))
    with pytest.raises(CheckpointError, match="edited.pkl: wrong LoRA rank in state_dict_unet: the file declares rank 8"):
        load_checkpoint(path)


def test_wrong_shapes_for_the_base(tiny_set, tmp_path):
    # a full-size projection on the tiny base: refused with the tensor named, before anything runs
    path = _modified(tiny_set, tmp_path, lambda o: o.update(state_dict_proj={"weight": torch.zeros(1024, 1024), "bias": torch.zeros(1024)}))
    with pytest.raises(ValueError, match="state_dict_proj: tensor 'weight' has shape \\(1024, 1024\\)"):
        load_pipeline(path, base=tiny_set / "base-sd21", clip=tiny_set / "clip-vision")


@pytest.mark.parametrize("name", ["../secret.pkl", "sub/../../x.pkl", "/etc/passwd", "C:\\\\models\\\\x.pkl", ""])
def test_model_names_cannot_escape(tiny_set, name):
    with pytest.raises(ValueError, match="model name"):
        safe_model_path(tiny_set, name)


def test_model_name_inside_folder(tiny_set):
    assert safe_model_path(tiny_set, "rcod_o.pkl") == (tiny_set / "rcod_o.pkl").resolve()
    with pytest.raises(FileNotFoundError, match="not found"):
        safe_model_path(tiny_set, "nope.pkl")


def test_convert_stores_a_grouping_rule_that_adaptive_inference_uses(tiny_set, tmp_path, capsys):
    """``rcod convert --grouping scan.json``: Eq. 5 with a training set's bounds travels in the file;
    ``rcod info`` shows it; the loaded pipeline's adaptive t follows it, not the release's thresholds."""
    import json

    from rcod_core.grouping import GroupingRule
    from rcod_core.loader import load_pipeline
    from rcod_core.tools.cli import main

    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps({"m_min": 0.55, "m_max": 0.85, "quantile_edges": [0.6, 0.7]}))
    out = tmp_path / "rcod_s.safetensors"
    args = ["convert", str(tiny_set / "rcod_s.pkl"), str(out), "--extra", str(tiny_set / "de_net.pth"),
            "--extra", str(tiny_set / "rcod_s_mem.pkl"), "--grouping", str(scan)]
    assert main(args) == 0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "paper Eq. 5: n=3, k=250, M_L in [0.55, 0.85]" in info and "stores no rule" not in info
    rule = load_checkpoint(out).spec.grouping
    assert rule == GroupingRule.paper(0.55, 0.85)
    pipe = load_pipeline(out, base=tiny_set / "base-sd-turbo", clip=tiny_set / "clip-vision")
    pipe.model.estimate_metric = lambda lr, state=None: torch.tensor([0.5, 0.7, 0.8])  # edges 0.65 / 0.75
    ts = pipe.run(torch.rand(3, 3, 16, 16), realism="adaptive").timesteps.tolist()
    assert ts == [750, 500, 250]  # the release's thresholds would give 499 / 249 / 249
    assert main(["convert", str(tiny_set / "rcod_s.pkl"), str(tmp_path / "x.safetensors"), "--grouping", "{bad"]) == 2
    assert "--grouping" in capsys.readouterr().err
