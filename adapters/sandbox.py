"""The intake worker: fetch and validate one adapter in a child process, within bounds.

Boundary: runs `sources.fetch_adapter` then `validation.validate_adapter_dir` (the same code
every intake path uses) in a separate Python process, and turns what happened into the
package's errors. `import_adapter` (the admin API, the demo seed) and `lorafleet adapter check`
both come through here; nothing else about an import (store, cache, registry) happens in it.

Why a process and not a thread: adapter content is client input, and parsing it is CPU and
memory work a client controls. In the server's process, a backtracking regex held the GIL (and
with it the event loop) for minutes, and a 300 MB tar header raised the server's memory by
2.4 GB. In a child: the server's event loop only waits on a pipe; the child's memory is capped
(`RLIMIT_DATA`, heap and anonymous maps: what hostile input can inflate), its CPU time too
(`RLIMIT_CPU`), and its wall time by the parent, which kills it at `deadline_s`.

    parent (server)                               child (python -m lorafleet.adapters.sandbox)
    request JSON on stdin (source, limits,  --->  setrlimit; fetch into <scratch>/fetched
    base model, credentials: never argv)          {"phase": "fetched"}
                                                   validate
    kill at deadline_s; map the outcome     <---  {"manifest": ...} | {"refused": ...} | ...

Outcomes: a manifest; `AdapterValidationError` (refused; `too_complex` when the child ran out
of memory, was killed while validating, or crashed); `AdapterFetchError` (transient when the
deadline struck while still fetching: a slow source may recover). Reasons are capped and scrubbed
of the scratch path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .basemodel import BaseModelInfo
from .errors import AdapterFetchError, AdapterValidationError, client_text
from .netguard import parse_networks
from .sources import FetchCredentials
from .validation import AdapterManifest, ValidationLimits

__all__ = ["IntakeSettings", "check_adapter"]

_MAX_REASON_CHARS = 400
_STDERR_TAIL = 2000


class IntakeSettings(BaseSettings):
    """Bounds of adapter intake (one adapter checked = one worker process).

    Read from `LORAFLEET_INTAKE_*` environment variables when built without arguments, e.g.
    `LORAFLEET_INTAKE_ALLOW_NETWORKS='["10.0.0.0/8"]'` to fetch from an in-cluster server.
    """

    model_config = SettingsConfigDict(env_prefix="LORAFLEET_INTAKE_", extra="forbid",
                                      frozen=True)

    allow_networks: tuple[str, ...] = Field(
        default=(), description="CIDRs that http(s) sources may reach although they are "
        "loopback, link-local, private, multicast or otherwise non-public (e.g. an in-cluster "
        "artifact server). Empty: public addresses only.")
    fetch_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for one "
                                   "connect or read of an http(s) source.")
    fetch_deadline_s: float = Field(default=300.0, gt=0, description="Longest time the whole "
                                    "download may take, redirects and every file included.")
    deadline_s: float = Field(default=360.0, gt=0, description="Longest time one adapter's "
                              "fetch and validation may take; the worker is killed then.")
    memory_bytes: int = Field(default=512 << 20, ge=64 << 20, description="Heap and anonymous "
                              "memory one intake worker may use (RLIMIT_DATA).")
    max_concurrent: int = Field(default=2, ge=1, description="Intake workers running at once "
                                "in one server process; more imports are refused with 503.")

    @field_validator("allow_networks")
    @classmethod
    def _networks_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_networks(value)  # a typo must fail at startup, not at the first import
        return value

    @model_validator(mode="after")
    def _deadlines_nest(self) -> IntakeSettings:
        if self.fetch_deadline_s > self.deadline_s:
            raise ValueError("fetch_deadline_s must not exceed deadline_s")
        return self


def check_adapter(source: str, dest: Path, *, base: BaseModelInfo, limits: ValidationLimits,
                  settings: IntakeSettings, credentials: FetchCredentials | None = None,
                  ) -> tuple[Path, AdapterManifest]:
    """Fetch `source` into `dest` (must not exist or be empty) and validate it, in a worker.

    Returns the directory holding the adapter's files (under `dest`) and its manifest. Blocking
    for up to `settings.deadline_s`: call it from a thread. `dest` is left for the caller to
    remove.
    """
    request = {
        "source": source,
        "dest": str(dest),
        "base": {"name": base.name, "num_layers": base.num_layers,
                 "modules": {k: list(v) for k, v in base.modules.items()}},
        "limits": dataclasses.asdict(limits),
        "credentials": dataclasses.asdict(credentials) if credentials else None,
        "allow_networks": list(settings.allow_networks),
        "fetch_timeout_s": settings.fetch_timeout_s,
        "fetch_deadline_s": settings.fetch_deadline_s,
        "memory_bytes": settings.memory_bytes,
        "cpu_s": int(settings.deadline_s) + 5,
    }
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.adapters.sandbox"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, start_new_session=True,  # its own process group: killed as one
    )
    killed = False
    try:
        out, err = proc.communicate(json.dumps(request).encode(), timeout=settings.deadline_s)
    except subprocess.TimeoutExpired:
        killed = True
        _kill_group(proc)
        out, err = proc.communicate()
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    messages = _messages(out)
    shown = client_text(source, 120)
    if killed:
        if any(m.get("phase") == "fetched" for m in messages):
            raise AdapterValidationError(
                f"checking {shown} took longer than {settings.deadline_s:g} s", "too_complex")
        raise AdapterFetchError(f"fetching {shown} took longer than {settings.deadline_s:g} s",
                                transient=True)
    final = messages[-1] if messages else {}
    scrub = _scrubber(dest)
    if "manifest" in final:
        m = final["manifest"]
        root = Path(final["root"])
        if not root.is_relative_to(dest):
            raise AdapterValidationError("the intake worker answered a foreign path",
                                         "too_complex")
        return root, AdapterManifest(
            rank=int(m["rank"]), alpha=float(m["alpha"]),
            target_modules=tuple(m["target_modules"]), size_bytes=int(m["size_bytes"]),
            digest=str(m["digest"]), files=tuple(m["files"]))
    if "refused" in final:
        r = final["refused"]
        raise AdapterValidationError(scrub(r["reason"]), r["code"])
    if "fetch_error" in final:
        f = final["fetch_error"]
        raise AdapterFetchError(scrub(f["reason"]), transient=bool(f["transient"]))
    if "out_of_memory" in final:
        raise AdapterValidationError(f"checking {shown} needs more than "
                                     f"{settings.memory_bytes >> 20} MiB of memory", "too_complex")
    # The child died (a signal: RLIMIT_CPU, the OOM killer, a native parser's crash) or raised
    # something unexpected. Either way the content made intake fail: refuse it for good, and
    # leave the child's own account in the server's log.
    detail = final.get("crashed") or _signal_name(proc.returncode)
    sys.stderr.write(f"lorafleet intake worker failed on {shown} ({detail}):\n"
                     f"{scrub(err.decode('utf-8', 'replace')[-_STDERR_TAIL:])}\n")
    raise AdapterValidationError(f"checking {shown} failed in the intake worker ({detail})",
                                 "too_complex")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _signal_name(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _messages(out: bytes) -> list[dict[str, Any]]:
    found = []
    for line in out.decode("utf-8", "replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def _scrubber(dest: Path) -> Any:
    def scrub(text: str) -> str:
        text = str(text).replace(str(dest), "<adapter>")
        if len(text) > _MAX_REASON_CHARS:
            text = text[:_MAX_REASON_CHARS] + "..."
        return text
    return scrub


# --- the child ----------------------------------------------------------------------------


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _child(request: dict[str, Any]) -> None:
    from .sources import fetch_adapter
    from .validation import validate_adapter_dir

    base = BaseModelInfo(request["base"]["name"], int(request["base"]["num_layers"]),
                         {k: (int(v[0]), int(v[1])) for k, v in request["base"]["modules"].items()})
    limits = ValidationLimits(**request["limits"])
    credentials = FetchCredentials(**request["credentials"]) if request["credentials"] else None
    try:
        fetched = fetch_adapter(
            request["source"], request["dest"], max_bytes=limits.max_bytes,
            credentials=credentials, timeout_s=request["fetch_timeout_s"],
            deadline_s=request["fetch_deadline_s"],
            allow_networks=parse_networks(request["allow_networks"]))
        _emit({"phase": "fetched"})
        manifest = validate_adapter_dir(fetched, base, limits)
    except AdapterValidationError as exc:
        _emit({"refused": {"code": exc.code, "reason": exc.reason}})
        return
    except AdapterFetchError as exc:
        _emit({"fetch_error": {"reason": exc.reason, "transient": exc.transient}})
        return
    _emit({"root": str(fetched), "manifest": dataclasses.asdict(manifest)})


def main() -> int:
    request = json.loads(sys.stdin.buffer.read())
    memory = int(request["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    cpu = int(request["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    try:
        _child(request)
    except MemoryError:
        _emit({"out_of_memory": True})
    except BaseException as exc:  # reported to the parent, which refuses the adapter
        traceback.print_exc()
        _emit({"crashed": type(exc).__name__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
