"""KV tier folders: private to the serving user, and not leaked by crashed engines (issue 19,
item 12). Real processes are started and SIGKILLed; no vLLM.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from lorafleet.serving.kvcache.tiers import OWNER_FILE, FileTier

_HOLD = """
import sys
from pathlib import Path
from lorafleet.serving.kvcache.tiers import FileTier
tier = FileTier(Path(sys.argv[1]), 1 << 20)
tier.put("block", b"secret prompt KV" * 64)
print("ready", flush=True)
if sys.argv[2] == "crash":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()  # hold: alive until the test closes stdin
"""


def _engine(root: Path, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(root), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_tier_folder_is_private(tmp_path: Path) -> None:
    tier = FileTier(tmp_path / "lorafleet-kv-a", 1 << 20)
    tier.put("k", b"x" * 10)
    assert stat.S_IMODE(tier.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((tier.root / OWNER_FILE).stat().st_mode) == 0o600


def test_an_existing_loose_folder_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "lorafleet-kv-b"
    root.mkdir()
    os.chmod(root, 0o777)
    FileTier(root, 1 << 20)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_crashed_engines_tier_is_swept_at_the_next_start(tmp_path: Path) -> None:
    crashed, alive = tmp_path / "lorafleet-kv-crashed", tmp_path / "lorafleet-kv-alive"
    dead = _engine(crashed, "crash")
    dead.wait(timeout=30)
    assert dead.returncode == -9 and any(crashed.iterdir())  # the crash left its blocks
    holder = _engine(alive, "hold")
    unrelated = tmp_path / "other-data"
    unrelated.mkdir()
    try:
        FileTier(tmp_path / "lorafleet-kv-restarted", 1 << 20)
        assert not crashed.exists()
        assert alive.exists() and unrelated.exists()  # a live engine's tier is never touched
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


def test_ownerless_folders_are_swept_only_when_old(tmp_path: Path) -> None:
    old, recent = tmp_path / "lorafleet-kv-old", tmp_path / "lorafleet-kv-recent"
    for d in (old, recent):
        d.mkdir()
        (d / "blob").write_bytes(b"x")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    FileTier(tmp_path / "lorafleet-kv-new", 1 << 20)
    assert not old.exists() and recent.exists()
