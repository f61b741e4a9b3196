"""Workload description (pydantic), loading from YAML, and seeded generation of a request plan.

Boundary: :func:`load_workload` reads the file (and a trace file it names) and
:func:`resolve_api_keys` reads the environment; :func:`generate_plan` is pure and deterministic:
the same workload (same seed) always yields the same plan. Each aspect (arrivals, tenants,
models, prompts, lengths, streaming, reader rates) draws from its own seeded stream, so changing
one aspect does not reshuffle the others.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorafleet.loadtest.errors import WorkloadError


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- distributions -------------------------------------------------------------------------


class Constant(_Model):
    dist: Literal["constant"] = Field(description="Always the same value.")
    value: float = Field(description="The value.")


class Uniform(_Model):
    dist: Literal["uniform"] = Field(description="Uniform between low and high.")
    low: float = Field(description="Lower bound (inclusive).")
    high: float = Field(description="Upper bound (inclusive).")

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.high < self.low:
            raise ValueError("high must be >= low")
        return self


class Normal(_Model):
    dist: Literal["normal"] = Field(description="Normal distribution, clipped to [min, max].")
    mean: float = Field(description="Mean.")
    std: float = Field(ge=0, description="Standard deviation.")
    min: float | None = Field(default=None, description="Values below are clipped to this.")
    max: float | None = Field(default=None, description="Values above are clipped to this.")


class LogNormal(_Model):
    dist: Literal["lognormal"] = Field(
        description="Log-normal distribution given by its median, clipped to [min, max]."
    )
    median: float = Field(gt=0, description="Median (exp of the underlying normal's mean).")
    sigma: float = Field(ge=0, description="Standard deviation of the underlying normal.")
    min: float | None = Field(default=None, description="Values below are clipped to this.")
    max: float | None = Field(default=None, description="Values above are clipped to this.")


Distribution = Annotated[Constant | Uniform | Normal | LogNormal, Field(discriminator="dist")]


def sample(dist: Constant | Uniform | Normal | LogNormal, rng: random.Random) -> float:
    """One draw from ``dist``."""
    if isinstance(dist, Constant):
        return dist.value
    if isinstance(dist, Uniform):
        return rng.uniform(dist.low, dist.high)
    if isinstance(dist, Normal):
        value = rng.gauss(dist.mean, dist.std)
    else:
        value = dist.median * math.exp(rng.gauss(0.0, dist.sigma))
    if dist.min is not None:
        value = max(dist.min, value)
    if dist.max is not None:
        value = min(dist.max, value)
    return value


# --- workload sections ---------------------------------------------------------------------


class TenantSpec(_Model):
    name: str = Field(min_length=1, description="Tenant name (used to group results).")
    api_key: str | None = Field(default=None, description="API key sent as a Bearer token.")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the API key (read at run time)."
    )
    weight: float = Field(default=1.0, gt=0, description="Relative share of the requests.")


class ModelEntry(_Model):
    model: str = Field(min_length=1, description="The `model` field to send (adapter or base).")
    tenant: str | None = Field(
        default=None, description="Only this tenant sends this model (None: any tenant)."
    )
    weight: float = Field(
        default=1.0, gt=0, description="Relative popularity when `popularity.kind` is weights."
    )


class Popularity(_Model):
    kind: Literal["zipf", "uniform", "weights"] = Field(
        default="uniform",
        description="zipf: entry k (1-based, in list order) has weight 1/k^s; uniform; or the "
        "entries' own weights.",
    )
    s: float = Field(default=1.0, gt=0, description="Zipf exponent (kind zipf only).")


class Models(_Model):
    popularity: Popularity = Field(
        default_factory=Popularity, description="How often each entry is chosen."
    )
    entries: list[ModelEntry] = Field(min_length=1, description="Models / adapters to request.")


class PoissonArrival(_Model):
    kind: Literal["poisson"] = Field(description="Open loop, exponential inter-arrival times.")
    rate: float = Field(gt=0, description="Requests per second.")


class BurstArrival(_Model):
    kind: Literal["bursts"] = Field(
        description="Open loop, Poisson at base_rate with on/off bursts at burst_rate."
    )
    base_rate: float = Field(ge=0, description="Requests per second outside bursts.")
    burst_rate: float = Field(gt=0, description="Requests per second during a burst.")
    burst_duration_s: float = Field(gt=0, description="Length of each burst.")
    period_s: float = Field(gt=0, description="A burst starts every period_s seconds.")
    first_burst_s: float = Field(default=0.0, ge=0, description="Start of the first burst.")

    @model_validator(mode="after")
    def _fits(self) -> BurstArrival:
        if self.burst_duration_s > self.period_s:
            raise ValueError("burst_duration_s must be <= period_s")
        return self


class TraceArrival(_Model):
    kind: Literal["trace"] = Field(description="Replay the timestamps of a trace file.")
    file: str = Field(
        description="File with one timestamp (seconds) per line, or a CSV whose first column is "
        "the timestamp; relative paths are relative to the workload file."
    )
    time_scale: float = Field(
        default=1.0, gt=0, description="Multiply gaps by this (0.5 replays twice as fast)."
    )


class ClosedArrival(_Model):
    kind: Literal["closed"] = Field(
        description="Closed loop: `concurrency` streams, each sends its next request when the "
        "previous one ends."
    )
    concurrency: int = Field(ge=1, le=1024, description="Number of concurrent streams.")


Arrival = Annotated[
    PoissonArrival | BurstArrival | TraceArrival | ClosedArrival, Field(discriminator="kind")
]


class Prompts(_Model):
    words: Distribution | None = Field(
        default=None, description="Synthetic prompt length in words (~tokens)."
    )
    prompts: list[str] | None = Field(
        default=None, description="A prompt set to draw from (uniformly) instead."
    )

    @model_validator(mode="after")
    def _one(self) -> Prompts:
        if (self.words is None) == (self.prompts is None):
            raise ValueError("give exactly one of `words` or `prompts`")
        if self.prompts is not None and not self.prompts:
            raise ValueError("`prompts` must not be empty")
        return self


class SLOSpec(_Model):
    ttft_s: float | None = Field(default=None, gt=0, description="Time-to-first-token target.")
    tpot_s: float | None = Field(default=None, gt=0, description="Time-per-output-token target.")


class Workload(_Model):
    name: str = Field(default="workload", description="Label for reports.")
    seed: int = Field(default=0, description="Seed of every random choice in the plan.")
    duration_s: float = Field(
        gt=0, le=24 * 3600, description="No request is started after this many seconds."
    )
    max_requests: int = Field(ge=1, le=1_000_000, description="At most this many requests.")
    max_concurrency: int = Field(
        default=64, ge=1, le=4096, description="At most this many requests in flight."
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="A request taking longer is cancelled and recorded."
    )
    endpoint: Literal["chat", "completions"] = Field(
        default="chat", description="/chat/completions or /completions."
    )
    tenants: list[TenantSpec] = Field(min_length=1, description="Who sends requests.")
    models: Models = Field(description="Which `model` values are requested, and how often.")
    arrival: Arrival = Field(description="When requests are sent.")
    prompts: Prompts = Field(description="Prompt lengths or a prompt set.")
    max_tokens: Distribution = Field(description="Output length (max_tokens) distribution.")
    ignore_eos: bool = Field(
        default=False, description="Ask the server to ignore EOS (vLLM extension): exact lengths."
    )
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature.")
    stream: bool | float = Field(
        default=True, description="Stream every request (true/false) or this fraction of them."
    )
    reader_rate: Distribution = Field(
        default_factory=lambda: LogNormal(dist="lognormal", median=6.0, sigma=0.25, min=2, max=20),
        description="Simulated reader speed in tokens/s (human reading is ~4-8).",
    )
    declare_reader_rate: bool = Field(
        default=False,
        description="Send each streaming request's reader speed to the server as LoRAFleet's "
        "`lorafleet.consumption_rate` extension (for servers that schedule by it).",
    )
    slo: SLOSpec = Field(default_factory=SLOSpec, description="Latency targets.")

    @model_validator(mode="after")
    def _consistent(self) -> Workload:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant names must be unique")
        for entry in self.models.entries:
            if entry.tenant is not None and entry.tenant not in names:
                raise ValueError(f"model {entry.model!r} names unknown tenant {entry.tenant!r}")
        for tenant in self.tenants:
            if not allowed_models(self, tenant.name):
                raise ValueError(f"tenant {tenant.name!r} may send no model entry")
            if tenant.api_key is not None and tenant.api_key_env is not None:
                raise ValueError(f"tenant {tenant.name!r}: give api_key or api_key_env, not both")
        if isinstance(self.stream, float) and not 0.0 <= self.stream <= 1.0:
            raise ValueError("stream as a fraction must be within 0..1")
        return self


def allowed_models(workload: Workload, tenant: str) -> list[tuple[int, ModelEntry]]:
    """(rank, entry) pairs a tenant may request, rank being the 1-based list position."""
    return [
        (i + 1, e)
        for i, e in enumerate(workload.models.entries)
        if e.tenant is None or e.tenant == tenant
    ]


# --- loading -------------------------------------------------------------------------------


def parse_workload(data: object, source: str = "<workload>") -> Workload:
    """Validate a decoded document; errors name the source and each offending path."""
    try:
        return Workload.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid workload {source}:"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise WorkloadError("\n".join(lines)) from None


def load_workload(path: str | Path) -> tuple[Workload, list[float] | None]:
    """Read and validate a YAML workload; also read its trace file when it names one."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise WorkloadError(f"cannot read workload {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise WorkloadError(f"workload {path} is not valid YAML: {exc}") from None
    workload = parse_workload(data, str(path))
    trace = None
    if isinstance(workload.arrival, TraceArrival):
        trace_path = Path(workload.arrival.file)
        if not trace_path.is_absolute():
            trace_path = path.parent / trace_path
        trace = load_trace(trace_path)
    return workload, trace


def load_trace(path: Path) -> list[float]:
    """Timestamps from a trace file (first numeric column; header and blank lines skipped)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    stamps: list[float] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        cell = line.split(",", 1)[0].strip()
        if not cell or cell.startswith("#"):
            continue
        try:
            stamps.append(float(cell))
        except ValueError:
            if stamps:  # only a header line may be non-numeric
                raise WorkloadError(f"trace {path}:{lineno}: not a timestamp: {cell!r}") from None
    if not stamps:
        raise WorkloadError(f"trace {path} has no timestamps")
    return stamps


def resolve_api_keys(
    workload: Workload, env: dict[str, str] | None = None, default: str | None = None
) -> dict[str, str | None]:
    """tenant -> API key (``api_key``, else ``$api_key_env``, else ``default``)."""
    env = dict(os.environ) if env is None else env
    keys: dict[str, str | None] = {}
    for tenant in workload.tenants:
        if tenant.api_key is not None:
            keys[tenant.name] = tenant.api_key
        elif tenant.api_key_env is not None:
            if tenant.api_key_env not in env:
                raise WorkloadError(
                    f"tenant {tenant.name!r}: environment variable {tenant.api_key_env} is not set"
                )
            keys[tenant.name] = env[tenant.api_key_env]
        else:
            keys[tenant.name] = default
    return keys


# --- generation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the plan. ``at_s`` is relative to the run start (0 for closed loops)."""

    index: int
    at_s: float
    tenant: str
    model: str
    prompt: str
    max_tokens: int
    stream: bool
    reader_rate: float


_WORDS = (
    "the of and to in is was for on that with as by at from his her an which are be this had "
    "not but or have they one were all their been has more when who will no if out so said "
    "what up its about into than them can only other new some time could these two may first "
    "then do any like my now over such our man me even most made after also did many before "
    "must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three river garden music city ocean "
    "story answer question"
)
_VOCAB = tuple(_WORDS.split())


def _rng(seed: int, aspect: str) -> random.Random:
    return random.Random(f"{seed}:{aspect}")


def arrival_times(workload: Workload, trace: Sequence[float] | None = None) -> list[float]:
    """Request start times within ``duration_s``, at most ``max_requests`` of them."""
    arr = workload.arrival
    limit, horizon = workload.max_requests, workload.duration_s
    rng = _rng(workload.seed, "arrival")
    times: list[float] = []
    if isinstance(arr, ClosedArrival):
        return [0.0] * limit
    if isinstance(arr, TraceArrival):
        if trace is None:
            raise WorkloadError("trace arrival needs the trace timestamps (use load_workload)")
        stamps = sorted(trace)
        for stamp in stamps:
            at = (stamp - stamps[0]) * arr.time_scale
            if at > horizon or len(times) >= limit:
                break
            times.append(at)
        return times
    if isinstance(arr, PoissonArrival):
        t = 0.0
        while len(times) < limit:
            t += rng.expovariate(arr.rate)
            if t > horizon:
                break
            times.append(t)
        return times
    # Bursts: non-homogeneous Poisson process by thinning.
    peak = max(arr.base_rate, arr.burst_rate)
    t = 0.0
    # Bounded: each candidate advances time by an exponential draw at the peak rate.
    max_candidates = limit * 4 + int(peak * horizon * 4) + 16
    for _ in range(max_candidates):
        t += rng.expovariate(peak)
        if t > horizon or len(times) >= limit:
            break
        if rng.random() * peak <= burst_rate_at(arr, t):
            times.append(t)
    return times


def burst_rate_at(arr: BurstArrival, t: float) -> float:
    """Instantaneous request rate of an on/off burst process at time ``t``."""
    if t < arr.first_burst_s:
        return arr.base_rate
    phase = (t - arr.first_burst_s) % arr.period_s
    return arr.burst_rate if phase < arr.burst_duration_s else arr.base_rate


def model_weights(workload: Workload, ranked: Sequence[tuple[int, ModelEntry]]) -> list[float]:
    """Selection weights of (rank, entry) pairs under the workload's popularity law."""
    pop = workload.models.popularity
    if pop.kind == "zipf":
        return [1.0 / rank**pop.s for rank, _ in ranked]
    if pop.kind == "weights":
        return [entry.weight for _, entry in ranked]
    return [1.0 for _ in ranked]


def generate_plan(workload: Workload, trace: Sequence[float] | None = None) -> list[PlannedRequest]:
    """The seeded request plan of a workload (pure and reproducible)."""
    times = arrival_times(workload, trace)
    seed = workload.seed
    r_tenant, r_model, r_prompt = _rng(seed, "tenant"), _rng(seed, "model"), _rng(seed, "prompt")
    r_len, r_stream, r_reader = _rng(seed, "max_tokens"), _rng(seed, "stream"), _rng(seed, "reader")
    tenant_names = [t.name for t in workload.tenants]
    tenant_weights = [t.weight for t in workload.tenants]
    per_tenant = {name: allowed_models(workload, name) for name in tenant_names}
    plan: list[PlannedRequest] = []
    for index, at in enumerate(times):
        tenant = r_tenant.choices(tenant_names, tenant_weights)[0]
        ranked = per_tenant[tenant]
        _, entry = r_model.choices(ranked, model_weights(workload, ranked))[0]
        plan.append(
            PlannedRequest(
                index=index,
                at_s=at,
                tenant=tenant,
                model=entry.model,
                prompt=_prompt(workload.prompts, r_prompt, index),
                max_tokens=max(1, round(sample(workload.max_tokens, r_len))),
                stream=_stream(workload.stream, r_stream),
                reader_rate=max(0.1, sample(workload.reader_rate, r_reader)),
            )
        )
    return plan


def _stream(spec: bool | float, rng: random.Random) -> bool:
    draw = rng.random()  # always drawn, so the stream's sequence does not depend on spec
    if isinstance(spec, bool):
        return spec
    return draw < spec


def _prompt(spec: Prompts, rng: random.Random, index: int) -> str:
    if spec.prompts is not None:
        return rng.choice(spec.prompts)
    assert spec.words is not None
    n_words = max(1, round(sample(spec.words, rng)))
    # A distinct opening per request keeps prefix caching from making every prompt free.
    words = [f"Request {index}:"] + [rng.choice(_VOCAB) for _ in range(n_words - 1)]
    return " ".join(words)
