"""Errors raised by `lorafleet.adapters`.

Boundary: every exception this package raises on purpose is one of these; callers (the admin API,
the operator) map them to HTTP statuses or retry decisions by type, never by message.

    AdapterError                      base of everything below
    ├── InvalidName (+ ValueError)    a tenant or adapter name that fails the name rule
    ├── AdapterValidationError        the adapter is refused; `.code` says which rule (422)
    ├── AdapterFetchError             the source could not be read; `.transient` says retry or not
    │   └── IntakeBusy                the same adapter is being imported, or every intake slot is
    │                                 taken (always transient: 503, retry later)
    ├── CacheError                    the on-disk cache was misused (bad digest, missing entry)
    │   └── CacheFull                 the cache's filesystem has no room left (507; free space)
    └── RegistryError                 the registry refused or failed an operation
        ├── NotFound                  the tenant / key / adapter does not exist (404)
        ├── AlreadyExists             a key id or key hash already exists (409)
        └── RegistryUnavailable       the backend is down or unreachable (503; retry later)
"""

from __future__ import annotations

import reprlib
from typing import Literal

__all__ = [
    "AdapterError",
    "AdapterFetchError",
    "AdapterValidationError",
    "AlreadyExists",
    "CacheError",
    "CacheFull",
    "IntakeBusy",
    "InvalidName",
    "NotFound",
    "RegistryError",
    "RegistryUnavailable",
    "ValidationCode",
    "client_text",
]

# The closed set of reasons an adapter is refused. Stable: the admin API returns it as `code`.
ValidationCode = Literal[
    "pickle_forbidden",  # a .bin/.pt/.pth/.pkl/.ckpt file: unpickling runs code
    "symlink_forbidden",  # a symlink, or a link/device member in an archive
    "path_traversal",  # an absolute path or '..' in an archive member name
    "unexpected_file",  # a file that is not config, weights or markdown
    "missing_file",  # adapter_config.json or adapter_model.safetensors absent
    "bad_config",  # adapter_config.json unreadable or malformed
    "not_lora",  # peft_type is not LORA
    "unsupported_config",  # modules_to_save, DoRA, bias, rank_pattern...: we do not serve those
    "wrong_base_model",  # base_model_name_or_path differs from the served model
    "rank_too_large",  # r above the serving limit
    "unknown_target_module",  # a target module the base model does not have
    "bad_header",  # a safetensors header that is malformed or oversized
    "bad_tensor",  # a tensor with an unexpected name, wrong dtype, NaN or Inf
    "shape_mismatch",  # a tensor shape that disagrees with the base model or r
    "config_mismatch",  # the config's r / target_modules disagree with the tensors
    "too_large",  # more bytes (or archive members) than the limit
    "too_complex",  # checking it needs more time or memory than intake allows (hostile content)
]

CLIENT_TEXT_CHARS = 48
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 2  # a 900-deep JSON list is printed as [[...]], never recursed into
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = CLIENT_TEXT_CHARS
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = 4


def client_text(value: object, limit: int = CLIENT_TEXT_CHARS) -> str:
    """Quote something a client sent, for an error message: at most `limit` printable ASCII
    characters, quoted, with `...` when cut.

    Error messages travel back to the client, into logs and into CR status: a quoted value must
    never be large (a 300 MB archive member name once came back as a 314 MB answer) nor carry
    control characters (terminal escapes, forged log lines).
    """
    text = value if isinstance(value, str) else _SHORT_REPR.repr(value)
    cut = len(text) > limit
    shown = "".join(c if c.isascii() and c.isprintable() else "?" for c in text[:limit])
    return f"'{shown}...'" if cut else f"'{shown}'"


class AdapterError(Exception):
    """Base of every error raised on purpose by `lorafleet.adapters`."""


class InvalidName(AdapterError, ValueError):
    """A tenant or adapter name that does not match the name rule."""


class AdapterValidationError(AdapterError):
    """The adapter is refused. `code` is machine-readable, `reason` is for humans."""

    def __init__(self, reason: str, code: ValidationCode) -> None:
        super().__init__(f"{code}: {reason}")
        self.reason = reason
        self.code: ValidationCode = code


class AdapterFetchError(AdapterError):
    """The adapter's source could not be read.

    `transient=True` (connection refused, timeout, HTTP 5xx/429) means the same request may work
    later; `transient=False` (404, 403, a corrupt archive, an unknown scheme) means it will not.
    """

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


class IntakeBusy(AdapterFetchError):
    """Intake refused to start now: the same (tenant, name) is being imported, or every intake
    slot is taken. A fetch error so that every caller already retries it as transient (503):
    a retry after the running import ends may succeed, and a retry never starts a second fetch
    of one adapter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, transient=True)


class CacheError(AdapterError):
    """The adapter cache was asked something impossible (bad digest, missing source)."""


class CacheFull(CacheError):
    """The cache's filesystem is full (ENOSPC or EDQUOT); nothing was written."""


class RegistryError(AdapterError):
    """Base of registry errors."""


class NotFound(RegistryError):
    """The tenant, key or adapter does not exist."""


class AlreadyExists(RegistryError):
    """An object with the same identity already exists."""


class RegistryUnavailable(RegistryError):
    """The registry backend cannot be reached; the operation may succeed later."""
