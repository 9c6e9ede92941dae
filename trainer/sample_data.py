"""Real photos for demos and training here: images that ship in Python packages and Debian packages.

``python -m trainer.sample_data DIR`` writes ``DIR/train`` and ``DIR/val`` (held out: never trained on)
as PNG, and ``DIR/SOURCES.json`` naming each image's package, path in the package and licence.

Sources, each optional beyond scikit-image:

* scikit-image's photos (the installed ``skimage`` or ``--wheel scikit_image-*.whl``);
* scikit-learn's two sample photos (``--wheel scikit_learn-*.whl``, or the installed package);
* matplotlib's ``grace_hopper.jpg`` (installed package or ``--wheel``);
* Debian wallpaper packages given as ``--deb FILE.deb`` (``apt-get download mate-backgrounds
  plasma-workspace-wallpapers``): every photo of ``mate-backgrounds``' nature set and one image per
  Plasma wallpaper (the largest), with the licence its ``metadata.json`` declares.

Images larger than ``--max-side`` (default 640) are reduced with a Lanczos filter, which also
removes most JPEG blocking; grey images are stored as RGB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

TRAIN = ("astronaut.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
         "retina.jpg", "ihc.png", "camera.png", "brick.png", "grass.png", "moon.png", "coins.png")
VAL_DEFAULT = ("coffee.png", "gravel.png", "chelsea.png")  # held out from training
#: one in this many Debian wallpapers (sorted by name) is held out
DEB_VAL_EVERY = 5

SKIMAGE_LICENCE = "scikit-image sample data (public domain / CC0 or as listed in skimage/data/README.txt)"
SKLEARN_LICENCE = "CC BY 2.0 (scikit-learn sklearn/datasets/images/README.txt)"
MPL_LICENCE = "public domain (U.S. Navy photograph; matplotlib sample_data)"


@dataclass
class Source:
    name: str          # output stem
    data: bytes
    package: str
    path: str          # path inside the package
    licence: str
    split: str         # train | val


def _from_wheel_or_package(wheels: Sequence[str], module: str, prefix: str, names: Iterable[str]) -> dict[str, tuple[bytes, str]]:
    names = set(names)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            found = {Path(n).name: (z.read(n), n) for n in z.namelist()
                     if n.startswith(prefix) and Path(n).name in names}
        if found:
            return found
    try:
        mod = __import__(module)
    except ImportError:
        return {}
    folder = Path(mod.__file__).parent / Path(prefix).relative_to(module)
    return {n: ((folder / n).read_bytes(), f"{prefix}{n}") for n in names if (folder / n).is_file()}


def _python_sources(wheels: Sequence[str]) -> list[Source]:
    out = []
    sk = _from_wheel_or_package(wheels, "skimage", "skimage/data/", set(TRAIN) | set(VAL_DEFAULT))
    for n, (data, path) in sorted(sk.items()):
        out.append(Source(f"skimage_{Path(n).stem}", data, "scikit-image", path, SKIMAGE_LICENCE,
                          "val" if n in VAL_DEFAULT else "train"))
    sl = _from_wheel_or_package(wheels, "sklearn", "sklearn/datasets/images/", ("china.jpg", "flower.jpg"))
    for n, (data, path) in sorted(sl.items()):
        out.append(Source(f"sklearn_{Path(n).stem}", data, "scikit-learn", path, SKLEARN_LICENCE, "train"))
    mp = _from_wheel_or_package(wheels, "matplotlib", "matplotlib/mpl-data/sample_data/", ("grace_hopper.jpg",))
    for n, (data, path) in sorted(mp.items()):
        out.append(Source(f"mpl_{Path(n).stem}", data, "matplotlib", path, MPL_LICENCE, "train"))
    return out


def read_deb(path: str | os.PathLike) -> tuple[str, dict[str, bytes]]:
    """(package name_version, {member path: bytes}) of a ``.deb``'s data archive (ar + tar.xz/gz),
    read with the standard library only, so no ``dpkg`` is needed."""
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"{os.fspath(path)}: cannot read the package: {exc.strerror}") from None
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{os.fspath(path)}: not a Debian package (no ar header)")
    pos, members = 8, {}
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise SystemExit(f"{os.fspath(path)}: no data.tar member")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        for info in tar:
            if info.isfile() and re.search(r"\.(jpe?g|png|webp)$|metadata\.json$|copyright$", info.name, re.I):
                files[info.name.lstrip("./")] = tar.extractfile(info).read()
    return Path(path).name.split("_")[0], files


def _deb_sources(debs: Sequence[str]) -> list[Source]:
    picked: list[tuple[str, bytes, str, str, str]] = []
    for deb in debs:
        package, files = read_deb(deb)
        for name, data in files.items():
            m = re.match(r"usr/share/backgrounds/mate/nature/([^/]+)\.jpe?g$", name, re.I)
            if m:
                picked.append((f"mate_{m.group(1)}", data, package, name,
                               "GPL-2+ or as listed in usr/share/doc/mate-backgrounds/copyright"))
        plasma: dict[str, tuple[int, str]] = {}
        for name in files:
            m = re.match(r"usr/share/wallpapers/([^/]+)/contents/images/(\d+)x(\d+)\.(jpe?g|png)$", name, re.I)
            if m:
                area = int(m.group(2)) * int(m.group(3))
                if area > plasma.get(m.group(1), (0, ""))[0]:
                    plasma[m.group(1)] = (area, name)
        for wall, (_, name) in plasma.items():
            meta = files.get(f"usr/share/wallpapers/{wall}/metadata.json")
            licence = "see usr/share/doc/plasma-workspace-wallpapers/copyright"
            if meta:
                try:
                    plugin = json.loads(meta).get("KPlugin", {})
                    authors = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
                    licence = f"{plugin.get('License', licence)} ({authors})" if authors else plugin.get("License", licence)
                except ValueError:
                    pass
            picked.append((f"plasma_{wall}", files[name], package, name, licence))
    picked.sort(key=lambda p: p[0])
    return [Source(stem, data, pkg, path, lic, "val" if i % DEB_VAL_EVERY == DEB_VAL_EVERY - 1 else "train")
            for i, (stem, data, pkg, path, lic) in enumerate(picked)]


def write_sample_data(out: str | os.PathLike, wheel: Optional[str | Sequence[str]] = None,
                      debs: Sequence[str] = (), max_side: int = 640) -> dict[str, list[Path]]:
    """Write ``out/train``, ``out/val`` and ``out/SOURCES.json``; returns the written paths per split."""
    from PIL import Image

    wheels = [wheel] if isinstance(wheel, str) else list(wheel or ())
    sources = _python_sources(wheels) + _deb_sources(debs)
    if not any(s.package == "scikit-image" for s in sources):
        raise SystemExit("no sample images found in scikit-image: pip install scikit-image (or pass --wheel)")
    out = Path(out)
    written: dict[str, list[Path]] = {"train": [], "val": []}
    manifest = []
    for s in sources:
        (out / s.split).mkdir(parents=True, exist_ok=True)
        img = Image.open(io.BytesIO(s.data))
        img.load()
        img = img.convert("RGB")
        if max(img.size) > max_side:
            f = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.LANCZOS)
        path = out / s.split / f"{s.name}.png"
        img.save(path)
        written[s.split].append(path)
        manifest.append({"file": f"{s.split}/{s.name}.png", "package": s.package, "path": s.path,
                         "licence": s.licence, "size": list(img.size)})
    (out / "SOURCES.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--wheel", action="append", default=[], help="a package wheel to read images from (repeatable)")
    parser.add_argument("--deb", action="append", default=[], help="a Debian wallpaper package (repeatable)")
    parser.add_argument("--max-side", type=int, default=640)
    args = parser.parse_args()
    written = write_sample_data(args.out, args.wheel, args.deb, args.max_side)
    print(json.dumps({k: len(v) for k, v in written.items()}))


if __name__ == "__main__":
    main()
