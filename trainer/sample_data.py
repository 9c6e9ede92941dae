"""Real photos for demos and the CPU proof: the images scikit-image ships in its wheel.

``python -m trainer.sample_data DIR`` writes ``DIR/train`` and ``DIR/val`` (held-out) as PNG from the
installed ``skimage`` package (``pip install scikit-image``), or from a downloaded wheel
(``--wheel scikit_image-*.whl``). Grey images are stored as RGB.
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
from pathlib import Path
from typing import Optional

TRAIN = ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
         "retina.jpg", "ihc.png", "camera.png", "brick.png", "grass.png", "moon.png", "coins.png")
VAL_DEFAULT = ("coffee.png", "gravel.png", "chelsea.png")  # held out from training


def _sources(wheel: Optional[str]) -> dict[str, bytes]:
    names = set(TRAIN) | set(VAL_DEFAULT)
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            return {Path(n).name: z.read(n) for n in z.namelist()
                    if n.startswith("skimage/data/") and Path(n).name in names}
    try:
        import skimage
    except ImportError as exc:
        raise SystemExit("scikit-image is not installed: pip install scikit-image (or pass --wheel)") from exc
    folder = Path(skimage.__file__).parent / "data"
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def write_sample_data(out: str | os.PathLike, wheel: Optional[str] = None) -> dict[str, list[Path]]:
    from PIL import Image

    out = Path(out)
    data = _sources(wheel)
    if not data:
        raise SystemExit("no sample images found in scikit-image")
    written: dict[str, list[Path]] = {"train": [], "val": []}
    for split, names in (("train", TRAIN), ("val", VAL_DEFAULT)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            if name not in data:
                continue
            img = Image.open(io.BytesIO(data[name])).convert("RGB")
            path = out / split / (Path(name).stem + ".png")
            img.save(path)
            written[split].append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--wheel")
    args = parser.parse_args()
    written = write_sample_data(args.out, args.wheel)
    print({k: [p.name for p in v] for k, v in written.items()})


if __name__ == "__main__":
    main()
