"""Image files ↔ tensors: RGB, RGBA, grayscale; 8- and 16-bit PNG and TIFF; JPEG, WebP, BMP.

Loading applies the EXIF orientation, keeps alpha as a separate channel, remembers grayscale,
bit depth and the ICC profile so that :func:`save_image` writes the output alike.

Pillow decodes everything except 16-bit colour: it has no 48/64-bit RGB(A) mode and silently
truncates such files to 8 bits. Those go through ``pypng`` (16-bit RGB/RGBA/LA PNG; pure Python)
and ``tifffile`` (16-bit TIFF; pure Python), with Pillow still reading the metadata (orientation,
ICC). 16-bit grayscale PNG/TIFF works in Pillow (mode ``I;16``). Saving is atomic (temporary file
in the same folder, then rename), the format comes from the suffix, and 16-bit is written for PNG
and TIFF when ``bit_depth == 16`` (other formats are 8-bit only).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .files import atomic_write

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: suffix → Pillow format name
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
#: the most pixels an input may declare (Pillow's decompression-bomb warning limit, ≈ 9459²); checked
#: from the header, before anything is decoded
MAX_INPUT_PIXELS = 89_478_485
JPEG_QUALITY = 95
WEBP_QUALITY = 95


@dataclass
class LoadedImage:
    """An image as (1, 3, H, W) float32 RGB in [0, 1] plus what is needed to save it alike.

    Grayscale images hold the gray value in all three channels (``grayscale=True``) and are saved
    as one channel (the mean of the three).
    """

    rgb: torch.Tensor
    alpha: Optional[torch.Tensor] = None  # (1, 1, H, W) in [0, 1]
    grayscale: bool = False
    bit_depth: int = 8
    icc_profile: Optional[bytes] = None


# -- orientation -----------------------------------------------------------------------------------
def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1–8) to an (H, W, C) array, as ``ImageOps.exif_transpose``."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(int(orientation))
    return np.ascontiguousarray(op(arr)) if op else arr


# -- 16-bit readers --------------------------------------------------------------------------------
def _png_header(path: PathLike) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    return head[24], head[25]


def _read_png16(path: PathLike) -> np.ndarray:
    """16-bit colour PNG → (H, W, C) uint16 via pypng."""
    import png

    width, height, rows, info = png.Reader(filename=os.fspath(path)).asDirect()
    planes = info["planes"]
    arr = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    return arr.reshape(height, width, planes)


def _is_tiff(path: PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*")


def _read_tiff_wide(path: PathLike) -> Optional[LoadedImage]:
    """A 16-bit integer or a floating-point TIFF via tifffile (first page, orientation and ICC
    applied); None for the 8-bit ones Pillow reads. Float samples must be finite and in [0, 1]."""
    import tifffile

    with tifffile.TiffFile(os.fspath(path)) as tif:
        page = tif.pages[0]
        is_float = page.dtype is not None and np.dtype(page.dtype).kind == "f"
        if page.bitspersample != 16 and not is_float:
            return None
        arr = page.asarray()
        icc = page.iccprofile or None
        tag = page.tags.get(274)  # Orientation
        orientation = int(tag.value) if tag is not None else 1
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] > 4 or not (arr.dtype == np.uint16 or arr.dtype.kind == "f"):
        raise ValueError(f"unsupported TIFF layout {arr.shape} {arr.dtype}")
    if arr.dtype.kind == "f":
        return _from_array(apply_orientation(_checked_float(arr), orientation), 1.0, 16, icc)
    return _from_array(apply_orientation(arr, orientation), 65535.0, 16, icc)


def _checked_float(arr: np.ndarray) -> np.ndarray:
    """Floating-point pixels as they are, if finite and in [0, 1] (never silently clipped or zeroed)."""
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{int((~np.isfinite(arr)).sum())} pixel values are NaN or Inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"floating-point pixel values must lie in [0, 1], these span [{lo:.4g}, {hi:.4g}]")
    return arr


def declared_size(path: PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding; ``ValueError`` (naming the file)
    when it declares more than :data:`MAX_INPUT_PIXELS` — a decompression bomb is never allocated."""
    from PIL import Image

    if _is_tiff(path):
        import tifffile

        with tifffile.TiffFile(os.fspath(path)) as tif:
            page = tif.pages[0]
            w, h = int(page.imagewidth), int(page.imagelength)
    else:
        with Image.open(path) as im:
            w, h = im.size
    if w * h > MAX_INPUT_PIXELS:
        raise ValueError(f"it declares {w}x{h} = {w * h:,} pixels, more than the {MAX_INPUT_PIXELS:,} this reads "
                         f"(a decompression bomb, or split the image first)")
    return w, h


def _icc_colour_space(icc: Optional[bytes]) -> Optional[bytes]:
    """The data colour-space signature of an ICC profile (bytes 16-20: b'RGB ', b'GRAY', b'CMYK', …)."""
    return icc[16:20] if icc and len(icc) >= 20 else None


def _from_array(arr: np.ndarray, scale: float, bit_depth: int, icc: Optional[bytes]) -> LoadedImage:
    """(H, W, C) with C in {1: gray, 2: gray+alpha, 3: RGB, 4: RGBA} → LoadedImage."""
    t = torch.from_numpy(arr.astype(np.float32) / scale).permute(2, 0, 1)[None]
    channels = t.shape[1]
    grayscale = channels in (1, 2)
    color = t[:, :1].expand(1, 3, -1, -1) if grayscale else t[:, :3]
    alpha = t[:, -1:].contiguous() if channels in (2, 4) else None
    return LoadedImage(color.contiguous(), alpha, grayscale, bit_depth, icc)


def _cmyk_to_rgb(im, icc: Optional[bytes]):
    """A CMYK image → RGB: through its embedded profile to sRGB when it has one, else Pillow's formula."""
    if icc:
        try:
            import io

            from PIL import ImageCms

            return ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                             ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain conversion below
            pass
    return im.convert("RGB")


def load_image(path: PathLike) -> LoadedImage:
    """Read an image file; raises ``ValueError`` naming the file when it cannot be decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        declared_size(path)
        if _is_tiff(path):
            wide_tiff = _read_tiff_wide(path)
            if wide_tiff is not None:
                return wide_tiff
        with Image.open(path) as im:
            icc = im.info.get("icc_profile") or None
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            fmt = im.format
            wide = None
            if fmt == "PNG":
                depth, colour_type = _png_header(path)
                if depth == 16 and colour_type in (2, 4, 6):  # RGB, LA, RGBA
                    wide = _read_png16(path)
            if wide is not None:
                return _from_array(apply_orientation(wide, orientation), 65535.0, 16, icc)
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)[..., None]
                return _from_array(arr, 65535.0, 16, icc)
            if mode == "F":  # 32-bit float grey: the values as they are, in [0, 1]
                return _from_array(_checked_float(np.asarray(im, dtype=np.float32))[..., None], 1.0, 16, icc)
            if mode == "CMYK":  # to sRGB through the file's own profile (a CMYK profile cannot tag RGB output)
                im = _cmyk_to_rgb(im, icc)
                icc = None
            grayscale = mode in ("L", "LA", "1")
            has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info)
            target = ("LA" if has_alpha else "L") if grayscale else ("RGBA" if has_alpha else "RGB")
            arr = np.asarray(im.convert(target))
            want = b"GRAY" if grayscale else b"RGB "
            if _icc_colour_space(icc) not in (None, want):
                icc = None  # a profile of another colour space would mis-tag the output
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, KeyError, struct.error,
            Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {exc}") from exc
    except Exception as exc:  # pypng / tifffile raise their own error types on corrupt data
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    return _from_array(arr, 255.0, 8, icc)


# -- saving ----------------------------------------------------------------------------------------
#: elements converted at once by :func:`to_uint` (a 32 MiB float64 strip)
STRIP_ELEMENTS = 1 << 22


def to_uint(images: torch.Tensor, bit_depth: int = 8) -> np.ndarray:
    """(C, H, W) float in [0, 1] → (H, W, C) unsigned integers, rounded (not truncated)."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    scale = 255.0 if bit_depth == 8 else 65535.0
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    c, h, w = images.shape
    out = np.empty((h, w, c), dtype)
    rows = max(1, STRIP_ELEMENTS // max(1, w * c))  # in strips: float64 temporaries of a strip, not the image
    for y in range(0, h, rows):
        strip = images[:, y : y + rows].detach().to(torch.float64, copy=True).clamp_(0, 1).mul_(scale).round_()
        out[y : y + rows] = strip.permute(1, 2, 0).cpu().numpy()
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16(tmp: str, arr: np.ndarray, icc: Optional[bytes]) -> None:
    """(H, W, C) uint16 → 16-bit PNG via pypng, with an iCCP chunk after IHDR when ``icc``."""
    import png

    h, w, c = arr.shape
    buffer = io.BytesIO()
    writer = png.Writer(w, h, greyscale=c in (1, 2), alpha=c in (2, 4), bitdepth=16, compression=6)
    writer.write(buffer, arr.reshape(h, w * c))
    data = buffer.getvalue()
    if icc:
        ihdr_end = 8 + 4 + 4 + 13 + 4
        chunk = _png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc))
        data = data[:ihdr_end] + chunk + data[ihdr_end:]
    with open(tmp, "wb") as f:
        f.write(data)


def _write_tiff16(tmp: str, arr: np.ndarray, icc: Optional[bytes]) -> None:
    import tifffile

    c = arr.shape[-1]
    kwargs = {"photometric": "minisblack" if c in (1, 2) else "rgb", "compression": "zlib", "metadata": None}
    if c in (2, 4):
        kwargs["extrasamples"] = ("unassalpha",)
    if icc:
        kwargs["iccprofile"] = icc
    tifffile.imwrite(tmp, arr[..., 0] if c == 1 else arr, **kwargs)


def save_image(path: PathLike, image: LoadedImage, overwrite: bool = False) -> Path:
    """Write atomically (temporary file in the same folder, then rename). Refuses to overwrite
    unless asked. The format comes from the suffix (:data:`SAVE_FORMATS`); ``bit_depth=16`` is
    written as 16-bit for PNG and TIFF, 8-bit elsewhere; the ICC profile is embedded where the
    format has one (PNG, TIFF, JPEG, WebP). Raises ``ValueError`` if the image holds NaN/Inf
    (never saved silently) or the suffix is unknown."""
    from PIL import Image

    path = Path(path)
    fmt = SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot save {path}: unknown image suffix {path.suffix!r}, expected one of {sorted(SAVE_FORMATS)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    rgb = image.rgb[0]
    if not torch.isfinite(rgb).all() or (image.alpha is not None and not torch.isfinite(image.alpha).all()):
        raise ValueError(f"refusing to save {path}: the image contains NaN or Inf")
    color = rgb.mean(dim=0, keepdim=True) if image.grayscale else rgb
    alpha = image.alpha[0] if image.alpha is not None and fmt != "JPEG" else None  # JPEG has no alpha
    channels = torch.cat([color, alpha]) if alpha is not None else color
    sixteen = image.bit_depth == 16 and fmt in ("PNG", "TIFF")
    arr = to_uint(channels, 16 if sixteen else 8)
    icc = image.icc_profile or None

    def write(tmp: str) -> None:
        if sixteen and fmt == "PNG" and arr.shape[-1] != 1:
            _write_png16(tmp, arr, icc)
        elif sixteen and fmt == "TIFF":
            _write_tiff16(tmp, arr, icc)
        else:
            pil = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)  # uint16 gray → I;16
            kwargs: dict = {"icc_profile": icc} if icc and fmt != "BMP" else {}
            if fmt == "JPEG":
                kwargs["quality"] = JPEG_QUALITY
            elif fmt == "WEBP":
                kwargs["quality"] = WEBP_QUALITY
            pil.save(tmp, format=fmt, **kwargs)

    atomic_write(path, write)
    return path
