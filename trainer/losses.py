"""Losses: LPIPS-VGG (or an LPIPS-style distance in the base VAE's features), the VSD
distribution-matching loss, and a DINO-ViT GAN discriminator.

* :class:`LPIPS` — Zhang et al. 2018 (v0.1, VGG16): ImageNet-scaled input, unit-normalised
  relu1_2 … relu5_3 features, squared differences weighted by 1x1 "lin" layers, spatial mean,
  summed over layers. The VGG16 weights (torchvision ``vgg16-397923af.pth``) and the lin weights
  (``lpips/weights/v0.1/vgg.pth``) cannot be downloaded here: ``pretrained`` needs the files;
  ``random-init`` (explicit) gives a seeded random network for tests.
* :func:`vsd_loss` — the VSD gradient of OSEDiff / RCOD_O: ``(x̂0_lora − x̂0_real,cfg) / mean|z − x̂0_real|``
  applied as ``MSE(z, sg(z − grad))``; the real score uses classifier-free guidance.
* :class:`ViTDiscriminator` — S3Diff's GAN uses vision-aided-gan's ``Discriminator(cv_type='dino',
  output_type='conv_multi_level', loss_type='multilevel_sigmoid_s')``: a frozen DINO ViT backbone
  with trainable heads on several of its layers and a non-saturating sigmoid (BCE) loss per level.
  This is our re-implementation with a transformers ``ViTModel`` backbone (``facebook/dino-vitb16``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: indices in ``features`` after which LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class WeightsError(ValueError):
    """Pretrained weights a config asks for are missing or do not fit."""


def packaged_lpips_weights() -> Optional[Path]:
    """The lin-layer weights shipped inside the ``lpips`` package, if it is installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (same indices, so its state dict loads)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers)


def _read_state(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{what}: {os.fspath(path)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


class LPIPS(nn.Module):
    """LPIPS-VGG distance of images in [-1, 1]; frozen. Returns (B,) distances."""

    def __init__(self, mode: str = "pretrained", vgg_weights=None, lin_weights=None, seed: int = 0):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        if mode == "pretrained":
            lin_weights = lin_weights or packaged_lpips_weights()
            if vgg_weights is None or lin_weights is None:
                raise WeightsError("LPIPS mode 'pretrained' needs lpips.vgg_weights and lpips.lin_weights files")
            state = _read_state(vgg_weights, "LPIPS VGG16 weights")
            feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
            missing = set(self.features.state_dict()) - set(feats)
            if missing:
                raise WeightsError(f"{vgg_weights}: not torchvision VGG16 weights (missing e.g. {sorted(missing)[:2]})")
            self.features.load_state_dict({k: feats[k] for k in self.features.state_dict()})
            lin = _read_state(lin_weights, "LPIPS lin weights")
            for i, layer in enumerate(self.lins):
                key = f"lin{i}.model.1.weight"
                if key not in lin:
                    raise WeightsError(f"{lin_weights}: not LPIPS v0.1 lin weights (missing {key!r})")
                layer.weight.data.copy_(lin[key])
        elif mode == "random-init":
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for m in self.features:
                    if isinstance(m, nn.Conv2d):
                        fan_in = m.weight[0].numel()
                        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                        m.bias.zero_()
                for layer in self.lins:
                    layer.weight.fill_(1.0 / layer.weight.shape[1])
        else:
            raise ValueError(f"LPIPS mode must be 'pretrained' or 'random-init', got {mode!r}")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, always eval
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = (x - self.shift) / self.scale
        y = (y - self.shift) / self.scale
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i == LPIPS_TAPS[tap]:
                nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + self.lins[tap]((nx - ny) ** 2).mean(dim=(1, 2, 3))
                tap += 1
                if tap == len(LPIPS_TAPS):
                    break
        return total


class VAEFeatureDistance(nn.Module):
    """An LPIPS-style distance in the features of a frozen VAE encoder, for when no ImageNet network
    can be had (``lpips.mode: vae``).

    Zhang et al.'s recipe without the learned layers: the activations after ``conv_in`` and after
    each down block of the base VAE's encoder (trained to reconstruct photos, so it responds to
    edges and texture) are unit-normalised over channels; the distance is the squared difference
    summed over channels, averaged over positions, then over the taps. Like LPIPS it penalises a
    blurred output far more than L2 does. Images in [-1, 1]; returns (B,) distances. The encoder is
    shared, not copied, and is never trained here."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        encoder = getattr(vae, "encoder", None)
        if encoder is None or not hasattr(encoder, "down_blocks"):
            raise ValueError("lpips.mode vae needs a diffusers AutoencoderKL (an encoder with down_blocks)")
        self._encoder = [encoder]  # a list: not a submodule, so no second copy in state dicts or .to()

    def train(self, mode: bool = True):  # always frozen, always eval
        return super().train(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        encoder = self._encoder[0]
        h = encoder.conv_in(x.to(encoder.conv_in.weight.dtype))
        out = [h]
        for block in encoder.down_blocks:
            h = block(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fy = self.taps(y)
        total = 0.0
        fx = self.taps(x)
        for a, b in zip(fx, fy):
            a, b = a.float(), b.float()
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (na - nb).pow(2).sum(1).mean(dim=(1, 2))
        return total / len(fx)


def build_lpips(cfg: dict, vae: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """The configured perceptual distance: LPIPS-VGG, or (mode ``vae``) :class:`VAEFeatureDistance`
    on ``vae`` (the frozen base VAE); None when the loss is off."""
    if cfg["loss"]["lpips"] <= 0 or cfg["lpips"]["mode"] == "off":
        return None
    if cfg["lpips"]["mode"] == "vae":
        if vae is None:
            raise ValueError("lpips.mode vae needs the base VAE")
        return VAEFeatureDistance(vae)
    return LPIPS(cfg["lpips"]["mode"], cfg["lpips"]["vgg_weights"], cfg["lpips"]["lin_weights"], seed=cfg["seed"])


# -- VSD ------------------------------------------------------------------------------------------

def x0_at(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    ab = alpha_bar.to(z_t.device, z_t.dtype).view(-1, 1, 1, 1)
    return (z_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def vsd_loss(z: torch.Tensor, x0_lora: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """Variational score distillation as OSEDiff applies it (DMD-style normalised gradient)."""
    weight = (z.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    grad = (x0_lora - x0_real) / weight
    return F.mse_loss(z, (z - grad).detach())


# -- GAN ------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vit_config(backbone: str, image_size: int):
    from transformers import ViTConfig

    if backbone == "dino_vitb16":
        return ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         image_size=image_size, patch_size=16, layer_norm_eps=1e-6)
    if backbone == "tiny":
        return ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                         image_size=image_size, patch_size=8, layer_norm_eps=1e-6)
    raise ValueError(f"GAN backbone must be 'dino_vitb16' or 'tiny', got {backbone!r}")


def load_vit_backbone(backbone: str, weights, random_init: bool, image_size: int, seed: int = 0) -> nn.Module:
    from transformers import ViTModel

    if weights is None:
        if not random_init:
            raise WeightsError(f"the GAN discriminator's {backbone} backbone needs pretrained weights (gan.weights), "
                               f"or gan.random_init: true for tests")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ViTModel(vit_config(backbone, image_size), add_pooling_layer=False)
    p = Path(weights)
    if p.is_dir():
        try:
            return ViTModel.from_pretrained(p, add_pooling_layer=False, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{p}: cannot load the DINO ViT folder: {str(exc).splitlines()[0]}") from exc
    model = ViTModel(vit_config(backbone, image_size), add_pooling_layer=False)
    state = {k.removeprefix("vit."): v for k, v in _read_state(p, "DINO ViT weights").items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise WeightsError(f"{p}: not transformers ViT weights for {backbone} (missing e.g. {missing[:3]})")
    model.load_state_dict({k: state[k] for k in own})
    return model


class ViTDiscriminator(nn.Module):
    """Frozen ViT features at several depths → trainable per-level heads (CLS linear + patch convs)."""

    def __init__(self, backbone: nn.Module, levels: Optional[Sequence[int]] = None, head_channels: int = 64):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        config = backbone.config
        n = config.num_hidden_layers
        self.levels = list(levels) if levels is not None else sorted({max(1, n // 4), max(1, n // 2), max(1, 3 * n // 4), n})
        self.image_size, self.patch = int(config.image_size), int(config.patch_size)
        d = int(config.hidden_size)
        self.cls_heads = nn.ModuleList(nn.Linear(d, 1) for _ in self.levels)
        self.patch_heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(d, head_channels, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(head_channels, 1, 1))
            for _ in self.levels)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] → one logit tensor per level (CLS and patch logits, flattened)."""
        x = (images + 1) / 2
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        hidden = self.backbone(pixel_values=x, output_hidden_states=True).hidden_states
        g = self.image_size // self.patch
        logits = []
        for level, cls_head, patch_head in zip(self.levels, self.cls_heads, self.patch_heads):
            h = hidden[level]
            cls = cls_head(h[:, 0])
            tokens = h[:, 1:].transpose(1, 2).reshape(h.shape[0], -1, g, g)
            logits.append(torch.cat([cls, patch_head(tokens).flatten(1)], dim=1))
        return logits


def gan_loss(logits: list[torch.Tensor], real: bool) -> torch.Tensor:
    """Non-saturating sigmoid loss averaged over levels (multilevel_sigmoid_s)."""
    losses = [F.binary_cross_entropy_with_logits(l, torch.full_like(l, 1.0 if real else 0.0)) for l in logits]
    return torch.stack(losses).mean()


def build_discriminator(cfg: dict) -> ViTDiscriminator:
    g = cfg["gan"]
    backbone = load_vit_backbone(g["backbone"], g["weights"], g["random_init"], g["image_size"], seed=cfg["seed"] + 7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"] + 8)
        return ViTDiscriminator(backbone)
