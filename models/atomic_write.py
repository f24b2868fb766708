"""Files that appear whole or not at all, for every layer (history images, the feature cache, converted pairs).

A file is written under a temporary name in its target's folder, flushed to the disk, renamed into place
(a rename within one folder is atomic), and the folder is synced so that the rename itself survives a power
cut. A process killed halfway leaves at most a temporary file, never a half-written target. The temporary
name is unique, so two processes may write the same target at once: the last rename wins, whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def write_atomically(target: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file opened in `mode` ("wb" or "w") whose contents become `target` when the block ends without an
    error; on an error (or Ctrl-C) the temporary file goes and `target` is as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sync_folder(target.parent)


def sync_folder(folder: Path) -> None:
    """Make the renames into `folder` durable (POSIX; elsewhere a rename is as durable as the OS makes it)."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
