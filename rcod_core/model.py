"""The RCOD model core: its modules and the pieces of the one-step forward, in one place.

:class:`RCODModel` owns the UNet, the VAE, the conditioning (VPIM tokens or fixed embeddings) and,
for RCOD_S / S3Diff, the degradation-guided LoRA and MEM. Its methods are the forward, piece by
piece — the pipeline calls them under ``torch.no_grad`` (batching, tiling, sweeps and realism maps
around them), the trainer calls the same methods with gradients:

* :meth:`~RCODModel.condition` — per-batch state from the original LR (RCOD_S: DEResNet → matrices);
* :meth:`~RCODModel.encode` — ``z_L``: the VAE posterior's mode, a seeded sample, or mean + std · noise;
* :meth:`~RCODModel.tokens` — VPIM (paper Sec. 3.3): CLIP vision → one Linear;
* :meth:`~RCODModel.eps` and :meth:`~RCODModel.x0` — the one-step denoise (Eq. 3/4),
  ``z_H = (z_L − sqrt(1−ᾱ) ε_θ(z_L; t, c)) / sqrt(ᾱ)``;
* :meth:`~RCODModel.decode` — latents → images in [-1, 1].

:meth:`RCODModel.forward` chains them for training (given timesteps; LDG picks them outside, from
M_L measured with the frozen base VAE).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import torch
from torch import nn

from .guided_lora import DegradationConditioning
from .mem import MetricEstimator
from .models import vae_factor
from .schedule import X0Mode, alphas_cumprod, x0_alpha_bar, x0_from_eps
from .spec import ModelSpec

LatentMode = Literal["mode", "sample"]
LATENT_MODES: tuple[str, ...] = ("mode", "sample")


def _scale_shift(vae: nn.Module) -> tuple[float, float]:
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def scale_latent(vae: nn.Module, raw: torch.Tensor) -> torch.Tensor:
    """A raw VAE latent (what ``vae.encode`` gives; ComfyUI's LATENT ``samples``) → the scaled latent
    the UNet sees: ``(raw − shift) · scaling_factor``, float32."""
    scale, shift = _scale_shift(vae)
    return (raw.float() - shift) * scale


def unscale_latent(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`scale_latent`, in ``z``'s dtype: ``z / scaling_factor + shift``."""
    scale, shift = _scale_shift(vae)
    return z / scale + shift


def posterior_latent(
    vae: nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    latent: LatentMode = "mode",
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The posterior's mode (= mean), a sample ``mean + std · ε`` (ε from ``generator``, or the given
    ``noise``), shifted and scaled by the VAE's config → float32 latents."""
    if latent not in LATENT_MODES:
        raise ValueError(f"latent must be one of {LATENT_MODES}, got {latent!r}")
    if noise is not None:
        if tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"noise must have the latent's shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
        mean = mean + std * noise.to(mean)
    elif latent == "sample":
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                          device=generator.device if generator is not None else None)
        mean = mean + std * eps.to(mean.device)
    return scale_latent(vae, mean)


def vae_input(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → the VAE encoder's input: [-1, 1] on its device, in its dtype (a new tensor;
    ``images`` is never changed). The tiled encoder applies it tile by tile."""
    param = next(vae.parameters())
    x = images.to(param.device, param.dtype)
    x = x.mul(2.0) if x is images else x.mul_(2.0)  # a cast is already a copy: scale it in place
    return x.sub_(1.0)


def encode_latent(
    vae: nn.Module,
    images: torch.Tensor,
    latent: LatentMode = "mode",
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Images in [0, 1] (sides multiples of the latent factor) → scaled float32 latents of ``vae``.

    The same function encodes for the model (``z_L``), for LDG's M_L with the frozen base VAE
    (training, ``scan-metric``, MEM targets) and for the tiled encoder's blended moments.
    """
    dist = vae.encode(vae_input(vae, images)).latent_dist
    return posterior_latent(vae, dist.mean, dist.std, latent, generator, noise)


@dataclass
class ForwardOutput:
    """Every intermediate of one training forward (:meth:`RCODModel.forward`)."""

    z_l: torch.Tensor  # scaled LR latent (fp32)
    tokens: torch.Tensor  # cross-attention tokens
    eps: torch.Tensor  # ε_θ(z_L; t, c)
    z_pred: torch.Tensor  # x0 (Eq. 3/4), fp32
    x_pred: torch.Tensor  # decoded, clamped to [-1, 1]
    state: dict  # per-batch conditioning (RCOD_S: scores, features, matrices)


@contextlib.contextmanager
def quiet_dtype_cast() -> Iterator[None]:
    """diffusers warns on every dtype ``.to()`` that modules "should be kept in float32", even when it
    lists none; our casts are deliberate (the VAE's precision is chosen by :func:`place`'s caller)."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class RCODModel(nn.Module):
    """An RCOD-family model: modules + the forward pieces (see the module docstring).

    Args:
        unet, vae: diffusers models with their LoRA (merged or not).
        prompt_encoder: :class:`~rcod_core.prompting.VisualPromptEncoder` (VPIM), or ``None`` for the
            text-conditioned bases, which then need ``prompt_embeds`` (1, N, D).
        spec: the settings beside the weights (kind, x0 mode, grouping rule, …).
        scheduler_config: the base's diffusers scheduler config (for ᾱ_t); ``None``: SD's.
        conditioning: RCOD_S / S3Diff's degradation-guided LoRA, already injected into unet/vae.
        mem: the metric estimation module (adaptive realism), RCOD_S.
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        prompt_encoder: Optional[nn.Module],
        spec: ModelSpec,
        scheduler_config: dict | None = None,
        prompt_embeds: torch.Tensor | None = None,
        conditioning: Optional[DegradationConditioning] = None,
        mem: Optional[MetricEstimator] = None,
    ):
        super().__init__()
        self.unet, self.vae, self.prompt_encoder = unet, vae, prompt_encoder
        self.conditioning, self.mem = conditioning, mem
        self.spec = spec
        cross_dim = int(unet.config.cross_attention_dim)
        if prompt_encoder is not None and prompt_encoder.cross_attention_dim != cross_dim:
            raise ValueError(
                f"VPIM projection outputs {prompt_encoder.cross_attention_dim} features but the UNet's "
                f"cross_attention_dim is {cross_dim}; the CLIP model/projection does not fit this base"
            )
        if prompt_embeds is not None and (prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != cross_dim):
            raise ValueError(f"prompt_embeds must have shape (1, N, {cross_dim}), got {tuple(prompt_embeds.shape)}")
        if prompt_encoder is None and prompt_embeds is None:
            raise ValueError("the model needs a VPIM prompt_encoder or fixed prompt_embeds for conditioning")
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.alphas_cumprod = alphas_cumprod(scheduler_config)  # float64, CPU
        #: the same table where the UNet runs, so that the x0 step reads ᾱ there (no host copy inside a graph)
        self.alphas_on_device = self.alphas_cumprod
        self.latent_factor = vae_factor(vae)
        # pad so that the latent survives every UNet downsampling exactly (64 px for SD)
        self.size_multiple = self.latent_factor * 2 ** (len(unet.config.block_out_channels) - 1)

    #: while :meth:`recording` runs: the last value of each intermediate (float32, CPU)
    recorder: Optional[dict] = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict]:
        """Record the forward's intermediates while the block runs: ``clip_hidden`` (CLIP's
        ``last_hidden_state``, VPIM models), ``tokens``, ``z_l``, ``eps``, ``x0``. Each holds the
        last call's value (a tiled stage: its last tile)."""
        self.recorder = {}
        try:
            yield self.recorder
        finally:
            self.recorder = None

    def _record(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if self.recorder is not None:
            self.recorder[name] = value.detach().float().cpu()
        return value

    # -- placement -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the UNet (and CLIP)."""
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def place(self, device: torch.device | str, dtype: torch.dtype, vae_dtype: torch.dtype) -> "RCODModel":
        """UNet and CLIP in ``dtype``, VAE in ``vae_dtype``, conditioning and MEM in float32, all on
        ``device``, eval mode. Casts before moving (an fp16 model never sits on a GPU in fp32)."""
        device = torch.device(device)
        for module, want in ((self.unet, dtype), (self.vae, vae_dtype), (self.prompt_encoder, dtype),
                             (self.conditioning, torch.float32), (self.mem, torch.float32)):
            if module is None:
                continue
            if any(p.dtype != want for p in module.parameters()):
                with quiet_dtype_cast():
                    module.to(dtype=want)
            module.to(device=device)
        if self.prompt_embeds is not None:
            self.prompt_embeds = self.prompt_embeds.to(device, dtype)
        self._alphas_here()
        return self.eval()

    def _alphas_here(self) -> torch.Tensor:
        """ᾱ on the UNet's device (float64 wherever the device has it; Apple's MPS does not), moved
        again when a host application has moved the modules."""
        device = self.device
        if self.alphas_on_device.device != device:
            self.alphas_on_device = self.alphas_cumprod.to(device, torch.float32 if device.type == "mps" else torch.float64)
        return self.alphas_on_device

    def to_channels_last(self) -> "RCODModel":
        """channels_last memory for the convolution-heavy UNet and VAE."""
        return self.set_channels_last(True)

    def set_channels_last(self, enabled: bool) -> "RCODModel":
        """channels_last (``True``) or the default contiguous layout for the UNet's and VAE's weights.

        Convolutions follow their weights' layout, so activations take the same one."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.unet.to(memory_format=fmt)
        self.vae.to(memory_format=fmt)
        return self

    def set_subpixel_upsampling(self, enabled: bool) -> "RCODModel":
        """The VAE decoder's nearest ×2 + 3×3 upsamplers in sub-pixel form (the same function in
        4/9 of the multiply-adds, :mod:`rcod_core.upsample`) or diffusers' own; weights untouched."""
        from .upsample import use_subpixel_upsampling  # imports diffusers: only once a model exists

        use_subpixel_upsampling(self.vae.decoder, enabled)
        return self

    def compile(self, mode: str | None = None, **kwargs) -> "RCODModel":
        """``torch.compile`` the UNet, the VAE encoder/decoder and CLIP, in place."""
        self.unet = torch.compile(self.unet, mode=mode, **kwargs)
        self.vae.encoder = torch.compile(self.vae.encoder, mode=mode, **kwargs)
        self.vae.decoder = torch.compile(self.vae.decoder, mode=mode, **kwargs)
        if self.prompt_encoder is not None:
            self.prompt_encoder.vision_model = torch.compile(self.prompt_encoder.vision_model, mode=mode, **kwargs)
        return self

    # -- the forward, piece by piece -----------------------------------------------------------
    def condition(self, lr: torch.Tensor) -> dict:
        """Per-batch state from the original LR (``{}`` for the OSEDiff layout); makes it current."""
        if self.conditioning is None:
            return {}
        state = self.conditioning(lr)
        state["unet_matrices"] = state["unet_matrices"].to(self.dtype)
        state["vae_matrices"] = state["vae_matrices"].to(self.vae_dtype)
        self.conditioning.select(state)
        return state

    def select(self, state: dict, index: Optional[int] = None) -> None:
        """Make sample ``index``'s conditioning current (``None``: the whole batch's). Tiled stages
        run one image at a time; nothing to do for the OSEDiff layout."""
        if self.conditioning is not None:
            self.conditioning.select(state, index)

    def encode(self, images: torch.Tensor, latent: LatentMode = "mode", generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """``z_L``: images in [0, 1] whose sides are multiples of the latent factor → scaled fp32 latents."""
        return self._record("z_l", encode_latent(self.vae, images, latent, generator, noise))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Cross-attention tokens for (B, 3, H, W) images in [0, 1]: VPIM, or the fixed embeddings."""
        if self.prompt_encoder is None:
            return self._record("tokens", self.prompt_embeds.expand(images.shape[0], -1, -1))
        hidden = self._record("clip_hidden", self.prompt_encoder.hidden_states(images.to(self.device)))
        return self._record("tokens", self.prompt_encoder.projection(hidden))

    def alpha_bar(self, timesteps: torch.Tensor, x0_mode: X0Mode | None = None) -> torch.Tensor:
        """The ᾱ of the x0 conversion per sample (float64): ᾱ_t, the release's fixed ᾱ, or ᾱ_999."""
        mode = x0_mode or self.spec.x0_mode
        if mode == "base" and self.spec.fixed_timestep is None:
            raise ValueError(f"x0 mode 'base' (ᾱ_999) belongs to the one-step bases, which run at t = 999; on a "
                             f"{self.spec.kind} model at t = {timesteps.reshape(-1)[0].item()} it would scale the "
                             f"latent by 1/sqrt(ᾱ_999) ≈ 14.6: use 'official' or 'paper'")
        return x0_alpha_bar(timesteps, mode, self._alphas_here(), self.spec.fixed_alpha_bar)

    def eps(self, z_l: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``ε_θ(z_L; t, c)``: one UNet pass at ``timesteps`` (B,)."""
        device, dtype = self.device, self.dtype
        return self._record("eps", self.unet(z_l.to(device, dtype), timesteps.to(device),
                                             encoder_hidden_states=tokens.to(device, dtype), return_dict=False)[0])

    def x0(self, z_l: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor,
           x0_mode: X0Mode | None = None) -> torch.Tensor:
        """Eq. 3/4 in float32: ``(z_L − sqrt(1−ᾱ) ε) / sqrt(ᾱ)``."""
        return self._record("x0", x0_from_eps(z_l.float(), eps.float(), self.alpha_bar(timesteps, x0_mode)))

    def denoise(self, z_l: torch.Tensor, tokens: torch.Tensor, timesteps: torch.Tensor,
                x0_mode: X0Mode | None = None) -> torch.Tensor:
        """The one-step denoise: ε, then x0 (fp32 latents out)."""
        return self.x0(z_l, self.eps(z_l, timesteps, tokens), timesteps, x0_mode)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → what the VAE decoder takes (its device and dtype)."""
        return unscale_latent(self.vae, z.to(self.device, self.vae_dtype))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → decoder output in [-1, 1] (the VAE's dtype, not clamped)."""
        return self.vae.decode(self.unscale(z), return_dict=False)[0]

    # -- MEM -----------------------------------------------------------------------------------
    @property
    def has_mem(self) -> bool:
        """Whether adaptive realism (MEM) is available."""
        return self.mem is not None and self.conditioning is not None

    def estimate_metric(self, lr: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """MEM's predicted latent metric M_L for each LR image (from DEResNet's pooled features)."""
        if not self.has_mem:
            raise ValueError(
                f"adaptive realism needs MEM weights (the metric estimation module), and this {self.spec.kind} "
                f"model has none; choose a preset or t, or load an RCOD_S model with its MEM file"
            )
        features = state["features"] if state else self.conditioning.degradation(lr)[1]
        return self.mem(features)

    # -- training ------------------------------------------------------------------------------
    def forward(self, lr_up: torch.Tensor, timesteps: torch.Tensor, lr: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, x0_mode: X0Mode | None = None) -> ForwardOutput:
        """The whole one-step forward with gradients: images in [0, 1] → prediction in [-1, 1].

        ``lr_up``: the LR upscaled to the output size; ``lr``: the original LR (RCOD_S's
        conditioning); ``noise``: the latent draw (``None``: the posterior mode).
        """
        if self.conditioning is not None and lr is None:
            raise ValueError(f"a {self.spec.kind} model needs the original LR image for its degradation estimate")
        state = self.condition(lr) if lr is not None else {}
        z_l = self.encode(lr_up, noise=noise)
        tokens = self.tokens(lr_up)
        eps = self.eps(z_l, timesteps, tokens)
        z_pred = self.x0(z_l, eps, timesteps, x0_mode)
        return ForwardOutput(z_l, tokens, eps, z_pred, self.decode(z_pred).clamp(-1, 1), state)


def measure_metric(
    vae: nn.Module,
    lr_up: torch.Tensor,
    hr: torch.Tensor,
    noise_lr: Optional[torch.Tensor] = None,
    noise_hr: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Eq. 4 on real data: ``M_L = cos(z_L, z_H)`` of the latents of the upscaled LR and the HR.

    LDG measures it with the *frozen base* VAE (no trainable or degradation LoRA), so a sample's
    group does not move while the model trains — in training, in ``scan-metric`` and for MEM's
    targets alike. ``noise_*``: the posterior draws (``None``: the mode). No gradients.
    """
    from .grouping import latent_metric

    with torch.no_grad():
        return latent_metric(encode_latent(vae, lr_up, noise=noise_lr), encode_latent(vae, hr, noise=noise_hr))
