"""Writing a file so that it appears only complete, and readable by other users' workers.

Every file nsfw_dask puts into a shared folder (a weights file, a SavedModel zip, a vocabulary
cache) is written the same way: a temporary ``.<name>.<random>.part`` file in the target folder,
flushed and ``fsync``ed, given the mode an ordinary ``open`` would give it (``0o666`` less the
umask: ``mkstemp``'s ``0o600`` would hide it from other users' workers), then renamed over the
target with ``os.replace``.  A reader sees the old file or the whole new one, never a part; a
failed write leaves no temporary file behind.

The job's OUTPUT uses :func:`put_small` for its small files (the job description, ``_SUCCESS``,
the lease): locally the same temporary-then-rename, named by :func:`tmp_name` so that a later run
recognises the temporaries of a crashed one (:data:`TMP_NAME`); on object stores one PUT.  A
failed write there is a :class:`~nsfw_dask.exceptions.JobError` that names the file, OUTPUT and
the fix (:func:`storage_error`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .exceptions import JobError

__all__ = ["TMP_NAME", "atomic_write_bytes", "atomic_writer", "put_small", "read_umask", "storage_error", "tmp_name"]


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


def tmp_name(name: str) -> str:
    """The hidden temporary name under which ``name`` is written in OUTPUT (host and pid in it)."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


TMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def storage_error(what: str, output: str, e: BaseException) -> JobError:
    """A failed write into OUTPUT as one line: the file, the reason, OUTPUT and the fix.

    ``what`` names the file as the user sees it; ``output`` is OUTPUT as given.  A full disk reads
    ``cannot write OUTPUT/_SUCCESS: No space left on device (OUTPUT ...). Free space ...``.
    """
    code = getattr(e, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else (str(e).splitlines() or [""])[0]
    return JobError(
        f"cannot write {what}: {reason or type(e).__name__} (OUTPUT {output}). Free space there (or fix "
        "the storage's permissions), then rerun the same command with --resume."
    )


def put_small(fs: Any, root: str, name: str, data: bytes, *, shown: str) -> None:
    """Put ``data`` at ``root/name`` so that it appears only complete.

    Locally: a :func:`tmp_name` file beside it, flushed and ``fsync``ed, renamed over it; the
    temporary is removed if anything fails.  Elsewhere: one upload (the object exists only when
    complete).  Any failure raises :func:`storage_error` (``shown``: OUTPUT as the user gave it).
    """
    from fsspec.implementations.local import LocalFileSystem

    final = f"{root}/{name}"
    try:
        if isinstance(fs, LocalFileSystem):
            tmp = f"{root}/{tmp_name(name)}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            fs.pipe_file(final, data)
    except OSError as e:
        raise storage_error(final if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(final), shown, e) from e
