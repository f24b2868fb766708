"""Encoded images on disk, so reopening a conversation with its image skips the vision encoder.

One file per (image content, vision file): the K/V of every cross-attention layer, as an uncompressed
.npz (about 210 MB for a 4-tile image on 11B at F16). Files are written whole (temp file, fsync,
rename), so two processes may share the folder: a reader sees a complete entry or none. A size cap
evicts the least recently used entries (reads refresh an entry's time).
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import numpy as np
from assistant.store import cache_dir
from models.atomic_write import write_atomically

DEFAULT_CAP_BYTES = 4 * 10**9


class FeatureCache:
    def __init__(self, directory: Path | None = None, cap_bytes: int = DEFAULT_CAP_BYTES) -> None:
        self.directory = directory or cache_dir() / "image-features"
        self.cap_bytes = cap_bytes

    def _path(self, key: str) -> Path:
        return self.directory / f"{key.replace(':', '-')}.npz"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._path(key)
        try:
            with np.load(path) as entry:
                arrays = {name: entry[name] for name in entry.files}
            _touch(path)                                     # recently used
        except (OSError, ValueError, zipfile.BadZipFile):    # absent, evicted meanwhile, or unreadable
            return None
        return arrays

    def store(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Best effort: a cache that cannot be written (full disk) only costs a later re-encode."""
        try:
            with write_atomically(self._path(key)) as file:
                np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub takes any key for allow_pickle
            _touch(self._path(key))
        except OSError:
            return
        self._evict()

    def _evict(self) -> None:
        entries = []
        for path in self.directory.glob("*.npz"):
            try:
                stat = path.stat()
            except FileNotFoundError:                        # another process evicted it
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.cap_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _touch(path: Path) -> None:
    """Set the entry's time from the fine clock (the file system's own clock ticks in milliseconds)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))
