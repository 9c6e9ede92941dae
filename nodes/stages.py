"""RCOD Visual Prompt, Encode, One-Step Denoise and Decode: the pipeline's stages as nodes.

LATENTs follow ComfyUI's convention: ``samples`` are *raw* VAE latents, as core VAE Encode makes
them (the scaling factor is applied inside, as a model's ``latent_format`` does), so RCOD Encode →
core VAE Decode and core VAE Encode → RCOD Denoise/Decode work with the same VAE weights. RCOD
Encode also puts ``"rcod": {...}`` beside them — the LR images, output size, VPIM tokens, the RCOD_S
degradation state and the latent's shape; ComfyUI's latent nodes copy extra keys, so
shape-preserving edits keep it. A LATENT without it (a core one, or one through SaveLatent /
LoadLatent) gets it rebuilt by Denoise from its optional LR ``image`` (or a ``prompt``).
"""

from __future__ import annotations

import torch

from .common import (CATEGORY, LATENT_KEY, MODEL, PROMPT, Progress, node_errors, realism_inputs, realism_value,
                     tile_value, tiling_inputs, to_bchw, to_bhwc, ui_values, x0_value)
from .managed import image_pixels, latent_pixels, use

RESAMPLERS = ("bicubic", "bilinear", "nearest", "area")


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _finite(z: torch.Tensor, node: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or z.ndim != 4:
        raise ValueError(f"{node}: LATENT samples must be a (B, C, h, w) tensor, got {getattr(z, 'shape', type(z).__name__)}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{node}: the LATENT holds NaN or Inf values ({int((~torch.isfinite(z)).sum())} of {z.numel()})")
    return z


def prepared_from_latent(pipe, latent: dict, node: str, progress=None, image=None, prompt=None):
    """rcod_core's :class:`Prepared` from a LATENT: RCOD Encode's side data when it is there and
    fits, else rebuilt from the LR ``image`` (or VPIM ``prompt`` tokens); otherwise say what is missing."""
    from rcod_core.imageops import resize, validate_images
    from rcod_core.model import scale_latent
    from rcod_core.pipeline import Prepared
    from rcod_core.progress import Progress as Tracker

    raw = _finite(latent["samples"], node)
    channels = int(pipe.vae.config.latent_channels)
    if raw.shape[1] != channels:
        raise ValueError(f"{node}: the LATENT has {raw.shape[1]} channels, this model's VAE makes {channels} "
                         f"(a latent of another model family?)")
    dev = pipe.device
    z = scale_latent(pipe.vae, raw).to(dev)
    tracker = Tracker(progress, progress.cancel if progress is not None else None)  # progress + interrupts
    info = latent.get(LATENT_KEY)
    if info is not None and image is None:
        if tuple(raw.shape) != tuple(info["shape"]):
            raise ValueError(f"{node}: the LATENT's samples have shape {tuple(raw.shape)}, but RCOD Encode made "
                             f"{tuple(info['shape'])}; latent nodes that resize or re-batch are not supported here, "
                             f"resize the IMAGE before RCOD Encode instead (or connect the LR image)")
        if info["kind"] != pipe.spec.kind:
            raise ValueError(f"{node}: the LATENT was encoded by a {info['kind']} model, this is a {pipe.spec.kind} model")
        state = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in info["state"].items()}
        return Prepared(info["lr"].to(dev), tuple(info["size"]), state, info["tokens"].to(dev), z, tracker=tracker)
    size = (raw.shape[-2] * pipe.latent_factor, raw.shape[-1] * pipe.latent_factor)
    batch = raw.shape[0]
    if image is not None:
        lr = to_bchw(image).to(dev)
        validate_images(lr, "image")
        if lr.shape[0] not in (1, batch):
            raise ValueError(f"{node}: {lr.shape[0]} LR images for a LATENT batch of {batch}; give 1 or {batch}")
        lr = lr.expand(batch, -1, -1, -1)
        state = pipe.condition(lr)
        tokens = pipe.prompt(resize(lr, size)) if prompt is None else prompt.to(dev)
        return Prepared(lr, size, state, tokens, z, tracker=tracker)
    if prompt is not None:
        if pipe.model.conditioning is not None:
            raise ValueError(f"{node}: a {pipe.spec.kind} model needs the LR image for its degradation estimate: "
                             f"connect it to 'image'")
        return Prepared(None, size, {}, prompt.to(dev), z, tracker=tracker)
    raise ValueError(f"{node}: this LATENT carries no RCOD data (it is not from RCOD Encode, or went through "
                     f"SaveLatent/LoadLatent): connect the LR image to 'image' (or an RCOD_PROMPT to 'prompt')")


class RCODVisualPrompt:
    DESCRIPTION = ("VPIM: CLIP vision tokens of an image, used as the UNet's conditioning instead of text. "
                   "RCOD conditions on the LR image itself by default; any image can be the prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PROMPT,)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("VPIM tokens (B, N, D) for RCOD One-Step Denoise.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rcod_model": (MODEL, {"tooltip": "From RCOD Model Loader (an RCOD_O or RCOD_S model)."}),
            "image": ("IMAGE", {"tooltip": "The prompt image (any size; batch 1 applies to every image)."}),
        }}

    def encode(self, rcod_model, image):
        with node_errors("RCOD Visual Prompt"):
            if rcod_model.prompt_encoder is None:
                raise ValueError(f"this {rcod_model.spec.kind} model is text-conditioned and has no VPIM: the image would "
                                 f"be ignored; use an RCOD_O or RCOD_S model")
            use(rcod_model)
            return (rcod_model.prompt(to_bchw(image)).detach().cpu(),)


class RCODEncode:
    DESCRIPTION = ("Upscales the LR image to the output size (classical resampler), computes its VPIM tokens "
                   "and encodes it with the model's VAE encoder: the z_L of one-step SR.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("z_L with the output size, tokens and (RCOD_S) degradation state for Denoise/Decode.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rcod_model": (MODEL, {"tooltip": "From RCOD Model Loader."}),
            "image": ("IMAGE", {"tooltip": "The low-resolution image(s)."}),
            "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 8.0, "step": 0.5,
                                "tooltip": "Upscale factor (1-8); the output is round(scale x side)."}),
            "resampler": (list(RESAMPLERS), {"default": "bicubic",
                                             "tooltip": "Resampler that brings the LR to the output size before the VAE."}),
        }, "optional": tiling_inputs("the VAE encoder")}

    def encode(self, rcod_model, image, scale=4.0, resampler="bicubic", tiling="auto", tile_size=64, tile_overlap=16):
        pbar = Progress(1)
        with node_errors("RCOD Encode"):
            tile = tile_value(tiling, tile_size)
            use(rcod_model, image_pixels(image, scale) if tile == "none" else 0)
            p = rcod_model.prepare(to_bchw(image), scale=scale, resampler=resampler, tile=tile,
                                    tile_overlap=int(tile_overlap), progress=pbar, cancel=pbar.cancel, passes=(0, 0))
        pbar.finish()
        from rcod_core.model import unscale_latent

        z = unscale_latent(rcod_model.vae, p.z_l.detach().float()).cpu()  # raw, as core VAE Encode gives
        info = {"kind": rcod_model.spec.kind, "shape": tuple(z.shape), "size": tuple(p.size), "lr": p.images.cpu(),
                "tokens": p.tokens.detach().cpu(), "state": _cpu(p.state)}
        return ({"samples": z, LATENT_KEY: info},)


class RCODDenoise:
    DESCRIPTION = ("ONE UNet pass at timestep t and the x0 conversion (Eq. 3/4). The preset chooses t; with a "
                   "MASK, t varies per pixel from 'mask_t0' (mask 0) to the preset's t (mask 1).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "INT")
    RETURN_NAMES = ("latent", "t")
    OUTPUT_TOOLTIPS = ("z_H, the denoised latent, for RCOD Decode.", "The timestep used (first image; the map's "
                       "high level with a mask).")
    FUNCTION = "denoise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "rcod_model": (MODEL, {"tooltip": "The model that made the LATENT (RCOD Encode)."}),
                "latent": ("LATENT", {"tooltip": "From RCOD Encode."}),
                **realism_inputs(),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Spatial realism map at the output size or any size with its aspect "
                                             "ratio: 0 → mask_t0, 1 → the preset's t, blended in latent space."}),
                "mask_t0": ("INT", {"default": 250, "min": 1, "max": 999, "step": 1,
                                    "tooltip": "t where the mask is 0 (used only with a MASK)."}),
                "prompt": (PROMPT, {"tooltip": "VPIM tokens from RCOD Visual Prompt; default: the LR's own."}),
                "image": ("IMAGE", {"tooltip": "The LR image, for a LATENT not made by RCOD Encode (core VAE Encode "
                                               "of the upscaled LR, or one through SaveLatent/LoadLatent): conditioning "
                                               "and tokens are computed from it."}),
                **tiling_inputs("the UNet"),
            },
        }

    def denoise(self, rcod_model, latent, preset="Neutral", t=500, x0_mode="model default", mask=None, mask_t0=250,
                prompt=None, image=None, tiling="auto", tile_size=64, tile_overlap=16):
        node = "RCOD One-Step Denoise"
        pbar = Progress(1)
        with node_errors(node):
            tile = tile_value(tiling, tile_size)
            use(rcod_model, latent_pixels(rcod_model, latent["samples"]) if tile == "none" else 0)
            prepared = prepared_from_latent(rcod_model, latent, node, pbar, image=image, prompt=prompt)
            prepared = rcod_model.with_tokens(prepared, prompt)
            prepared = rcod_model.with_plan(prepared, tile, int(tile_overlap), passes=(2 if mask is not None else 1, 0))
            realism = realism_value(preset, t)
            step = rcod_model.denoise_prepared(prepared, realism, x0_value(x0_mode), mask=mask,
                                               mask_timesteps=(int(mask_t0), realism))
            z_h, timesteps, metric = step.latents, step.timesteps, step.metric
        pbar.finish()
        from rcod_core.model import unscale_latent

        out = {**latent, "samples": unscale_latent(rcod_model.vae, z_h.detach().float()).cpu()}
        if LATENT_KEY in latent:
            out[LATENT_KEY] = {**latent[LATENT_KEY], "shape": tuple(out["samples"].shape)}
        return {"ui": ui_values(timesteps, metric), "result": (out, int(timesteps.reshape(-1)[-1 if mask is not None else 0]))}


class RCODDecode:
    DESCRIPTION = "Decodes latents with the model's VAE decoder and crops to the output size RCOD Encode chose."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The super-resolved image(s), (B, H, W, 3) in [0, 1].",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rcod_model": (MODEL, {"tooltip": "From RCOD Model Loader."}),
            "latent": ("LATENT", {"tooltip": "A raw VAE latent of this model's VAE family (RCOD One-Step Denoise, "
                                             "or core nodes); RCOD latents are cropped to their output size."}),
        }, "optional": tiling_inputs("the VAE decoder")}

    def decode(self, rcod_model, latent, tiling="auto", tile_size=64, tile_overlap=16):
        from rcod_core.model import scale_latent

        pbar = Progress(1)
        with node_errors("RCOD Decode"):
            z = _finite(latent["samples"], "RCOD Decode")
            info = latent.get(LATENT_KEY)
            tile = tile_value(tiling, tile_size)
            pbar.cancel()  # an interrupt before the decoder runs
            use(rcod_model, latent_pixels(rcod_model, z) if tile == "none" else 0)
            images = rcod_model.decode_latents(scale_latent(rcod_model.vae, z), tile, int(tile_overlap),
                                               progress=pbar, cancel=pbar.cancel)
            if info is not None and tuple(z.shape) == tuple(info["shape"]):
                images = images[..., : info["size"][0], : info["size"][1]]
        pbar.finish()
        return (to_bhwc(images),)
