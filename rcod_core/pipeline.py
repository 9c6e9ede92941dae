"""The one-step RCOD pipeline: LR → upscale → VAE encode → one UNet pass at t → x0 → decode.

Images are ``(B, 3, H, W)`` float tensors in [0, 1] in and out. Device, dtype, timestep and seed
are arguments; nothing is a hidden flag on the models. The pieces are public functions so that the
ComfyUI nodes, the CLI and the trainer call the same code:

* :func:`one_step` — ε prediction at t with VPIM tokens, then Eq. 3/4;
* :meth:`RCODPipeline.encode` / :meth:`~RCODPipeline.prompt` / :meth:`~RCODPipeline.denoise` /
  :meth:`~RCODPipeline.decode` — the stages;
* :meth:`RCODPipeline.__call__` — all of them, batched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .colour import COLOR_FIXES, ColorFix, color_fix as apply_color_fix
from .grouping import latent_metric, make_rule, resolve_realism, select_timestep
from .memory import TilePlan, choose_tile
from .tiling import Cancelled, tiled_apply, tiled_decode, tiled_encode
from .realism import blend_levels, gaussian_blur, level_weights, mask_to_t_map, metric_map, prepare_map
from .schedule import X0Mode, alphas_cumprod, check_timestep, x0_alpha_bar, x0_from_eps
from .spec import ModelSpec

Resampler = Literal["bicubic", "bilinear", "nearest", "area"]
RESAMPLERS: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "area")
LatentMode = Literal["mode", "sample"]
MAX_SCALE = 8.0
Realism = Union[str, int, Sequence[int], torch.Tensor]
TileSpec = Union[str, int, None]
ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


class Tracker:
    """Progress over stages and tiles of one call: ``progress(done, total)`` after every unit (a
    whole-batch stage or a tile; the total grows as stages are planned), ``cancel()`` checked
    between units (raises :class:`~rcod_core.tiling.Cancelled`)."""

    def __init__(self, progress: ProgressFn = None, cancel: CancelFn = None):
        self.progress, self.cancel = progress, cancel
        self.done = self.total = 0

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("cancelled by the caller")

    def step(self, n: int = 1) -> None:
        """Count ``n`` finished units of a stage that was not planned in advance."""
        self.total += n
        self.advance(n)

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def stage(self) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` for one tiled call: its total joins ours on the first report."""
        start, planned = self.done, []

        def report(done: int, total: int) -> None:
            if not planned:
                planned.append(total)
                self.total += total
            self.advance(start + done - self.done)

        return report


def validate_images(images: torch.Tensor, name: str = "images", channels: int = 3) -> None:
    """Raise ``ValueError`` unless ``images`` is a finite float (B, channels, H, W) tensor in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, {channels}, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")
    lo, hi = torch.aminmax(images.detach().float())
    lo, hi = float(lo), float(hi)  # one sync per call, at the entry
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf")
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"{name} values must be in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def output_size(height: int, width: int, scale: float | None = None, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Target (H, W): ``round(scale · side)`` for a scale in [1, 8], or an explicit ``size=(H, W)``."""
    if size is not None:
        if scale is not None:
            raise ValueError("give either scale or size, not both")
        h, w = (int(v) for v in size)
        if h < 1 or w < 1:
            raise ValueError(f"size must be positive (H, W), got {size!r}")
        return h, w
    scale = 4.0 if scale is None else float(scale)
    if not (1.0 <= scale <= MAX_SCALE):
        raise ValueError(f"scale must be in [1, {MAX_SCALE:g}], got {scale!r}")
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(images: torch.Tensor, size: tuple[int, int], resampler: Resampler = "bicubic") -> torch.Tensor:
    """Resize to ``size`` with a named resampler, clamped to [0, 1] (bicubic overshoots)."""
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    kwargs = {}
    if resampler in ("bicubic", "bilinear"):
        kwargs = {"align_corners": False, "antialias": True}
    return F.interpolate(images, size=size, mode=resampler, **kwargs).clamp(0.0, 1.0)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad H and W (bottom/right) up to a multiple; returns the padded tensor and (H, W).

    Falls back to edge replication where a side is too short to reflect.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def one_step(
    unet: nn.Module,
    z_l: torch.Tensor,
    timesteps: torch.Tensor,
    tokens: torch.Tensor,
    alpha_bar: torch.Tensor,
) -> torch.Tensor:
    """One-step SR in latent space (Eq. 3/4): ``(z_L − sqrt(1−ᾱ) ε_θ(z_L; t, c)) / sqrt(ᾱ)``.

    ``timesteps`` (B,) go to the UNet's timestep embedding, ``alpha_bar`` (B,) to the conversion.
    The conversion runs in float32 whatever the UNet dtype.
    """
    eps = unet(z_l, timesteps, encoder_hidden_states=tokens, return_dict=False)[0]
    return x0_from_eps(z_l.float(), eps.float(), alpha_bar)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Cast (only when needed: diffusers warns on every dtype ``.to``), then move — so an fp16
    model never sits on the GPU in fp32 — and eval mode."""
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)
    return module.to(device=device).eval()


def _to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] decoder output → float32 [0, 1], in place (no extra full-size buffer)."""
    x = x.float()
    return x.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)


def default_vae_dtype(vae: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The VAE's precision when not given: ``dtype``, except fp16 for a VAE whose config asks to be
    upcast (SD 2.1's ``force_upcast``: its decoder overflows in fp16) → fp32. bf16 has fp32's range."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


@dataclass
class StageOutput:
    """What :meth:`RCODPipeline.run` returns beside the images (for UIs and logs)."""

    images: torch.Tensor
    #: the timestep of each image, or the levels of a realism map
    timesteps: torch.Tensor
    #: MEM's predicted latent metric M_L per image (adaptive) or per pixel (auto-map), else None
    metric: Optional[torch.Tensor] = None
    #: the per-pixel timestep map that was used (spatial realism), else None
    t_map: Optional[torch.Tensor] = None


@dataclass
class Prepared:
    """The per-batch work before the UNet (see :meth:`RCODPipeline.prepare`)."""

    images: torch.Tensor  # the LR batch on the device, float32
    size: tuple[int, int]  # output (H, W)
    state: dict  # per-batch conditioning (RCOD_S: degradation scores, features, LoRA matrices)
    tokens: torch.Tensor
    z_l: torch.Tensor
    lr_up: Optional[torch.Tensor] = None  # the upscaled LR (the colour-fix reference)
    plan: Optional[TilePlan] = None  # None = untiled
    tracker: Tracker = None  # type: ignore[assignment]
    color_fix: str = "none"


@dataclass
class Denoised:
    """Latents after the timestep-controlled step (see :meth:`RCODPipeline.denoise_prepared`)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    metric: Optional[torch.Tensor] = None
    t_map: Optional[torch.Tensor] = None


@dataclass
class RealismMap:
    """An automatic realism map at LR resolution (see :meth:`RCODPipeline.realism_map`)."""

    metric_map: torch.Tensor  # (B, 1, h, w) predicted M_L
    t_map: torch.Tensor  # (B, 1, h, w) timestep per pixel (smoothed)
    levels: list[int]


class RCODPipeline:
    """A loaded RCOD-family model, ready to upscale.

    Args:
        unet, vae: diffusers models (LoRA merged or not).
        prompt_encoder: a :class:`~rcod_core.prompting.VisualPromptEncoder` (VPIM) or ``None`` for the
            text-conditioned bases, which then need ``prompt_embeds``.
        spec: the model's :class:`~rcod_core.spec.ModelSpec`.
        scheduler_config: diffusers scheduler config of the base (for ᾱ_t).
        device, dtype: where and in which precision the UNet and CLIP run.
        vae_dtype: precision of the VAE (default: ``dtype``, but fp32 for an fp16 pipeline whose VAE
            config says ``force_upcast``, as SD 2.1's does).
        prompt_embeds: fixed conditioning tokens (1, N, D) for the bases (text embeddings).
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        prompt_encoder: Optional[nn.Module],
        spec: ModelSpec,
        scheduler_config: dict | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ):
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype or default_vae_dtype(vae, dtype)
        self.unet = _place(unet, self.device, dtype)
        self.vae = _place(vae, self.device, self.vae_dtype)
        self.prompt_encoder = _place(prompt_encoder, self.device, dtype) if prompt_encoder is not None else None
        cross_dim = int(self.unet.config.cross_attention_dim)
        if self.prompt_encoder is not None and self.prompt_encoder.cross_attention_dim != cross_dim:
            raise ValueError(
                f"VPIM projection outputs {self.prompt_encoder.cross_attention_dim} features but the UNet's "
                f"cross_attention_dim is {cross_dim}; the CLIP model/projection does not fit this base"
            )
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cross_dim:
                raise ValueError(f"prompt_embeds must have shape (1, N, {cross_dim}), got {tuple(prompt_embeds.shape)}")
            prompt_embeds = prompt_embeds.to(self.device, dtype)
        self.prompt_embeds = prompt_embeds
        if self.prompt_encoder is None and prompt_embeds is None:
            raise ValueError("the pipeline needs a VPIM prompt_encoder or fixed prompt_embeds for conditioning")
        self.alphas_cumprod = alphas_cumprod(scheduler_config)
        if self.device.type == "cuda":
            self.to_channels_last()  # convolution-heavy: NHWC kernels are faster on GPUs
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        # pad so that the latent survives every UNet downsampling exactly (64 px for SD)
        self.size_multiple = self.latent_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    # -- configuration -------------------------------------------------------------------------
    def to_channels_last(self) -> "RCODPipeline":
        """Use channels_last memory for the convolution-heavy UNet and VAE (a GPU speed-up)."""
        self.unet.to(memory_format=torch.channels_last)
        self.vae.to(memory_format=torch.channels_last)
        return self

    def compile(self, mode: str | None = None, **kwargs) -> "RCODPipeline":
        """``torch.compile`` the UNet and the VAE encoder/decoder (and CLIP), in place."""
        self.unet = torch.compile(self.unet, mode=mode, **kwargs)
        self.vae.encoder = torch.compile(self.vae.encoder, mode=mode, **kwargs)
        self.vae.decoder = torch.compile(self.vae.decoder, mode=mode, **kwargs)
        if self.prompt_encoder is not None:
            self.prompt_encoder.vision_model = torch.compile(self.prompt_encoder.vision_model, mode=mode, **kwargs)
        return self

    # -- timesteps -----------------------------------------------------------------------------
    def resolve_timesteps(self, realism: Realism, batch_size: int, metric: torch.Tensor | None = None) -> torch.Tensor:
        """Preset name, integer t, one t per sample, or "adaptive" (t from ``metric`` by the spec's
        grouping rule, Eq. 5/6) → int64 (B,) on CPU, validated."""
        if self.spec.fixed_timestep is not None:
            return torch.full((batch_size,), self.spec.fixed_timestep, dtype=torch.int64)
        if isinstance(realism, str) and realism.strip().lower() == "adaptive":
            if metric is None:
                raise ValueError("adaptive realism needs the predicted latent metric (MEM)")
            return select_timestep(metric.detach().cpu(), self.grouping_rule())
        if isinstance(realism, str):
            t = torch.tensor([resolve_realism(realism, self.spec.preset_style)])
        else:
            t = check_timestep(realism, name="realism")
        if t.numel() == 1:
            t = t.expand(batch_size)
        if t.numel() != batch_size:
            raise ValueError(f"realism gives {t.numel()} timesteps for a batch of {batch_size}")
        return t.clone()

    def grouping_rule(self):
        return make_rule(self.spec.grouping_rule, self.spec.grouping_n)

    # -- per-image conditioning hooks (RCOD_S overrides them) -------------------------------------
    def condition(self, lr: torch.Tensor) -> dict:
        """Per-batch state computed from the original LR before the stages run (none here)."""
        return {}

    def select_sample(self, state: dict, index: Optional[int]) -> None:
        """Make the per-image conditioning of sample ``index`` current (``None``: the whole batch).
        Tiled stages run one image at a time; nothing to do for the OSEDiff-layout models."""

    def estimate_metric(self, lr: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """MEM's predicted latent metric M_L for each LR image."""
        raise ValueError(
            f"adaptive realism needs MEM weights (the metric estimation module), and this {self.spec.kind} "
            f"model has none; choose a preset or t, or load an RCOD_S model with its MEM file"
        )

    def alpha_bar_for(self, timesteps: torch.Tensor, x0_mode: X0Mode | None = None) -> torch.Tensor:
        mode = x0_mode or self.spec.x0_mode
        return x0_alpha_bar(timesteps, mode, self.alphas_cumprod, self.spec.fixed_alpha_bar)

    # -- stages --------------------------------------------------------------------------------
    @torch.no_grad()
    def prompt(self, images: torch.Tensor) -> torch.Tensor:
        """Conditioning tokens for (B, 3, H, W) images in [0, 1]: VPIM, or the fixed embeddings."""
        if self.prompt_encoder is None:
            return self.prompt_embeds.expand(images.shape[0], -1, -1)
        return self.prompt_encoder(images.to(self.device))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, latent: LatentMode = "mode", generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] whose sides are multiples of the latent factor → scaled latents (fp32)."""
        x = images.to(self.device, self.vae_dtype) * 2.0 - 1.0
        dist = self.vae.encode(x).latent_dist
        return self._scaled_latent(dist.mean, dist.std, latent, generator)

    def _scaled_latent(self, mean: torch.Tensor, std: torch.Tensor, latent: LatentMode,
                       generator: torch.Generator | None) -> torch.Tensor:
        """The posterior's mode (= mean) or a seeded sample, shifted and scaled (fp32)."""
        if latent == "sample":
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                device=generator.device if generator is not None else None)
            mean = mean + std * noise.to(mean.device)
        elif latent != "mode":
            raise ValueError(f"latent must be 'mode' or 'sample', got {latent!r}")
        return (mean.float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def denoise(
        self,
        z_l: torch.Tensor,
        tokens: torch.Tensor,
        timesteps: torch.Tensor,
        x0_mode: X0Mode | None = None,
    ) -> torch.Tensor:
        """One UNet pass at ``timesteps`` (B,) and the x0 conversion; fp32 latents out."""
        alpha_bar = self.alpha_bar_for(timesteps, x0_mode)
        t = timesteps.to(self.device)
        return one_step(self.unet, z_l.to(self.device, self.dtype), t, tokens.to(self.device, self.dtype), alpha_bar)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [0, 1] (float32)."""
        z = z.to(self.device, self.vae_dtype) / self.scaling_factor + self.shift_factor
        x = self.vae.decode(z, return_dict=False)[0]
        return _to_unit_range(x)

    # -- all together --------------------------------------------------------------------------
    def plan_tiles(self, height: int, width: int, tile: TileSpec = "none", tile_overlap: int = 32,
                   max_memory: int | None = None) -> Optional[TilePlan]:
        """Tile sizes for a (padded) output of ``height`` × ``width``: ``"none"``, ``"auto"`` (the
        largest tiles that fit ``max_memory`` bytes or the device's free memory; untiled when the
        whole image fits) or an int latent tile (all stages; VAE encode tiles are ``tile`` × 8 px)."""
        if tile is None or tile == "none":
            return None
        if tile == "auto":
            bits = torch.finfo(self.dtype).bits
            plan = choose_tile(height, width, budget=max_memory, dtype_bytes=bits // 8, device=self.device,
                               latent_factor=self.latent_factor)
            return plan if plan.tiled else None
        if isinstance(tile, str):
            if not tile.isdigit():
                raise ValueError(f"tile must be 'none', 'auto' or a latent tile size in pixels, got {tile!r}")
            tile = int(tile)
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16:
            raise ValueError(f"tile must be at least 16 latent pixels, got {tile!r}")
        if not 0 <= tile_overlap < tile:
            raise ValueError(f"tile_overlap must be in [0, tile) = [0, {tile}), got {tile_overlap!r}")
        f = self.latent_factor
        return TilePlan(tile, tile_overlap, tile * f, tile_overlap * f, tile, tile_overlap)

    @torch.no_grad()
    def prepare(
        self,
        images: torch.Tensor,
        scale: float | None = None,
        size: tuple[int, int] | None = None,
        resampler: Resampler = "bicubic",
        latent: LatentMode = "mode",
        generator: torch.Generator | None = None,
        tile: TileSpec = "none",
        tile_overlap: int = 32,
        max_memory: int | None = None,
        color_fix: ColorFix = "none",
        progress: ProgressFn = None,
        cancel: CancelFn = None,
    ) -> "Prepared":
        """Everything before the UNet, once per batch: validation, conditioning, upscale, VPIM
        tokens, VAE encode (tiled per the plan). Sweeps and realism maps reuse it for every t."""
        validate_images(images)
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {color_fix!r}")
        if latent not in ("mode", "sample"):
            raise ValueError(f"latent must be 'mode' or 'sample', got {latent!r}")
        tracker = Tracker(progress, cancel)
        tracker.check()
        out_h, out_w = output_size(images.shape[-2], images.shape[-1], scale, size)
        images = images.to(self.device, torch.float32)
        state = self.condition(images)
        lr_up = resize(images, (out_h, out_w), resampler)
        tokens = self.prompt(lr_up)
        padded, _ = pad_to_multiple(lr_up, self.size_multiple)
        plan = self.plan_tiles(padded.shape[-2], padded.shape[-1], tile, tile_overlap, max_memory)
        tracker.check()
        if plan is not None and plan.vae_encode_tile_px is not None:
            z_l = self._encode_tiled(padded, plan, state, latent, generator, tracker)
        else:
            z_l = self.encode(padded, latent, generator)
            tracker.step()
        return Prepared(images, (out_h, out_w), state, tokens, z_l, lr_up, plan, tracker, color_fix)

    def _encode_tiled(self, padded, plan: TilePlan, state, latent, generator, tracker: Tracker) -> torch.Tensor:
        latents = []
        for i in range(padded.shape[0]):
            self.select_sample(state, i)
            x = padded[i : i + 1].to(self.device, self.vae_dtype) * 2.0 - 1.0
            mean, std = tiled_encode(self.vae, x, plan.vae_encode_tile_px, plan.vae_encode_overlap_px,
                                     progress=tracker.stage(), cancel=tracker.cancel, with_std=True)
            latents.append(self._scaled_latent(mean, std, latent, generator))
        self.select_sample(state, None)
        return torch.cat(latents)

    @torch.no_grad()
    def unet_step(self, prepared: "Prepared", timesteps: torch.Tensor, x0_mode: X0Mode | None = None) -> torch.Tensor:
        """One UNet pass + x0 for the prepared batch at ``timesteps`` (B,), tiled per the plan."""
        plan, tracker = prepared.plan, prepared.tracker
        tracker.check()
        if plan is None or plan.latent_tile is None:
            z_h = self.denoise(prepared.z_l, prepared.tokens, timesteps, x0_mode)
            tracker.step()
            return z_h
        outs = []
        for i in range(prepared.z_l.shape[0]):
            self.select_sample(prepared.state, i)
            tokens, t = prepared.tokens[i : i + 1], timesteps[i : i + 1]

            def fn(tiles: torch.Tensor, boxes) -> torch.Tensor:
                n = tiles.shape[0]
                return self.denoise(tiles, tokens.expand(n, -1, -1), t.expand(n), x0_mode)

            outs.append(tiled_apply(fn, prepared.z_l[i : i + 1], plan.latent_tile, plan.latent_overlap,
                                    progress=tracker.stage(), cancel=tracker.cancel))
        self.select_sample(prepared.state, None)
        return torch.cat(outs)

    def finish(self, prepared: "Prepared", z_h: torch.Tensor) -> torch.Tensor:
        """Decode (tiled per the plan), crop to the output size, colour-fix."""
        out_h, out_w = prepared.size
        plan, tracker = prepared.plan, prepared.tracker
        tracker.check()
        if plan is not None and plan.vae_decode_tile_latent is not None:
            z = z_h.to(self.device, self.vae_dtype) / self.scaling_factor + self.shift_factor
            x = tiled_decode(self.vae, z, plan.vae_decode_tile_latent, plan.vae_decode_overlap_latent,
                             progress=tracker.stage(), cancel=tracker.cancel)
            out = _to_unit_range(x)
        else:
            out = self.decode(z_h)
            tracker.step()
        out = out[..., :out_h, :out_w]
        if prepared.color_fix != "none":
            out = apply_color_fix(out, prepared.lr_up, prepared.color_fix)
        return out

    @torch.no_grad()
    def run(
        self,
        images: torch.Tensor,
        realism: Realism = "neutral",
        scale: float | None = None,
        size: tuple[int, int] | None = None,
        x0_mode: X0Mode | None = None,
        resampler: Resampler = "bicubic",
        latent: LatentMode = "mode",
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
        mask_timesteps: tuple[Realism, Realism] = ("fidelity", "realism"),
        t_map: torch.Tensor | None = None,
        levels: Sequence[int] | None = None,
        tile: TileSpec = "none",
        tile_overlap: int = 32,
        max_memory: int | None = None,
        color_fix: ColorFix = "none",
        progress: ProgressFn = None,
        cancel: CancelFn = None,
    ) -> StageOutput:
        """Upscale a batch. Returns the images (B, 3, H', W') in [0, 1] and the timesteps used.

        ``realism``: a preset, an integer t, one t per image, ``"adaptive"`` (MEM picks t per image)
        or ``"auto-map"`` (MEM per region, see :meth:`realism_map`). ``mask`` (in [0, 1], 0 →
        ``mask_timesteps[0]``, 1 → ``mask_timesteps[1]``) or ``t_map`` (a timestep per pixel, run at
        ``levels``) give a spatial realism map: one UNet pass per level, blended in latent space.
        ``tile`` ("none" | "auto" | latent px), ``tile_overlap``, ``max_memory`` (bytes, for "auto"):
        bounded-memory tiling of all stages. ``color_fix``: "none" | "adain" | "wavelet" towards
        the upscaled LR. ``progress(done, total)`` after every stage/tile; ``cancel()`` between them
        (raises :class:`~rcod_core.tiling.Cancelled`; the model stays usable).
        """
        prepared = self.prepare(images, scale, size, resampler, latent, generator, tile, tile_overlap, max_memory,
                                color_fix, progress, cancel)
        step = self.denoise_prepared(prepared, realism, x0_mode, mask, mask_timesteps, t_map, levels)
        return StageOutput(self.finish(prepared, step.latents), step.timesteps, step.metric, step.t_map)

    @torch.no_grad()
    def denoise_prepared(
        self,
        prepared: "Prepared",
        realism: Realism = "neutral",
        x0_mode: X0Mode | None = None,
        mask: torch.Tensor | None = None,
        mask_timesteps: tuple[Realism, Realism] = ("fidelity", "realism"),
        t_map: torch.Tensor | None = None,
        levels: Sequence[int] | None = None,
    ) -> "Denoised":
        """The timestep-controlled step of :meth:`run` on a prepared batch (see there for the
        arguments): one UNet pass per timestep/level, latents out (before :meth:`finish`)."""
        key = realism.strip().lower() if isinstance(realism, str) else None
        if key == "auto-map" and (mask is not None or t_map is not None):
            raise ValueError("realism='auto-map' computes its own map; do not pass mask or t_map as well")
        if mask is not None and t_map is not None:
            raise ValueError("give either mask or t_map, not both")
        self.select_sample(prepared.state, None)  # this batch's conditioning (another call may have set others)
        batch = prepared.z_l.shape[0]
        metric = None
        if key == "auto-map":
            rmap = self.realism_map(prepared.images, state=prepared.state)
            t_map, levels, metric = rmap.t_map, rmap.levels, rmap.metric_map
        if mask is not None or t_map is not None:
            if mask is not None:
                lo, hi = (int(self.resolve_timesteps(v, 1)[0]) for v in mask_timesteps)
                m = prepare_map(mask, batch, prepared.size, "mask")
                m = mask_to_t_map(m, 0, 1)  # validates the [0, 1] range before feathering
                m = gaussian_blur(m, sigma=self.latent_factor)  # feather over about one latent pixel
                m = torch.where(m < 1e-6, torch.zeros_like(m), torch.where(m > 1 - 1e-6, torch.ones_like(m), m))
                t_map, levels = mask_to_t_map(m, lo, hi), [lo, hi]
            else:
                t_map = prepare_map(t_map, batch, prepared.size, "t_map")
                levels = sorted(set(int(v) for v in (levels or self.rule_levels())))
                check_timestep(levels, name="levels")
            z_h = self.denoise_map(prepared, t_map, levels, x0_mode)
            return Denoised(z_h, torch.tensor(levels, dtype=torch.int64), metric, t_map)
        if key == "adaptive":
            metric = self.estimate_metric(prepared.images, prepared.state)
        timesteps = self.resolve_timesteps(realism, batch, metric)
        return Denoised(self.unet_step(prepared, timesteps, x0_mode), timesteps, metric)

    def with_tokens(self, prepared: "Prepared", tokens: Optional[torch.Tensor]) -> "Prepared":
        """``prepared`` conditioned on other VPIM tokens (e.g. of a reference photo); batch 1 broadcasts."""
        if tokens is None:
            return prepared
        batch = prepared.z_l.shape[0]
        if tokens.shape[0] not in (1, batch):
            raise ValueError(f"the prompt has {tokens.shape[0]} token sets for a batch of {batch}; give 1 or {batch}")
        if tuple(tokens.shape[1:]) != tuple(prepared.tokens.shape[1:]):
            raise ValueError(f"the prompt tokens have shape {tuple(tokens.shape[1:])}, this model needs "
                             f"{tuple(prepared.tokens.shape[1:])}: make the prompt with the same model")
        return dataclasses.replace(prepared, tokens=tokens.to(prepared.tokens).expand(batch, -1, -1))

    @torch.no_grad()
    def true_metric(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """Eq. 4 on real data: M_L from the VAE latents of the LR (upscaled to the HR size) and the HR."""
        validate_images(hr, "hr")
        if hr.shape[0] != lr.shape[0]:
            raise ValueError(f"hr has {hr.shape[0]} images for {lr.shape[0]} LR images")
        prepared = self.prepare(lr, size=tuple(hr.shape[-2:]))
        z_h = self.encode(pad_to_multiple(hr.to(self.device, torch.float32), self.size_multiple)[0])
        return latent_metric(prepared.z_l, z_h)

    @property
    def has_mem(self) -> bool:
        """Whether adaptive realism (MEM) is available."""
        return False

    def to(self, device: torch.device | str) -> "RCODPipeline":
        """Move every module (e.g. offload to CPU between runs and back)."""
        self.device = torch.device(device)
        for name in ("unet", "vae", "prompt_encoder"):
            module = getattr(self, name)
            if module is not None:
                module.to(self.device)
        if self.prompt_embeds is not None:
            self.prompt_embeds = self.prompt_embeds.to(self.device)
        return self

    @torch.no_grad()
    def denoise_map(self, prepared: "Prepared", t_map: torch.Tensor, levels: Sequence[int],
                    x0_mode: X0Mode | None = None) -> torch.Tensor:
        """One UNet pass per level, blended by the t-map's hat weights (skips levels with no weight)."""
        weights = level_weights(t_map.to(self.device), levels)
        batch = prepared.z_l.shape[0]
        latents, used = [], []
        for level, w in zip(sorted(levels), weights):
            if float(w.max()) == 0.0:
                continue
            t = torch.full((batch,), int(level), dtype=torch.int64)
            latents.append(self.unet_step(prepared, t, x0_mode))
            used.append(w)
        padded = [F.pad(w, (0, prepared.z_l.shape[-1] * self.latent_factor - w.shape[-1],
                            0, prepared.z_l.shape[-2] * self.latent_factor - w.shape[-2]), mode="replicate")
                  for w in used]
        return blend_levels(latents, torch.stack(padded))

    @torch.no_grad()
    def sweep(
        self,
        images: torch.Tensor,
        timesteps: Sequence[Realism] = ("fidelity", "neutral", "realism"),
        x0_mode: X0Mode | None = None,
        **prepare_kwargs,
    ) -> StageOutput:
        """The same images at several timesteps: encode and VPIM once, UNet + decode per t.

        Returns images of shape (K, B, 3, H', W') for K timesteps, and the K timesteps.
        Each result equals a single :meth:`run` at that t (same batch, same kernels).
        """
        if not timesteps:
            raise ValueError("timesteps must list at least one preset or t")
        ts = [int(self.resolve_timesteps(t, 1)[0]) for t in timesteps]
        prepared = self.prepare(images, **prepare_kwargs)
        batch = prepared.z_l.shape[0]
        outs = []
        for t in ts:
            z_h = self.unet_step(prepared, torch.full((batch,), t, dtype=torch.int64), x0_mode)
            outs.append(self.finish(prepared, z_h))
        return StageOutput(torch.stack(outs), torch.tensor(ts, dtype=torch.int64))

    def rule_levels(self) -> list[int]:
        """The timesteps the spec's grouping rule can choose (the levels of a realism map)."""
        rule = self.grouping_rule()
        if hasattr(rule, "timesteps"):
            return sorted(int(t) for t in rule.timesteps)
        return sorted({min(rule.k * (rule.n - g), 999) for g in range(rule.n)})

    @torch.no_grad()
    def realism_map(self, images: torch.Tensor, tile: int = 64, overlap: int = 32, smooth: float | None = None,
                    state: dict | None = None) -> "RealismMap":
        """Automatic realism map: MEM per LR tile → M_L map → t per region (the grouping rule), smoothed.

        Maps are at the LR resolution; edit and pass ``t_map=`` to :meth:`run` (it is resized).
        """
        images = images.to(self.device, torch.float32)
        m_map = metric_map(lambda tiles: self.estimate_metric(tiles), images, tile, overlap)
        groups = select_timestep(m_map.flatten().cpu(), self.grouping_rule()).view_as(m_map).float()
        t_map = gaussian_blur(groups.to(self.device), smooth if smooth is not None else tile / 4)
        return RealismMap(m_map, t_map, self.rule_levels())

    def __call__(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        """Same as :meth:`run`, returning only the images."""
        return self.run(images, **kwargs).images
