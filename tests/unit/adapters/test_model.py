from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorafleet.adapters.errors import InvalidName
from lorafleet.adapters.model import (
    NAME_PATTERN,
    AdapterRecord,
    ApiKey,
    Quota,
    Tenant,
    validate_name,
)


def _record(**overrides: object) -> AdapterRecord:
    fields: dict[str, object] = dict(
        tenant="alice", name="sql-helper", source="file:///x", base_model="tiny-llama",
        digest="ab" * 32, rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"),
        size_bytes=1234, shared=False, created_at=1.5)
    fields.update(overrides)
    return AdapterRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "alice", "team-1", "v1.2_x", "0abc", "a" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Alice", "-x", ".x", "_x", "a/b", "a@b", "a b", "a" * 64, "ü", "../etc"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@given(st.text(max_size=70))
def test_accepted_names_are_safe_in_paths_and_ids(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        assert NAME_PATTERN.fullmatch(name) is None
        return
    assert "/" not in name and "@" not in name and not name.startswith(".")
    assert name == name.lower() and 1 <= len(name) <= 63


def test_records_refuse_bad_names() -> None:
    with pytest.raises(InvalidName):
        Tenant("Bad Name", "x")
    with pytest.raises(InvalidName):
        _record(name="../../etc")
    with pytest.raises(InvalidName):
        ApiKey("nothex!!", "alice", "h", 0.0)


def test_adapter_id() -> None:
    assert _record().adapter_id == "alice/sql-helper@" + "ab" * 6


@pytest.mark.parametrize("obj", [
    Tenant("alice", "Alice", Quota(4, 60, None), 2.0),
    ApiKey("0123abcd", "alice", "f" * 64, 3.0, revoked=True),
    ApiKey("0123abce", "alice", "e" * 64, 3.0, owner="operator"),
    _record(target_modules=["q_proj"], shared=True),
    _record(source="s3://b/p", secret_ref="creds", stored_at="s3://store/x/" + "ab" * 32),
])
def test_json_round_trip(obj: Tenant | ApiKey | AdapterRecord) -> None:
    data = json.loads(json.dumps(obj.to_dict()))
    assert type(obj).from_dict(data) == obj


def test_quota_refuses_negative() -> None:
    with pytest.raises(ValueError):
        Quota(max_concurrent=-1)


def test_records_carry_content_never_a_node_path() -> None:
    """What the registry shares is enough to fetch the adapter anywhere, and nothing local."""
    record = _record(source="s3://b/p", secret_ref="creds", stored_at="s3://store/x/" + "ab" * 32)
    assert "local_path" not in record.to_dict()
    content = record.content
    assert (content.digest, content.source, content.secret_ref, content.stored_at) == (
        "ab" * 32, "s3://b/p", "creds", "s3://store/x/" + "ab" * 32)


def test_old_records_with_local_path_still_read() -> None:
    """A record written by an earlier version (with the importing pod's path) reads fine; the
    path is dropped, so no replica is ever handed a directory of another node."""
    old = {k: v for k, v in _record().to_dict().items() if k not in ("secret_ref", "stored_at")}
    old["local_path"] = "/data/adapter-cache/" + "ab" * 32
    record = AdapterRecord.from_dict(old)
    assert record == _record()
    assert record.content.stored_at is None
