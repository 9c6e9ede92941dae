"""Training data: HR photo folders (LR made online) and paired LR/HR folders, as a seeded stream.

Samples form an endless stream indexed by ``k = 0, 1, 2, …``. Sample ``k`` is fully determined by
the run seed and ``k``: which image (a fresh seeded permutation per pass over the data), where the
crop lies, the flip, and — for HR folders — every random draw of the degradation. A micro-batch
``m`` of a run with ``P`` processes and per-process batch ``B`` holds stream indices
``[m·P·B, (m+1)·P·B)``, process ``r`` taking ``[m·P·B + r·B, m·P·B + (r+1)·B)``. Hence:

* resuming after ``m`` micro-batches starts the stream at micro-batch ``m`` — consumed batches are
  skipped without being loaded;
* two processes with batch ``B`` see exactly the samples of one process with batch ``2B``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_MASK = (1 << 63) - 1


class DataError(ValueError):
    """A dataset cannot be used; the message names the folder or file."""


def stream_seed(seed: int, index: int, salt: int) -> int:
    """A 63-bit seed for (run seed, stream index, purpose), stable across processes and runs."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + int(salt) * 0x94D049BB133111EB) & _MASK
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK


def generator(seed: int, index: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, index, salt))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted; raises :class:`DataError` if none."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder {os.fspath(folder)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"image folder {os.fspath(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively)")
    return files


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after checking the whole file decodes; :class:`DataError` otherwise."""
    from PIL import Image, UnidentifiedImageError

    from rcod_core.imageio import declared_size

    try:
        declared_size(path)  # before anything is decoded: no decompression bomb is allocated
        with Image.open(path) as im:
            size = im.size
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"unreadable image {os.fspath(path)!r}: {exc}") from exc
    return size


def load_image(path: Path) -> np.ndarray:
    """HWC uint8 RGB (grey and RGBA are converted); the declared size is checked first."""
    from PIL import Image

    from rcod_core.imageio import declared_size

    try:
        declared_size(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable image {os.fspath(path)!r}: {exc}") from exc
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


class _ImageCache:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._store: dict[Path, np.ndarray] = {}

    def get(self, path: Path) -> np.ndarray:
        if not self.enabled:
            return load_image(path)
        arr = self._store.get(path)
        if arr is None:
            arr = self._store[path] = load_image(path)
        return arr


class _Stream(Dataset):
    """Endless seeded stream over ``n`` items; subclasses load item ``i`` with generator ``g``."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, int(seed)
        self._perm_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:  # the stream is endless; one pass is ``n`` samples
        return self.n

    def item_index(self, k: int) -> int:
        epoch, pos = divmod(int(k), self.n)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            self._perm_cache = {epoch: torch.randperm(self.n, generator=generator(self.seed, epoch, 1))}
            perm = self._perm_cache[epoch]
        return int(perm[pos])


class HRCropDataset(_Stream):
    """Random ``crop`` x ``crop`` patches (and horizontal flips) of HR photos; LR is made later."""

    def __init__(self, files: Sequence[Path], crop: int, seed: int, flip: bool = True, cache: bool = True,
                 check: bool = True):
        super().__init__(len(files), seed)
        if not files:
            raise DataError("the HR dataset is empty")
        self.files, self.crop, self.flip = list(files), int(crop), flip
        if check:
            for f in self.files:
                w, h = image_size(f)
                if w < self.crop or h < self.crop:
                    raise DataError(f"image {os.fspath(f)!r} is {w}x{h}, smaller than the {self.crop}px crop")
        self._cache = _ImageCache(cache)

    def __getitem__(self, k: int) -> dict:
        g = generator(self.seed, k, 2)
        arr = self._cache.get(self.files[self.item_index(k)])
        h, w = arr.shape[:2]
        y = int(torch.randint(h - self.crop + 1, (), generator=g))
        x = int(torch.randint(w - self.crop + 1, (), generator=g))
        patch = arr[y:y + self.crop, x:x + self.crop]
        if self.flip and bool(torch.rand((), generator=g) < 0.5):
            patch = patch[:, ::-1]
        return {"hr": to_tensor(np.ascontiguousarray(patch)), "index": int(k)}


def pair_files(lr_folder, hr_folder) -> list[tuple[Path, Path]]:
    """LR/HR files matched by file stem (relative path without extension)."""
    lr_files, hr_files = list_images(lr_folder), list_images(hr_folder)
    key = lambda root, p: p.relative_to(root).with_suffix("").as_posix()
    hr_map = {key(Path(hr_folder), p): p for p in hr_files}
    pairs, missing = [], []
    for p in lr_files:
        k = key(Path(lr_folder), p)
        if k in hr_map:
            pairs.append((p, hr_map[k]))
        else:
            missing.append(k)
    if missing:
        raise DataError(f"{len(missing)} LR image(s) in {os.fspath(lr_folder)!r} have no HR image with the same name in "
                        f"{os.fspath(hr_folder)!r}, e.g. {missing[:3]}")
    return pairs


class PairedCropDataset(_Stream):
    """Aligned crops of LR/HR pairs: HR ``crop`` px, LR ``crop / scale`` px at the matching place."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], crop: int, scale: int, seed: int, flip: bool = True,
                 cache: bool = True, check: bool = True):
        super().__init__(len(pairs), seed)
        if not pairs:
            raise DataError("the paired dataset is empty")
        if crop % scale:
            raise DataError(f"crop {crop} must be a multiple of the scale {scale}")
        self.pairs, self.crop, self.scale, self.flip = list(pairs), int(crop), int(scale), flip
        if check:
            for lr, hr in self.pairs:
                (lw, lh), (hw, hh) = image_size(lr), image_size(hr)
                if (hw, hh) != (lw * scale, lh * scale):
                    raise DataError(f"pair {os.fspath(lr)!r} ({lw}x{lh}) / {os.fspath(hr)!r} ({hw}x{hh}): the HR must be "
                                    f"exactly {scale}x the LR")
                if hw < crop or hh < crop:
                    raise DataError(f"image {os.fspath(hr)!r} is {hw}x{hh}, smaller than the {crop}px crop")
        self._cache = _ImageCache(cache)

    def __getitem__(self, k: int) -> dict:
        g = generator(self.seed, k, 2)
        lr_path, hr_path = self.pairs[self.item_index(k)]
        lr, hr = self._cache.get(lr_path), self._cache.get(hr_path)
        c, s = self.crop // self.scale, self.scale
        y = int(torch.randint(lr.shape[0] - c + 1, (), generator=g))
        x = int(torch.randint(lr.shape[1] - c + 1, (), generator=g))
        lr_p, hr_p = lr[y:y + c, x:x + c], hr[y * s:(y + c) * s, x * s:(x + c) * s]
        if self.flip and bool(torch.rand((), generator=g) < 0.5):
            lr_p, hr_p = lr_p[:, ::-1], hr_p[:, ::-1]
        return {"hr": to_tensor(np.ascontiguousarray(hr_p)), "lr": to_tensor(np.ascontiguousarray(lr_p)), "index": int(k)}


class StreamSampler(Sampler):
    """Stream indices of one process, from micro-batch ``start``; endless."""

    def __init__(self, batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.batch_size, self.start, self.rank, self.world_size = int(batch_size), int(start), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        m = self.start
        while True:
            base = m * self.batch_size * self.world_size + self.rank * self.batch_size
            yield from range(base, base + self.batch_size)
            m += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is effectively endless
        return 2 ** 62


@dataclass
class ValidationSet:
    """Fixed held-out pairs: HR centre crops and their LR (degraded with fixed seeds, or given)."""

    hr: torch.Tensor
    lr: torch.Tensor
    names: list[str]


def centre_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return arr[y:y + size, x:x + size]
