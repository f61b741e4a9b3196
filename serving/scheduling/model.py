"""Plain data the scheduling policy works on: request views, capacity, knobs, decisions.

Boundary: frozen dataclasses and enums only; no vLLM, no clock, no I/O. The vLLM scheduler
subclass builds these from its queues; tests build them by hand.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "DEFAULT_CONSUMPTION_RATE",
    "Action",
    "Capacity",
    "Decision",
    "Plan",
    "Reason",
    "RequestState",
    "RequestView",
    "StepCost",
    "TokenFlowParams",
]

DEFAULT_CONSUMPTION_RATE = 6.0
"""Tokens/s a person reads, assumed for a stream whose client declared no rate."""


class RequestState(enum.Enum):
    """Where a request is, as the policy sees it."""

    WAITING = "waiting"
    """Never started (no KV, no output)."""
    RUNNING = "running"
    PAUSED = "paused"
    """Was running, was preempted (by us or by vLLM) and has output already."""


class Action(enum.Enum):
    ADMIT = "admit"
    DEFER = "defer"
    PAUSE = "pause"
    RESUME = "resume"
    KEEP_RUNNING = "keep_running"
    KEEP_PAUSED = "keep_paused"


class Reason(enum.Enum):
    """Why a decision was taken. A closed set: these become metric labels."""

    FCFS = "fcfs"
    TTFT_URGENCY = "ttft_urgency"
    DEADLINE = "deadline"
    BUFFER_DRAINING = "buffer_draining"
    BUFFER_SHORT = "buffer_short"
    BUFFER_LONG = "buffer_long"
    AWAITING_FIRST_TOKEN = "awaiting_first_token"
    MIN_RUN = "min_run"
    """Admitted or resumed less than ``min_run_s`` ago: keeps its slot against paused streams
    (no ping-pong); a newcomer may still take it."""
    PAUSE_LIMIT = "pause_limit"
    WAIT_BOUND = "wait_bound"
    PAUSE_BOUND = "pause_bound"
    NO_CAPACITY = "no_capacity"
    LORA_SLOTS_FULL = "lora_slots_full"
    LORA_DRAIN = "lora_drain"
    """Its adapter holds a slot that a request kept waiting past ``SlotParams.wait_s`` needs:
    the adapter takes no new requests until its running ones finish and the slot frees."""
    LORA_PREEMPT = "lora_preempt"
    """Its adapter's slot went to a tenant below its slot share while its own tenant was
    above it: paused (running) or held (not running) until a slot is free for it again."""
    TENANT_SLOT_SHARE = "tenant_slot_share"
    """Its tenant's adapters already hold ``SlotParams.tenant_share`` of the adapter slots
    while another tenant has adapter requests."""
    TENANT_BATCH_SHARE = "tenant_batch_share"
    """Its tenant runs more sequences than the per-tenant batch cap while a smaller tenant
    competes (``TokenFlowParams.tenant_max_slowdown``, ``batch_share``): paused or held."""
    KV_FULL = "kv_full"
    RATE_CAP = "rate_cap"
    """Not run this step: the streams kept running already read what the engine can generate
    at that batch size (one more would leave them slower than their readers). It waits, paused
    or with its first token, until a running stream finishes or has buffer to spare."""


@dataclass(frozen=True)
class RequestView:
    """One request, as plain data. Times are seconds on the caller's clock."""

    request_id: str
    arrival: float
    state: RequestState
    prompt_tokens: int
    max_tokens: int
    generated_tokens: int = 0
    streaming: bool = True
    consumption_rate: float = DEFAULT_CONSUMPTION_RATE
    """Tokens/s the client reads (declared or default). Must be > 0."""
    first_token_time: float | None = None
    reader_tokens: float = 0.0
    """Modelled reader: tokens it had paid for at ``reader_at`` (the first token is free)."""
    reader_at: float | None = None
    """When the modelled reader held ``reader_tokens``; ``None``: at the first token, none read.
    The scheduler moves it on after the reader ran dry (``policy.advance_reader``)."""
    adapter_id: str | None = None
    tenant: str | None = None
    """Owner of the adapter (``None``: base model, or unknown): slot shares are per tenant."""
    paused_since: float | None = None
    running_since: float | None = None
    """Running only: when it was last admitted or resumed (``None``: unknown)."""
    num_pauses: int = 0
    deadline: float | None = None
    """Non-streaming only: when the whole answer is due. ``None``: derived from the knobs."""

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True)
class Capacity:
    """What the batch can hold this step."""

    max_running: int
    """Batch slots the policy may fill (<= vLLM's ``max_num_seqs``)."""
    max_loras: int
    """Distinct adapters allowed in the running set (vLLM's ``max_loras``)."""
    kv_blocks: int | None = None
    """KV blocks the running set may use; ``None``: not a constraint."""
    block_size: int = 32
    step_cost: StepCost | None = None
    """How long a step takes at each batch size (learned from the engine's steps); ``None``:
    unknown, no reading-rate cap."""


@dataclass(frozen=True)
class StepCost:
    """One engine step takes ``base_s + per_sequence_s * n + per_token_s * tokens`` seconds
    for ``n`` sequences computing ``tokens`` tokens (a decode step: ``tokens == n``)."""

    base_s: float
    per_sequence_s: float
    per_token_s: float

    def step_s(self, sequences: int, tokens: int) -> float:
        return self.base_s + self.per_sequence_s * sequences + self.per_token_s * tokens

    def stream_tokens_per_s(self, sequences: int) -> float:
        """Tokens/s each of ``sequences`` decoding streams gets (one token per step)."""
        return 1.0 / self.step_s(sequences, sequences)

    def decode_tokens_per_s(self, sequences: int) -> float:
        """Tokens/s a decode batch of ``sequences`` streams generates in all."""
        return sequences * self.stream_tokens_per_s(sequences)


@dataclass(frozen=True)
class TokenFlowParams:
    """Knobs of the TokenFlow policy (seconds unless said otherwise)."""

    ttft_target_s: float = 0.5
    """A new streaming request becomes as urgent as a buffer that drains in this time."""
    pause_min_buffer_s: float = 3.0
    """Only requests whose client buffer lasts longer than this may be paused."""
    resume_margin_s: float = 1.0
    """Paused requests resume this long (plus their resume cost) before their buffer drains."""
    prefill_tokens_per_s: float = 2000.0
    """Estimate of recompute speed: the resume cost of a context is ``tokens / this``."""
    adapter_load_cost_s: float = 0.05
    """Added to the slack of a request whose adapter is not in the running set."""
    switch_hysteresis_s: float = 0.5
    """A running request keeps its slot unless a rival is more urgent by this much."""
    min_run_s: float = 2.0
    """A stream admitted or resumed keeps its slot this long against paused streams (not
    against newcomers, nor overdue ones): each pause costs a save and a partial-block
    recompute, and two streams compared by slack alone traded places every ~0.4 s."""
    max_wait_s: float = 10.0
    """Waiting longer than this makes a request go first (no starvation)."""
    max_pause_s: float = 15.0
    """Paused longer than this makes a request go first (bounded pause)."""
    max_pauses_per_request: int = 32
    """A request paused this many times is never paused again. Rotation needs many: a stream
    generated 3x faster than it is read runs a third of the time under a burst, and each
    cycle is one pause (4 pinned long answers in the batch and made newcomers wait)."""
    nonstream_ttft_s: float = 2.0
    nonstream_tpot_s: float = 0.2
    """A non-streaming request's deadline: arrival + ttft + tpot * max_tokens (if not given)."""
    tpot_estimate_s: float = 0.05
    """Estimate of one decode step, used to turn remaining tokens into seconds."""
    rate_headroom: float = 0.1
    """Reading-rate cap: the streams kept running (with a first token) may together read at
    most ``(1 - rate_headroom)`` of what a batch of that size generates
    (``Capacity.step_cost``), so each gains buffer while it runs and can later yield its slot.
    1.0 turns the cap off."""
    tenant_max_slowdown: float = 1.5
    """Per-tenant batch cap (both policies; ``batch_share``): while tenants compete, none runs
    more sequences than keeps the smallest tenant's decode step, predicted by
    ``Capacity.step_cost``, within this factor of its step alone (never fewer than the
    smallest tenant runs). 0 turns it off; otherwise at least 1."""
    tenant_linger_s: float = 2.0
    """A tenant whose last request ended less than this ago still counts for the batch cap,
    with the demand it had: its next request comes just after."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value >= 0:  # NaN too
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be > 0")
        if 0 < self.tenant_max_slowdown < 1:
            raise ValueError(f"tenant_max_slowdown must be 0 or >= 1, got {self.tenant_max_slowdown}")
        if self.rate_headroom > 1:
            raise ValueError(f"rate_headroom must be <= 1, got {self.rate_headroom}")


@dataclass(frozen=True)
class Decision:
    request_id: str
    action: Action
    reason: Reason


@dataclass(frozen=True)
class Plan:
    """The policy's answer for one step: one decision per request, in start order."""

    decisions: tuple[Decision, ...]

    def with_action(self, *actions: Action) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action in actions)

    @property
    def to_pause(self) -> tuple[str, ...]:
        return tuple(d.request_id for d in self.with_action(Action.PAUSE))

    @property
    def to_start(self) -> tuple[str, ...]:
        """Waiting and paused requests to hand to vLLM, most urgent first."""
        return tuple(d.request_id for d in self.with_action(Action.ADMIT, Action.RESUME))

    @property
    def held(self) -> tuple[str, ...]:
        """Requests kept out of vLLM's queues this step."""
        return tuple(d.request_id for d in self.with_action(Action.DEFER, Action.KEEP_PAUSED))
