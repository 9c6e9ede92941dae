"""Progress and cancellation of one call: ``progress(done, total)`` after every unit of work (a
whole-batch stage or a tile), with fractional ``done`` between units where a unit runs long (see
:meth:`Progress.tick`), and ``cancel()`` checked between units.

One :class:`Progress` serves a whole call: the tiled functions count tiles on it, the pipeline
counts stages, and a tiled call nested in a pipeline stage reports through :meth:`Progress.stage`.
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


class Cancelled(Exception):
    """Raised when ``cancel()`` returns True between two units of work; the models stay usable."""


class Progress:
    """Counts finished units against a total. The total is either planned up front (:meth:`plan`:
    it then stays fixed, so a progress bar only moves forward) or grows as stages report theirs."""

    def __init__(self, progress: ProgressFn = None, cancel: CancelFn = None, total: int = 0):
        self.progress, self.cancel = progress, cancel
        self.done, self.total = 0, int(total)
        self.planned = False

    def plan(self, total: int) -> None:
        """Fix the total of the whole call (stages and tiles counted in advance)."""
        self.total, self.planned = int(total), True

    def check(self) -> None:
        """Raise :class:`Cancelled` if the caller asks to stop."""
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"cancelled by the caller after {self.done} of {max(self.total, self.done)} steps")

    def advance(self, n: int = 1) -> None:
        """``n`` planned units are done."""
        self.done += n
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def tick(self, fraction: float) -> None:
        """A part (0 < ``fraction`` < 1) of the unit under way is done: a report between two units,
        for stages that run long as one unit (a UNet pass or a VAE decode on a CPU). ``done`` is
        then fractional; the next :meth:`advance` reaches the whole unit."""
        if self.progress is not None and 0.0 < fraction < 1.0:
            self.progress(self.done + fraction, max(self.total, self.done + 1))

    def step(self, n: int = 1) -> None:
        """``n`` units of an untiled stage are done (they join the total unless it was planned)."""
        if not self.planned:
            self.total += n
        self.advance(n)

    def stage(self) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` for one nested call: its total joins ours on the first report."""
        start, planned = self.done, []

        def report(done: int, total: int) -> None:
            if not planned:
                planned.append(total)
                if not self.planned:
                    self.total += total
            self.advance(start + done - self.done)

        return report
