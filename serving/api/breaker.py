"""A circuit breaker for a store that may stop answering without refusing (packets dropped).

Boundary: pure state, no I/O. The caller asks ``allow(now)`` before a call and reports
``failure(now)`` or ``success()`` after it. A refused connection fails in microseconds; a
black-holed one fails only when a timeout runs out, so without a breaker every request waits
out that timeout. The rule:

- closed: every call goes through;
- a slow failure (a deadline ran out), or ``threshold`` fast ones in a row, opens it for
  ``retry_after_s``: no call goes through, callers answer from what they know (a cache, a
  local fallback) or fail fast. One fast failure does not: the first command on a pooled
  connection to a restarted server fails at once, and the caller's retry must reach it;
- after that, exactly one call (the probe) goes through at a time; its success closes the
  breaker, its failure opens it again. Callers that arrive while the probe is in flight are
  refused like an open breaker, so a store that hangs costs one waiting call, not one per
  request.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CircuitBreaker"]


@dataclass
class CircuitBreaker:
    retry_after_s: float = 2.0
    threshold: int = 2
    # While open, no call goes through before _open_until (the caller's monotonic clock).
    _open: bool = False
    _open_until: float = 0.0
    _probing: bool = False
    _failures: int = 0

    @property
    def closed(self) -> bool:
        return not self._open

    def allow(self, now: float) -> bool:
        """Whether a call may go through now; a call allowed while open is the probe, and
        the caller must report its outcome (``success`` or ``failure``)."""
        if not self._open:
            return True
        if self._probing or now < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        self._open = False

    def failure(self, now: float, *, slow: bool = False) -> None:
        self._failures += 1
        self._probing = False
        if slow or self._failures >= self.threshold:
            self._open = True
            self._open_until = now + self.retry_after_s

    def abandon(self) -> None:
        """The probe ended without an outcome (cancelled): let the next caller probe."""
        self._probing = False
