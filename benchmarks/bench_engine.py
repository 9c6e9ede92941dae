#!/usr/bin/env python
"""The engine benchmark: ``rcod bench`` (rcod_core/bench.py) as a script. See ``--help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rcod_core.tools.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
