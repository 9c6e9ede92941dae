"""The one-step RCOD pipeline: LR → upscale → VAE encode → one UNet pass at t → x0 → decode.

Images are ``(B, 3, H, W)`` float tensors in [0, 1] in and out. Device, dtype, timestep and seed
are arguments; nothing is a hidden flag on the models. The forward itself lives in the model core
(:class:`~rcod_core.model.RCODModel`, shared with the trainer); the pipeline orchestrates it:

* :meth:`RCODPipeline.prepare` — validation, conditioning, upscale, VPIM tokens, VAE encode (tiled);
* :meth:`RCODPipeline.unet_step` — one UNet pass + x0 at given timesteps (tiled);
* :meth:`RCODPipeline.finish` — decode (tiled), crop, colour fix;
* :meth:`RCODPipeline.run` / :meth:`~RCODPipeline.sweep` / :meth:`~RCODPipeline.realism_map` —
  presets, adaptive t (MEM + the grouping rule), spatial realism, several t at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .capture import CapturedDenoise
from .colour import COLOR_FIXES, ColorFix, color_fix as apply_color_fix
from .devices import computes_bf16, prefer_channels_last
from .grouping import GroupingRule, latent_metric, resolve_realism, select_timestep
from .imageops import MAX_SCALE, Resampler, output_size, pad_to_multiple, resize, to_unit_range, validate_images
from .memory import SAFETY, UNET_BATCH_TILES, TilePlan, choose_tile, free_memory, plan_from_costs
from .memprobe import StageCosts, measure_stage_costs
from .model import LATENT_MODES, LatentMode, RCODModel, posterior_latent, vae_input
from .progress import CancelFn, Progress, ProgressFn
from .release import PROCESSINGS, Processing, release_input, release_output, release_timestep, uint8_to_float
from .realism import blend_levels, feathered_mask_t_map, gaussian_blur, level_weights, metric_map, prepare_map
from .schedule import X0Mode, check_timestep
from .spec import ModelSpec
from .tiling import tile_units, tiled_apply
from .vae_tiling import tiled_decode, tiled_encode, vae_tile_units

Realism = Union[str, int, Sequence[int], torch.Tensor]
TileSpec = Union[str, int, None]


def default_vae_dtype(vae: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """The VAE's precision when not given: ``dtype``, except fp16 for a VAE whose config asks to be
    upcast (SD 2.1's ``force_upcast``: its decoder overflows in fp16) → bf16 where ``device`` computes
    it natively (fp32's range at half fp32's bytes and time), else fp32."""
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        if device is not None and computes_bf16(torch.device(device)):
            return torch.bfloat16
        return torch.float32
    return dtype


@dataclass
class StageOutput:
    """What the pipeline's steps return: images (or latents, before :meth:`RCODPipeline.finish`)
    and the timesteps, for UIs and logs."""

    #: images (B, 3, H', W') in [0, 1] — or, from :meth:`RCODPipeline.denoise_prepared`, latents
    images: torch.Tensor
    #: the timestep of each image, or the levels of a realism map
    timesteps: torch.Tensor
    #: MEM's predicted latent metric M_L per image (adaptive) or per pixel (auto-map), else None
    metric: Optional[torch.Tensor] = None
    #: the per-pixel timestep map that was used (spatial realism), else None
    t_map: Optional[torch.Tensor] = None

    @property
    def latents(self) -> torch.Tensor:
        """The same tensor, named for the latent step."""
        return self.images


@dataclass
class Prepared:
    """The per-batch work before the UNet (see :meth:`RCODPipeline.prepare`)."""

    images: torch.Tensor  # the LR batch on the device, float32
    size: tuple[int, int]  # output (H, W)
    state: dict  # per-batch conditioning (RCOD_S: degradation scores, features, LoRA matrices)
    tokens: torch.Tensor
    z_l: torch.Tensor
    lr_up: Optional[torch.Tensor] = None  # the upscaled LR, kept only as a colour fix's reference (else None)
    plan: Optional[TilePlan] = None  # None = untiled
    tracker: Progress = None  # type: ignore[assignment]
    color_fix: str = "none"
    #: progress units of one encode / UNet pass / decode of this batch under its plan
    units: Optional[dict] = None


@dataclass
class RealismMap:
    """An automatic realism map at LR resolution (see :meth:`RCODPipeline.realism_map`)."""

    metric_map: torch.Tensor  # (B, 1, h, w) predicted M_L
    t_map: torch.Tensor  # (B, 1, h, w) timestep per pixel (smoothed)
    levels: list[int]


class RCODPipeline:
    """A loaded RCOD-family model, ready to upscale.

    Args:
        model: the :class:`~rcod_core.model.RCODModel` (modules + forward pieces).
        device, dtype: where and in which precision the UNet and CLIP run.
        vae_dtype: precision of the VAE (default: ``dtype``; for an fp16 pipeline whose VAE config
            says ``force_upcast``, as SD 2.1's does, bf16 where the device has it, else fp32).
    """

    def __init__(self, model: RCODModel, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 vae_dtype: torch.dtype | None = None):
        if not isinstance(model, RCODModel):
            raise ValueError(f"RCODPipeline needs an RCODModel, got {type(model).__name__}")
        self.model = model
        self.dtype = dtype
        self.vae_dtype = vae_dtype or default_vae_dtype(model.vae, dtype, device)
        self._stage_costs: Optional[tuple[tuple, StageCosts]] = None  # (device, dtypes) → measured, see stage_costs
        #: pad inputs up to multiples of this many output pixels (0: only what the UNet needs); see set_shape_bucket
        self.shape_bucket = 0
        self._graphs: Optional[OrderedDict] = None  # key → CapturedDenoise, see use_cuda_graphs
        self._graph_pool = None
        self.max_graphs = 8
        model.place(device, dtype, self.vae_dtype)
        if prefer_channels_last(self.device, dtype):
            self.to_channels_last()  # convolution-heavy: NHWC kernels where measured faster
        model.set_subpixel_upsampling(True)  # the decoder's upsamplers in 4/9 of the multiply-adds

    @property
    def device(self) -> torch.device:
        """Where the model's weights are now (they may be moved, e.g. by a host application's memory manager)."""
        return self.model.device

    # the model's parts and settings, for callers that inspect or swap them
    spec: ModelSpec = property(lambda self: self.model.spec)  # type: ignore[assignment]
    latent_factor: int = property(lambda self: self.model.latent_factor)  # type: ignore[assignment]
    size_multiple: int = property(lambda self: self.model.size_multiple)  # type: ignore[assignment]
    alphas_cumprod: torch.Tensor = property(lambda self: self.model.alphas_cumprod)  # type: ignore[assignment]
    prompt_encoder = property(lambda self: self.model.prompt_encoder)
    vae = property(lambda self: self.model.vae)
    has_mem: bool = property(lambda self: self.model.has_mem)  # type: ignore[assignment]

    @property
    def unet(self) -> nn.Module:
        return self.model.unet

    @unet.setter
    def unet(self, module: nn.Module) -> None:
        self.model.unet = module

    # -- configuration -------------------------------------------------------------------------
    def set_channels_last(self, enabled: bool) -> "RCODPipeline":
        """channels_last (or the default layout) for the UNet and VAE; see :func:`~rcod_core.devices.prefer_channels_last`."""
        self.model.set_channels_last(enabled)
        return self

    def to_channels_last(self) -> "RCODPipeline":
        """Use channels_last memory for the convolution-heavy UNet and VAE (a GPU speed-up)."""
        self.model.to_channels_last()
        return self

    def set_subpixel_upsampling(self, enabled: bool) -> "RCODPipeline":
        """The VAE decoder's upsamplers in sub-pixel form (default) or diffusers' own
        (:mod:`rcod_core.upsample`: the same function, fewer multiply-adds)."""
        self.model.set_subpixel_upsampling(enabled)
        return self

    def set_shape_bucket(self, pixels: int) -> "RCODPipeline":
        """Pad every input up to multiples of ``pixels`` (a multiple of :attr:`size_multiple`; 0: only
        to what the UNet needs) before encoding, and crop the output back.

        Compiled graphs and CUDA graphs are made per input shape; with buckets, images of similar
        sizes share one, at the cost of up to ``pixels - 1`` padded rows and columns. Padding is by
        reflection, and the UNet's attention and the VAE's GroupNorm see the padded image, so a
        bucketed output differs slightly from the unpadded one (the demo model, 200×232 padded to
        256×256: 0.6 grey levels on average, less than tiling changes)."""
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0 or pixels % self.size_multiple:
            raise ValueError(f"shape bucket must be 0 or a positive multiple of {self.size_multiple} px "
                             f"(this model's padding unit), got {pixels!r}")
        self.shape_bucket = pixels
        return self

    @property
    def pad_multiple(self) -> int:
        """What inputs are padded to: the shape bucket, or the UNet's :attr:`size_multiple`."""
        return self.shape_bucket or self.size_multiple

    def use_cuda_graphs(self, enabled: bool = True, max_graphs: int = 8) -> "RCODPipeline":
        """Replay the one-step denoise (ε and Eq. 3/4) as CUDA graphs, captured once per input shape
        (:class:`~rcod_core.capture.CapturedDenoise`; the ``max_graphs`` most recent are kept, sharing
        one memory pool). With eager kernels, this removes the launch cost of the UNet's kernels;
        ``torch.compile(mode="reduce-overhead")`` does the same for compiled ones, so the two are not
        combined. Shape buckets (:meth:`set_shape_bucket`) bound the number of shapes."""
        if enabled:
            if not self._cuda_graph_device():
                raise ValueError(f"CUDA graphs need the pipeline on a CUDA device; it is on {self.device}")
            if isinstance(self.unet, torch._dynamo.eval_frame.OptimizedModule):
                raise ValueError("the UNet is compiled: use torch.compile's mode='reduce-overhead' for its CUDA graphs")
            if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
                raise ValueError(f"max_graphs must be a positive integer, got {max_graphs!r}")
        self._graphs = OrderedDict() if enabled else None
        self._graph_pool = None
        self.max_graphs = max_graphs
        return self

    def _cuda_graph_device(self) -> bool:
        return self.device.type == "cuda"

    def _replayed(self, z_l: torch.Tensor, tokens: torch.Tensor, timesteps: torch.Tensor,
                  x0_mode: X0Mode | None) -> torch.Tensor:
        """:meth:`denoise` by a CUDA graph of this shape, captured on first use."""
        timesteps = check_timestep(timesteps)  # checked here: a capture cannot read them back
        key = CapturedDenoise.key_of(self.model, z_l, tokens, timesteps, x0_mode)
        if any(weights != key[1] for _, weights in self._graphs):  # the UNet moved, was cast or replaced:
            self._graphs.clear()  # every capture holds stale weight addresses; free them and their pool
            self._graph_pool = None
        graph = self._graphs.pop(key, None)
        if graph is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = CapturedDenoise(self.model, z_l, tokens, timesteps, x0_mode, pool=self._graph_pool)
        self._graphs[key] = graph  # most recent last
        return graph(z_l, tokens, timesteps)

    def compile(self, mode: str | None = None, **kwargs) -> "RCODPipeline":
        """``torch.compile`` the UNet and the VAE encoder/decoder (and CLIP), in place."""
        self.model.compile(mode, **kwargs)
        return self

    @contextlib.contextmanager
    def _block_ticks(self, tracker: Optional[Progress], network: str) -> Iterator[None]:
        """On a CPU, report progress after each block of the network that runs as one unit
        (``"unet"``, ``"encode"``, ``"decode"``): a 512² SD 2.1 UNet pass or VAE decode takes
        seconds there. Off elsewhere, and for compiled modules (a hook would break their graph)."""
        module = {"unet": self.model.unet, "encode": self.model.vae.encoder, "decode": self.model.vae.decoder}[network]
        if tracker is None or tracker.progress is None or self.device.type != "cpu" or hasattr(module, "_orig_mod"):
            yield
            return
        if network == "decode":
            blocks = [module.mid_block, *module.up_blocks]
        else:
            blocks = [*module.down_blocks, module.mid_block, *getattr(module, "up_blocks", [])]
        blocks = [b for b in blocks if b is not None]  # a UNet may have no mid block
        n = len(blocks) + 1
        handles = [b.register_forward_hook(lambda m, args, out, k=k: tracker.tick(k / n)) for k, b in enumerate(blocks, 1)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

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

    def grouping_rule(self) -> GroupingRule:
        """The model's LDG rule (from its spec: the file's metadata, or the release's thresholds)."""
        return self.spec.grouping

    # -- the model's forward pieces, without gradients -------------------------------------------
    @torch.no_grad()
    def condition(self, lr: torch.Tensor) -> dict:
        """Per-batch state computed from the original LR before the stages run (RCOD_S)."""
        return self.model.condition(lr.to(self.device, torch.float32))

    def select_sample(self, state: dict, index: Optional[int]) -> None:
        self.model.select(state, index)

    @torch.no_grad()
    def estimate_metric(self, lr: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """MEM's predicted latent metric M_L for each LR image."""
        return self.model.estimate_metric(lr.to(self.device, torch.float32), state)

    def alpha_bar_for(self, timesteps: torch.Tensor, x0_mode: X0Mode | None = None) -> torch.Tensor:
        return self.model.alpha_bar(timesteps, x0_mode)

    @torch.no_grad()
    def prompt(self, images: torch.Tensor) -> torch.Tensor:
        """Conditioning tokens for (B, 3, H, W) images in [0, 1]: VPIM, or the fixed embeddings."""
        return self.model.tokens(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, latent: LatentMode = "mode", generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] whose sides are multiples of the latent factor → scaled latents (fp32)."""
        return self.model.encode(images, latent, generator)

    @torch.no_grad()
    def denoise(self, z_l: torch.Tensor, tokens: torch.Tensor, timesteps: torch.Tensor,
                x0_mode: X0Mode | None = None) -> torch.Tensor:
        """One UNet pass at ``timesteps`` (B,) and the x0 conversion; fp32 latents out (replayed as a
        CUDA graph after :meth:`use_cuda_graphs`)."""
        if self._graphs is not None and self._cuda_graph_device() and self.model.recorder is None:
            return self._replayed(z_l, tokens, timesteps, x0_mode)
        return self.model.denoise(z_l, tokens, timesteps, x0_mode)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [0, 1] (float32)."""
        return to_unit_range(self.model.decode(z))

    # -- all together --------------------------------------------------------------------------
    def plan_tiles(self, height: int, width: int, tile: TileSpec = "none", tile_overlap: int = 32,
                   max_memory: int | None = None, color_fix: ColorFix = "none") -> Optional[TilePlan]:
        """Tile sizes for a (padded) output of ``height`` × ``width``: ``"none"``, ``"auto"`` (the
        largest tiles that fit ``max_memory`` bytes or the device's free memory; untiled when the
        whole image fits) or an int latent tile (all stages; VAE encode tiles are ``tile`` × 8 px)."""
        if tile is None or tile == "none":
            return None
        if tile == "auto":
            budget = max_memory
            if budget is None:
                budget = int(free_memory(self.device) * SAFETY)
            # the SD 2.1 estimate first: with ample room to spare nothing needs measuring
            roomy = choose_tile(height, width, budget=budget // 2, dtype_bytes=torch.finfo(self.dtype).bits // 8,
                                vae_dtype_bytes=torch.finfo(self.vae_dtype).bits // 8, latent_factor=self.latent_factor)
            if not roomy.tiled:
                return None
            plan = plan_from_costs(height, width, self.stage_costs(), budget, self.latent_factor,
                                   reference=color_fix != "none")
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

    def stage_costs(self) -> StageCosts:
        """This pipeline's measured activation memory per stage (:mod:`rcod_core.memprobe`), measured
        once per device and precision; what ``tile="auto"`` plans from."""
        key = (str(self.device), self.dtype, self.vae_dtype)
        if self._stage_costs is None or self._stage_costs[0] != key:
            self._stage_costs = (key, measure_stage_costs(self))
        return self._stage_costs[1]

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
        noise: torch.Tensor | None = None,
        passes: tuple[int, int] | None = None,
    ) -> "Prepared":
        """Everything before the UNet, once per batch: validation, conditioning, upscale, VPIM
        tokens, VAE encode (tiled per the plan). Sweeps and realism maps reuse it for every t.

        ``noise``: the latent draw ε of ``z_L = mean + std · ε`` itself, shape (B, C, H/f, W/f) of the
        padded image (overrides ``latent`` and ``generator``). ``passes``: (UNet passes, decodes)
        that will follow, to plan the progress total of the whole call up front (tiles included);
        ``None`` lets the total grow stage by stage."""
        validate_images(images)
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {color_fix!r}")
        if latent not in LATENT_MODES:
            raise ValueError(f"latent must be one of {LATENT_MODES}, got {latent!r}")
        tracker = Progress(progress, cancel)
        tracker.check()
        out_h, out_w = output_size(images.shape[-2], images.shape[-1], scale, size)
        m = self.pad_multiple
        plan = self.plan_tiles(-(-out_h // m) * m, -(-out_w // m) * m, tile, tile_overlap, max_memory,  # padded size
                               color_fix)
        images = images.to(self.device, torch.float32)
        state = self.condition(images)
        lr_up = resize(images, (out_h, out_w), resampler)
        tokens = self.prompt(lr_up)
        padded, _ = pad_to_multiple(lr_up, m)
        if color_fix == "none":
            lr_up = None  # kept only as the colour-fix reference: one full-size buffer less from here on
        units = self._stage_units(plan, tuple(padded.shape[-2:]), padded.shape[0])
        if passes is not None:
            unet_passes, decodes = passes
            tracker.plan(units["encode"] + unet_passes * units["unet"] + decodes * units["decode"])
        tracker.check()
        if plan is not None and plan.vae_encode_tile_px is not None:
            z_l = self._encode_tiled(padded, plan, state, latent, generator, tracker, noise)
        else:
            with self._block_ticks(tracker, "encode"):
                z_l = self.model.encode(padded, latent, generator, noise)
            tracker.step()
        return Prepared(images, (out_h, out_w), state, tokens, z_l, lr_up, plan, tracker, color_fix, units)

    def _stage_units(self, plan: Optional[TilePlan], hw: tuple[int, int], batch: int) -> dict:
        """Progress units of each stage for a padded ``hw`` batch: what the tiled functions report
        (:func:`~rcod_core.tiling.tile_units`, :func:`~rcod_core.vae_tiling.vae_tile_units`), 1 untiled."""
        f = self.latent_factor
        lh, lw = hw[0] // f, hw[1] // f
        units = {"encode": 1, "unet": 1, "decode": 1}
        if plan is None:
            return units
        if plan.vae_encode_tile_px is not None:
            units["encode"] = vae_tile_units(*hw, plan.vae_encode_tile_px, plan.vae_encode_overlap_px, batch)
        if plan.latent_tile is not None:
            units["unet"] = tile_units(lh, lw, plan.latent_tile, plan.latent_overlap, batch)
        if plan.vae_decode_tile_latent is not None:
            units["decode"] = vae_tile_units(lh, lw, plan.vae_decode_tile_latent, plan.vae_decode_overlap_latent, batch)
        return units

    def _encode_tiled(self, padded, plan: TilePlan, state, latent, generator, tracker: Progress,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        latents = []
        for i in range(padded.shape[0]):
            self.select_sample(state, i)
            mean, std = tiled_encode(self.vae, padded[i : i + 1], plan.vae_encode_tile_px, plan.vae_encode_overlap_px,
                                     global_mid=plan.vae_global_mid, transform=functools.partial(vae_input, self.vae),
                                     progress=tracker.stage(), cancel=tracker.cancel, with_std=True)
            latents.append(self.model._record("z_l", posterior_latent(
                self.vae, mean, std, latent, generator, None if noise is None else noise[i : i + 1])))
        self.select_sample(state, None)
        return torch.cat(latents)

    def with_plan(self, prepared: "Prepared", tile: TileSpec = "none", tile_overlap: int = 32,
                  max_memory: int | None = None, passes: tuple[int, int] = (1, 0)) -> "Prepared":
        """``prepared`` with a tile plan (see :meth:`plan_tiles`) for the stages still to run on it,
        for a batch whose encode happened elsewhere (a LATENT from another node); ``passes``: the
        (UNet passes, decodes) that follow, whose tiles make its tracker's planned progress total."""
        plan, units = self._latent_plan(prepared.z_l, tile, tile_overlap, max_memory)
        if prepared.tracker is not None:
            prepared.tracker.plan(passes[0] * units["unet"] + passes[1] * units["decode"])
        return dataclasses.replace(prepared, plan=plan, units=units)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor, tile: TileSpec = "none", tile_overlap: int = 32,
                       max_memory: int | None = None, progress: ProgressFn = None,
                       cancel: CancelFn = None) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → images in [0, 1], the VAE decoder run in tiles per ``tile``
        (as in :meth:`prepare`: ``"auto"`` tiles only what does not fit ``max_memory``)."""
        plan, units = self._latent_plan(z, tile, tile_overlap, max_memory)
        tracker = Progress(progress, cancel)
        tracker.plan(units["decode"])
        return self._decode_planned(z.to(self.device), plan, tracker)

    def _latent_plan(self, z: torch.Tensor, tile: TileSpec, tile_overlap: int,
                     max_memory: int | None) -> tuple[Optional[TilePlan], dict]:
        """The tile plan and progress units for the stages after the encode of latents ``z``."""
        hw = (z.shape[-2] * self.latent_factor, z.shape[-1] * self.latent_factor)
        plan = self.plan_tiles(*hw, tile, tile_overlap, max_memory)
        return plan, self._stage_units(plan, hw, z.shape[0])

    @torch.no_grad()
    def unet_step(self, prepared: "Prepared", timesteps: torch.Tensor, x0_mode: X0Mode | None = None) -> torch.Tensor:
        """One UNet pass + x0 for the prepared batch at ``timesteps`` (B,), tiled per the plan."""
        plan, tracker = prepared.plan, prepared.tracker
        tracker.check()
        if plan is None or plan.latent_tile is None:
            with self._block_ticks(tracker, "unet"):
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
                                    batch_tiles=UNET_BATCH_TILES, progress=tracker.stage(), cancel=tracker.cancel))
        self.select_sample(prepared.state, None)
        return torch.cat(outs)

    def _decode_planned(self, z: torch.Tensor, plan: Optional[TilePlan], tracker: Progress) -> torch.Tensor:
        """Scaled latents → images in [0, 1], VAE-decoded in tiles when the plan says so."""
        tracker.check()
        if plan is not None and plan.vae_decode_tile_latent is not None:
            x = tiled_decode(self.vae, self.model.unscale(z), plan.vae_decode_tile_latent,
                             plan.vae_decode_overlap_latent, global_mid=plan.vae_global_mid,
                             progress=tracker.stage(), cancel=tracker.cancel)
            return to_unit_range(x)
        with self._block_ticks(tracker, "decode"):
            out = self.decode(z)
        tracker.step()
        return out

    def finish(self, prepared: "Prepared", z_h: torch.Tensor) -> torch.Tensor:
        """Decode (tiled per the plan), crop to the output size, colour-fix."""
        out_h, out_w = prepared.size
        out = self._decode_planned(z_h, prepared.plan, prepared.tracker)
        out = out[..., :out_h, :out_w]
        if prepared.color_fix != "none":
            out = apply_color_fix(out, prepared.lr_up, prepared.color_fix, in_place=True)  # no full-size temporaries
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
        latent: LatentMode | None = None,
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
        noise: torch.Tensor | None = None,
        processing: Processing = "ours",
    ) -> StageOutput:
        """Upscale a batch. Returns the images (B, 3, H', W') in [0, 1] and the timesteps used.

        ``realism``: a preset, an integer t, one t per image, ``"adaptive"`` (MEM picks t per image)
        or ``"auto-map"`` (MEM per region, see :meth:`realism_map`). ``mask`` (in [0, 1], 0 →
        ``mask_timesteps[0]``, 1 → ``mask_timesteps[1]``) or ``t_map`` (a timestep per pixel, run at
        ``levels``) give a spatial realism map: one UNet pass per level, blended in latent space.
        ``tile`` ("none" | "auto" | latent px), ``tile_overlap``, ``max_memory`` (bytes, for "auto"):
        bounded-memory tiling of all stages. ``color_fix``: "none" | "adain" | "wavelet" towards
        the upscaled LR. ``progress(done, total)`` after every stage/tile; ``cancel()`` between them
        (raises :class:`~rcod_core.progress.Cancelled`; the model stays usable).

        ``latent``: ``"mode"`` (default) or ``"sample"`` (seeded by ``generator``: the only random draw,
        ε of the latent's shape in one ``torch.randn`` call per batch); ``noise``: that ε given.
        ``processing="release"``: the authors' scripts' size rules, resamplers, 8-bit steps, colour-fix
        order and timestep mapping (:mod:`rcod_core.release`; latent ``"sample"`` by default there).
        """
        if processing not in PROCESSINGS:
            raise ValueError(f"processing must be one of {PROCESSINGS}, got {processing!r}")
        if processing == "release":
            unsupported = {"size": size, "mask": mask, "t_map": t_map}
            bad = [k for k, v in unsupported.items() if v is not None] + (["tile"] if tile not in (None, "none") else [])
            if bad:
                raise ValueError(f"processing='release' runs the release's scripts, which have no {', '.join(bad)}")
            return self._run_release(images, realism, 4 if scale is None else scale, x0_mode,
                                     latent or "sample", generator, noise, color_fix, progress, cancel)
        if mask is not None:
            unet_passes = 2
        elif t_map is not None:
            unet_passes = len(self._map_levels(levels))
        else:
            auto_map = isinstance(realism, str) and realism.strip().lower() == "auto-map"
            unet_passes = len(self.rule_levels()) if auto_map else 1
        prepared = self.prepare(images, scale, size, resampler, latent or "mode", generator, tile, tile_overlap,
                                max_memory, color_fix, progress, cancel, noise, passes=(unet_passes, 1))
        step = self.denoise_prepared(prepared, realism, x0_mode, mask, mask_timesteps, t_map, levels)
        return StageOutput(self.finish(prepared, step.latents), step.timesteps, step.metric, step.t_map)

    @torch.no_grad()
    def _run_release(self, images, realism, scale, x0_mode, latent, generator, noise, color_fix, progress, cancel):
        """:meth:`run` with ``processing="release"`` (see :mod:`rcod_core.release`)."""
        validate_images(images)
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {COLOR_FIXES}, got {color_fix!r}")
        if isinstance(scale, bool) or float(scale) != int(scale) or not 1 <= int(scale) <= MAX_SCALE:
            raise ValueError(f"processing='release' takes an integer scale in [1, {MAX_SCALE:g}] (the release's "
                             f"--upscale), got {scale!r}")
        key = realism.strip().lower() if isinstance(realism, str) else None
        if key == "auto-map":
            raise ValueError("processing='release' has no realism map; use 'adaptive', a preset or t")
        tracker = Progress(progress, cancel, total=3)
        tracker.check()
        rin = release_input(images, self.spec.base, int(scale))
        lr, x = rin.lr.to(self.device), rin.model_input.to(self.device)
        state = self.model.condition(lr)  # RCOD_S: DEResNet on the original LR
        tokens = self.model.tokens(x)
        z_l = self.model.encode(x, latent, generator, noise)
        tracker.advance()
        tracker.check()
        metric = self.model.estimate_metric(lr, state) if key == "adaptive" else None
        timesteps = self.resolve_timesteps(realism, x.shape[0], metric)
        if key != "adaptive":
            timesteps = torch.tensor([release_timestep(t) for t in timesteps.tolist()], dtype=torch.int64)
        z_h = self.model.denoise(z_l, tokens, timesteps, x0_mode)
        tracker.advance()
        tracker.check()
        out8 = release_output(self.model.decode(z_h), rin, color_fix)
        tracker.advance()
        return StageOutput(uint8_to_float(out8).to(self.device), timesteps, metric)

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
    ) -> StageOutput:
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
                t_map = feathered_mask_t_map(prepare_map(mask, batch, prepared.size, "mask"), lo, hi, self.latent_factor)
                levels = [lo, hi]
            else:
                t_map = prepare_map(t_map, batch, prepared.size, "t_map")
                levels = self._map_levels(levels)
                check_timestep(levels, name="levels")
            z_h = self.denoise_map(prepared, t_map, levels, x0_mode)
            return StageOutput(z_h, torch.tensor(levels, dtype=torch.int64), metric, t_map)
        if key == "adaptive":
            metric = self.estimate_metric(prepared.images, prepared.state)
        timesteps = self.resolve_timesteps(realism, batch, metric)
        return StageOutput(self.unet_step(prepared, timesteps, x0_mode), timesteps, metric)

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
        (h, w), (H, W) = lr.shape[-2:], hr.shape[-2:]
        sh, sw = H / h, W / w
        if not (1.0 <= min(sh, sw) and max(sh, sw) <= MAX_SCALE) or abs(sh - sw) * min(h, w) > 1.0:
            raise ValueError(f"the HR image ({W}x{H}) is not the LR ({w}x{h}) at one scale in [1, {MAX_SCALE:g}] "
                             f"(×{sw:.3g} wide, ×{sh:.3g} high): give the HR that matches this LR")
        prepared = self.prepare(lr, size=tuple(hr.shape[-2:]))
        z_h = self.encode(pad_to_multiple(hr.to(self.device, torch.float32), self.size_multiple)[0])
        return latent_metric(prepared.z_l, z_h)

    def to(self, device: torch.device | str) -> "RCODPipeline":
        """Move every module (e.g. offload to CPU between runs and back)."""
        self.model.to(torch.device(device))
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
                if prepared.tracker is not None and prepared.tracker.planned:
                    prepared.tracker.advance(prepared.units["unet"])  # a planned pass not needed
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
        prepared = self.prepare(images, **{"passes": (len(ts), len(ts)), **prepare_kwargs})
        batch = prepared.z_l.shape[0]
        outs = []
        for t in ts:
            z_h = self.unet_step(prepared, torch.full((batch,), t, dtype=torch.int64), x0_mode)
            outs.append(self.finish(prepared, z_h))
        return StageOutput(torch.stack(outs), torch.tensor(ts, dtype=torch.int64))

    def _map_levels(self, levels: Sequence[int] | None) -> list[int]:
        """The distinct timesteps a ``t_map`` runs at: ``levels``, or the grouping rule's."""
        return sorted(set(int(v) for v in (levels or self.rule_levels())))

    def rule_levels(self) -> list[int]:
        """The timesteps the spec's grouping rule can choose (the levels of a realism map)."""
        return self.grouping_rule().levels

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
