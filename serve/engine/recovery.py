"""How a pool brings back a copy of the model whose engine process died, and when it gives up.

``Recovery`` holds the settings (ENGINE_MAX_RESTARTS, ENGINE_RESTART_WINDOW_S, ENGINE_STALL_TIMEOUT_S);
``CrashWindow`` counts the crashes of one pool within the window and says how long to wait before the next restart,
or that it is time to give up (the worker then exits, so the platform replaces the instance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from serve.engine.types import EngineStats

FIRST_BACKOFF_S = 1.0  # the wait before the first restart; doubled for each other crash still in the window
LAST_BACKOFF_S = 30.0  # the longest wait between a crash and its restart
CUMULATIVE = (
    "prefix_queried_tokens",
    "prefix_hit_tokens",
    "preemptions",
    "steps",
    "steps_ahead",
    "busy_seconds",
    "speculative_proposed",
    "speculative_accepted",
    "speculative_lengths",
)


@dataclass(frozen=True)
class Recovery:
    """A pool's restart policy: at most ``max_restarts`` restarts within ``window_s`` seconds (one crash more and the
    pool gives up), and a copy with work in flight that made no step for ``stall_timeout_s`` seconds is not ready
    (0: never)."""

    max_restarts: int = 3
    window_s: float = 600.0
    stall_timeout_s: float = 60.0


class CrashWindow:
    """The crashes of the last ``window_s`` seconds; ``crashed()`` answers the wait before the restart, or None when
    the crash is one too many."""

    def __init__(self, recovery: Recovery, clock: Callable[[], float] = time.monotonic):
        self._recovery = recovery
        self._clock = clock
        self._crashes: list[float] = []

    def crashed(self) -> Optional[float]:
        """Count a crash now; the seconds to wait before restarting, or None to give up."""
        now = self._clock()
        self._crashes = [at for at in self._crashes if now - at < self._recovery.window_s] + [now]
        recent = len(self._crashes)
        if recent > self._recovery.max_restarts:
            return None
        return min(FIRST_BACKOFF_S * 2 ** (recent - 1), LAST_BACKOFF_S)

    @property
    def recent(self) -> int:
        """Crashes counted within the window (as of the last one)."""
        return len(self._crashes)


def counters_only(stats: EngineStats) -> EngineStats:
    """The counters of a dead engine process, which its successor's add to (its gauges died with it)."""
    return EngineStats(**{name: getattr(stats, name) for name in CUMULATIVE})
