"""Progress of long loops: a tqdm bar on a terminal; elsewhere (a background run's log file) a
line with the count, the rate and the time left at most every :data:`LOG_EVERY_S` seconds."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Seconds between two progress lines in a log.
LOG_EVERY_S = 60.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class LogProgress:
    """The part of tqdm's interface the loops use (``update``, ``close``), as log lines."""

    def __init__(self, total: int, desc: str, unit: str = "ex", every: float = LOG_EVERY_S) -> None:
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, float(every)
        self.n = 0
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last < self.every or self.n >= self.total:
            return
        self.last = now
        rate = self.n / max(now - self.started, 1e-9)
        log.info("%s: %d/%d %s, %.2f %s/s, about %s left", self.desc, self.n, self.total, self.unit, rate,
                 self.unit, _duration((self.total - self.n) / rate))

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "ex", enabled: bool = True):
    """A tqdm bar on a terminal, :class:`LogProgress` elsewhere, nothing when not ``enabled``."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(total, desc, unit, every=LOG_EVERY_S)
    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled)
