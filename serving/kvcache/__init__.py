"""KV-cache tiers outside vLLM's block pool (host memory, local disk) for paused requests.

Boundary: ``tiers`` is pure capacity/eviction logic. The vLLM KV connector that moves blocks
between vLLM's KV cache and these tiers is not written yet (see docs/scheduling.md).
"""

from .tiers import DiskTier, HostPool, TieredStore, TierStats

__all__ = ["DiskTier", "HostPool", "TierStats", "TieredStore"]
