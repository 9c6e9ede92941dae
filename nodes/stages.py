"""RCOD Visual Prompt, Encode, One-Step Denoise and Decode: the pipeline's stages as nodes.

The LATENT made by RCOD Encode is ``{"samples": z_L, "rcod": {...}}``: besides the scaled latents it
keeps what the later stages need (LR images, output size, VPIM tokens, the RCOD_S degradation
state, the latent's shape). ComfyUI's latent nodes copy extra keys, so shape-preserving latent
edits (blend, add, noise) keep working; a resized or re-batched latent is refused with a message.
"""

from __future__ import annotations

import torch

from .common import (CATEGORY, LATENT_KEY, MODEL, PROMPT, Progress, node_errors, realism_inputs, realism_value,
                     to_bchw, to_bhwc, ui_values, x0_value)

RESAMPLERS = ("bicubic", "bilinear", "nearest", "area")


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def prepared_from_latent(pipe, latent: dict, node: str, progress=None):
    """Rebuild rcod_core's :class:`Prepared` from a LATENT made by RCOD Encode (or say why not)."""
    from rcod_core.pipeline import Prepared
    from rcod_core.progress import Progress as Tracker

    z = latent["samples"]
    info = latent.get(LATENT_KEY)
    if info is None:
        raise ValueError(f"{node}: this LATENT was not made by RCOD Encode (it has no '{LATENT_KEY}' entry); "
                         f"encode the image with RCOD Encode")
    if tuple(z.shape) != tuple(info["shape"]):
        raise ValueError(f"{node}: the LATENT's samples have shape {tuple(z.shape)}, but RCOD Encode made "
                         f"{tuple(info['shape'])}; latent nodes that resize or re-batch are not supported here, "
                         f"resize the IMAGE before RCOD Encode instead")
    if info["kind"] != pipe.spec.kind:
        raise ValueError(f"{node}: the LATENT was encoded by a {info['kind']} model, this is a {pipe.spec.kind} model")
    dev = pipe.device
    state = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in info["state"].items()}
    tracker = Tracker(progress, progress.cancel if progress is not None else None)  # progress + interrupts
    return Prepared(info["lr"].to(dev), tuple(info["size"]), state, info["tokens"].to(dev), z.to(dev), tracker=tracker)


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
        }}

    def encode(self, rcod_model, image, scale=4.0, resampler="bicubic"):
        pbar = Progress(1)
        with node_errors("RCOD Encode"):
            p = rcod_model.prepare(to_bchw(image), scale=scale, resampler=resampler, progress=pbar,
                                    cancel=pbar.cancel)
        pbar(1, 1)
        z = p.z_l.detach().cpu()
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
            },
        }

    def denoise(self, rcod_model, latent, preset="Neutral", t=500, x0_mode="model default", mask=None, mask_t0=250,
                prompt=None):
        node = "RCOD One-Step Denoise"
        pbar = Progress(1)
        with node_errors(node):
            prepared = rcod_model.with_tokens(prepared_from_latent(rcod_model, latent, node, pbar), prompt)
            realism = realism_value(preset, t)
            step = rcod_model.denoise_prepared(prepared, realism, x0_value(x0_mode), mask=mask,
                                               mask_timesteps=(int(mask_t0), realism))
            z_h, timesteps, metric = step.latents, step.timesteps, step.metric
        pbar(1, 1)
        out = {**latent, "samples": z_h.detach().cpu()}
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
            "latent": ("LATENT", {"tooltip": "From RCOD One-Step Denoise (any latent of this VAE decodes; "
                                             "only RCOD latents are cropped to their output size)."}),
        }}

    def decode(self, rcod_model, latent):
        with node_errors("RCOD Decode"):
            z = latent["samples"]
            info = latent.get(LATENT_KEY)
            images = rcod_model.decode(z)
            if info is not None and tuple(z.shape) == tuple(info["shape"]):
                images = images[..., : info["size"][0], : info["size"][1]]
        return (to_bhwc(images),)
