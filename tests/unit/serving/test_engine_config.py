"""``EngineConfig``: the user's ``EngineSettings`` plus where the model is, sizes in GiB.

Code that thinks in bytes (vLLM's ``kv_cache_memory_bytes``, the offload tiers, tests with
tiny caches) builds, copies and reads configs in bytes; a size must survive the trip exactly,
including through ``model_dump`` to a Ray actor and back.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet.serving.config import EngineConfig, EngineSettings


def config(**kw: object) -> EngineConfig:
    return EngineConfig(model_dir="/m", served_model_name="m", **kw)


def test_byte_spellings_build_the_same_config_as_gib() -> None:
    in_bytes = config(kv_cache_bytes=64 * 2**20, kv_offload_host_bytes=32768,
                      kv_offload_disk_bytes=3 * 2**30)
    assert in_bytes == config(kv_cache_gib=1 / 16, kv_offload_gib=32768 / 2**30,
                              kv_offload_disk_gib=3.0)
    assert (in_bytes.kv_cache_bytes, in_bytes.kv_offload_host_bytes,
            in_bytes.kv_offload_disk_bytes) == (64 * 2**20, 32768, 3 * 2**30)


def test_a_config_travels_to_an_actor_and_back_unchanged() -> None:
    c = config(kv_cache_bytes=123_456_789, prefix_caching=False, max_num_seqs=8)
    back = EngineConfig(**c.model_dump())
    assert back == c and back.kv_cache_bytes == 123_456_789


def test_a_copy_may_change_a_size_in_bytes() -> None:
    c = config().model_copy(update={"kv_offload_host_bytes": 4096, "prefix_caching": False})
    assert c.kv_offload_host_bytes == 4096 and c.prefix_caching is False


def test_a_size_given_both_ways_is_refused() -> None:
    with pytest.raises(ValidationError, match="not both"):
        config(kv_cache_bytes=2**30, kv_cache_gib=1.0)


def test_a_config_of_settings_keeps_every_setting() -> None:
    s = EngineSettings(max_loras=2, kv_cache_gib=0.5, scheduling_policy="tokenflow")
    c = EngineConfig.of(s, model_dir="/m", served_model_name="m", multiprocessing=False)
    assert {k: getattr(c, k) for k in EngineSettings.model_fields} == s.model_dump()
    assert c.multiprocessing is False


def test_the_cache_is_at_least_one_mib() -> None:
    with pytest.raises(ValidationError):
        config(kv_cache_bytes=2**20 - 1)
    assert config(kv_cache_bytes=2**20).kv_cache_bytes == 2**20
