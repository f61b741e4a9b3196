"""vLLM's scheduler with a LoRAFleet policy in front: a translator, nothing more.

Boundary: the only module of this package that imports vLLM. Before each of vLLM's own
``schedule()`` calls it builds :class:`RequestView`s from vLLM's queues, asks the policy
(tokenflow or fcfs) for a :class:`Plan` over the requests within the per-tenant batch cap
(``batch_share``), narrows it by adapter-slot admission (``slots.decide_slots``: bounded
wait, per-tenant share, slots taken back for a tenant below its share), and applies it:
pauses are vLLM's own recompute preemption (``_preempt_request``; KV blocks stay in the
prefix cache until evicted, and a KV connector may keep a copy elsewhere), requests the plan
holds back are *parked* outside vLLM's waiting queue, and the rest of the waiting queue is
reordered to the plan's start order. vLLM then admits in that order under its own limits
(token budget, KV, ``max_loras``).

Pinned to vLLM 0.32.0: ``Scheduler`` internals are not a public API.

Plugged in with ``EngineArgs(scheduler_cls=SCHEDULER_CLS, additional_config={CONFIG_KEY: {...}})``;
the per-request fields come from ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import vllm
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from .batch_share import decide_with_batch_share
from .errors import UnsupportedVLLMVersion
from .metrics import export_text, scheduler_metrics
from .model import (
    DEFAULT_CONSUMPTION_RATE,
    Action,
    Capacity,
    RequestState,
    RequestView,
    TokenFlowParams,
)
from .policy import make_policy
from .slots import SlotParams, decide_slots
from .step_cost import StepCostModel
from .tracking import RequestTrack

log = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32.0"
SCHEDULER_CLS = "lorafleet.serving.scheduling.vllm_scheduler.TokenFlowScheduler"
CONFIG_KEY = "lorafleet_scheduling"
EXTRA_ARGS_KEY = "lorafleet"

def check_vllm_version(version: str = vllm.__version__) -> None:
    if version != SUPPORTED_VLLM:
        raise UnsupportedVLLMVersion(
            f"TokenFlowScheduler is written against vLLM {SUPPORTED_VLLM} internals; "
            f"found vLLM {version}. Use --scheduling-policy fcfs or install vllm {SUPPORTED_VLLM}."
        )


def adapter_tenant(lora_name: str) -> str | None:
    """The tenant of an adapter from the name the engine gives vLLM (``tenant/name@digest``,
    ``adapters.model.adapter_id_of``); ``None`` for a name of another shape."""
    tenant, sep, _ = lora_name.partition("/")
    return tenant if sep else None


def request_extra(request: Request) -> dict[str, Any]:
    extra = request.sampling_params.extra_args if request.sampling_params else None
    return dict((extra or {}).get(EXTRA_ARGS_KEY) or {})


class TokenFlowScheduler(Scheduler):
    """vLLM's ``Scheduler`` whose queues are arranged by a LoRAFleet policy each step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        super().__init__(*args, **kwargs)
        if self.policy != SchedulingPolicy.FCFS:
            raise ValueError("TokenFlowScheduler reorders an FCFS queue; leave vLLM's policy at fcfs")
        cfg = dict((self.vllm_config.additional_config or {}).get(CONFIG_KEY) or {})
        params = TokenFlowParams(**cfg.get("params", {}))
        self._policy = make_policy(cfg.get("policy", "tokenflow"), params)
        self._params = params  # the batch share's knobs apply under either policy
        self._tenants_seen: dict[str, tuple[float, int]] = {}  # tenant: (last seen, demand)
        # fcfs needs no step cost: its plan only changes when someone waits for a slot.
        self._rate_aware = cfg.get("policy", "tokenflow") != "fcfs"
        self._slots = SlotParams(**cfg.get("slots", {}))
        self._max_running = min(int(cfg.get("max_running") or self.max_num_running_reqs),
                                self.max_num_running_reqs)
        self._default_rate = float(cfg.get("default_consumption_rate") or DEFAULT_CONSUMPTION_RATE)
        self._max_loras = self.lora_config.max_loras if self.lora_config else 1_000_000
        self._clock = time.time  # vLLM's arrival_time is wall-clock; so is ours
        # Requests the plan holds back (paused or deferred). They are still ours: counted as
        # waiting, and finishable (abort) at any time.
        self._parked: dict[str, Request] = {}
        self._tracks: dict[str, RequestTrack] = {}  # one record per request seen
        # Step timing: when each schedule() began (FIFO: outputs come back in order) and when
        # the last output was processed (a pipelined step starts before the previous ends).
        self._step_began: deque[float] = deque(maxlen=8)
        self._last_output_at: float | None = None
        self._step_cost = StepCostModel()
        self.metrics = scheduler_metrics()
        self._metrics_path = Path(cfg["metrics_path"]) if cfg.get("metrics_path") else None
        self._exported_at = 0.0
        self._dirty = False  # a pause or resume since the last export

    # -- vLLM hooks -------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> Any:
        self._step_began.append(self._clock())
        self._apply_plan()
        saves = bool(getattr(self.connector, "has_pending_saves", lambda: False)())
        out = super().schedule(throttle_prefills)
        if saves:
            # The worker runs a connector's transfers after the forward pass unless a load
            # must precede it; our saves must too (a freed block may be reused this step).
            out.has_sync_kv_loads = True
        return out

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        out = super().update_from_output(scheduler_output, model_runner_output)
        now = self._clock()
        self._observe_step(scheduler_output, now)
        for req in self.running:
            track = self._track(req).delivered_to(req.num_output_tokens, now)
            if track.resumed_at is not None and req.num_computed_tokens >= req.num_tokens - 1:
                self.metrics.resume_latency.observe(now - track.resumed_at)
                track = replace(track, resumed_at=None)
            self._tracks[req.request_id] = track
        if self._dirty or now - self._exported_at >= 1.0:
            self._export(now)
        return out

    def shutdown(self) -> None:
        self._export(self._clock())
        super().shutdown()

    def _observe_step(self, scheduler_output: Any, now: float) -> None:
        """Feed the step-cost model: sequences and tokens of the step and how long it took
        (from its schedule() call, or from the previous output when steps overlap)."""
        began = self._step_began.popleft() if self._step_began else None
        last, self._last_output_at = self._last_output_at, now
        if began is None:
            return
        start = began if last is None else max(began, last)
        self._step_cost.observe(now - start, len(scheduler_output.num_scheduled_tokens),
                                scheduler_output.total_num_scheduled_tokens)

    def _export(self, now: float) -> None:
        """Write this process's lorafleet_* series for the replica to serve (~1/s)."""
        if self._metrics_path is not None:
            self.metrics.observe_step_cost(self._step_cost.estimate, self._max_running)
            self._exported_at = now
            self._dirty = False
            export_text(self._metrics_path)

    def get_request_counts(self) -> tuple[int, int]:
        running, waiting = super().get_request_counts()
        return running, waiting + len(self._parked)

    def finish_requests(self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus) -> Any:
        ids: Iterable[str] = (
            list(self._parked) if request_ids is None
            else (request_ids,) if isinstance(request_ids, str) else list(request_ids)
        )
        for rid in ids:
            req = self._parked.pop(rid, None)
            if req is not None:  # hand it back so vLLM's own bookkeeping frees it
                self.waiting.add_request(req)
        finished = super().finish_requests(request_ids, finished_status)
        for req in finished:
            self._forget(req.request_id)
        return finished

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        self._forget(request.request_id)
        return super()._free_request(request, delay_free_blocks)

    # -- translation ------------------------------------------------------------------

    def _forget(self, rid: str) -> None:
        self._tracks.pop(rid, None)

    def _track(self, req: Request) -> RequestTrack:
        """The request's record, made from its extension args the first time it is seen."""
        track = self._tracks.get(req.request_id)
        if track is None:
            extra = request_extra(req)
            track = RequestTrack(streaming=bool(extra.get("streaming", True)),
                                 rate=float(extra.get("consumption_rate") or self._default_rate),
                                 tenant=extra.get("tenant") or None)
            self._tracks[req.request_id] = track
        return track

    def _view(self, req: Request, state: RequestState, now: float) -> RequestView:
        track = self._track(req)
        lora = req.lora_request
        return RequestView(
            request_id=req.request_id,
            arrival=req.arrival_time,
            state=state,
            prompt_tokens=req.num_prompt_tokens,
            max_tokens=req.max_tokens,
            generated_tokens=req.num_output_tokens,
            streaming=track.streaming,
            consumption_rate=track.rate,
            first_token_time=track.first_token_at,
            reader_tokens=track.reader_tokens,
            reader_at=track.reader_at,
            adapter_id=str(lora.lora_int_id) if lora is not None else None,
            # The sender, so a tenant's base-model requests count for its share too; the
            # adapter's owner where the engine did not say (a request built elsewhere).
            tenant=track.tenant or (adapter_tenant(lora.lora_name) if lora is not None else None),
            # A request vLLM preempted by itself has no pause time of ours: paused "now".
            paused_since=(
                (track.paused_since if track.paused_since is not None else now)
                if state is RequestState.PAUSED else None
            ),
            num_pauses=track.num_pauses,
            running_since=track.started_at if state is RequestState.RUNNING else None,
        )

    def _lingering(self, views: list[RequestView], now: float) -> dict[str, int]:
        """Tenants with no request now that had some less than ``tenant_linger_s`` ago, with
        the demand they had then (remembered here: the policy keeps no state)."""
        for tenant, n in Counter(v.tenant for v in views if v.tenant is not None).items():
            self._tenants_seen[tenant] = (now, n)
        linger = self._params.tenant_linger_s
        for tenant in [t for t, (at, _) in self._tenants_seen.items() if now - at > linger]:
            del self._tenants_seen[tenant]
        return {t: n for t, (at, n) in self._tenants_seen.items() if at < now}

    def _apply_plan(self) -> None:
        now = self._clock()
        # Only plain running/waiting requests are the policy's; requests blocked on grammar,
        # remote KV or streaming input, and KV-holding waiters, stay exactly where vLLM put them.
        movable = [r for r in self.waiting if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)]
        step_cost = self._step_cost.estimate
        if not movable and not self._parked and (step_cost is None or not self._rate_aware):
            # Nothing waits and no reading-rate cap (yet): nothing to pause, nothing to reorder.
            # With a step cost the plan runs every step: the cap may pause a running stream
            # even when nobody waits (a burst admitted in one step).
            return
        fixed = [r for r in self.waiting if r.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED)]
        pool = {r.request_id: r for r in [*movable, *self._parked.values()]}
        views = [self._view(r, RequestState.RUNNING, now) for r in self.running
                 if r.status == RequestStatus.RUNNING]
        for r in pool.values():
            paused = r.status == RequestStatus.PREEMPTED or r.num_output_tokens > 0
            views.append(self._view(r, RequestState.PAUSED if paused else RequestState.WAITING, now))
        cap = Capacity(max_running=self._max_running, max_loras=self._max_loras,
                       kv_blocks=self.cache_config.num_gpu_blocks, block_size=self.block_size,
                       step_cost=step_cost)
        plan = decide_with_batch_share(self._policy, views, cap, now, self._params,
                                       self._lingering(views, now))
        plan = decide_slots(plan, views, cap, now, self._slots)

        running_by_id = {r.request_id: r for r in self.running}
        stamp = time.monotonic()
        for d in plan.decisions:
            if d.action in (Action.PAUSE, Action.RESUME, Action.ADMIT):
                self.metrics.decisions.labels(d.action.value, d.reason.value).inc()
            if d.action is not Action.PAUSE:
                continue
            req = running_by_id.get(d.request_id)
            if req is None or not self._request_blocks_can_be_freed(req):
                continue
            self.running.remove(req)
            offload = getattr(self.connector, "offload_on_pause", None)
            if offload is not None:  # our KV connector: copy the blocks out before vLLM frees them
                offload(req, self.kv_cache_manager.get_block_ids(req.request_id)[0])
            self._preempt_request(req, stamp)  # prepends it to self.waiting
            self.waiting.remove_request(req)
            pool[req.request_id] = req
            self._tracks[req.request_id] = self._track(req).paused(now)
            self.metrics.pauses.inc()
            self._dirty = True

        start = [pool[rid] for rid in plan.to_start if rid in pool]
        for req in start:
            track = self._track(req)
            if self._parked.pop(req.request_id, None) is not None and track.paused_since is not None:
                self.metrics.resumes.inc()
                self._dirty = True
            self._tracks[req.request_id] = track.started(now)
        started = {r.request_id for r in start}
        for rid, req in pool.items():
            if rid not in started:
                self._parked[rid] = req
        self.waiting.clear()
        for req in [*start, *fixed]:
            self.waiting.add_request(req)
