"""How long an engine step takes, learned online from the engine's own steps.

Boundary: pure state, no clock, no vLLM, no I/O. The scheduler reports every step (prefill
included): how many sequences it ran, how many tokens it computed and how long it took. The
fit is ``seconds = base + per_sequence * n + per_token * tokens`` by exponentially decayed
least squares, with non-negative coefficients. The policy turns it into per-stream speed
(``1 / step``) and batch throughput (``n / step``) at any batch size
(:class:`~.model.StepCost`), so it can tell before the batch is full when adding a stream
would leave every running stream slower than its reader.

Rules, and why:
- Every step counts, not only full ones: the question is how fast a batch of *any* size
  runs, and a burst's prefill steps are what separate the per-token cost from the
  per-sequence one.
- Old steps fade (``decay`` per step): the cost moves with the prompt mix, adapters in the
  batch and a neighbour's load on the machine.
- The slopes are shrunk slightly towards zero (``ridge``): while the steps seen so far all ran
  the same batch size the slopes are not identified, and the fit then says "a bigger batch
  costs nothing more", which admits until the engine's own steps show otherwise (the
  scheduler must not get in the way on evidence it does not have).
- Coefficients are never negative: noise must not predict that a bigger batch runs faster.
"""

from __future__ import annotations

import itertools
import math

from .model import StepCost

_FEATURES = 3  # 1, sequences, tokens


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """``a x = b`` by Gaussian elimination with partial pivoting; ``None`` if singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


class StepCostModel:
    """Decayed least-squares fit of step seconds against (1, sequences, tokens).

    ``estimate`` is ``None`` until ``min_steps`` steps were seen."""

    def __init__(self, decay: float = 0.995, min_steps: int = 20, ridge: float = 1e-4,
                 max_step_s: float = 30.0) -> None:
        if not 0 < decay <= 1 or min_steps < 1 or ridge < 0 or max_step_s <= 0:
            raise ValueError("decay in (0, 1], min_steps >= 1, ridge >= 0, max_step_s > 0")
        self.decay = decay
        self.min_steps = min_steps
        self.ridge = ridge
        self.max_step_s = max_step_s
        self._xx = [[0.0] * _FEATURES for _ in range(_FEATURES)]
        self._xy = [0.0] * _FEATURES
        self._yy = 0.0
        self._steps = 0
        self._cached: StepCost | None = None
        self._stale = False

    @property
    def steps(self) -> int:
        return self._steps

    def observe(self, seconds: float, sequences: int, tokens: int) -> None:
        """A step that ran ``sequences`` sequences over ``tokens`` tokens took ``seconds``.
        Empty steps and implausible durations (<= 0, > ``max_step_s``, NaN) are ignored."""
        if sequences <= 0 or tokens <= 0 or not 0 < seconds <= self.max_step_s:
            return
        x = (1.0, float(sequences), float(tokens))
        d = self.decay
        for i in range(_FEATURES):
            self._xy[i] = d * self._xy[i] + x[i] * seconds
            for j in range(_FEATURES):
                self._xx[i][j] = d * self._xx[i][j] + x[i] * x[j]
        self._yy = d * self._yy + seconds * seconds
        self._steps += 1
        self._stale = True

    @property
    def estimate(self) -> StepCost | None:
        if self._steps < self.min_steps:
            return None
        if self._stale:
            self._cached = self._fit()
            self._stale = False
        return self._cached

    def _fit(self) -> StepCost | None:
        """Non-negative least squares by trying each subset of terms (there are three)."""
        weight = self._xx[0][0]
        best: tuple[float, list[float]] | None = None
        for k in range(_FEATURES, 0, -1):
            for subset in itertools.combinations(range(_FEATURES), k):
                a = [[self._xx[i][j] + (self.ridge * weight if i == j and i > 0 else 0.0)
                      for j in subset] for i in subset]
                sol = _solve(a, [self._xy[i] for i in subset])
                if sol is None or any(c < 0 for c in sol):
                    continue
                theta = [0.0] * _FEATURES
                for i, c in zip(subset, sol, strict=True):
                    theta[i] = c
                sse = self._yy - 2 * sum(t * y for t, y in zip(theta, self._xy, strict=True)) + sum(
                    theta[i] * self._xx[i][j] * theta[j]
                    for i in range(_FEATURES) for j in range(_FEATURES))
                sse += self.ridge * weight * (theta[1] ** 2 + theta[2] ** 2)
                if best is None or sse < best[0] - 1e-15:
                    best = (sse, theta)
        if best is None or not all(math.isfinite(c) for c in best[1]):
            return None
        base, per_seq, per_token = best[1]
        if base + per_seq + per_token <= 0:
            return None
        return StepCost(base_s=base, per_sequence_s=per_seq, per_token_s=per_token)
