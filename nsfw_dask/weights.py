"""Finding, downloading and verifying LAION's NSFW head weights.

Resolution order (first hit wins): an explicit ``model_dir`` -> ``$NSFW_DASK_MODEL_DIR`` ->
the user cache (``$NSFW_DASK_CACHE_DIR``, else ``$XDG_CACHE_HOME/nsfw_dask``, else
``~/.cache/nsfw_dask``) -> a download into the user cache from the URL pinned to a LAION commit.

Every file is verified before its tensors reach a model: LAION's file names by the pinned SHA-256
of the bytes; NeMo Curator's layout (``laion/clip-autokeras-binary-nsfw/clip_autokeras_binary_nsfw.pth``),
whose bytes are not pinned, by a digest of the tensors after a ``weights_only`` read.  A file that
fails is never used: in the user cache it is replaced by a fresh download, anywhere else it is an
error naming the file.  Downloads stream to a temporary file in the target folder, are checked,
then renamed into place atomically, under a file lock so that many worker processes on one node
download once.

Asked to put the weights into a folder (:func:`fetch_weights`, ``nsfw-dask fetch-weights
--model-dir D``, ``NSFWScorer.download_weights_on_node``), a verified copy already on this machine
(``$NSFW_DASK_MODEL_DIR`` or the user cache) is copied there, without the network.  When the server
cannot be reached, the error is one line naming the file, the URL, the cause and the fix, and the
target folder is left as it was (no lock file, no temporary file, not even the folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import os
import shlex
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from filelock import FileLock
from filelock import Timeout as LockTimeout

from ._atomic import atomic_writer
from ._specs import ModelSpec, get_spec
from .exceptions import WeightsError, WeightsIntegrityError, WeightsNotFoundError

if TYPE_CHECKING:
    import torch

__all__ = [
    "WeightsInfo",
    "cache_dir",
    "fetch_file",
    "fetch_weights",
    "find_weights_in",
    "read_state_dict",
    "resolve_file",
    "resolve_weights",
    "sha256_file",
    "state_dict_digest",
]

logger = logging.getLogger(__name__)

ENV_MODEL_DIR = "NSFW_DASK_MODEL_DIR"
ENV_CACHE_DIR = "NSFW_DASK_CACHE_DIR"
ENV_OFFLINE = "NSFW_DASK_OFFLINE"

_Found = TypeVar("_Found")  # what a resolution finds: a WeightsInfo, or a Path


@dataclass(frozen=True)
class WeightsInfo:
    """A verified weights file: where it is and the checksum it was verified against."""

    spec: ModelSpec
    path: Path
    checksum: str  # "sha256:<hex>" of the bytes, or "tensors:<hex>" for unpinned containers


def cache_dir() -> Path:
    """The per-user weights cache, read from the environment at each call."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nsfw_dask"


def search_folders(model_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The folders searched before the user cache: ``model_dir``, then ``$NSFW_DASK_MODEL_DIR``."""
    return [Path(f).expanduser().resolve() for f in (model_dir, os.environ.get(ENV_MODEL_DIR)) if f]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 over the sorted tensor names, dtypes, shapes and little-endian bytes."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def read_state_dict(info: WeightsInfo) -> dict[str, torch.Tensor]:
    """Read ``info.path`` once, check it against ``info.checksum`` again, load it (weights_only).

    The bytes that are hashed are the bytes that are loaded, so a file changed on disk after it
    was first verified is refused rather than loaded.
    """
    data = info.path.read_bytes()
    kind, _, expected = info.checksum.partition(":")
    if kind == "sha256" and hashlib.sha256(data).hexdigest() != expected:
        raise WeightsIntegrityError(
            f"Weights file {info.path} changed since it was verified (sha256 now "
            f"{hashlib.sha256(data).hexdigest()}, expected {expected}); it was not loaded."
        )
    import torch  # here, not at the top: the client side of the job resolves weights without torch

    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsIntegrityError(f"Could not read weights file {info.path}: {e}") from e
    if kind == "tensors" and state_dict_digest(sd) != expected:
        raise WeightsIntegrityError(
            f"Weights file {info.path} changed since it was verified (tensor digest differs); it was not loaded."
        )
    return sd


def _candidates(spec: ModelSpec, folder: Path) -> list[Path]:
    return [folder / spec.filename] + [folder / p for p in spec.alias_paths]


def _verify(spec: ModelSpec, path: Path) -> WeightsInfo:
    """Verify ``path`` for ``spec``; raise WeightsIntegrityError naming the file if it fails."""
    if path.name == spec.filename:
        got = sha256_file(path)
        if got != spec.sha256:
            raise WeightsIntegrityError(
                f"Weights file {path} is truncated, corrupted or not {spec.what}: "
                f"sha256 {got}, expected {spec.sha256} ({path.stat().st_size} bytes). "
                f"Delete it and run `{spec.fetch_command}`, or download "
                f"{spec.url} again."
            )
        return WeightsInfo(spec, path, f"sha256:{got}")
    # An unpinned container (NeMo Curator's file): read it safely, then compare tensor contents.
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        got = state_dict_digest(sd)
    except Exception as e:
        raise WeightsIntegrityError(
            f"Weights file {path} cannot be read as a torch state dict ({e}); it is truncated or "
            f"corrupted. Delete it, or use LAION's {spec.filename} (sha256 {spec.sha256})."
        ) from e
    expected = spec.content_digest or None  # pinned in MODEL_SPECS (nsfw_dask._specs)
    if got != expected:
        raise WeightsIntegrityError(
            f"Weights file {path} does not hold {spec.what} (tensor digest {got}, "
            f"expected {expected}). Delete it, or use LAION's {spec.filename} (sha256 {spec.sha256})."
        )
    return WeightsInfo(spec, path, f"tensors:{got}")


def find_weights_in(spec: ModelSpec, folder: Path) -> WeightsInfo | None:
    """The verified weights for ``spec`` in ``folder`` (LAION's file name first, then NeMo
    Curator's), or None if there are none; a file that fails verification is a
    :class:`WeightsIntegrityError` naming it."""
    for path in _candidates(spec, folder):
        if path.is_file():
            return _verify(spec, path)
    return None


def _offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def resolve_weights(
    model: str | ModelSpec = "vit-l-14",
    model_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool | None = None,
    timeout: float = 60.0,
) -> WeightsInfo:
    """Find (and if needed download) verified weights for ``model``.

    Parameters
    ----------
    model : {"vit-l-14", "vit-b-32"}
        Which LAION head.
    model_dir : path, optional
        Folder searched first, holding LAION's file or NeMo Curator's layout.
    download : bool, optional
        Allow a download into the user cache when nothing is found.  Defaults to True unless
        ``NSFW_DASK_OFFLINE=1``.
    timeout : float
        Network timeout in seconds for the download.

    Returns
    -------
    WeightsInfo

    Raises
    ------
    WeightsIntegrityError
        A file was found outside the user cache but failed verification.
    WeightsNotFoundError
        Nothing was found and the download was not allowed or failed.
    """
    spec = get_spec(model)
    return _resolve(
        f"weights for {spec.name} ({spec.what})",
        spec.filename,
        spec.url,
        spec.sha256,
        find=lambda folder, in_cache: find_weights_in(spec, folder),
        fetch=lambda cache: WeightsInfo(spec, fetch_weights(spec, cache, timeout=timeout), f"sha256:{spec.sha256}"),
        model_dir=model_dir,
        download=download,
    )


def fetch_weights(
    model: str | ModelSpec = "vit-l-14",
    model_dir: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    timeout: float = 60.0,
    force: bool = False,
) -> Path:
    """Put verified LAION weights for ``model`` into ``model_dir`` (default: the user cache).

    An existing verified file there is reused unless ``force``.  Otherwise, unless ``force`` or
    ``url`` is given, a verified copy elsewhere on this machine (``$NSFW_DASK_MODEL_DIR``, the user
    cache; LAION's bytes, checked by SHA-256) is copied in, without the network.  Otherwise the file
    is downloaded: streamed to a temporary file in ``model_dir``, its SHA-256 checked against the
    pinned value, then renamed into place; a file lock makes concurrent callers (several worker
    processes on one node) download once.  ``NSFW_DASK_OFFLINE`` does not apply here: this call
    is an explicit request to download.

    Parameters
    ----------
    model : {"vit-l-14", "vit-b-32"}
    model_dir : path, optional
        Target folder, created if needed (not when the server cannot be reached).
    url : str, optional
        A mirror to download from instead of the pinned LAION URL; the pinned SHA-256 still applies.
    timeout : float
        Socket timeout in seconds.
    force : bool
        Download even if a verified file is already there.

    Returns
    -------
    pathlib.Path
        The verified file.

    Raises
    ------
    WeightsNotFoundError
        The server could not be reached (no network, DNS failure, connection refused or timed
        out); one line naming the file, the URL, the cause and the fix.  ``model_dir`` is left as
        it was.
    WeightsIntegrityError
        The downloaded bytes are not LAION's file.
    WeightsError
        Any other download failure (an HTTP error, a transfer cut short).

    Examples
    --------
    >>> from nsfw_dask import fetch_weights
    >>> path = fetch_weights("vit-l-14", "/data/models")  # doctest: +SKIP
    """
    spec = get_spec(model)
    copy_from = [] if (force or url) else _local_copies([spec.filename, *spec.alias_paths])
    return _fetch(
        spec.filename,
        url or spec.url,
        spec.sha256,
        model_dir,
        timeout=timeout,
        force=force,
        copy_from=copy_from,
        model=spec.fetch_command.removeprefix("nsfw-dask fetch-weights "),  # its flags: --model M (--heads H)
    )


def fetch_file(
    filename: str,
    url: str,
    sha256: str,
    folder: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 60.0,
    force: bool = False,
    copy_from: Iterable[str | os.PathLike[str]] | None = None,
) -> Path:
    """Put ``folder/filename`` (default folder: the user cache) in place, verified by ``sha256``.

    The machinery behind :func:`fetch_weights`, shared by every pinned file (the ``.pth`` heads
    and LAION's original SavedModel zips).  An existing file with the right SHA-256 is reused
    unless ``force``.  Otherwise the first of ``copy_from`` (default, unless ``force``: ``filename``
    in ``$NSFW_DASK_MODEL_DIR`` and in the user cache) with the right SHA-256 is copied in, without
    the network.  Otherwise ``url`` is downloaded: a file lock, a temporary file in ``folder``, the
    SHA-256 check, an atomic rename.  A server that cannot be reached is a
    :class:`WeightsNotFoundError` with the fix, and ``folder`` is left as it was.
    """
    if copy_from is None:
        copy_from = [] if force else _local_copies([filename])
    return _fetch(filename, url, sha256, folder, timeout=timeout, force=force, copy_from=copy_from)


def _local_copies(names: list[str]) -> list[Path]:
    """Where a verified copy of a file may already be on this machine: ``$NSFW_DASK_MODEL_DIR``,
    then the user cache (each under every name in ``names``)."""
    return [folder / name for folder in [*search_folders(None), cache_dir()] for name in names]


def _fetch(
    filename: str,
    url: str,
    sha256: str,
    folder: str | os.PathLike[str] | None,
    *,
    timeout: float,
    force: bool,
    copy_from: Iterable[str | os.PathLike[str]],
    model: str | None = None,
) -> Path:
    target = (Path(folder).expanduser() if folder is not None else cache_dir()).resolve()
    dest = target / filename
    # 1. Already there.  No lock needed: a file appears at ``dest`` only by an atomic rename of a
    #    verified file, so one that verifies now is complete.
    if not force and dest.is_file() and sha256_file(dest) == sha256:
        return dest
    # 2. A verified copy elsewhere on this machine: copy it, no network.
    if not force:
        for src in copy_from:
            src = Path(src).expanduser()
            try:
                if src.resolve() == dest or not src.is_file() or sha256_file(src) != sha256:
                    continue
            except OSError:
                continue
            return _copy_into(src, dest, sha256, timeout=timeout)
    # 3. A download.  Check first that the server (or the proxy) can be reached at all, so that
    #    an offline machine gets the fix, and the target folder is left as it was: no folder
    #    created, no lock file, no temporary file.
    try:
        _probe(url, timeout)
        target.mkdir(parents=True, exist_ok=True)
        lock_path = target / f".{filename}.lock"
        try:
            with FileLock(str(lock_path), timeout=max(600.0, 4 * timeout)):
                if dest.is_file() and not force:
                    if sha256_file(dest) == sha256:
                        return dest
                    logger.warning("Replacing %s: its sha256 does not match the pinned one", dest)
                _download(url, dest, sha256, timeout)
        except LockTimeout as e:
            raise WeightsError(
                f"Timed out waiting for {lock_path}: another process has been downloading {filename} "
                "for too long. Remove the lock file if no download is running."
            ) from e
    except _Unreachable as e:
        raise WeightsNotFoundError(_unreachable_message(filename, url, sha256, target, e.reason, model)) from e
    return dest


def _copy_into(src: Path, dest: Path, sha256: str, *, timeout: float) -> Path:
    """Copy the verified ``src`` to ``dest``: temporary file beside ``dest``, SHA-256 of the bytes
    written, atomic rename.  Under a lock kept in the user cache (not beside ``dest``), so the
    target folder gets nothing but the file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _side_lock(dest, timeout):
        if dest.is_file():
            if sha256_file(dest) == sha256:
                return dest  # another process put it there meanwhile
            logger.warning("Replacing %s: its sha256 does not match the pinned one", dest)
        h = hashlib.sha256()
        with atomic_writer(dest) as out:
            with open(src, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != sha256:  # raised inside: the temporary file is deleted
                raise WeightsIntegrityError(
                    f"{src} changed while it was copied to {dest} (sha256 {h.hexdigest()}, expected "
                    f"{sha256}); it was not saved. Check {src}, then retry."
                )
    logger.info("Copied %s (verified) to %s", src, dest)
    return dest


@contextlib.contextmanager
def _side_lock(dest: Path, timeout: float) -> Iterator[None]:
    """A lock for writing ``dest``, kept in ``<user cache>/locks/`` instead of beside ``dest``.

    The lock file is never deleted (deleting a flock()ed file while another process waits on it
    would let two processes in).  If the user cache is not writable the copy goes ahead unlocked:
    it is still safe (unique temporary file, verified, atomic rename), only maybe done twice.
    """
    lock_path = cache_dir() / "locks" / f"{hashlib.sha256(str(dest).encode()).hexdigest()[:32]}.lock"
    file_lock = FileLock(str(lock_path), timeout=max(600.0, 4 * timeout))
    lock: FileLock | None = file_lock  # None: copying without a lock
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        file_lock.acquire()
    except LockTimeout as e:
        raise WeightsError(
            f"Timed out waiting for {lock_path}: another process has been writing {dest} for too "
            "long. Remove the lock file if no nsfw-dask process is running."
        ) from e
    except OSError as e:
        logger.debug("No lock for %s (%s); copying without one", dest, e)
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class _Unreachable(WeightsError):
    """The server (or proxy) could not be reached; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(e: BaseException) -> str:
    """``Name or service not known``, ``Connection refused``, ``timed out``, ..."""
    r = getattr(e, "reason", e)
    if isinstance(r, OSError) and r.strerror:
        return r.strerror
    return str(r) or type(r).__name__


def _probe(url: str, timeout: float) -> None:
    """Connect (TCP only, no request) to ``url``'s host, or to the proxy urllib would use;
    raise ``_Unreachable`` if that fails.  Other schemes are left to urllib."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if not p.hostname:
                return
            host, port = p.hostname, p.port or (443 if p.scheme == "https" else 80)
    except ValueError:  # a malformed URL or port: urllib will say so
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise _Unreachable(_reason(e)) from e


def _unreachable_message(filename: str, url: str, sha256: str, target: Path, reason: str, model: str | None) -> str:
    verify = "nsfw-dask fetch-weights" + (f" {model}" if model else "") + f" --model-dir {shlex.quote(str(target))}"
    return (
        f"Cannot download {filename} from {url}: {reason} (no network, or the server is "
        f"unreachable). Download it on a machine with internet access and copy it into "
        f"{target}, or set {ENV_MODEL_DIR} to a folder that holds it (sha256 {sha256}); "
        f"`{verify}` then verifies it."
    )


def resolve_file(
    filename: str,
    url: str,
    sha256: str,
    model_dir: str | os.PathLike[str] | None = None,
    *,
    what: str,
    download: bool | None = None,
    timeout: float = 60.0,
) -> Path:
    """Find ``filename`` by the weights' resolution order, verified by its pinned SHA-256.

    ``model_dir`` -> ``$NSFW_DASK_MODEL_DIR`` -> the user cache -> a download into the user
    cache.  A file that fails the check outside the user cache is an error naming it; in the
    user cache it is replaced by a download.  ``what`` names the file in messages.
    """

    def find(folder: Path, in_cache: bool) -> Path | None:
        path = folder / filename
        if not path.is_file():
            return None
        got = sha256_file(path)
        if got == sha256:
            return path
        if in_cache:
            raise WeightsIntegrityError(
                f"{path} is there but was refused: sha256 {got}, expected {sha256}; it is truncated or corrupted"
            )
        raise WeightsIntegrityError(
            f"{what} {path} is truncated, corrupted or not LAION's file: sha256 {got}, "
            f"expected {sha256}. Delete it and download {url} again."
        )

    return _resolve(
        what,
        filename,
        url,
        sha256,
        find=find,
        fetch=lambda cache: fetch_file(filename, url, sha256, cache, timeout=timeout),
        model_dir=model_dir,
        download=download,
    )


def _resolve(
    what: str,
    filename: str,
    url: str,
    sha256: str,
    *,
    find: Callable[[Path, bool], _Found | None],
    fetch: Callable[[Path], _Found],
    model_dir: str | os.PathLike[str] | None,
    download: bool | None,
) -> _Found:
    """The resolution order, for :func:`resolve_weights` and :func:`resolve_file`.

    ``find(folder, in_cache)`` returns what is verified in ``folder`` or None, and raises
    :class:`WeightsIntegrityError` naming a file that fails; ``fetch(cache)`` downloads into the
    user cache.  ``what`` names the file in messages; ``filename``, ``url`` and ``sha256`` say
    how to get it by hand.
    """
    if model_dir and not Path(model_dir).expanduser().is_dir():
        # else $NSFW_DASK_MODEL_DIR or the user cache would silently stand in for a mistyped folder
        raise WeightsNotFoundError(
            f"model_dir={os.fspath(model_dir)!r} is not a folder; pass model_dir= naming the folder "
            f"that holds {filename}, or leave out model_dir= to use {ENV_MODEL_DIR} "
            f"({os.environ.get(ENV_MODEL_DIR) or 'not set'}) or the user cache ({cache_dir()})."
        )
    searched: list[Path] = []
    for folder in search_folders(model_dir):
        searched.append(folder)
        found = find(folder, False)
        if found is not None:
            if model_dir and folder != searched[0]:
                logger.warning("%s: not in model_dir %s; using %s from %s", what, searched[0], filename, folder)
            return found
    cache = cache_dir()
    searched.append(cache)
    if download is None:
        download = not _offline()
    refused = ""
    try:
        found = find(cache, True)
    except WeightsIntegrityError as e:  # in the user cache: downloaded again, if allowed
        logger.warning("%s%s", e, "; downloading it again" if download else "")
        refused = f" ({e})"
        found = None
    if found is not None:
        if model_dir:
            logger.warning("%s: not in model_dir %s; using %s from %s", what, searched[0], filename, cache)
        return found
    where = ", ".join(str(p) for p in searched) + refused
    how = (
        f"Copy {filename} (sha256 {sha256}, from {url}) into a folder and set "
        f"{ENV_MODEL_DIR}=/that/folder (or pass model_dir=)."
    )
    if not download:
        raise WeightsNotFoundError(f"No {what} in {where}, and downloading is disabled. {how}")
    try:
        return fetch(cache)
    except WeightsIntegrityError:
        raise
    except WeightsNotFoundError as e:  # the server could not be reached: the message has the fix
        raise WeightsNotFoundError(f"No {what} in {where}. {e}") from e
    except WeightsError as e:
        raise WeightsNotFoundError(f"No {what} in {where}, and the download failed: {e}. {how}") from e


def _download(url: str, dest: Path, sha256: str, timeout: float) -> None:
    # ``timeout`` bounds each socket read; the whole transfer gets a deadline too (a server that
    # trickles bytes would otherwise hold the lock, and every waiting worker, indefinitely).
    deadline = time.monotonic() + max(120.0, 20 * timeout)
    with atomic_writer(dest) as out:  # an exception below deletes the temporary file
        h = hashlib.sha256()
        size = 0
        req = urllib.request.Request(url, headers={"User-Agent": "nsfw-dask"})
        logger.info("Downloading %s to %s", url, dest)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    if time.monotonic() > deadline:
                        raise WeightsError(
                            f"download of {url} took too long (over {max(120.0, 20 * timeout):.0f} s); aborted"
                        )
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                # Synced here too (atomic_writer syncs again, at no cost), so that a disk that
                # fails now is reported as a failed download, as a failed write is.
                out.flush()
                os.fsync(out.fileno())
        except urllib.error.HTTPError as e:
            e.close()
            raise WeightsError(f"HTTP {e.code} {e.reason} from {url}") from e
        except urllib.error.URLError as e:  # before any response: the server could not be reached
            raise _Unreachable(_reason(e)) from e
        except (OSError, http.client.HTTPException) as e:  # once connected: a timeout, a reset
            raise WeightsError(f"could not download {url}: {getattr(e, 'reason', e)}") from e
        if h.hexdigest() != sha256:
            raise WeightsIntegrityError(
                f"Downloaded {url} ({size} bytes) has sha256 {h.hexdigest()}, expected "
                f"{sha256}; it was not saved. Check the URL or mirror."
            )
