"""Files that hold keys (the admin key, the demo tenants' keys): private from the first byte.

Boundary: file creation and the admin-key strength rule; what the keys are is `keys`.
A file written and then `chmod`ed is world-readable (umask 022) in between, long enough for
another local user polling the directory to read it. Here the file is created with mode 0600
by the `open` call itself (`O_CREAT | O_EXCL`: never an existing file, never through a
symbolic link someone planted at that name); a file that already exists is replaced by
renaming a new private file over it, so no reader ever sees a partial or a public key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = [
    "MIN_ADMIN_KEY_CHARS",
    "WeakAdminKey",
    "check_admin_key",
    "read_private_file",
    "write_private_file",
]

MIN_ADMIN_KEY_CHARS = 32


class WeakAdminKey(ValueError):
    """An admin key too short to resist guessing."""


def check_admin_key(key: str, source: str = "the admin key",
                    remedy: str = "leave it unset to have one generated") -> str:
    """Return `key` if it is strong enough to be the admin credential, else raise.

    `source` names where the key came from and `remedy` what to do, for the one-line error
    the operator of the server reads (the key itself is never quoted)."""
    if len(key) < MIN_ADMIN_KEY_CHARS:
        raise WeakAdminKey(
            f"{source} has {len(key)} characters; at least {MIN_ADMIN_KEY_CHARS} are "
            f"required ({remedy})")
    return key


def _create_private(path: Path, text: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    finally:
        if fd != -1:
            os.close(fd)


def write_private_file(path: Path, text: str, *, replace: bool = False) -> None:
    """Write `text` to a new file at `path` with mode 0600.

    `replace=False`: `FileExistsError` if `path` exists (a concurrent creator won; read its
    file). `replace=True`: an existing file is atomically replaced by a new private one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace:
        _create_private(path, text)
        return
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        _create_private(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_private_file(path: Path) -> str:
    """Read a key file that must be a regular file of this user's, not a symbolic link.

    A group- or world-readable one (written by hand, or by an older version) is made 0600
    first. Raises `PermissionError` for a file owned by someone else: its content could be a
    key that user knows.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        info = os.fstat(f.fileno())
        if info.st_uid != os.geteuid():
            raise PermissionError(f"{path} is owned by another user; refusing its key")
        if info.st_mode & 0o077:
            os.fchmod(f.fileno(), 0o600)
        return f.read()


def load_or_create_admin_key(data_dir: Path, given: str | None) -> str:
    """The admin key: the one given, else the one in ``data_dir/admin.key``, else a new one
    (created with mode 0600). Raises ``WeakAdminKey`` for a key under 32 characters."""
    if given:
        return check_admin_key(given, "the admin key given (--admin-key or LORAFLEET_ADMIN_KEY)",
                               "leave it unset to have one generated")
    path = data_dir / "admin.key"
    key = "lfadmin_" + secrets.token_urlsafe(32)
    try:
        write_private_file(path, key + "\n")
    except FileExistsError:  # an earlier start (or a concurrent one) made it: use that
        return check_admin_key(read_private_file(path).strip(), f"the admin key in {path}",
                               "remove the file to have a new one generated")
    return key
