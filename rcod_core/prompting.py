"""Visual prompt injection (VPIM, paper Sec. 3.3): CLIP vision tokens replace the text prompt.

The LR image (after the upscale to the output size) is fed to a CLIP vision transformer; all
tokens of its ``last_hidden_state`` (before ``post_layernorm``; 257 for ViT-L/14 at 224 px) go
through ONE ``nn.Linear(hidden_size -> cross_attention_dim)`` and condition the UNet's
cross-attention in place of text embeddings.

Preprocessing modes:

* ``"official"``   — as the release: the image in [-1, 1], resized to 224 x 224 (bilinear,
  antialiased), no CLIP mean/std normalisation.
* ``"normalized"`` — the CLIP convention: [0, 1], bicubic 224 x 224 (antialiased), then the CLIP
  mean/std. Weights trained one way should be run the same way.

Negative tokens (for classifier-free guidance in VSD training) are the projected tokens of an
all-zero CLIP input, computed once per device/dtype and cached until the weights change.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

PreprocessMode = Literal["official", "normalized"]
PREPROCESS_MODES: tuple[str, ...] = ("official", "normalized")

#: OpenAI CLIP image statistics (``preprocessor_config.json`` of openai/clip-vit-large-patch14).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_for_clip(images: torch.Tensor, mode: PreprocessMode = "official", size: int = 224) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] → the CLIP vision input (B, 3, size, size)."""
    if mode == "official":
        # the release maps to [-1, 1] first; resizing first is the same linear map (the filter's weights
        # sum to 1) without two full-size copies of a large image
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x.mul_(2.0).sub_(1.0)
    if mode == "normalized":
        x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std
    raise ValueError(f"VPIM preprocess mode must be one of {PREPROCESS_MODES}, got {mode!r}")


class VisualPromptEncoder(nn.Module):
    """CLIP vision model + one linear projection → UNet cross-attention tokens (VPIM)."""

    def __init__(self, vision_model: nn.Module, cross_attention_dim: int, preprocess: PreprocessMode = "official"):
        super().__init__()
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"VPIM preprocess mode must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        self.vision_model = vision_model
        config = vision_model.config
        self.image_size = int(config.image_size)
        self.projection = nn.Linear(int(config.hidden_size), int(cross_attention_dim))
        self.preprocess_mode: PreprocessMode = preprocess
        self._negative_cache: dict[tuple, torch.Tensor] = {}

    @property
    def hidden_size(self) -> int:
        return self.projection.in_features

    @property
    def cross_attention_dim(self) -> int:
        return self.projection.out_features

    @property
    def num_tokens(self) -> int:
        config = self.vision_model.config
        return (self.image_size // int(config.patch_size)) ** 2 + 1

    def _param_dtype(self) -> torch.dtype:
        return self.projection.weight.dtype

    def hidden_states_from_clip_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Already-preprocessed CLIP input (B, 3, S, S) → ``last_hidden_state`` (B, N, hidden)."""
        pixel_values = pixel_values.to(self.projection.weight.device, self._param_dtype())
        frozen = not any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # RCOD trains the projection only
            return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def tokens_from_clip_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Already-preprocessed CLIP input (B, 3, S, S) → projected tokens (B, N, D)."""
        return self.projection(self.hidden_states_from_clip_input(pixel_values))

    def hidden_states(self, images: torch.Tensor, preprocess: PreprocessMode | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] → CLIP's ``last_hidden_state`` (before the projection)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VPIM images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        pixel_values = preprocess_for_clip(images.float(), preprocess or self.preprocess_mode, self.image_size)
        return self.hidden_states_from_clip_input(pixel_values)

    def forward(self, images: torch.Tensor, preprocess: PreprocessMode | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] → VPIM tokens (B, N, cross_attention_dim)."""
        return self.projection(self.hidden_states(images, preprocess))

    def _weights_version(self) -> tuple:
        # In-place updates (load_state_dict, optimiser steps) bump ``_version``; new tensors change the pointer.
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    @torch.no_grad()
    def negative_tokens(self, batch_size: int = 1) -> torch.Tensor:
        """Projected tokens of an all-zero CLIP input, expanded to ``batch_size`` (cached)."""
        weight = self.projection.weight
        key = (weight.device, weight.dtype, self._weights_version())
        cached = self._negative_cache.get(key)
        if cached is None:
            self._negative_cache.clear()
            zeros = torch.zeros(1, 3, self.image_size, self.image_size, device=weight.device, dtype=weight.dtype)
            cached = self.tokens_from_clip_input(zeros)
            self._negative_cache[key] = cached
        return cached.expand(batch_size, -1, -1)

    def _apply(self, fn, *args, **kwargs):  # .to()/.half()/.cuda() invalidate the cache
        self._negative_cache.clear()
        return super()._apply(fn, *args, **kwargs)
