"""vLLM's scheduler with the TokenFlow policy in front: a translator, nothing more.

Boundary: the only module of this package that imports vLLM. Before each of vLLM's own
``schedule()`` calls it builds :class:`RequestView`s from vLLM's queues, asks the policy for a
:class:`Plan`, and applies it: pauses are vLLM's own recompute preemption
(``_preempt_request``; KV blocks stay in the prefix cache until evicted, and a KV connector may
keep a copy elsewhere), requests the plan holds back are *parked* outside vLLM's waiting queue,
and the rest of the waiting queue is reordered to the plan's start order. vLLM then admits in
that order under its own limits (token budget, KV, ``max_loras``).

Pinned to vLLM 0.32.0: ``Scheduler`` internals are not a public API.

Plugged in with ``EngineArgs(scheduler_cls=SCHEDULER_CLS, additional_config={CONFIG_KEY: {...}})``;
the per-request fields come from ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import vllm
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from .errors import UnsupportedVLLMVersion
from .metrics import export_text, scheduler_metrics
from .model import Action, Capacity, RequestState, RequestView, TokenFlowParams
from .policy import advance_reader, make_policy
from .throughput import ThroughputEstimate

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
        self._max_running = min(int(cfg.get("max_running") or self.max_num_running_reqs),
                                self.max_num_running_reqs)
        self._default_rate = float(cfg.get("default_consumption_rate", 6.0))
        self._max_loras = self.lora_config.max_loras if self.lora_config else 1_000_000
        self._clock = time.time  # vLLM's arrival_time is wall-clock; so is ours
        # Requests the plan holds back (paused or deferred). They are still ours: counted as
        # waiting, and finishable (abort) at any time.
        self._parked: dict[str, Request] = {}
        self._paused_since: dict[str, float] = {}
        self._num_pauses: dict[str, int] = {}
        self._first_token_at: dict[str, float] = {}
        # Reader model per streaming request: (tokens paid for, at, tokens delivered, its
        # reading rate, looked up once at the first token rather than every step).
        self._reader: dict[str, tuple[float, float, int, float]] = {}
        self._resumed_at: dict[str, float] = {}
        self._started_at: dict[str, float] = {}  # last admitted or resumed by a plan
        self._throughput = ThroughputEstimate(full_at=max(1, self._max_running - 1))
        self.metrics = scheduler_metrics()
        self._metrics_path = Path(cfg["metrics_path"]) if cfg.get("metrics_path") else None
        self._exported_at = 0.0
        self._dirty = False  # a pause or resume since the last export

    # -- vLLM hooks -------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> Any:
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
        sampled = getattr(model_runner_output, "sampled_token_ids", None) or []
        self._throughput.observe(now, len(scheduler_output.num_scheduled_tokens),
                                 sum(1 for ids in sampled if len(ids) > 0))
        for req in self.running:
            rid = req.request_id
            delivered = req.num_output_tokens
            if delivered > 0 and rid not in self._first_token_at:
                self._first_token_at[rid] = now
                self._reader[rid] = (0.0, now, delivered, self._rate(request_extra(req)))
            elif delivered > 0:
                read, at, before, rate = self._reader[rid]
                if delivered > before:
                    read, at = advance_reader(read, at, before, rate, now)
                    self._reader[rid] = (read, at, delivered, rate)
            started = self._resumed_at.get(rid)
            if started is not None and req.num_computed_tokens >= req.num_tokens - 1:
                self.metrics.resume_latency.observe(now - started)
                del self._resumed_at[rid]
        if self._dirty or now - self._exported_at >= 1.0:
            self._export(now)
        return out

    def shutdown(self) -> None:
        self._export(self._clock())
        super().shutdown()

    def _export(self, now: float) -> None:
        """Write this process's lorafleet_* series for the replica to serve (~1/s)."""
        if self._metrics_path is not None:
            self.metrics.throughput.set(self._throughput.value or 0.0)
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
        for d in (self._paused_since, self._num_pauses, self._first_token_at, self._resumed_at,
                  self._reader, self._started_at):
            d.pop(rid, None)

    def _rate(self, extra: dict[str, Any]) -> float:
        """Tokens/s the request's client reads: declared, else the default."""
        return float(extra.get("consumption_rate") or self._default_rate)

    def _view(self, req: Request, state: RequestState, now: float) -> RequestView:
        extra = request_extra(req)
        lora = req.lora_request
        read, read_at, _, _ = self._reader.get(req.request_id, (0.0, None, 0, 0.0))
        return RequestView(
            request_id=req.request_id,
            arrival=req.arrival_time,
            state=state,
            prompt_tokens=req.num_prompt_tokens,
            max_tokens=req.max_tokens,
            generated_tokens=req.num_output_tokens,
            streaming=bool(extra.get("streaming", True)),
            consumption_rate=self._rate(extra),
            first_token_time=self._first_token_at.get(req.request_id),
            reader_tokens=read,
            reader_at=read_at,
            adapter_id=str(lora.lora_int_id) if lora is not None else None,
            paused_since=(
                self._paused_since.get(req.request_id, now) if state is RequestState.PAUSED else None
            ),
            num_pauses=self._num_pauses.get(req.request_id, 0),
            running_since=(
                self._started_at.get(req.request_id) if state is RequestState.RUNNING else None
            ),
        )

    def _apply_plan(self) -> None:
        now = self._clock()
        # Only plain running/waiting requests are the policy's; requests blocked on grammar,
        # remote KV or streaming input, and KV-holding waiters, stay exactly where vLLM put them.
        movable = [r for r in self.waiting if r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)]
        if not movable and not self._parked:
            return  # nothing waits: nothing to pause for, nothing to reorder
        fixed = [r for r in self.waiting if r.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED)]
        pool = {r.request_id: r for r in [*movable, *self._parked.values()]}
        views = [self._view(r, RequestState.RUNNING, now) for r in self.running
                 if r.status == RequestStatus.RUNNING]
        for r in pool.values():
            paused = r.status == RequestStatus.PREEMPTED or r.num_output_tokens > 0
            views.append(self._view(r, RequestState.PAUSED if paused else RequestState.WAITING, now))
        cap = Capacity(max_running=self._max_running, max_loras=self._max_loras,
                       kv_blocks=self.cache_config.num_gpu_blocks, block_size=self.block_size,
                       tokens_per_s=self._throughput.value)
        plan = self._policy(views, cap, now)

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
            self._paused_since[req.request_id] = now
            self._num_pauses[req.request_id] = self._num_pauses.get(req.request_id, 0) + 1
            self.metrics.pauses.inc()
            self._dirty = True

        start = [pool[rid] for rid in plan.to_start if rid in pool]
        for req in start:
            if self._parked.pop(req.request_id, None) is not None and req.request_id in self._paused_since:
                self._resumed_at[req.request_id] = now
                self.metrics.resumes.inc()
                self._dirty = True
            self._paused_since.pop(req.request_id, None)
            self._started_at[req.request_id] = now
        started = {r.request_id for r in start}
        for rid, req in pool.items():
            if rid not in started:
                self._parked[rid] = req
        self.waiting.clear()
        for req in [*start, *fixed]:
            self.waiting.add_request(req)
