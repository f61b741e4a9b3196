"""Credentials for an adapter's source, named by its `secretRef`, read from a mounted directory.

Boundary: reads files, returns `FetchCredentials`; knows nothing of Kubernetes' API. How a
secretRef maps to credentials, on a serving pod and for the operator alike:

    <secrets_dir>/<secretRef name>/<KEY>      one file per key (a Kubernetes Secret mounted as a
                                              volume has exactly this shape)

    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN   s3:// sources
    AWS_ENDPOINT_URL, AWS_REGION (or AWS_DEFAULT_REGION)          S3-compatible stores
    HF_TOKEN (or token)                                           hf:// and http(s):// bearer

The directory is `LORAFLEET_ADAPTER_SECRETS_DIR` (`--adapter-secrets-dir`), by default
`<data_dir>/secrets`; the chart mounts each Secret an adapter names there. Why a directory and
not environment variables: Secrets added later appear in a mounted volume without a restart,
and one pod can hold many tenants' credentials without mixing them into its own environment.

A source with a secretRef uses those credentials only: an `s3://` source whose secret has no
access key is refused instead of silently falling back to the pod's ambient identity (which
would let one tenant read what the serving pod, not the tenant, may read).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from .errors import AdapterFetchError
from .sources import FetchCredentials

__all__ = ["SECRET_KEYS", "SecretResolver", "decide_credentials"]

# Kubernetes object names (RFC 1123 subdomain): no '/', no '..' path tricks.
_REF_PATTERN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_TOKEN", "token")
_MAX_VALUE_BYTES = 8192


def decide_credentials(ref: str, values: Mapping[str, str], source: str) -> FetchCredentials:
    """Credentials for `source` from a secret's key/value pairs, or a permanent fetch error."""
    creds = FetchCredentials(
        token=values.get("HF_TOKEN") or values.get("token") or None,
        aws_access_key_id=values.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=values.get("AWS_SECRET_ACCESS_KEY") or None,
        aws_session_token=values.get("AWS_SESSION_TOKEN") or None,
        endpoint_url=values.get("AWS_ENDPOINT_URL") or None,
        region=values.get("AWS_REGION") or values.get("AWS_DEFAULT_REGION") or None,
    )
    if urlsplit(source).scheme.lower() == "s3" and not (
            creds.aws_access_key_id and creds.aws_secret_access_key):
        raise AdapterFetchError(
            f"secret {ref!r} has no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for an s3:// source",
            transient=False)
    return creds


class SecretResolver:
    """Turns a secretRef name into `FetchCredentials` by reading `<root>/<name>/<KEY>` files."""

    def __init__(self, root: Path | str | None) -> None:
        self.root = Path(root) if root is not None else None

    def credentials(self, ref: str | None, source: str) -> FetchCredentials | None:
        """None when `ref` is None (ambient identity); else that secret's credentials only.

        Blocking (reads files). A missing secret is a permanent error: retrying will not mount it.
        """
        if ref is None:
            return None
        if _REF_PATTERN.fullmatch(ref) is None:
            raise AdapterFetchError(f"invalid secretRef name {ref!r}", transient=False)
        directory = self.root / ref if self.root is not None else None
        if directory is None or not directory.is_dir():
            raise AdapterFetchError(
                f"secret {ref!r} is not mounted on this node (expected a directory "
                f"{ref} under the adapter secrets dir)", transient=False)
        values = {}
        for key in SECRET_KEYS:
            path = directory / key
            if path.is_file() and path.stat().st_size <= _MAX_VALUE_BYTES:
                values[key] = path.read_text(encoding="utf-8").strip()
        return decide_credentials(ref, values, source)
