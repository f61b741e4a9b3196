"""secretRef -> credentials: a mounted directory per secret, one file per key; never ambient."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.adapters.errors import AdapterFetchError
from lorafleet.adapters.secrets import SecretResolver


def _secret(root: Path, name: str, **values: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in values.items():
        (root / name / key).write_text(value + "\n")  # kubectl-created secrets often end in \n


def test_a_mounted_secret_becomes_the_sources_credentials(tmp_path: Path) -> None:
    _secret(tmp_path, "team-a-s3", AWS_ACCESS_KEY_ID="AKIDTEAMA", AWS_SECRET_ACCESS_KEY="s3cr3t",
            AWS_ENDPOINT_URL="http://127.0.0.1:9000", AWS_REGION="eu-west-1")
    creds = SecretResolver(tmp_path).credentials("team-a-s3", "s3://bucket/adapter")
    assert creds is not None
    assert (creds.aws_access_key_id, creds.aws_secret_access_key, creds.endpoint_url,
            creds.region) == ("AKIDTEAMA", "s3cr3t", "http://127.0.0.1:9000", "eu-west-1")
    assert "s3cr3t" not in repr(creds)


def test_no_secret_ref_means_ambient_identity(tmp_path: Path) -> None:
    assert SecretResolver(tmp_path).credentials(None, "s3://bucket/adapter") is None


@pytest.mark.parametrize("ref", ["missing", "../etc", "a/b", "UPPER"])
def test_unknown_or_hostile_secret_names_are_permanent_errors(tmp_path: Path, ref: str) -> None:
    with pytest.raises(AdapterFetchError) as info:
        SecretResolver(tmp_path).credentials(ref, "s3://bucket/adapter")
    assert not info.value.transient


def test_an_s3_secret_without_keys_is_refused_not_ambient(tmp_path: Path) -> None:
    """Falling back to the pod's identity would let a tenant read what the pod may read."""
    _secret(tmp_path, "half", AWS_REGION="us-east-1")
    with pytest.raises(AdapterFetchError, match="AWS_ACCESS_KEY_ID"):
        SecretResolver(tmp_path).credentials("half", "s3://bucket/adapter")
    creds = SecretResolver(tmp_path).credentials("half", "https://example.com/a.tar.gz")
    assert creds is not None and creds.aws_access_key_id is None
