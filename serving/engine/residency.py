"""Which adapters an engine replica keeps resident, and which one to drop for a newcomer.

Policy is pure (``select_victim``); ``AdapterResidency`` is the small stateful holder the
engine uses, with in-flight counts so an adapter is never unloaded under a running request
(the SGLang registry's acquire/release idea).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Resident:
    """An adapter held by a replica: its vLLM integer id, its files on this node (``path``, of
    content ``digest``) and how many requests use it."""

    adapter_id: str
    lora_int_id: int
    path: str
    in_flight: int = 0
    digest: str = ""


def select_victim(
    lru_order: Sequence[str], in_flight: Mapping[str, int], capacity: int, incoming: str
) -> str | None:
    """The least recently used idle adapter to drop so ``incoming`` fits, or None if none needed.

    Raises ``LookupError`` when the replica is full of adapters that are all in use.
    """
    if incoming in lru_order or len(lru_order) < capacity:
        return None
    for adapter_id in lru_order:  # oldest first
        if in_flight.get(adapter_id, 0) == 0:
            return adapter_id
    raise LookupError("every resident adapter is in use")


class AdapterResidency:
    """LRU bookkeeping of resident adapters. Not thread-safe: owned by one event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Oldest first. Guards: an id is here iff vLLM holds it under that lora_int_id.
        self._lru: OrderedDict[str, Resident] = OrderedDict()
        self._next_int_id = 1

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._lru

    def ids(self) -> tuple[str, ...]:
        return tuple(self._lru)

    def get(self, adapter_id: str) -> Resident | None:
        return self._lru.get(adapter_id)

    def victim_for(self, incoming: str) -> str | None:
        in_flight = {k: r.in_flight for k, r in self._lru.items()}
        return select_victim(list(self._lru), in_flight, self.capacity, incoming)

    def add(self, adapter_id: str, path: str, digest: str = "") -> Resident:
        resident = Resident(adapter_id, self._next_int_id, path, digest=digest)
        self._next_int_id += 1
        self._lru[adapter_id] = resident
        return resident

    def remove(self, adapter_id: str) -> Resident | None:
        return self._lru.pop(adapter_id, None)

    def acquire(self, adapter_id: str) -> Resident:
        r = self._lru[adapter_id]
        self._lru[adapter_id] = r = replace(r, in_flight=r.in_flight + 1)
        self._lru.move_to_end(adapter_id)
        return r

    def release(self, adapter_id: str) -> None:
        r = self._lru.get(adapter_id)
        if r is not None:
            self._lru[adapter_id] = replace(r, in_flight=max(0, r.in_flight - 1))
