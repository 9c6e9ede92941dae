"""Writing files so that nothing is lost: atomic replace, the usual permissions, fsync, and the
clean-up of what a killed writer left behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]
#: hidden temporary files of :func:`atomic_write`: ``.rcod-tmp-<pid>-<random><suffix>``
TEMP_PREFIX = ".rcod-tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then give it the usual permissions
    (0666 less the umask), fsync it and rename it over ``path``; on any error the temporary file goes.
    The suffix is kept, so writers that pick a format by suffix work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temp_files(folder: PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` (their process is gone); the
    files of live writers — other processes of a sharded run — stay. Returns what was removed."""
    removed = []
    for f in Path(folder).glob(f"{TEMP_PREFIX}*"):
        pid = f.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
