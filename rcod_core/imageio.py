"""Image files ↔ tensors: EXIF orientation applied, alpha and grayscale kept, atomic writes."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class LoadedImage:
    """An image as (1, 3, H, W) float32 RGB in [0, 1] plus what is needed to save it alike."""

    rgb: torch.Tensor
    alpha: Optional[torch.Tensor] = None  # (1, 1, H, W) in [0, 1]
    grayscale: bool = False
    bit_depth: int = 8
    icc_profile: Optional[bytes] = None


def load_image(path: PathLike) -> LoadedImage:
    """Read an image file; raises ``ValueError`` naming the file when it cannot be decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            icc = im.info.get("icc_profile")
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                return LoadedImage(torch.from_numpy(arr)[None, None].expand(1, 3, -1, -1).contiguous(), None, True, 16, icc)
            grayscale = mode in ("L", "LA", "1")
            has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
            rgba = np.asarray(im.convert("RGBA" if has_alpha else "RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {exc}") from exc
    tensor = torch.from_numpy(rgba).permute(2, 0, 1)[None]
    alpha = tensor[:, 3:4].contiguous() if has_alpha else None
    return LoadedImage(tensor[:, :3].contiguous(), alpha, grayscale, 8, icc)


def to_uint(images: torch.Tensor, bit_depth: int = 8) -> np.ndarray:
    """(C, H, W) float in [0, 1] → (H, W, C) unsigned integers, rounded (not truncated)."""
    scale = 255.0 if bit_depth == 8 else 65535.0
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    arr = (images.detach().float().clamp(0, 1) * scale).round().permute(1, 2, 0).cpu().numpy()
    return arr.astype(dtype)


def save_image(path: PathLike, image: LoadedImage, overwrite: bool = False) -> Path:
    """Write atomically (temporary file in the same folder, then rename). Refuses to overwrite
    unless asked. Raises ``ValueError`` if the image holds NaN/Inf (never saved silently)."""
    from PIL import Image

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    rgb = image.rgb[0]
    if not torch.isfinite(rgb).all() or (image.alpha is not None and not torch.isfinite(image.alpha).all()):
        raise ValueError(f"refusing to save {path}: the image contains NaN or Inf")
    if image.grayscale:
        gray = rgb.mean(dim=0, keepdim=True)
        channels = torch.cat([gray, image.alpha[0]]) if image.alpha is not None else gray
    else:
        channels = torch.cat([rgb, image.alpha[0]]) if image.alpha is not None else rgb
    if image.bit_depth == 16 and image.grayscale and image.alpha is None:
        pil = Image.fromarray(to_uint(channels, 16)[..., 0])
    else:
        arr = to_uint(channels, 8)
        pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        kwargs = {"icc_profile": image.icc_profile} if image.icc_profile else {}
        pil.save(tmp, **kwargs)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
