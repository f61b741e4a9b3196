"""What the scheduler remembers about one request between steps, as one frozen record.

Boundary: pure. ``now`` is passed in. The vLLM scheduler subclass keeps one
:class:`RequestTrack` per request it has seen (built from the request's extension args once)
and replaces it as the request gets tokens, pauses and starts again; the policy's
:class:`~.model.RequestView` is built from vLLM's request plus this record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .policy import advance_reader


@dataclass(frozen=True)
class RequestTrack:
    """One request's scheduling state that vLLM's ``Request`` does not hold."""

    streaming: bool
    rate: float
    """Tokens/s its client reads (declared, else the default); looked up once."""
    tenant: str | None = None
    """The tenant that sent it, as the engine passed it; ``None``: not given."""
    first_token_at: float | None = None
    reader_tokens: float = 0.0
    """Modelled reader: tokens it had paid for at ``reader_at`` (see ``policy.advance_reader``)."""
    reader_at: float | None = None
    delivered: int = 0
    """Tokens generated when the reader model was last moved on."""
    paused_since: float | None = None
    """Set while paused by a plan (or found preempted by vLLM)."""
    num_pauses: int = 0
    started_at: float | None = None
    """When a plan last admitted or resumed it."""
    resumed_at: float | None = None
    """When a plan resumed it, until its context is back (resume latency)."""

    def delivered_to(self, delivered: int, now: float) -> RequestTrack:
        """``delivered`` tokens generated as of ``now`` (the first one starts the reader)."""
        if delivered <= 0:
            return self
        if self.first_token_at is None:
            return replace(self, first_token_at=now, reader_tokens=0.0, reader_at=now,
                           delivered=delivered)
        if delivered <= self.delivered or self.reader_at is None:
            return self
        read, at = advance_reader(self.reader_tokens, self.reader_at, self.delivered, self.rate, now)
        return replace(self, reader_tokens=read, reader_at=at, delivered=delivered)

    def paused(self, now: float) -> RequestTrack:
        return replace(self, paused_since=now, num_pauses=self.num_pauses + 1, resumed_at=None)

    def started(self, now: float) -> RequestTrack:
        """Admitted or resumed by a plan at ``now``."""
        was_paused = self.paused_since is not None
        return replace(self, paused_since=None, started_at=now,
                       resumed_at=now if was_paused else self.resumed_at)
