"""KV-cache tiers outside vLLM's block pool (host memory, local disk) for paused requests.

Boundary: ``tiers`` is capacity, eviction and file handling; ``connector`` is the vLLM KV
connector that moves paused requests' blocks between vLLM's cache and the tiers.
"""

from .tiers import FileTier, TieredStore, TierStats

__all__ = ["FileTier", "TierStats", "TieredStore"]
