"""Pure metric computations over plain token timelines.

Nothing here reads a clock, a socket or a file: every function takes recorded times (seconds,
relative to the moment the request was sent) and returns numbers, so the tests can feed
hand-made timelines.

Per-request figures
-------------------
- **TTFT**: arrival time of the first output token (streaming only; ``None`` otherwise).
- **e2e**: time from sending the request to the end of the response.
- **TPOT**: ``(e2e - ttft) / (n_out - 1)`` (``None`` when ``n_out < 2`` or not streaming).
- **ITL**: differences between consecutive token arrivals.
- **n_out**: ``usage.completion_tokens`` when the server sent it, else the number of content
  chunks.

Simulated reader: effective throughput and stall time (TokenFlow / Andes)
--------------------------------------------------------------------------
A streaming client shows tokens to a person who reads at ``c`` tokens/s. Let ``a_1 <= ... <=
a_n`` be the token arrival times. The reader starts with the first token: it reads token 1 at
``r_1 = a_1``. It then *needs* token ``i`` at ``d_i = r_{i-1} + 1/c``; if the token is already
there it reads it at ``d_i``, otherwise it waits: ``r_i = max(d_i, a_i)``. The wait
``max(0, a_i - d_i)`` is **stall time** (the buffer was empty), and the schedule shifts by it.
Token ``i`` is **on time** when ``a_i <= d_i`` (token 1 is on time by definition: the wait for
it is the TTFT, counted separately). The **effective tokens** of a request are its on-time
tokens; the **effective throughput** of a run is the sum of effective tokens over all requests
divided by the run's duration. With ``c = inf`` every token is on time and nothing stalls.

When the server sends several tokens in one chunk (or the usage count exceeds the number of
content chunks), the extra tokens are taken to arrive with the last chunk: they were held back,
so counting them late is the conservative choice.

On-schedule tokens: the user's own timeline
-------------------------------------------
The simulated reader forgives a late first token (that wait is the TTFT) and forgives every
stall once it has happened (its schedule shifts). A user who asked at ``0`` and expects the first
token within the TTFT target ``T`` and then reads on at ``c`` tokens/s has a fixed timeline
instead (Andes' "expected token delivery timeline"): token ``i`` (1-based) is due at
``T + (i - 1) / c``. Token ``i`` is **on schedule** when ``a_i`` is no later than that. A request
that waited 10 s for its first token, or that stalled for 10 s in the middle, is behind its
user's timeline until generation catches up with it; a paused stream whose buffer covered the
pause loses nothing. **On-schedule throughput** is the sum of on-schedule tokens over the run's
duration; without a TTFT target or a reader rate it equals the effective throughput.
Non-streaming requests count the same in both.

Non-streaming requests have no buffer; they have a deadline instead:
``deadline = ttft_slo + tpot_slo * (n_out - 1)``. Their ``n_out`` tokens are all effective if the
request succeeded and ``e2e <= deadline``, none otherwise (no stall time is defined).

SLO attainment: a successful streaming request attains its SLO when ``ttft <= ttft_s`` and
(if it has a TPOT) ``tpot <= tpot_s``; a non-streaming one when it met its deadline. Failed
requests never attain it. Attainment is the fraction over *all* requests, failed ones included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

PERCENTILES: tuple[int, ...] = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Latency targets. ``None`` means no target for that figure."""

    ttft_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class RequestRecord:
    """What the client observed for one request (times relative to sending it)."""

    index: int
    tenant: str
    adapter: str
    stream: bool
    scheduled_s: float
    """When the request was planned to start, relative to the run start."""
    start_s: float
    """When it was actually sent, relative to the run start."""
    token_times: tuple[float, ...] = ()
    """Arrival time of each content chunk (streaming), relative to ``start_s``."""
    e2e_s: float | None = None
    n_out: int = 0
    prompt_tokens: int | None = None
    status: int | None = None
    """HTTP status; ``None`` when no answer came (connection error, timeout, cancelled)."""
    error: str | None = None
    reader_rate: float = math.inf
    max_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass(frozen=True)
class ReaderOutcome:
    """Result of replaying a token timeline through the simulated reader."""

    on_time: int
    stall_s: float
    read_end_s: float | None


@dataclass(frozen=True)
class RequestMetrics:
    """Derived per-request figures (see the module docstring for definitions)."""

    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    itls_s: tuple[float, ...]
    n_out: int
    effective_tokens: int
    stall_s: float
    slo_ok: bool
    on_schedule_tokens: int = 0


def expand_token_times(chunk_times: Sequence[float], n_out: int) -> list[float]:
    """Token arrival times from chunk arrival times, given the total token count ``n_out``.

    Extra tokens (``n_out > len(chunk_times)``) arrive with the last chunk; surplus chunks
    (``n_out < len(chunk_times)``, e.g. an empty-text chunk) are dropped from the end.
    """
    times = sorted(chunk_times)
    if not times or n_out <= 0:
        return []
    if n_out <= len(times):
        return times[:n_out]
    return times + [times[-1]] * (n_out - len(times))


def simulate_reader(token_times: Sequence[float], rate: float) -> ReaderOutcome:
    """Replay arrival times through a reader consuming ``rate`` tokens/s (module docstring)."""
    if not token_times:
        return ReaderOutcome(on_time=0, stall_s=0.0, read_end_s=None)
    if rate <= 0:
        raise ValueError(f"reader rate must be > 0, got {rate}")
    times = sorted(token_times)
    if math.isinf(rate):  # no reader: the client takes tokens as they come
        return ReaderOutcome(on_time=len(times), stall_s=0.0, read_end_s=times[-1])
    step = 1.0 / rate
    read_at = times[0]
    on_time = 1
    stall = 0.0
    for arrival in times[1:]:
        needed_at = read_at + step
        if arrival <= needed_at + 1e-12:
            on_time += 1
            read_at = needed_at
        else:
            stall += arrival - needed_at
            read_at = arrival
    return ReaderOutcome(on_time=on_time, stall_s=stall, read_end_s=read_at)


def on_schedule(token_times: Sequence[float], rate: float, first_due_s: float) -> int:
    """Tokens arriving no later than a user's fixed timeline needs them (module docstring):
    token ``i`` (0-based, arrivals sorted) is due at ``first_due_s + i / rate``."""
    if rate <= 0 or math.isinf(rate):
        raise ValueError(f"reader rate must be finite and > 0, got {rate}")
    step = 1.0 / rate
    return sum(1 for i, t in enumerate(sorted(token_times)) if t <= first_due_s + i * step + 1e-12)


def inter_token_latencies(token_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive arrivals (sorted)."""
    times = sorted(token_times)
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def tpot(ttft_s: float | None, e2e_s: float | None, n_out: int) -> float | None:
    """``(e2e - ttft) / (n_out - 1)``, or ``None`` when undefined."""
    if ttft_s is None or e2e_s is None or n_out < 2:
        return None
    return max(0.0, e2e_s - ttft_s) / (n_out - 1)


def deadline(n_out: int, slo: SLO) -> float | None:
    """Deadline of a non-streaming request: ``ttft_s + tpot_s * (n_out - 1)``."""
    if slo.ttft_s is None and slo.tpot_s is None:
        return None
    return (slo.ttft_s or 0.0) + (slo.tpot_s or 0.0) * max(0, n_out - 1)


def request_metrics(rec: RequestRecord, slo: SLO) -> RequestMetrics:
    """All derived figures of one request."""
    if not rec.ok:
        ttft = rec.token_times[0] if rec.stream and rec.token_times else None
        return RequestMetrics(ttft, None, rec.e2e_s, (), rec.n_out, 0, 0.0, False)
    if not rec.stream:
        limit = deadline(rec.n_out, slo)
        met = rec.e2e_s is not None and (limit is None or rec.e2e_s <= limit)
        return RequestMetrics(
            ttft_s=None,
            tpot_s=None,
            e2e_s=rec.e2e_s,
            itls_s=(),
            n_out=rec.n_out,
            effective_tokens=rec.n_out if met else 0,
            stall_s=0.0,
            slo_ok=met,
            on_schedule_tokens=rec.n_out if met else 0,
        )
    times = expand_token_times(rec.token_times, rec.n_out)
    ttft = min(rec.token_times) if rec.token_times else None
    per_token = tpot(ttft, rec.e2e_s, rec.n_out)
    reader = simulate_reader(times, rec.reader_rate)
    slo_ok = ttft is not None
    if slo_ok and slo.ttft_s is not None:
        slo_ok = ttft <= slo.ttft_s  # type: ignore[operator]
    if slo_ok and slo.tpot_s is not None and per_token is not None:
        slo_ok = per_token <= slo.tpot_s
    return RequestMetrics(
        ttft_s=ttft,
        tpot_s=per_token,
        e2e_s=rec.e2e_s,
        itls_s=tuple(inter_token_latencies(rec.token_times)),
        n_out=rec.n_out,
        effective_tokens=reader.on_time,
        stall_s=reader.stall_s,
        slo_ok=slo_ok,
        on_schedule_tokens=(reader.on_time if slo.ttft_s is None or math.isinf(rec.reader_rate)
                            else on_schedule(times, rec.reader_rate, slo.ttft_s)),
    )


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default)."""
    data = sorted(values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 of some values (``None`` entries when there are none)."""
    data = list(values)
    out: dict[str, float | None] = {"mean": sum(data) / len(data) if data else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(data, q)
    return out


@dataclass(frozen=True)
class Summary:
    """Aggregated figures for a set of requests over a run of ``duration_s`` seconds."""

    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    effective_tokens: int
    effective_tokens_per_s: float
    on_schedule_tokens: int
    on_schedule_tokens_per_s: float
    stall_s_total: float
    stalled_requests: int
    slo_attainment: float | None
    ttft_s: dict[str, float | None] = field(default_factory=dict)
    tpot_s: dict[str, float | None] = field(default_factory=dict)
    itl_s: dict[str, float | None] = field(default_factory=dict)
    e2e_s: dict[str, float | None] = field(default_factory=dict)
    stall_s: dict[str, float | None] = field(default_factory=dict)


def error_key(rec: RequestRecord) -> str | None:
    """How a failed request is counted in ``errors`` (HTTP status, or the error's kind)."""
    if rec.ok:
        return None
    if rec.status is not None and rec.status != 200:
        return str(rec.status)
    return (rec.error or "unknown").split(":", 1)[0]


def summarize(
    pairs: Sequence[tuple[RequestRecord, RequestMetrics]], duration_s: float
) -> Summary:
    """Aggregate per-request figures; rates are per second of ``duration_s``."""
    ok = [(r, m) for r, m in pairs if r.ok]
    errors: dict[str, int] = {}
    for rec, _ in pairs:
        key = error_key(rec)
        if key is not None:
            errors[key] = errors.get(key, 0) + 1
    dur = max(duration_s, 1e-9)
    out_tokens = sum(m.n_out for _, m in ok)
    eff_tokens = sum(m.effective_tokens for _, m in ok)
    sched_tokens = sum(m.on_schedule_tokens for _, m in ok)
    streamed = [m for r, m in ok if r.stream]
    return Summary(
        requests=len(pairs),
        ok=len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration_s,
        requests_per_s=len(ok) / dur,
        output_tokens=out_tokens,
        output_tokens_per_s=out_tokens / dur,
        effective_tokens=eff_tokens,
        effective_tokens_per_s=eff_tokens / dur,
        on_schedule_tokens=sched_tokens,
        on_schedule_tokens_per_s=sched_tokens / dur,
        stall_s_total=sum(m.stall_s for m in streamed),
        stalled_requests=sum(1 for m in streamed if m.stall_s > 0),
        slo_attainment=(sum(1 for _, m in pairs if m.slo_ok) / len(pairs)) if pairs else None,
        ttft_s=distribution(m.ttft_s for m in streamed if m.ttft_s is not None),
        tpot_s=distribution(m.tpot_s for m in streamed if m.tpot_s is not None),
        itl_s=distribution(x for m in streamed for x in m.itls_s),
        e2e_s=distribution(m.e2e_s for _, m in ok if m.e2e_s is not None),
        stall_s=distribution(m.stall_s for m in streamed),
    )


def summarize_by(
    pairs: Sequence[tuple[RequestRecord, RequestMetrics]],
    duration_s: float,
    key: Callable[[RequestRecord], str],
) -> dict[str, Summary]:
    """One :class:`Summary` per group (e.g. ``key=lambda r: r.tenant``)."""
    groups: dict[str, list[tuple[RequestRecord, RequestMetrics]]] = {}
    for rec, met in pairs:
        groups.setdefault(key(rec), []).append((rec, met))
    return {name: summarize(items, duration_s) for name, items in sorted(groups.items())}


def throughput_timeline(
    pairs: Sequence[tuple[RequestRecord, RequestMetrics]], bin_s: float, duration_s: float
) -> list[tuple[float, float]]:
    """Output tokens/s per time bin over the run (for the throughput-over-time plot)."""
    n_bins = max(1, math.ceil(duration_s / bin_s))
    counts = [0] * n_bins
    for rec, met in pairs:
        if not rec.ok:
            continue
        if rec.stream:
            times = expand_token_times(rec.token_times, met.n_out)
        else:
            times = [rec.e2e_s or 0.0] * met.n_out
        for t in times:
            idx = min(n_bins - 1, max(0, int((rec.start_s + t) / bin_s)))
            counts[idx] += 1
    return [(i * bin_s, c / bin_s) for i, c in enumerate(counts)]
