"""``python -m rcod_core.cli`` (e.g. under ``accelerate launch`` or ``torchrun``): the ``rcod`` command,
implemented in :mod:`rcod_core.tools.cli`."""

from .tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
