"""The agent's disk: content-addressed verified blobs and one state file.

Layout under the state directory::

    state.json           the one state file (written only through :meth:`Store.write_state`)
    blobs/<sha256>       verified model blobs, named by their hash
    blobs/.partial/      downloads in progress (resumable; never loaded)
    empty/               the agent's working directory, kept empty (:func:`empty_directory`)

Invariants: a file appears under ``blobs/<sha256>`` only after its bytes hashed to that name
(rename is the commit); ``state.json`` is replaced atomically (temp file in the same directory,
fsync, ``os.replace``, fsync the directory), so a kill at any instant leaves the previous or the
new state, never a torn one. The agent's main loop is this module's only writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgefleet.agent.contract.errors import BlobMismatch, StoreFailed

__all__ = ["Store", "atomic_write", "empty_directory", "sha256_file"]

STATE_KIND = "edgefleet.agent-state/v1"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreFailed(f"could not write {path}: {exc}") from exc


def empty_directory(path: Path) -> Path:
    """Create ``path`` (0700) if needed and remove anything in it: a working directory in which
    a relative file reference from an untrusted model finds nothing."""
    import shutil

    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as exc:
        raise StoreFailed(f"cannot prepare the empty working directory {path}: {exc}") from exc
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = self.blobs / ".partial"
        self.state_path = root / "state.json"
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreFailed(f"cannot create the state directory {root}: {exc}") from exc

    # -- blobs -----------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def partial_path(self, sha256: str) -> Path:
        return self.partial / sha256

    def has_blob(self, sha256: str, size: int) -> bool:
        p = self.blob_path(sha256)
        return p.is_file() and p.stat().st_size == size

    def commit_blob(self, tmp: Path, sha256: str, size: int) -> Path:
        """Check ``tmp`` against the signed size and hash, then make it visible by rename."""
        actual_size = tmp.stat().st_size
        if actual_size != size:
            tmp.unlink(missing_ok=True)
            raise BlobMismatch(
                f"blob {sha256[:16]}… is {actual_size} bytes, the signed size is {size}",
                reason="size_mismatch",
            )
        actual = sha256_file(tmp)
        if actual != sha256:
            tmp.unlink(missing_ok=True)
            raise BlobMismatch(
                f"blob hashes to {actual[:16]}…, the signed sha256 is {sha256[:16]}…; "
                "the blob server sent other bytes than the hub published",
                reason="hash_mismatch",
            )
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        dest = self.blob_path(sha256)
        os.replace(tmp, dest)
        fsync_dir(self.blobs)
        return dest

    def verify_blob(self, sha256: str, size: int) -> bool:
        return self.has_blob(sha256, size) and sha256_file(self.blob_path(sha256)) == sha256

    def gc(self, keep: set[str]) -> list[str]:
        """Delete blobs that no state references; return the hashes removed."""
        removed = []
        for p in self.blobs.iterdir():
            if p.is_file() and p.name not in keep:
                p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    # -- state -----------------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        """The last committed state, or an empty one on first start."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return {"kind": STATE_KIND, "last_seq": 0, "models": {}}
        try:
            state = json.loads(raw)
        except ValueError as exc:
            # Cannot happen with atomic writes unless the disk lies; keep the evidence.
            broken = self.state_path.with_suffix(".broken")
            os.replace(self.state_path, broken)
            raise StoreFailed(
                f"{self.state_path} does not parse ({exc}); moved to {broken}. Start again to "
                "begin with an empty state; the hub re-sends the desired state."
            ) from exc
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
            raise StoreFailed(f"{self.state_path} is not an {STATE_KIND} file")
        return state

    def write_state(self, state: dict[str, Any]) -> None:
        state = {**state, "kind": STATE_KIND}
        atomic_write(self.state_path, json.dumps(state, sort_keys=True, indent=1).encode())
