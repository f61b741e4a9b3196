"""How many tokens/s the engine generates with a full batch, learned from its own steps.

Boundary: pure state, no clock, no vLLM: the scheduler passes each step's end time, how many
requests the step ran and how many of them got a token. The reading-rate budget of the policy
(``Capacity.tokens_per_s``) is this estimate: only nearly full steps count, as the budget
matters only when the batch is full, and prefill steps count too (a newcomer's prefill spends
the same throughput its readers would need).
"""

from __future__ import annotations


class ThroughputEstimate:
    """Exponentially weighted tokens per second over steps that ran at least ``full_at``
    requests. ``value`` is ``None`` until ``min_steps`` such steps were seen."""

    def __init__(self, full_at: int, alpha: float = 0.05, min_steps: int = 20,
                 max_gap_s: float = 2.0) -> None:
        if full_at < 1 or not 0 < alpha <= 1:
            raise ValueError("full_at must be >= 1 and alpha in (0, 1]")
        self.full_at = full_at
        self.alpha = alpha
        self.min_steps = min_steps
        self.max_gap_s = max_gap_s
        self._last: float | None = None
        self._tokens = 0.0
        self._seconds = 0.0
        self._steps = 0

    def observe(self, now: float, ran: int, tokens: int) -> None:
        """A step that ran ``ran`` requests ended at ``now`` and yielded ``tokens`` tokens.
        Its duration is the time since the previous step ended (idle gaps are skipped)."""
        last, self._last = self._last, (now if ran > 0 else None)
        if last is None or ran < self.full_at:
            return
        dt = now - last
        if not 0 < dt <= self.max_gap_s:
            return
        a = self.alpha if self._steps else 1.0
        self._tokens += a * (tokens - self._tokens)
        self._seconds += a * (dt - self._seconds)
        self._steps += 1

    @property
    def value(self) -> float | None:
        if self._steps < self.min_steps or self._seconds <= 0:
            return None
        return self._tokens / self._seconds
