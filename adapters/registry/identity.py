"""Which registry a reader is talking to, and whether it may still believe it.

Boundary: plain data and one pure policy; no I/O. The backends (``sqlite.py``, ``redis.py``)
store the identity; readers (the ingress's tenancy cache) keep a ``RegistryTrust`` and feed
every identity they read through ``decide_registry_trust``.

The problem it solves: a Redis that lost its data (rescheduled onto an empty volume) or came
back from an old snapshot answers every query as a perfectly valid, smaller registry. Tenants
would get 401 for keys that exist, and a key revoked after the snapshot would work again. The
store cannot tell; a reader that remembers what it saw can.

The identity is three things the backend writes next to the data:

- ``registry_id``: a random id, set by the first write a store ever takes (``SET NX`` in the
  same transaction as the generation bump), so an emptied store has none, and the first write
  into it makes a new one.
- ``generation``: grows by one on every write (``Registry.generation()``).
- ``supersedes``: ids this store was explicitly accepted as a restore of (``accept_restore``).

The rule (``decide_registry_trust``), for a reader that last trusted ``known``:

- nothing known yet: trust what is seen (a fresh process cannot know better; see the limits).
- same id, generation not lower: trust, and remember the higher generation.
- same id, generation lower: **rolled back** (an older snapshot of the same store).
- no id remembered (the store had not been written when first seen): trust a generation that
  did not go down; an id appearing is the first write.
- another id, or none, where one was known: **reset**, unless the seen store ``supersedes``
  the known id (an operator accepted the restore with ``lorafleet registry accept-restore``).

A refusal is sticky: a rolled-back store that takes writes until its generation passes the
remembered one is still refused (the revoked key is still live in it), until a restore is
accepted. Accepting gives the store a new id that supersedes the old ones, which every reader
that knew an old id adopts on its next read: one command, every ingress replica.

Limits: the memory is per process. A reader started after the loss (a new ingress pod) has
nothing to compare with and trusts what it finds; the guard protects the replicas that were
running, which on a cluster is the usual case (Redis restarts, ingress pods do not). Durable
Redis (AOF on a volume, the chart's default) is the first line; this is the second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import RegistryUnavailable

__all__ = [
    "NO_ID",
    "RESET_MESSAGE",
    "RegistryIdentity",
    "RegistryReset",
    "RegistryTrust",
    "decide_registry_trust",
]

# Stands for "a store that had no id yet" in ``supersedes``: every accepted restore lists it, so
# a reader that first saw a store before its first write can accept a restore too.
NO_ID = ""

RESET_MESSAGE = (
    "The registry was reset or rolled back; this server keeps serving what it knew and refuses "
    "the rest until an operator accepts the restored registry (lorafleet registry accept-restore)."
)


@dataclass(frozen=True)
class RegistryIdentity:
    """What a store says it is: its id (None before its first write), generation, lineage."""

    registry_id: str | None
    generation: int
    supersedes: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class RegistryTrust:
    """A reader's memory: the highest identity it trusted, and why it refuses now (if it does)."""

    known: RegistryIdentity | None = None
    refused: Literal["reset", "rolled_back"] | None = None
    seen: RegistryIdentity | None = None  # the last identity read (for status pages and logs)

    @property
    def trusted(self) -> bool:
        return self.refused is None


class RegistryReset(RegistryUnavailable):
    """The registry answers, but it is not the one this process knew (emptied or rolled back).

    A subclass of ``RegistryUnavailable`` on purpose: whoever already serves from what it knew
    during an outage does the same here, and whoever maps outages to 503 keeps doing so.
    """

    def __init__(self, trust: RegistryTrust) -> None:
        super().__init__(RESET_MESSAGE)
        self.trust = trust


def decide_registry_trust(state: RegistryTrust, seen: RegistryIdentity) -> RegistryTrust:
    """The reader's new state after reading ``seen`` (the rule is in the module docstring)."""
    known = state.known
    if known is None:
        return RegistryTrust(known=seen, seen=seen)
    if seen.registry_id != known.registry_id and (known.registry_id or NO_ID) in seen.supersedes:
        return RegistryTrust(known=seen, seen=seen)  # an accepted restore
    if known.registry_id is not None and seen.registry_id != known.registry_id:
        return RegistryTrust(known=known, refused="reset", seen=seen)
    if state.refused is not None:
        return RegistryTrust(known=known, refused=state.refused, seen=seen)  # sticky
    if seen.generation < known.generation:
        return RegistryTrust(known=known, refused="rolled_back", seen=seen)
    return RegistryTrust(known=seen, seen=seen)
