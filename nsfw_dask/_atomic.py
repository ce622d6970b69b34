"""Writing a file so that it appears only complete, and readable by other users' workers.

Every file nsfw_dask puts into a shared folder (a weights file, a SavedModel zip, a vocabulary
cache) is written the same way: a temporary ``.<name>.<random>.part`` file in the target folder,
flushed and ``fsync``ed, given the mode an ordinary ``open`` would give it (``0o666`` less the
umask: ``mkstemp``'s ``0o600`` would hide it from other users' workers), then renamed over the
target with ``os.replace``.  A reader sees the old file or the whole new one, never a part; a
failed write leaves no temporary file behind.

(The dataset writer in :mod:`nsfw_dask.pipeline` names its temporary files differently, so that
a later run can recognise and clean up those of a crashed one; it does not use this module.)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write_bytes", "atomic_writer", "read_umask"]


def read_umask() -> int:
    """The process umask, read without changing it (``os.umask`` is process-wide and racy)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_writer(dest: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``dest`` for writing; on a clean exit, put it at ``dest``.

    The ``with`` body writes to the yielded binary file.  If the body returns, the file is
    flushed, ``fsync``ed, closed, given mode ``0o666 & ~umask`` and renamed to ``dest``
    (atomically, replacing any file there).  If the body raises (a failed check, say), the
    temporary file is deleted and ``dest`` is left as it was.  ``dest``'s folder must exist.
    """
    dest = Path(dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~read_umask())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``dest`` through :func:`atomic_writer`; returns ``dest`` as a Path."""
    with atomic_writer(dest) as out:
        out.write(data)
    return Path(dest)
