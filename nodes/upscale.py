"""RCOD Upscale (the whole pipeline in one node) and RCOD Realism Sweep (one image at several t)."""

from __future__ import annotations

import torch

from .common import (CATEGORY, MODEL, Progress, node_errors, realism_inputs, realism_value, tile_value, tiling_inputs,
                     to_bchw, to_bhwc, ui_values, x0_value)
from .managed import image_pixels, use
from .stages import RESAMPLERS

from rcod_core.release import PROCESSINGS

COLOR_FIX = ("none", "adain", "wavelet")


class RCODUpscale:
    DESCRIPTION = ("One-step super-resolution of an image with a realism dial: upscale, encode, ONE UNet pass at "
                   "t, decode. Optional MASK for a spatial realism map, tiling for large images, colour fix.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "INT")
    RETURN_NAMES = ("image", "t")
    OUTPUT_TOOLTIPS = ("The super-resolved image(s), (B, H, W, 3) in [0, 1].", "The timestep used (first image).")
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "rcod_model": (MODEL, {"tooltip": "From RCOD Model Loader."}),
                "image": ("IMAGE", {"tooltip": "The low-resolution image(s)."}),
                "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 8.0, "step": 0.5,
                                    "tooltip": "Upscale factor (1-8)."}),
                **realism_inputs(),
                **tiling_inputs(),
                "color_fix": (list(COLOR_FIX), {"default": "none", "tooltip":
                              "Match the output's colours to the LR: AdaIN (mean/std) or wavelet (low frequencies)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Spatial realism map: 0 → mask_t0, 1 → the preset's t."}),
                "mask_t0": ("INT", {"default": 250, "min": 1, "max": 999, "step": 1,
                                    "tooltip": "t where the mask is 0 (used only with a MASK)."}),
                "processing": (list(PROCESSINGS), {"default": "ours", "tooltip":
                               "ours: this extension's processing. release: the authors' inference scripts exactly "
                               "(their resize rules, 8-bit steps, colour-fix order, sampled latent with the seed, "
                               "250/500/750 run as 249/499/749); integer scale, no tiling or mask."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1, "tooltip":
                         "Seeds the latent sample of processing=release (its only random draw)."}),
            },
        }

    def upscale(self, rcod_model, image, scale=4.0, preset="Neutral", t=500, x0_mode="model default", tiling="auto",
                tile_size=64, tile_overlap=16, color_fix="none", mask=None, mask_t0=250, processing="ours", seed=0):
        pbar = Progress(1)
        with node_errors("RCOD Upscale"):
            use(rcod_model, image_pixels(image, scale) if tiling == "none" else 0)
            realism = realism_value(preset, t)
            kwargs = {"mask": mask, "mask_timesteps": (int(mask_t0), realism)} if mask is not None else {}
            if processing == "release":
                kwargs.update(processing="release", generator=torch.Generator().manual_seed(int(seed)))
                tiling = "none"
            out = rcod_model.run(to_bchw(image), realism=realism, scale=scale, x0_mode=x0_value(x0_mode),
                                 tile=tile_value(tiling, tile_size), tile_overlap=int(tile_overlap),
                                 color_fix=color_fix, progress=pbar, cancel=pbar.cancel, **kwargs)
        pbar.finish()
        t_used = out.timesteps.reshape(-1)
        result = to_bhwc(out.images)
        if image.shape[-1] == 4:  # RGBA: the alpha is upscaled classically and kept, as the CLI does
            from rcod_core.imageops import resize

            alpha = resize(image[..., 3:].permute(0, 3, 1, 2).float(), tuple(result.shape[1:3]), "bicubic")
            result = torch.cat([result, alpha.permute(0, 2, 3, 1).cpu()], dim=-1)
        return {"ui": ui_values(out.timesteps, out.metric),
                "result": (result, int(t_used[-1 if mask is not None else 0]))}


class RCODRealismSweep:
    DESCRIPTION = ("The same image(s) at several timesteps, to compare realism levels: encode and VPIM once, one "
                   "UNet pass + decode per t. Output: a batch, t-major (all images at t1, then at t2, ...).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("K x B images for K timesteps (connect to a preview or a grid).",)
    FUNCTION = "sweep"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "rcod_model": (MODEL, {"tooltip": "From RCOD Model Loader."}),
            "image": ("IMAGE", {"tooltip": "The low-resolution image(s)."}),
            "timesteps": ("STRING", {"default": "250,500,750", "tooltip":
                          "Comma-separated t values (1-999) or presets (fidelity, neutral, realism)."}),
            "scale": ("FLOAT", {"default": 4.0, "min": 1.0, "max": 8.0, "step": 0.5, "tooltip": "Upscale factor (1-8)."}),
            "x0_mode": realism_inputs()["x0_mode"],
            "resampler": (list(RESAMPLERS), {"default": "bicubic", "tooltip": "Resampler before the VAE."}),
        }, "optional": tiling_inputs()}

    def sweep(self, rcod_model, image, timesteps="250,500,750", scale=4.0, x0_mode="model default",
              resampler="bicubic", tiling="auto", tile_size=64, tile_overlap=16):
        pbar = Progress(1)
        with node_errors("RCOD Realism Sweep"):
            tile = tile_value(tiling, tile_size)
            use(rcod_model, image_pixels(image, scale) if tile == "none" else 0)
            values = [v.strip() for v in str(timesteps).split(",") if v.strip()]
            out = rcod_model.sweep(to_bchw(image), timesteps=values, x0_mode=x0_value(x0_mode), scale=scale,
                                   resampler=resampler, tile=tile, tile_overlap=int(tile_overlap), progress=pbar,
                                   cancel=pbar.cancel)
        pbar.finish()
        images = out.images.reshape(-1, *out.images.shape[2:])
        return {"ui": ui_values(out.timesteps), "result": (to_bhwc(images),)}
