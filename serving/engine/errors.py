"""Engine errors.

    EngineError                  any failure inside an engine replica
    ├── AdapterLoadError         an adapter could not be made resident (-> 422/503)
    │   └── AdapterBusy          unload refused: requests are still using it
    ├── EngineDead               the engine crashed; the replica must be replaced (-> 503)
    ├── RequestRefused           the engine refused the request's parameters (-> 400)
    └── DeviceMismatch           the replica's devices are not what it asked for (start refused)
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of engine failures."""


def public_message(exc: BaseException, limit: int = 300) -> str:
    """A short, single-line reason that may reach a client: never a traceback.

    Ray re-raises a replica's exception as ``RayTaskError(<cause type>)`` whose text is the
    whole remote traceback (file paths, pid, node IP, actor id); its ``cause`` is the original.
    """
    while isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause  # type: ignore[attr-defined]
    reason = getattr(exc, "reason", None)
    text = reason if isinstance(reason, str) else str(exc)
    line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class AdapterLoadError(EngineError):
    """The adapter could not be loaded into the engine."""


class AdapterBusy(AdapterLoadError):
    """The adapter is in use and cannot be unloaded now."""


class EngineDead(EngineError):
    """The engine is no longer usable."""


class RequestRefused(EngineError):
    """The engine refused the request as invalid before generating (a structured-output
    constraint it cannot compile, a token id outside the vocabulary): the client's fault."""


class DeviceMismatch(EngineError):
    """The replica asked for devices it cannot see (or runs without the ones vLLM needs)."""
