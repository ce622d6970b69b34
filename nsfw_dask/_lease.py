"""One live run per OUTPUT: a lease object in OUTPUT that the running job keeps renewing.

A run of :func:`nsfw_dask.score_dataset` holds ``OUTPUT/_nsfw_dask_lease.json`` from before it
changes anything in OUTPUT (removing an old ``_SUCCESS``, old parts or temporaries) until after it
wrote ``_SUCCESS``, or failed and cleaned up.  The lease names the run (a random id), its job, the
host and process, when it was taken, its last heartbeat and when it expires.  It works the same on
a local folder and on an object store, where there are no lock files and fsspec has no
create-if-absent:

* **acquire**: read the lease.  Another run's *live* lease: refuse (one line: who holds it, since
  when, what to do).  None, or a *stale* one: write ours (locally a hard link of a complete file,
  which fails if a lease appeared meanwhile; over a stale lease, or on an object store, a rename or
  one PUT), wait :func:`settle_seconds`, read it back: still ours, we hold it; another run's, that
  run won the race and we refuse.
* **heartbeat**: a daemon thread re-reads the lease and rewrites it with a new heartbeat every
  ``seconds / 6``.  If it finds another run's lease, or cannot renew it for ``seconds``, the lease
  is *lost*: the run stops without writing ``_SUCCESS``.
* **commit**: every worker reads the lease just before it commits a part
  (:func:`confirm_holder`): a part is committed only while the lease names its run.
* **release**: the lease is deleted if it still names this run.

A lease is **stale** when its ``expires`` (last heartbeat + the holder's ``seconds``) has passed by
this machine's clock, or when its holder ran on this machine (same host name, boot and pid
namespace) and that process is gone: a killed run's lease blocks nothing on its own machine, and
elsewhere for at most ``seconds`` (``$NSFW_DASK_LEASE_SECONDS``, default 120).  Clocks of the
machines sharing an OUTPUT must agree to well within ``seconds``.

What is left of the race: two runs that both find no live lease, and where the second one's
write lands more than ``settle`` after the first one read its own back (the second's read and
write are milliseconds apart, so only if its process stalls in between).  Both then believe they
hold the lease until the first one's next heartbeat finds the other's lease and stops it; parts
it committed in between carry its job id, and the survivor's final check of every part's footer
refuses to write ``_SUCCESS`` over a part of another job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from ._atomic import put_small, storage_error, tmp_name
from .exceptions import JobError
from .io import is_local, show_path

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "LEASE_FILE",
    "LEASE_SECONDS_ENV",
    "Lease",
    "confirm_holder",
    "lease_seconds",
    "read_lease",
    "stale_reason",
]

logger = logging.getLogger(__name__)

LEASE_FILE = "_nsfw_dask_lease.json"

LEASE_SECONDS_ENV = "NSFW_DASK_LEASE_SECONDS"

#: How long a lease outlives its last heartbeat (renewed every sixth of that).
DEFAULT_LEASE_SECONDS = 120.0

_FORMAT = "nsfw-dask-lease/1"


def lease_seconds() -> float:
    """``$NSFW_DASK_LEASE_SECONDS`` (a positive number), else :data:`DEFAULT_LEASE_SECONDS`."""
    raw = os.environ.get(LEASE_SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise JobError(
            f"{LEASE_SECONDS_ENV}={raw!r} is not a positive number of seconds; unset it (default "
            f"{DEFAULT_LEASE_SECONDS:g}) or set e.g. {LEASE_SECONDS_ENV}=120.",
            2,
        )
    return v


def settle_seconds(seconds: float) -> float:
    """How long a writer waits before reading its lease back (1 s at the default expiry)."""
    return min(1.0, seconds / 100)


def _machine() -> str:
    """This host, boot and pid namespace: a holder's pid means something only from the same one."""
    boot = ns = ""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    with contextlib.suppress(OSError):
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    return f"{socket.gethostname()}/{boot}/{ns}"


def _process_start(pid: int) -> float | None:
    import psutil  # type: ignore[import-untyped]

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: gone
            return None
        return float(proc.create_time())
    except (psutil.Error, ValueError):
        return None


def read_lease(fs: Any, root: str) -> dict[str, Any] | None:
    """The lease in OUTPUT ``root``: None if there is none, ``{}`` if it is unreadable."""
    try:
        raw = fs.cat_file(f"{root}/{LEASE_FILE}")
    except FileNotFoundError:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) and rec.get("format") == _FORMAT else {}


def stale_reason(rec: dict[str, Any] | None, now: float | None = None) -> str | None:
    """Why the lease ``rec`` no longer holds OUTPUT, or None while it is live."""
    if not rec:
        return "it is unreadable"
    now = time.time() if now is None else now
    pid, started = rec.get("pid"), rec.get("started")
    if rec.get("machine") == _machine() and isinstance(pid, int):
        actual = _process_start(pid)
        if actual is None or not isinstance(started, (int, float)) or abs(actual - started) > 1.0:
            return f"its process (pid {pid} on this machine) is gone"
    expires = rec.get("expires")
    if not isinstance(expires, (int, float)):
        return "it has no expiry"
    if now > expires:
        return f"it expired {now - expires:.0f} s ago"
    return None


def _ago(rec: dict[str, Any], now: float) -> str:
    hb = rec.get("heartbeat")
    return f"{max(0.0, now - hb):.0f} s ago" if isinstance(hb, (int, float)) else "never"


def describe(rec: dict[str, Any] | None, now: float | None = None) -> str:
    """Who holds a lease, in a few words: host, pid, since when, last heartbeat."""
    if rec is None:
        return "no lease"
    if not rec:
        return "an unreadable lease"
    now = time.time() if now is None else now
    return f"host {rec.get('host')}, pid {rec.get('pid')}, since {rec.get('acquired')}, last heartbeat {_ago(rec, now)}"


def _busy(shown: str, rec: dict[str, Any] | None, *, race: bool = False) -> JobError:
    now = time.time()
    expires = rec.get("expires") if rec else None
    left = f"in {max(0.0, expires - now):.0f} s" if isinstance(expires, (int, float)) else "soon"
    what = "took it at the same moment" if race else "is writing it"
    return JobError(
        f"OUTPUT {shown} is in use: another nsfw-dask score run {what} ({describe(rec, now)}); only one "
        "run at a time may write an OUTPUT. Wait for that run to finish, or stop it; if it died, its "
        f"lease expires {left} (at once when checked on its own machine): then rerun with --resume.",
        2,
    )


def confirm_holder(fs: Any, root: str, run: str, what: str) -> None:
    """On a worker, just before committing ``what``: the lease must still name this run."""
    shown = show_path(fs, root)
    try:
        rec = read_lease(fs, root)
    except OSError as e:
        raise JobError(
            f"cannot read the lease of OUTPUT {shown} ({e}); {what} was not committed. Rerun with --resume."
        ) from e
    if rec is None or rec.get("run") != run:
        raise JobError(
            f"this run no longer holds OUTPUT {shown} (now {describe(rec)}); {what} was not committed. "
            "Only one run at a time may write an OUTPUT: let the other run finish, or stop it and rerun "
            "with --resume."
        )
    if rec.get("closing"):  # the run failed or was interrupted: its client is cleaning up
        raise JobError(f"the run writing OUTPUT {shown} stopped; {what} was not committed.")


class Lease:
    """This run's lease on OUTPUT ``root`` (``shown``: OUTPUT as the user gave it)."""

    def __init__(self, fs: Any, root: str, job_id: str, shown: str, seconds: float | None = None) -> None:
        self.fs, self.root, self.shown = fs, root, shown
        self.path = f"{root}/{LEASE_FILE}"
        self.job_id = job_id
        self.run = uuid.uuid4().hex
        self.seconds = lease_seconds() if seconds is None else seconds
        self.held = False
        self.lost = threading.Event()
        self.lost_reason = ""
        self.replaced: str | None = None  # the stale lease taken over, described
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired = ""

    # ------------------------------------------------------------------ reading and writing

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "format": _FORMAT,
            "run": self.run,
            "job": self.job_id,
            "host": socket.gethostname(),
            "machine": _machine(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "acquired": self._acquired,
            "heartbeat": now,
            "expires": now + self.seconds,
            "seconds": self.seconds,
        }

    def _write(self, rec: dict[str, Any]) -> None:
        put_small(self.fs, self.root, LEASE_FILE, json.dumps(rec).encode(), shown=self.shown)

    def _create_local(self, rec: dict[str, Any]) -> bool:
        """Locally, where no lease exists: link a complete file into place, which fails if one
        appeared meanwhile.  False where the folder cannot hold hard links (then rename + read back)."""
        tmp = f"{self.root}/{tmp_name(LEASE_FILE)}"
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(rec).encode())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                raise _busy(self.shown, read_lease(self.fs, self.root), race=True) from None
            except OSError:
                return False
            return True
        except JobError:
            raise
        except OSError as e:
            raise storage_error(self.path, self.shown, e) from e
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def refuse_if_live(self) -> None:
        """Before anything else: another run's live lease on OUTPUT refuses this run (exit 2)."""
        rec = read_lease(self.fs, self.root)
        if rec is not None and rec.get("run") != self.run and stale_reason(rec) is None:
            raise _busy(self.shown, rec)

    def acquire(self) -> None:
        """Take the lease (OUTPUT's folder exists), then keep it alive on a heartbeat thread."""
        rec = read_lease(self.fs, self.root)
        if rec is not None:
            reason = stale_reason(rec)
            if reason is None:
                raise _busy(self.shown, rec)
            self.replaced = f"{describe(rec)}: {reason}"
        self._acquired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        mine = self._record()
        if rec is None and is_local(self.fs) and self._create_local(mine):
            self.held = True
        else:
            self._write(mine)
            self.held = True  # from here release() removes it if it names this run
            time.sleep(settle_seconds(self.seconds))
            back = read_lease(self.fs, self.root)
            if back is None or back.get("run") != self.run:
                self.held = False
                raise _busy(self.shown, back, race=True)
        if self.replaced:
            logger.warning("OUTPUT %s: took over the stale lease of another run (%s)", self.shown, self.replaced)
        self._thread = threading.Thread(target=self._beat, name="nsfw-dask-lease", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ while the run lives

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = (
                f"this run lost OUTPUT {self.shown}: {why}. It stops without writing _SUCCESS; its "
                "committed parts stay. Only one run at a time may write an OUTPUT: let the other run "
                "finish, or stop it and rerun with --resume."
            )
            self.lost.set()
            logger.error("%s", self.lost_reason)

    def _beat(self) -> None:
        interval = self.seconds / 6
        renewed = time.monotonic()
        while not self._stop.wait(interval):
            try:
                rec = read_lease(self.fs, self.root)
                if rec is None or rec.get("run") != self.run:
                    self._lose(f"its lease was replaced by another run's ({describe(rec)})")
                    return
                if self._stop.is_set():
                    return
                self._write(self._record())
                renewed = time.monotonic()
            except Exception as e:  # storage briefly unreachable: retried at the next beat
                logger.warning("could not renew the lease on OUTPUT %s: %s", self.shown, e)
                if time.monotonic() - renewed > self.seconds:
                    self._lose(f"its lease could not be renewed for {self.seconds:g} s ({e})")
                    return

    def check(self, *, fresh: bool = False) -> None:
        """Raise if the lease was lost; ``fresh``: read it from OUTPUT first."""
        if fresh and not self.lost.is_set():
            rec = read_lease(self.fs, self.root)
            if rec is None or rec.get("run") != self.run:
                self._lose(f"its lease was replaced by another run's ({describe(rec)})")
        if self.lost.is_set():
            raise JobError(self.lost_reason)

    def close_commits(self) -> None:
        """The run failed: stop the heartbeat and mark the lease closing (still this run's), so
        that a task still running on a worker commits nothing from now on (``confirm_holder``) and
        what the client then lists in OUTPUT is all this run will ever have committed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if not self.held or self.lost.is_set():
            return
        with contextlib.suppress(Exception):
            rec = read_lease(self.fs, self.root)
            if rec and rec.get("run") == self.run:
                self._write({**self._record(), "closing": True})

    def release(self) -> None:
        """Stop the heartbeat; delete the lease if it still names this run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(Exception):
            rec = read_lease(self.fs, self.root)
            if rec and rec.get("run") == self.run:
                self.fs.rm(self.path)
