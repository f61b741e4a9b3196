"""Per-request timing (TTFT, TPOT, end-to-end) and token counts, recorded into metrics.

Boundary: pure bookkeeping over timestamps passed in; ``finish`` writes to ``ServingMetrics``.
TTFT runs from the request's arrival at the HTTP server (``arrival.py``: stamped by Ray
Serve's proxy, so the proxy and router queues count) to the moment the first output token
was written to the client's stream (``on_written``); a non-streaming answer has no such
moment and stops the clock at the first token from the engine. TPOT per choice is
``(t_last - t_first) / (tokens - 1)`` over the engine's deltas, averaged over choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..metrics import ServingMetrics


@dataclass
class _Choice:
    first: float | None = None
    last: float | None = None
    tokens: int = 0


@dataclass
class RequestMeter:
    metrics: ServingMetrics
    tenant: str
    adapter_label: str
    arrival: float
    prompt_tokens: int = 0
    choices: dict[int, _Choice] = field(default_factory=dict)
    first_written: float | None = None
    finished: bool = False

    def on_tokens(self, index: int, n_tokens: int, now: float) -> None:
        if n_tokens <= 0:
            return
        c = self.choices.setdefault(index, _Choice())
        if c.first is None:
            c.first = now
        c.last = now
        c.tokens += n_tokens

    def on_written(self, now: float) -> None:
        """The first token's bytes were handed to the client's connection."""
        if self.first_written is None:
            self.first_written = now

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    def ttft(self) -> float | None:
        if self.first_written is not None:
            return self.first_written - self.arrival
        firsts = [c.first for c in self.choices.values() if c.first is not None]
        return (min(firsts) - self.arrival) if firsts else None

    def tpot(self) -> float | None:
        per_choice = [
            (c.last - c.first) / (c.tokens - 1)
            for c in self.choices.values()
            if c.first is not None and c.last is not None and c.tokens > 1
        ]
        return sum(per_choice) / len(per_choice) if per_choice else None

    def finish(self, status: int, now: float) -> None:
        if self.finished:
            return
        self.finished = True
        m, labels = self.metrics, (self.tenant, self.adapter_label)
        m.requests.labels(*labels, str(status)).inc()
        if status != 200:
            return
        m.prompt_tokens.labels(*labels).inc(self.prompt_tokens)
        m.generation_tokens.labels(*labels).inc(self.completion_tokens)
        ttft = self.ttft()
        if ttft is not None:
            m.ttft.labels(*labels).observe(ttft)
            m.e2e.labels(*labels).observe(now - self.arrival)
        tpot = self.tpot()
        if tpot is not None:
            m.tpot.labels(*labels).observe(tpot)
