"""The vLLM engine: an in-process ``AsyncLLM`` with multi-LoRA, behind the engine protocol.

Boundary: this is the only module that imports vLLM's engine. It takes token ids (the
API layer renders prompts), returns ``TokenDelta``s, and keeps adapters resident with an
LRU bounded by ``max_cpu_loras`` that never drops an adapter under a running request.
A cancelled consumer (client disconnect) aborts the request inside vLLM.

Adapters arrive as content (``AdapterRef``: id, digest, where to get it), never as paths; the
injected ``AdapterFiles`` (``lorafleet.adapters.Materializer`` rooted in this node's data
directory) brings their files here and keeps them pinned for as long as the adapter is
resident, because vLLM reads them again whenever it reloads the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..config import EngineConfig
from ..placement import parallel_engine_args
from .errors import AdapterBusy, AdapterLoadError, EngineDead, RequestRefused, public_message
from .protocol import (
    AdapterFiles,
    AdapterRef,
    EngineStats,
    GenerateRequest,
    TokenDelta,
    TokenLogprobs,
)
from .residency import AdapterResidency

log = logging.getLogger(__name__)


def _apply_vllm_environment(config: EngineConfig) -> None:
    """vLLM reads these from the environment; set them before the engine is built."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if config.multiprocessing else "0"
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(config.reserved_cpus))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    pin_inductor_vec_isa()


INDUCTOR_VEC_ISA_OK = "TORCHINDUCTOR_VEC_ISA_OK"


def pin_inductor_vec_isa() -> None:
    """Let torch's inductor take the CPU's vector ISA from the CPU's flags, in this process
    and every process it starts (engine core, workers; a value already set wins).

    Otherwise each process decides by compiling and loading a probe, and a probe that fails
    (a loaded machine) makes that process build kernels without the ISA, while the kernel
    cache it shares with the other processes of the machine holds code generated with it:
    the C++ build of a cached kernel then fails (``'at::vec' has not been declared``). vLLM's
    sampler compiles such a kernel for logprobs, so the engine died on a logprobs request.
    Only CPU code generation reads it; on a GPU node it changes nothing.
    """
    value = os.environ.setdefault(INDUCTOR_VEC_ISA_OK, "1")
    import torch._inductor.config as inductor  # read the variable at import: a fork inherits it

    if inductor.cpp.vec_isa_ok is None:
        inductor.cpp.vec_isa_ok = value == "1"


def scheduling_engine_args(config: EngineConfig, metrics_path: str | None = None) -> dict[str, Any]:
    """Engine args that plug LoRAFleet's scheduler in. fcfs needs it only where a batch can
    hold more adapters than there are slots (its slot admission, ``scheduling.slots``);
    otherwise fcfs is stock vLLM. The engine core writes its ``lorafleet_*`` metrics to
    ``metrics_path`` (it is another process)."""
    fcfs = config.scheduling_policy == "fcfs"
    if fcfs and config.max_loras >= config.max_num_seqs:
        return {}
    from ..scheduling.vllm_scheduler import CONFIG_KEY, SCHEDULER_CLS, check_vllm_version

    check_vllm_version()
    offload: dict[str, Any] = {}
    if config.kv_offload_host_bytes > 0 and not fcfs:
        from vllm.config import KVTransferConfig

        from ..kvcache.connector import CONNECTOR_NAME

        offload["kv_transfer_config"] = KVTransferConfig(
            kv_connector=CONNECTOR_NAME,
            kv_connector_module_path="lorafleet.serving.kvcache.connector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "host_bytes": config.kv_offload_host_bytes,
                "disk_dir": config.kv_offload_disk_dir,
                "disk_bytes": config.kv_offload_disk_bytes,
            },
        )
    return {
        **offload,
        "scheduler_cls": SCHEDULER_CLS,
        "additional_config": {CONFIG_KEY: {
            "policy": config.scheduling_policy,
            "max_running": config.scheduling_max_running,
            "default_consumption_rate": config.default_consumption_rate,
            "params": dict(config.scheduling_params),
            "slots": {"wait_s": config.lora_slot_wait_s,
                      "tenant_share": config.lora_tenant_slot_share},
            "metrics_path": metrics_path,
        }},
    }


class VLLMEngine:
    """One engine replica. Create, ``await start()``, then ``generate`` concurrently."""

    def __init__(self, config: EngineConfig, replica_id: str = "replica-0",
                 adapter_files: AdapterFiles | None = None) -> None:
        self.config = config
        self.replica_id = replica_id
        self.adapter_files = adapter_files
        self._llm: Any = None
        self._residency = AdapterResidency(config.max_cpu_loras)
        # Serialises adapter loads/unloads so two requests never load the same adapter twice
        # and an eviction never races a load. Generation itself never holds it.
        self._adapter_lock = asyncio.Lock()
        self._in_flight = 0
        self._core_metrics_path = Path(tempfile.gettempdir()) / (
            f"lorafleet-core-metrics-{os.getpid()}-{id(self):x}.prom")

    def core_metrics_text(self) -> str:
        """The engine-core process's ``lorafleet_*`` exposition (tokenflow only), or ""."""
        try:
            return self._core_metrics_path.read_text()
        except OSError:
            return ""

    async def start(self) -> None:
        _apply_vllm_environment(self.config)
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        args = AsyncEngineArgs(
            model=c.model_dir,
            served_model_name=[c.served_model_name],
            tokenizer=c.model_dir,
            dtype=c.resolved_dtype(),
            max_model_len=c.max_model_len,
            max_num_seqs=c.max_num_seqs,
            enable_lora=True,
            max_loras=c.max_loras,
            max_lora_rank=c.max_lora_rank,
            max_cpu_loras=c.max_cpu_loras,
            kv_cache_memory_bytes=c.kv_cache_bytes,
            block_size=c.block_size,
            enable_prefix_caching=c.prefix_caching,
            # JSON constrained by a schema or json_object may contain whitespace anywhere;
            # a small model then emits whitespace until its output limit. Without it, the
            # constrained output is compact and always ends.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar",
                                                              disable_any_whitespace=True),
            seed=c.seed,
            disable_log_stats=False,
            enable_log_requests=False,
            **scheduling_engine_args(c, str(self._core_metrics_path)),
            **parallel_engine_args(c),
        )
        if c.tensor_parallel_size > 1:
            self._llm = _async_llm_in_placement_group(args)
        else:
            self._llm = AsyncLLM.from_engine_args(args)

    @property
    def llm(self) -> Any:
        if self._llm is None:
            raise EngineDead("engine not started")
        return self._llm

    # -- adapters ---------------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Make ``adapter`` resident: its files first (fetched on a miss), then vLLM's copy."""
        if adapter.adapter_id in self._residency:
            return 0.0
        started = time.perf_counter()
        # Outside the lock: a slow fetch of one adapter must not hold up loads of others.
        path = await self._acquire_files(adapter)
        keep_pin = False
        try:
            async with self._adapter_lock:
                if adapter.adapter_id in self._residency:
                    return 0.0  # loaded by a concurrent request meanwhile (which holds the pin)
                try:
                    victim = self._residency.victim_for(adapter.adapter_id)
                except LookupError as e:
                    raise AdapterBusy(f"replica {self.replica_id}: {e}") from e
                if victim is not None:
                    await self._drop(victim)
                resident = self._residency.add(adapter.adapter_id, str(path),
                                               adapter.content.digest)
                try:
                    await self.llm.add_lora(self._lora_request(resident))
                except Exception as e:  # vLLM raises plain exceptions for bad adapters
                    self._residency.remove(adapter.adapter_id)
                    raise AdapterLoadError(
                        f"adapter {adapter.adapter_id} failed to load: {public_message(e)}") from e
                keep_pin = True  # released by _drop when the adapter leaves
                return time.perf_counter() - started
        finally:
            if not keep_pin and self.adapter_files is not None:
                self.adapter_files.release(adapter.content.digest)

    async def _acquire_files(self, adapter: AdapterRef) -> Path:
        from lorafleet.adapters.errors import AdapterError

        if self.adapter_files is None:
            raise AdapterLoadError(f"replica {self.replica_id} has no adapter files configured")
        try:
            return await self.adapter_files.acquire(adapter.content)
        except AdapterError as e:  # fetch, digest or validation failure: say which, briefly
            raise AdapterLoadError(
                f"adapter {adapter.adapter_id} could not be fetched: {public_message(e)}") from e

    async def unload_adapter(self, adapter_id: str) -> bool:
        async with self._adapter_lock:
            resident = self._residency.get(adapter_id)
            if resident is None:
                return False
            if resident.in_flight:
                raise AdapterBusy(f"adapter {adapter_id} has {resident.in_flight} running requests")
            await self._drop(adapter_id)
            return True

    async def _drop(self, adapter_id: str) -> None:
        resident = self._residency.remove(adapter_id)
        if resident is not None:
            try:
                await self.llm.remove_lora(resident.lora_int_id)
            finally:
                if self.adapter_files is not None and resident.digest:
                    self.adapter_files.release(resident.digest)

    @staticmethod
    def _lora_request(resident: Any) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(resident.adapter_id, resident.lora_int_id, resident.path)

    # -- generation -------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        lora = None
        if request.adapter is not None:
            await self.load_adapter(request.adapter)
            resident = self._residency.acquire(request.adapter.adapter_id)
            lora = self._lora_request(resident)
        s = request.sampling
        ours = {"lorafleet": {
            "streaming": request.streaming,
            "consumption_rate": request.consumption_rate or self.config.default_consumption_rate,
            "tenant": request.tenant,
        }}
        if isinstance(request.vllm_params, SamplingParams):
            # Built by the API layer from vLLM's request model; the engine owns how output
            # is delivered, and the scheduler's arguments are ours alone.
            params = request.vllm_params.clone()
            params.n = 1
            params.max_tokens = s.max_tokens
            params.seed = s.seed
            params.output_kind = RequestOutputKind.DELTA
            params.extra_args = ours
        else:
            params = SamplingParams(
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=s.seed,
                stop=list(s.stop) or None,
                ignore_eos=s.ignore_eos,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                output_kind=RequestOutputKind.DELTA,
                extra_args=ours,
            )
        self._in_flight += 1
        finished = produced = False
        try:
            prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_token_ids)}
            if request.cache_salt is not None:
                prompt["cache_salt"] = request.cache_salt
            stream = self.llm.generate(prompt, params, request.request_id, lora_request=lora)
            async for out in stream:
                produced = True
                completion = out.outputs[0]
                finished = out.finished
                reason = completion.finish_reason if out.finished else None
                yield TokenDelta(
                    text=completion.text,
                    token_ids=tuple(completion.token_ids),
                    finish_reason=reason if reason in ("stop", "length", "abort") else (
                        "stop" if out.finished else None
                    ),
                    logprobs=_logprobs(completion.logprobs),
                    stop_reason=completion.stop_reason if out.finished else None,
                )
        except (ValueError, TypeError) as e:
            if produced or self._llm is None or self._llm.errored:
                raise
            # vLLM validates a request's parameters when it is added (structured outputs,
            # logit_bias, allowed token ids) and raises these for the caller's mistakes.
            raise RequestRefused(public_message(e)) from e
        except EngineDeadError as e:
            # The engine core process is gone. Ours is an EngineError, which the API turns
            # into a 503 (Ray keeps the type: RayTaskError(EngineDead) is an EngineDead).
            raise EngineDead(f"replica {self.replica_id}: the vLLM engine core died") from e
        finally:
            self._in_flight -= 1
            if request.adapter is not None:
                self._residency.release(request.adapter.adapter_id)
            if not finished and self._llm is not None:
                # Consumer went away (client disconnect, cancellation): free the KV now.
                # A dead engine has nothing to free, and must not mask the first error.
                with contextlib.suppress(EngineDeadError):
                    await asyncio.shield(self._llm.abort(request.request_id))

    # -- introspection ----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The engine was started and has not died (vLLM notices a dead core at once)."""
        return self._llm is not None and not self._llm.errored

    def engine_pids(self) -> tuple[int, ...]:
        """Pids of the engine-core processes (none when the engine runs in-process).

        vLLM exposes its process manager only through its client's internals; a version
        that moves them makes this empty, never wrong."""
        manager = getattr(getattr(getattr(self._llm, "engine_core", None), "resources", None),
                          "engine_manager", None)
        procs = getattr(manager, "processes", None) or []
        return tuple(p.pid for p in procs if p.pid is not None)

    async def stats(self) -> EngineStats:
        return EngineStats(
            replica_id=self.replica_id,
            resident_adapters=self._residency.ids(),
            in_flight=self._in_flight,
            max_loras=self.config.max_loras,
            max_cpu_loras=self.config.max_cpu_loras,
            healthy=self.alive,
            engine_pids=self.engine_pids(),
        )

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self._core_metrics_path.unlink(missing_ok=True)


def _logprobs(steps: Any) -> tuple[TokenLogprobs, ...] | None:
    """vLLM's per-token logprob dicts (None when not asked for) as plain tuples, in order."""
    if steps is None:
        return None
    return tuple(
        TokenLogprobs(tuple((int(tid), float(lp.logprob), lp.decoded_token)
                            for tid, lp in (step or {}).items()))
        for step in steps
    )


def _async_llm_in_placement_group(args: Any) -> Any:
    """TP > 1: vLLM's ranks run as Ray actors in the replica's own placement group.

    The group is handed to vLLM explicitly: its engine core runs in a child process that is no
    Ray worker, so it cannot find the group itself and would ask Ray for a second set of GPUs
    that the first group already holds (a wait that never ends).
    """
    import ray
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm_config = args.create_engine_config()
    vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
    return AsyncLLM.from_vllm_config(
        vllm_config, enable_log_requests=args.enable_log_requests,
        disable_log_stats=args.disable_log_stats)
