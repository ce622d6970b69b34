"""The main job: score a whole dataset on Dask into a resumable, committed parquet folder.

:func:`score_dataset` is what ``nsfw-dask score`` runs.  It plans the input on the client (file
listing and parquet footers / ``.npy`` headers only: no data), then submits one task per input
partition.  Each task runs on a worker, reads its own rows from storage, scores them, writes one
output part and commits it (locally a rename, on object stores one finished upload), then reads
the part's footer back to verify it.  Nothing but a few numbers per part travels to the client.

OUTPUT layout (a local folder or any fsspec URL)::

    OUTPUT/_nsfw_dask_job.json           the job: input files (size, mtime/etag), options, version
    OUTPUT/part.000000.<source>.parquet  one part per input partition, in input order
    OUTPUT/part.000001.<source>.parquet
    ...
    OUTPUT/_SUCCESS                      written last, after every part's footer was checked
    OUTPUT/_nsfw_dask_lease.json         while a run is live: one live run per OUTPUT (_lease.py)

Names starting with ``_`` or ``.`` are skipped by pyarrow, dask, pandas and Spark readers, so
temporary files (``.part.*.tmp-*``), the job file and the lease are never read as data.  An
OUTPUT is finished only when it has ``_SUCCESS``.  A killed run keeps its committed parts;
``resume=True`` checks the job description, keeps every part whose footer checks out and scores
only the rest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from typing import Any, ParamSpec, TypeVar

from ._atomic import put_small, storage_error
from ._lease import LEASE_FILE, Lease

# the modules the job is built from (their names used by tests and callers stay importable from here)
from ._plan import (
    DEFAULT_ROWS_PER_PARTITION,
    ROW_NUMBER_COLUMN,
    Part,
    Plan,
    _split,  # noqa: F401  (tests)
    filesystem,
    has_glob,
    is_inside,
    map_threads,
    normalize_path,
    plan_input,
    real_path,
)
from ._specs import get_spec
from ._task import IS_NSFW_COLUMN, KEEP_OPS, TMP_NAME, Options, part_ok, read_part_info, run_part
from ._version import __version__
from .exceptions import JobError
from .heads import HEADS, parse_heads
from .io import is_local, show_path
from .summary import (  # noqa: F401
    HIST_BINS,
    QUANTILES,
    Progress,
    Summary,
    add_part,
    decode_histogram,
    histogram,
    quantiles_from_histogram,
)

__all__ = [
    "JOB_FILE",
    "SUCCESS_FILE",
    "JobError",
    "Summary",
    "default_cluster_shape",
    "default_gpu_cluster_shape",
    "default_worker_env",
    "is_finished",
    "plan_input",
    "score_dataset",
]

logger = logging.getLogger(__name__)

JOB_FILE = "_nsfw_dask_job.json"


SUCCESS_FILE = "_SUCCESS"


FILTERS = ("none", "keep-safe", "keep-nsfw")


KEEP_EMBEDDINGS = (False, "binary", "list")


_JOB_FORMAT = "nsfw-dask-job/1"


def _job_description(plan: Plan, opts: Options, rows_per_partition: int) -> dict[str, Any]:
    content = {
        "input": show_path(plan.in_fs, plan.input) if not is_local(plan.in_fs) else plan.input,
        "input_kind": plan.kind,
        "input_files": plan.files,
        "options": {
            "model": opts.model,
            "exact": opts.exact,
            "column": plan.column,
            "score_column": opts.score_column,
            "threshold": opts.threshold,
            "filter": opts.filter,
            "keep_embeddings": opts.keep_embeddings,
            "rows_per_partition": rows_per_partition,
            # CUDA kernels may differ from CPU ones in the last bits: parts are not mixed
            "device": "cuda" if opts.device == "cuda" else "cpu",
        },
        "version": __version__,
    }
    if opts.heads != ("nsfw",):  # which heads, in which order: their columns (absent: NSFW only)
        content["options"]["heads"] = list(opts.heads)  # type: ignore[index]
    if opts.keep:
        content["options"]["keep"] = [keep_text(k, opts.score_columns()) for k in opts.keep]  # type: ignore[index]
    if opts.normalize:  # changes the scores; absent when off, so earlier jobs keep their ids
        content["options"]["normalize"] = True  # type: ignore[index]
    if plan.partition_columns:  # their values are in the files' paths; their types follow all of them
        content["partition_columns"] = [list(c) for c in plan.partition_columns]
    job_id = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "format": _JOB_FORMAT,
        "job_id": job_id,
        **content,
        "partitions": len(plan.parts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


_OPTION_FLAGS = {
    "model": "--model",
    "exact": "--exact",
    "column": "--column",
    "score_column": "--score-column",
    "threshold": "--threshold",
    "filter": "--filter",
    "keep_embeddings": "--keep-embeddings",
    "rows_per_partition": "--rows-per-partition",
    "device": "--gpu",
    "normalize": "--normalize",
    "heads": "--heads",
    "keep": "--keep",
}


def _job_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    if old.get("format") != new["format"]:
        return [f"it was written in format {old.get('format')!r}"]
    if old.get("version") != new["version"]:
        diffs.append(f"nsfw-dask version {old.get('version')} wrote it, this is {new['version']}")
    if old.get("input") != new["input"]:
        diffs.append(f"INPUT was {old.get('input')}, now {new['input']}")
    if old.get("partition_columns") != new.get("partition_columns"):
        diffs.append(
            f"INPUT's hive partition columns were {old.get('partition_columns')}, now {new.get('partition_columns')}"
        )
    old_options = old.get("options", {})
    for k in [*new["options"], *(k for k in old_options if k not in new["options"])]:
        was, v = old_options.get(k), new["options"].get(k)
        if was != v:
            diffs.append(f"{_OPTION_FLAGS.get(k, k)} was {was!r}, now {v!r}")
    of = {f["path"]: f for f in old.get("input_files", [])}
    nf = {f["path"]: f for f in new["input_files"]}
    gone = sorted(of.keys() - nf.keys())
    added = sorted(nf.keys() - of.keys())
    if gone:
        diffs.append(f"{len(gone)} input file(s) are gone, e.g. {gone[0]}")
    if added:
        diffs.append(f"{len(added)} input file(s) are new, e.g. {added[0]}")
    changed = [p for p in sorted(of.keys() & nf.keys()) if of[p] != nf[p]]
    if changed:
        p = changed[0]
        diffs.append(
            f"{len(changed)} input file(s) changed since, e.g. {p} "
            f"(size/version {of[p].get('size')}/{of[p].get('version')} -> "
            f"{nf[p].get('size')}/{nf[p].get('version')})"
        )
    return diffs


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


def _listing(fs: Any, root: str) -> list[str]:
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def _is_ours(name: str) -> bool:
    """The lease, or a temporary of a part or of the job's own files: not OUTPUT's content."""
    if name == LEASE_FILE:
        return True
    m = TMP_NAME.match(name)
    return m is not None and (m["name"].startswith("part.") or m["name"] in (JOB_FILE, SUCCESS_FILE, LEASE_FILE))


def _check_overlap(plan: Plan, out_fs: Any, out_root: str, output_given: str) -> None:
    """OUTPUT must not contain, or sit inside, anything INPUT reads (globs, ``~``, symlinks resolved)."""
    in_fs = plan.in_fs
    if is_local(in_fs) != is_local(out_fs):
        return
    if not is_local(out_fs) and getattr(in_fs, "protocol", None) != getattr(out_fs, "protocol", None):
        return
    resolve = real_path if is_local(out_fs) else (lambda p: p)
    out = resolve(out_root)
    roots = [resolve(_fs_path(in_fs, f["path"])) for f in plan.files]
    if not has_glob(plan.input) and plan.kind is not None:
        roots.append(resolve(_fs_path(in_fs, plan.input)))
    for r in roots:
        if is_inside(r, out) or is_inside(out, r):
            raise JobError(
                f"OUTPUT {output_given} overlaps INPUT {plan.input} (both reach {r}); write "
                "to a folder outside INPUT. nsfw-dask never writes into or over its input.",
                2,
            )
    if is_local(out_fs):
        cwd = real_path(os.getcwd())
        if is_inside(cwd, out):
            raise JobError(
                f"OUTPUT {output_given} is the current folder or one of its parents; choose a new folder.", 2
            )


def _fs_path(fs: Any, shown: str) -> str:
    from ._compat import strip_protocol

    return shown if is_local(fs) else strip_protocol(fs, shown)


def _probe_shared_folder(client: Any, fs: Any, root: str, plan: Plan, given: str) -> None:
    """With a cluster we did not start, local paths must be the same folders on every worker.

    The probe file goes into OUTPUT's nearest existing folder (OUTPUT may not exist yet), before
    anything in OUTPUT is created or replaced.
    """
    token = uuid.uuid4().hex
    folder = root
    if is_local(fs):
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
    probe = f"{folder}/._nsfw_dask_probe-{token}"
    checks: list[tuple[str, int]] = []
    if is_local(plan.in_fs):
        for f in {plan.files[0]["path"], plan.files[-1]["path"]}:
            checks.append((f, os.path.getsize(f)))
    if is_local(fs):
        try:
            with open(probe, "w") as fh:
                fh.write(token)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(probe)
            raise storage_error(probe, given, e) from e
    try:
        result = client.run(_probe_on_worker, probe if is_local(fs) else None, token, checks)
    finally:
        if is_local(fs):
            with contextlib.suppress(OSError):
                os.unlink(probe)
    bad_out = [w for w, r in result.items() if not r[0]]
    bad_in = [(w, r[1]) for w, r in result.items() if r[1]]
    if bad_out:
        raise JobError(
            f"OUTPUT {given} is a local path that {len(bad_out)} worker(s) (e.g. {bad_out[0]}) do "
            "not see as the same folder; use a folder shared by every node (NFS) or an object-"
            "store URL (s3://, gs://, abfs://).",
            2,
        )
    if bad_in:
        w, f = bad_in[0]
        raise JobError(
            f"INPUT file {f} is not the same file on worker {w}; use a path every node shares or an object-store URL.",
            2,
        )


def _probe_on_worker(probe: str | None, token: str, checks: list[tuple[str, int]]) -> tuple[bool, str | None]:
    ok = True
    if probe is not None:
        try:
            with open(probe) as fh:
                ok = fh.read() == token
        except OSError:
            ok = False
    for path, size in checks:
        try:
            if os.path.getsize(path) != size:
                return ok, path
        except OSError:
            return ok, path
    return ok, None


#: Dask threads per worker process in the cluster the job starts on CPU machines.  Each thread
#: scores its own partition with one torch thread (the nanny sets ``OMP_NUM_THREADS=1``); the
#: processes share no memory, so fewer, fuller processes keep one copy of the model and of the
#: page cache's hot pages.  Measured on 2 cores (docs/performance.md): 1 process x 2 threads
#: scored ~17 % more rows/s than 2 processes x 1 thread; up to 4 threads per process keeps the
#: GIL (held between torch calls) from being contended.
THREADS_PER_WORKER = 4


def default_cluster_shape(
    n_workers: int | None = None, threads_per_worker: int | None = None, n_cpu: int | None = None
) -> tuple[int, int]:
    """``(workers, threads_per_worker)`` of the CPU cluster ``score_dataset`` starts.

    What is given wins; the rest fills the machine's cores with workers of at most 4 threads
    (1 x 2 on 2 cores, 2 x 3 on 6, 2 x 4 on 8, 16 x 4 on 64).

    Examples
    --------
    >>> default_cluster_shape(n_cpu=2), default_cluster_shape(n_cpu=6), default_cluster_shape(3, n_cpu=8)
    ((1, 2), (2, 3), (3, 2))
    """
    n_cpu = max(1, n_cpu or os.cpu_count() or 1)
    if n_workers and threads_per_worker:
        return n_workers, threads_per_worker
    if n_workers:
        return n_workers, max(1, n_cpu // n_workers)
    if threads_per_worker:
        return max(1, n_cpu // threads_per_worker), threads_per_worker
    workers = -(-n_cpu // THREADS_PER_WORKER)
    return workers, -(-n_cpu // workers)


#: How long (ms) pyarrow's allocator (mimalloc) keeps freed memory before returning it to the
#: OS, in the workers of the cluster the job starts.  mimalloc's own default returns it after a few
#: milliseconds, so every partition's decode page-faults its buffers in again (hundreds of MB for a
#: ``list<float32>`` column); kept for a few seconds, the next partition reuses them.  Measured
#: here: pyarrow decoding a 200,000-row ``list<float32>`` file repeatedly, ~17 -> ~6 us/row; the
#: CLI on 800,000 such rows ~9 % faster (docs/performance.md).  Memory stays bounded by what the
#: threads hold at once; it is returned when a worker is idle.  A ``MIMALLOC_PURGE_DELAY`` already
#: in the environment wins.
MIMALLOC_PURGE_DELAY_MS = 5000


def default_worker_env() -> dict[str, str]:
    """Environment variables for the workers of the CPU cluster ``score_dataset`` starts.

    Pass the same to a cluster of your own (``LocalCluster(env=...)``, or set them where
    ``dask worker`` starts): ``{"MIMALLOC_PURGE_DELAY": "5000"}`` unless already set.
    """
    return {"MIMALLOC_PURGE_DELAY": os.environ.get("MIMALLOC_PURGE_DELAY", str(MIMALLOC_PURGE_DELAY_MS))}


#: Threads per GPU worker process of the ``--gpu`` cluster: at least 2, at most 8 (below:
#: ``default_gpu_cluster_shape``).
GPU_THREADS_PER_WORKER = (2, 8)


def default_gpu_cluster_shape(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    *,
    n_gpus: int,
    n_cpu: int | None = None,
) -> tuple[int, int]:
    """``(workers, threads_per_worker)`` of the ``LocalCUDACluster`` ``score_dataset(gpu=True)`` starts.

    One worker process per GPU (``LocalCUDACluster`` runs at most one per visible device;
    ``n_workers`` chooses fewer), each running several tasks at once: what is given wins, else
    ``max(2, min(8, n_cpu // workers))`` threads.  A task does its host work (reading and
    decoding the partition, staging it into pinned memory, building and writing its parquet
    part) on its own thread, and only the forward passes on the GPU; with one thread per worker
    (dask-cuda's default) the GPU waits for all of that, part after part.  With several, one
    task's host work overlaps another's GPU work (pyarrow, numpy and torch release the GIL).
    The host's cores are shared by the GPUs' workers (dask-cuda pins each worker to the cores
    near its GPU); at least 2 threads even on few cores, so that the GPU always has a task;
    at most 8, since each thread keeps its own buffers at the fixed 32,768-row forward block
    (float16 input: ~360 MB on the GPU and ~100 MB of pinned host memory; float32: ~310 MB and
    ~200 MB; docs/gpu.md) and the tasks' Python parts share one GIL.

    Examples
    --------
    >>> default_gpu_cluster_shape(n_gpus=1, n_cpu=16), default_gpu_cluster_shape(n_gpus=8, n_cpu=64)
    ((1, 8), (8, 8))
    >>> default_gpu_cluster_shape(n_gpus=4, n_cpu=8), default_gpu_cluster_shape(1, 3, n_gpus=2, n_cpu=16)
    ((4, 2), (1, 3))
    """
    workers = n_workers or max(1, n_gpus)
    if threads_per_worker:
        return workers, threads_per_worker
    n_cpu = max(1, n_cpu or os.cpu_count() or 1)
    lo, hi = GPU_THREADS_PER_WORKER
    return workers, max(lo, min(hi, n_cpu // workers))


def _gpu_cluster_options(n_workers: int | None, threads_per_worker: int | None) -> dict[str, Any]:
    """The keywords for ``local_cuda_cluster`` (checked against the visible GPUs: exit code 2),
    with ``threads_per_worker`` from :func:`default_gpu_cluster_shape` unless given."""
    from .gpu import _visible_gpus, cuda_worker_options

    try:
        opts = cuda_worker_options(n_workers, threads_per_worker)
    except ValueError as e:
        raise JobError(str(e), 2) from None
    _, opts["threads_per_worker"] = default_gpu_cluster_shape(n_workers, threads_per_worker, n_gpus=_visible_gpus())
    return opts


def _start_without_sigint(start: Callable[[], Any]) -> Any:
    """``start()`` (a cluster of worker processes) run in a thread that blocks SIGINT.

    The cluster's event-loop thread, and through it the worker processes it spawns, inherit that
    signal mask (a thread inherits its creator's; fork and exec keep it).  A terminal's Ctrl-C is
    SIGINT to the whole foreground process group: it now reaches only this process, which stops
    the workers itself (the cluster's ``close``), instead of also interrupting every worker, each
    of which printed a KeyboardInterrupt traceback.  SIGTERM and SIGKILL still stop a worker, and
    a worker whose parent dies exits (distributed's parent-alive pipe).  This process's own
    threads are unaffected: Ctrl-C still interrupts it while the cluster starts.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no process groups)
        return start()
    from multiprocessing import resource_tracker

    lock = threading.Lock()
    state: dict[str, Any] = {}

    def run() -> None:
        # multiprocessing starts its resource tracker with SIGINT blocked and then *unblocks* it
        # in the calling thread: start it first, so that the cluster's loop thread keeps the mask
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            cluster = start()
        except BaseException as e:
            state["error"] = e
            return
        with lock:
            if state.get("abandoned"):  # interrupted while starting: nobody else will close it
                cluster.close()
            else:
                state["cluster"] = cluster

    thread = threading.Thread(target=run, name="nsfw-dask-cluster-start", daemon=True)
    thread.start()
    try:
        thread.join()
    except BaseException:
        with lock:
            state["abandoned"] = True
            cluster = state.pop("cluster", None)
        if cluster is not None:
            cluster.close()
        raise
    if "error" in state:
        raise state["error"]
    return state["cluster"]


@contextlib.contextmanager
def _cluster(
    client: Any, n_workers: int | None, threads_per_worker: int | None, gpu: bool, quiet: bool
) -> Iterator[tuple[Any, bool]]:
    """``(client, embedded)``: the given client, the current one, or a cluster started for the job."""
    if client is not None:
        yield client, False
        return
    from distributed import Client

    if gpu:
        from .gpu import local_cuda_cluster

        options = _gpu_cluster_options(n_workers, threads_per_worker)
        cluster = _start_without_sigint(lambda: local_cuda_cluster(**options))
    else:
        from distributed import LocalCluster

        workers, threads = default_cluster_shape(n_workers, threads_per_worker)
        cluster = _start_without_sigint(
            lambda: LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                dashboard_address=":0",  # a free port: no clash, no warning
                silence_logs=logging.CRITICAL if quiet else logging.WARNING,
                env=default_worker_env(),  # set in each worker process before it allocates
            )
        )
    with cluster, Client(cluster) as c:
        yield c, True


#: The CLI flag a job message names -> the keyword of ``score_dataset`` a Python caller passes.
_KEYWORDS = {
    "column": "column=",
    "score-column": "score_column=",
    "threshold": "threshold=",
    "filter": "filter=",
    "keep-embeddings": "keep_embeddings=",
    "rows-per-partition": "rows_per_partition=",
    "model": "model=",
    "model-dir": "model_dir=",
    "exact": "exact=True",
    "gpu": "gpu=True",
    "resume": "resume=True",
    "overwrite": "overwrite=True",
    "scheduler": "client=",
    "workers": "n_workers=",
    "threads-per-worker": "threads_per_worker=",
    "storage-options": "storage_options=",
    "batch-size": "batch_size=",
    "normalize": "normalize=True",
    "no-norm-check": "norm_check=False",
    "heads": "heads=",
    "keep": "keep=",
}


def keyword_hints(message: str) -> str:
    """A job message for a Python caller: each CLI flag it names as ``score_dataset``'s keyword
    (``--column`` -> ``column=``, ``--keep-embeddings list`` -> ``keep_embeddings='list'``,
    ``--resume`` -> ``resume=True``); the CLI's own messages keep the flags."""
    message = re.sub(
        r"--(keep-embeddings|model|filter) (binary|list|vit-[\w-]+|none|keep-safe|keep-nsfw)\b",
        lambda m: f"{m.group(1).replace('-', '_')}={m.group(2)!r}",
        message,
    )
    message = re.sub(
        r"--(column|score-column) ('[^']*'|\"[^\"]*\")",
        lambda m: f"{m.group(1).replace('-', '_')}={m.group(2)}",
        message,
    )
    message = re.sub(
        r"--(workers|threads-per-worker|rows-per-partition|batch-size) (\d+)\b",
        lambda m: f"{_KEYWORDS[m.group(1)]}{m.group(2)}",
        message,
    )

    def flag(m: re.Match[str]) -> str:
        if m.group(1) not in _KEYWORDS:
            return m.group(0)
        if m.group(2):  # "--threshold was None, now 0.3": the option's name
            return _KEYWORDS[m.group(1)].split("=")[0] + m.group(2)
        return _KEYWORDS[m.group(1)]

    return re.sub(r"(?<![\w-])--([a-z][a-z-]*[a-z])\b( was )?", flag, message)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _keyword_messages(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` for Python callers: a :class:`JobError` names keywords, not CLI flags (the CLI
    calls the undecorated function, ``score_dataset.__wrapped__``)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except JobError as e:
            e.args = (keyword_hints(str(e)),)
            raise

    return wrapper


@_keyword_messages
def score_dataset(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    column: str | None = None,
    model: str = "vit-l-14",
    exact: bool = False,
    threshold: float | None = None,
    filter: str | None = None,
    keep_embeddings: bool | str = False,
    resume: bool = False,
    overwrite: bool = False,
    client: Any = None,
    storage_options: dict[str, Any] | None = None,
    score_column: str = "nsfw_score",
    batch_size: int | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    gpu: bool = False,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION,
    progress: bool = False,
    interrupted: threading.Event | None = None,
    normalize: bool = False,
    norm_check: bool = True,
    heads: str | Sequence[str] = ("nsfw",),
    keep: Sequence[Any] = (),
) -> Summary:
    """Score a parquet or LAION parquet_npy dataset into a committed, resumable parquet folder.

    Parameters
    ----------
    input : path or fsspec URL
        A parquet file, folder or glob with an Arrow list column of CLIP embeddings, or a LAION
        ``parquet_npy`` folder (``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet``).
        ``~`` is expanded; ``file://`` URLs are local paths.
    output : path or fsspec URL
        The output folder (``s3://``, ``gs://``, ``abfs://``, ``file://`` or a local path).
    column : str, optional
        The embedding column (parquet: default the only list-of-float column; parquet_npy: the
        name given to the ``.npy`` embeddings, default ``"embedding"``).
    model, exact, batch_size, model_dir
        As for :func:`nsfw_dask.score_nsfw`.
    threshold : float, optional
        Also write ``is_nsfw = score >= threshold`` (nullable; <NA> where the score is NaN).
    filter : {"none", "keep-safe", "keep-nsfw"}, optional
        Keep only rows with ``score < threshold`` (keep-safe) or ``>= threshold``; NaN scores are
        kept by neither.  ``threshold`` defaults to 0.5 then.
    keep_embeddings : {False, True, "binary", "list"}
        Also write the embedding column.  ``True``/``"binary"``: as ``fixed_size_binary`` with
        each vector's raw little-endian bytes (its field metadata names the dtype; ~15x faster to
        write than lists); ``"list"``: as the input's Arrow list type.
    resume : bool
        Continue an interrupted run into ``output``: refused if the job description differs;
        committed parts whose footer checks out are kept, the rest are scored.
    overwrite : bool
        Replace ``output`` (its ``_SUCCESS`` is removed first).
    client : distributed.Client, optional
        Run on this client's cluster.  Default: the current client if there is one, else a
        ``LocalCluster`` (``n_workers`` x ``threads_per_worker``, default
        :func:`default_cluster_shape`; ``gpu=True``: a ``LocalCUDACluster``, one worker per GPU
        with :func:`default_gpu_cluster_shape`'s threads) started for the call.
    storage_options : dict, optional
        fsspec options for both ``input`` and ``output`` (credentials, endpoint).
    rows_per_partition : int
        Rows per output part at most (a part never spans two input files).
    progress : bool
        A progress line on stderr.
    interrupted : threading.Event, optional
        If set when the parts are done, ``_SUCCESS`` is not written (the CLI's signal flag).
    normalize : bool
        L2-normalise each embedding before scoring (for raw ``encode_image`` outputs; a zero
        vector gets a NaN score and is counted in ``summary.norms["zero"]``).  Part of the job
        description: ``resume`` with another value is refused.
    heads : str or sequence of str
        The heads scored from one read of each partition (:mod:`nsfw_dask.heads`): ``"nsfw"``
        (default), ``"aesthetic"`` (LAION's improved aesthetic predictor, ViT-L/14),
        ``"aesthetic-v1"`` (LAION-5B's ``aesthetic``); each writes its float32 column
        (``nsfw_score`` or ``score_column``, ``aesthetic_score``, ``aesthetic_v1_score``).
    keep : sequence of str or (head, op, value)
        Write only the rows passing every condition, e.g. ``["nsfw<0.5", "aesthetic>=5"]`` (a
        NaN score passes none); with ``filter`` both apply.  ``summary.keep`` counts each one.
    norm_check : bool
        Every row's norm is taken while it is scored (``summary.norms``: quantiles, rows off unit
        length by more than 1 %); a partition whose median norm is outside [0.5, 2] is clearly
        not normalised and fails the job (:class:`~nsfw_dask.EmbeddingNormError`) unless
        ``normalize`` or ``norm_check=False``.

    Returns
    -------
    Summary

    Raises
    ------
    JobError
        Paths, options or an existing OUTPUT prevent the run (code 2), among them another live
        run writing ``output``; or the run failed: an input file changed while it ran, a write
        into ``output`` failed (a full disk), another run took ``output`` over.  The message
        names the file and the fix.
    EmbeddingFormatError
        A row cannot be scored; the message names the file and the row within it.
    EmbeddingNormError
        A partition's embeddings are clearly not L2-normalised (see ``norm_check``).

    Notes
    -----
    One run at a time writes ``output``: the run holds ``output/_nsfw_dask_lease.json``, renewed
    every sixth of ``$NSFW_DASK_LEASE_SECONDS`` (default 120); a run that died leaves it, and
    ``resume=True`` or ``overwrite=True`` take it over once its process is gone (same machine) or
    it has expired (:mod:`nsfw_dask._lease`).
    """
    from .weights import resolve_weights

    t0 = time.perf_counter()
    spec = get_spec(model)
    opts = _validate_options(
        spec.name,
        exact,
        score_column,
        threshold,
        filter,
        keep_embeddings,
        batch_size,
        resume,
        overwrite,
        rows_per_partition,
        heads,
        keep,
    )
    device = "cuda" if gpu else None
    opts = Options(
        **{
            **asdict(opts),
            "device": device,
            "model_dir": None if model_dir is None else normalize_path(model_dir),
            "normalize": bool(normalize),
            "norm_check": bool(norm_check),
        }
    )

    plan = plan_input(
        input, column=column, model=spec.name, rows_per_partition=rows_per_partition, storage_options=storage_options
    )
    _check_column_clashes(plan, opts)
    output_given = os.fspath(output)
    out_path = normalize_path(output_given)
    out_fs, out_root = filesystem(out_path, storage_options)
    _check_overlap(plan, out_fs, out_root, output_given)

    if client is None:
        with contextlib.suppress(ValueError):
            from distributed import default_client

            client = default_client()
    external = client is not None
    if external:  # workers may be on other nodes: local paths must be the same folders there
        _probe_shared_folder(client, out_fs, out_root, plan, output_given)

    if gpu and not external:  # --workers beyond the visible GPUs: refused before OUTPUT exists
        _gpu_cluster_options(n_workers, threads_per_worker)
    for h in opts.heads:  # fail fast, on the client, with the fix in the message
        resolve_weights(HEADS[h].spec_for(spec.name), opts.model_dir)
    if exact:
        from .exact import load_vocabulary

        load_vocabulary(spec.name, opts.model_dir)

    plan.out_fs, plan.out_root = out_fs, out_root
    job = _job_description(plan, opts, rows_per_partition)
    plan.job_id = job["job_id"]
    lease = Lease(out_fs, out_root, plan.job_id, output_given)
    plan.run_id = lease.run
    reused, created = _prepare_output(plan, job, output_given, lease, resume=resume, overwrite=overwrite)
    summary = Summary(
        partitions=len(plan.parts),
        partitions_reused=len(reused),
        threshold=opts.threshold,
        output=show_path(out_fs, out_root),
    )
    for r in reused.values():
        add_part(summary, r)
    todo = [p for p in plan.parts if p.index not in reused]

    from distributed import as_completed

    from .plugin import NSFWModelPlugin

    quiet = logging.getLogger("nsfw_dask").getEffectiveLevel() > logging.INFO
    rows_scored = 0
    committed = 0
    try:
        with _cluster(client, n_workers, threads_per_worker, gpu, quiet) as (c, _embedded):
            if todo:
                c.register_plugin(
                    NSFWModelPlugin(
                        spec.name, device=device or "cpu", model_dir=opts.model_dir, exact=exact, heads=opts.heads
                    )
                )
                nthreads = c.nthreads()  # the most tasks in flight at once
                summary.workers, summary.threads = len(nthreads), sum(nthreads.values())
            t_compute = time.perf_counter()
            bar = Progress(len(plan.parts), progress)
            done = len(reused)
            job_spec = replace(plan, parts=[], files=[])  # what each task needs: no per-part lists
            futures = c.map(
                run_part,
                [job_spec] * len(todo),
                todo,
                [opts] * len(todo),
                pure=False,
                key=[f"nsfw-dask-part-{plan.job_id}-{p.index}-{uuid.uuid4().hex[:6]}" for p in todo],
            )
            try:
                for fut in as_completed(futures):
                    lease.check()  # lost to another run: stop now
                    if fut.status == "error":
                        raise fut.exception()
                    r = fut.result()
                    fut.release()
                    add_part(summary, r)
                    committed += 1
                    rows_scored += r["rows"]
                    done += 1
                    bar.update(done, summary.rows)
                bar.update(done, summary.rows, force=True)
            except BaseException:
                c.cancel(futures)
                raise
            finally:
                bar.close()
                del futures
    except BaseException:
        lease.close_commits()  # tasks still running on workers commit nothing from now on
        if not committed and not reused:
            _remove_created(out_fs, out_root, created, lease)
        lease.release()
        raise
    compute_seconds = time.perf_counter() - t_compute
    try:
        if interrupted is not None and interrupted.is_set():
            raise KeyboardInterrupt("interrupted")
        _finish(plan, summary, lease, output_given)
    finally:
        lease.release()
    summary.compute_seconds = compute_seconds
    summary.seconds = time.perf_counter() - t0
    summary.rows_per_s = rows_scored / compute_seconds if compute_seconds > 0 and rows_scored else 0.0
    summary.finish_heads(opts.score_columns(), [keep_text(k, opts.score_columns()) for k in opts.keep])
    lo, hi = HEADS[opts.heads[0]].output_range
    summary.quantiles = quantiles_from_histogram(summary.histogram, lo=lo, hi=hi)  # the first head's
    summary.finish_norms(normalized=opts.normalize)
    return summary


def _validate_options(
    model: str,
    exact: bool,
    score_column: Any,
    threshold: Any,
    filter: Any,
    keep_embeddings: Any,
    batch_size: Any,
    resume: bool,
    overwrite: bool,
    rows_per_partition: Any,
    heads: Any = ("nsfw",),
    keep: Any = (),
) -> Options:
    try:
        head_specs = parse_heads(heads)
        for h in head_specs:
            h.spec_for(model)
    except ValueError as e:
        raise JobError(_head_flags(str(e)), 2) from None
    head_names = tuple(h.name for h in head_specs)
    columns = {h: score_column if h == "nsfw" else HEADS[h].score_column for h in head_names}
    conditions = tuple(parse_keep(k, head_names, columns) for k in ([keep] if isinstance(keep, str) else keep))
    if exact and "nsfw" not in head_names:
        raise JobError(f"--exact is LAION's original NSFW model; --heads {','.join(head_names)} has no nsfw.", 2)
    if not isinstance(score_column, str) or not score_column.strip():
        raise JobError(f"the score column needs a name (--score-column), not {score_column!r}", 2)
    if filter is None:
        filter = "none"
    if filter not in FILTERS:
        raise JobError(f"filter must be one of {FILTERS}, not {filter!r}", 2)
    if threshold is not None:
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise JobError(f"threshold must be in [0, 1], not {threshold}", 2)
    elif filter != "none":
        threshold = 0.5
    if keep_embeddings is True:
        keep_embeddings = "binary"
    if keep_embeddings not in KEEP_EMBEDDINGS:
        raise JobError(f"keep_embeddings must be False, True, 'binary' or 'list', not {keep_embeddings!r}", 2)
    if threshold is not None and score_column == IS_NSFW_COLUMN:
        raise JobError(
            f"--score-column {IS_NSFW_COLUMN!r} clashes with the {IS_NSFW_COLUMN} column that "
            "--threshold adds; choose another score column name.",
            2,
        )
    if "nsfw" not in head_names and (threshold is not None or filter != "none"):
        raise JobError(
            f"--threshold and --filter select on the NSFW score, but --heads is {','.join(head_names)}; "
            "add nsfw to --heads, or filter with --keep (e.g. --keep 'aesthetic>=5').",
            2,
        )
    if resume and overwrite:
        raise JobError("--resume keeps the committed parts and --overwrite deletes them; pass one.", 2)
    if not isinstance(rows_per_partition, int) or isinstance(rows_per_partition, bool) or rows_per_partition < 1:
        raise JobError(f"rows_per_partition must be a positive integer, not {rows_per_partition!r}", 2)
    return Options(
        model=model,
        exact=bool(exact),
        score_column=score_column,
        threshold=threshold,
        filter=filter,
        keep_embeddings=keep_embeddings,
        batch_size=batch_size,
        device=None,
        model_dir=None,
        heads=head_names,
        keep=conditions,
    )


def _head_flags(message: str) -> str:
    """A head error from :mod:`nsfw_dask.heads` (worded for ``score_heads``) for the job."""
    return message.replace("model= one of those", "--model one of those")


def parse_keep(condition: Any, heads: tuple[str, ...], columns: dict[str, str] | None = None) -> tuple[str, str, float]:
    """``"aesthetic>=5"`` / ``"aesthetic_score >= 5"`` / ``("aesthetic", ">=", 5)`` -> ``("aesthetic", ">=", 5.0)``.

    The head may be named by its name or its score column; it must be among ``heads``.
    """
    if isinstance(condition, str):
        m = re.fullmatch(r"\s*([A-Za-z][\w-]*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*", condition)
        if m is None:
            raise JobError(
                f"--keep {condition!r} is not HEAD OP VALUE; write e.g. --keep 'aesthetic>=5' or "
                "--keep 'nsfw<0.5' (OP one of <, <=, >, >=)",
                2,
            )
        name, op, raw = m.groups()
    else:
        try:
            name, op, raw = condition
        except (TypeError, ValueError):
            raise JobError(f"a --keep condition is (head, op, value), not {condition!r}", 2) from None
    columns = columns or {h: HEADS[h].score_column for h in heads}
    by_column = {c: h for h, c in columns.items()}  # a head by its column too (--score-column included)
    head = by_column.get(str(name), str(name).replace("_", "-"))
    if head not in heads:
        raise JobError(
            f"--keep {condition!r} names {name!r}, which is not a head scored here ({','.join(heads)}); "
            "add it to --heads, or keep on one of those.",
            2,
        )
    if op not in KEEP_OPS:
        raise JobError(f"--keep {condition!r}: OP must be one of {sorted(KEEP_OPS)}", 2)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise JobError(f"--keep {condition!r}: {raw!r} is not a number", 2) from None
    if not math.isfinite(value):
        raise JobError(f"--keep {condition!r}: the value must be a finite number, not {value}", 2)
    return head, op, value


def keep_text(condition: tuple[str, str, float], columns: dict[str, str]) -> str:
    head, op, value = condition
    return f"{columns[head]} {op} {value:g}"


def _check_column_clashes(plan: Plan, opts: Options) -> None:
    """The columns we add must not clash with each other or with the input's."""
    existing = list(plan.meta_columns) + ([ROW_NUMBER_COLUMN] if plan.kind == "parquet_npy" else [])
    existing += [name for name, _ in plan.partition_columns]
    if opts.keep_embeddings:
        existing.append(plan.column)
    columns = opts.score_columns()
    if opts.score_column == plan.column:
        raise JobError(f"--score-column {opts.score_column!r} is the embedding column; choose another name.", 2)
    for head, column in columns.items():
        if column in existing or column == plan.column:
            if head == "nsfw":
                raise JobError(f"INPUT already has a column {column!r}; pass --score-column with another name.", 2)
            raise JobError(
                f"INPUT already has a column {column!r}, which the {head} head writes; rename that column in INPUT.", 2
            )
    if len(set(columns.values())) < len(columns):
        raise JobError(f"--score-column {opts.score_column!r} is another head's column; choose another name.", 2)
    if opts.threshold is not None and IS_NSFW_COLUMN in existing:
        raise JobError(
            f"INPUT already has a column {IS_NSFW_COLUMN!r}, which --threshold adds; rename or "
            f"drop that column in INPUT, or run without --threshold/--filter.",
            2,
        )
    forms = plan.embedding_forms
    if opts.keep_embeddings and len({dtype for _, dtype, _ in forms}) > 1:
        (_, d0, f0), (_, d1, f1) = forms[0], next(f for f in forms if f[1] != forms[0][1])
        raise JobError(
            f"--keep-embeddings would write {d0} vectors for {f0} but {d1} for {f1}, parts of "
            "different schemas; leave --keep-embeddings out, or convert the files to one float type.",
            2,
        )
    if opts.keep_embeddings == "list" and len(forms) > 1:
        (t0, _, f0), (t1, _, f1) = forms[:2]
        raise JobError(
            f"--keep-embeddings list would write {t0} for {f0} but {t1} for {f1}, parts of different "
            "schemas; pass --keep-embeddings binary (the same bytes for every list form), or convert "
            "the files to one type.",
            2,
        )


def _prepare_output(
    plan: Plan, job: dict[str, Any], given: str, lease: Lease, *, resume: bool, overwrite: bool
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Create, replace or resume OUTPUT under this run's lease; write the job description.

    Another run's live lease refuses the run before anything is read or changed.  The lease is
    taken before anything in OUTPUT is removed; if preparing fails, what this call created is
    removed and the lease released.  Returns the reused parts and the folders this call created
    (deepest first; local only).
    """
    fs, root = plan.out_fs, plan.out_root
    exists = fs.exists(root)
    if exists and not fs.isdir(root):
        raise JobError(f"OUTPUT {given} is a file; OUTPUT is a folder of parquet parts. Choose another path.", 2)
    listing = _listing(fs, root) if exists else []
    if LEASE_FILE in listing:  # another run may be writing OUTPUT: touch nothing
        lease.refuse_if_live()
    names = [n for n in listing if not _is_ours(n)]  # a dead run's lease and temporaries are not content
    if names and resume:
        old = _read_json(fs, f"{root}/{JOB_FILE}")
        if not old:
            raise JobError(
                f"OUTPUT {given} has no nsfw-dask job description ({JOB_FILE}); it was not written "
                "by nsfw-dask score, so there is nothing to resume. Choose another OUTPUT, or pass "
                "--overwrite to replace it.",
                2,
            )
        diffs = _job_differences(old, job)
        if diffs:
            raise JobError(
                f"--resume refused: OUTPUT {given} was written by a different job: "
                f"{'; '.join(diffs)}. Rerun with the original options, or pass --overwrite to "
                "start again.",
                2,
            )
    elif names and not overwrite:
        old = _read_json(fs, f"{root}/{JOB_FILE}")
        if old is None:
            raise JobError(
                f"OUTPUT {given} already exists and was not written by nsfw-dask score; choose "
                "another OUTPUT, or pass --overwrite to replace it.",
                2,
            )
        state = "a finished run" if SUCCESS_FILE in names else "an unfinished run"
        raise JobError(
            f"OUTPUT {given} already holds {state}; pass --resume to finish it (only the "
            "missing parts are scored), --overwrite to replace it, or choose another OUTPUT.",
            2,
        )
    created = _makedirs(fs, root, given) if not exists else []
    try:
        lease.acquire()
    except BaseException:
        lease.release()  # only if it names this run
        _remove_created(fs, root, created, None)
        raise
    reused: dict[int, dict[str, Any]] = {}
    try:
        if names and overwrite:
            if SUCCESS_FILE in names:  # first, so that a mix of two runs is never taken for finished
                fs.rm(f"{root}/{SUCCESS_FILE}")
            for n in names:
                if n != SUCCESS_FILE:
                    fs.rm(f"{root}/{n}", recursive=True)
        elif names and resume:
            if SUCCESS_FILE in names:
                fs.rm(f"{root}/{SUCCESS_FILE}")
            reused = _reusable_parts(plan, names)
        _sweep_temporaries(fs, root)
        put_small(fs, root, JOB_FILE, json.dumps({**job, "run": lease.run}, indent=1).encode(), shown=given)
    except BaseException:
        if not reused:
            _remove_created(fs, root, created, lease)
        lease.release()
        raise
    return reused, created


def _makedirs(fs: Any, root: str, given: str) -> list[str]:
    """``fs.makedirs(root)``; returns the local folders it created, deepest first."""
    created = []
    if is_local(fs):
        p = root
        while p and not os.path.exists(p):
            created.append(p)
            p = os.path.dirname(p)
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as e:
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise storage_error(show_path(fs, root), given, e) from e
    return created


def _remove_created(fs: Any, root: str, created: list[str], lease: Lease | None) -> None:
    """After a run that committed no part: remove what it created, even when the disk is full.

    Its temporaries, its job file and its lease (only while it holds OUTPUT: never another run's),
    then the folders it made, if empty.  If a part is there after all (committed by a task whose
    result never arrived), the job file stays, so that OUTPUT can be resumed.
    """
    if lease is not None:
        if not lease.held or lease.lost.is_set():
            return
        with contextlib.suppress(Exception):
            _sweep_temporaries(fs, root)
            if not set(_listing(fs, root)) - {JOB_FILE, LEASE_FILE}:
                old = _read_json(fs, f"{root}/{JOB_FILE}")
                if old and old.get("run") == lease.run:
                    fs.rm(f"{root}/{JOB_FILE}")
        lease.release()
    for d in created:
        try:
            os.rmdir(d)
        except OSError:
            break


def _sweep_temporaries(fs: Any, root: str) -> None:
    """Remove ``.part*.tmp-*`` files left by killed runs (only the lease holder calls this)."""
    for n in _listing(fs, root):
        if TMP_NAME.match(n):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{root}/{n}")


def _reusable_parts(plan: Plan, names: list[str]) -> dict[int, dict[str, Any]]:
    fs, root = plan.out_fs, plan.out_root
    by_name = {p.name: p for p in plan.parts}
    present = [by_name[n] for n in names if n in by_name]
    stray = [n for n in names if n.startswith("part.") and n not in by_name]

    def check(part: Part) -> tuple[Part, dict[str, Any] | None]:
        try:
            rows, info = read_part_info(fs, f"{root}/{part.name}")
        except Exception:
            return part, None
        if not part_ok(plan, part, rows, info):
            return part, None
        assert info is not None
        return part, {
            "part": part.index,
            "rows": part.rows,
            "rows_written": rows,
            "reused": True,
            "nan_scores": info["nan_scores"],
            "over_threshold": info["over_threshold"],
            "histogram": decode_histogram(info["histogram"]),
            "norm_off_unit": info.get("norm_off_unit", 0),  # parts written before the norm check: none
            "norm_zero": info.get("norm_zero", 0),
            "norm_histogram": decode_histogram(info["norm_histogram"]) if "norm_histogram" in info else None,
            "heads": {
                h: {"nan": v["nan"], "histogram": decode_histogram(v["histogram"])}
                for h, v in (info.get("heads") or {}).items()
            },
            "keep_counts": info.get("keep_counts") or [],
        }

    reused = {}
    for part, r in map_threads(check, present):
        if r is None:
            logger.info("%s does not check out; it is scored again", part.name)
            fs.rm(f"{root}/{part.name}")
        else:
            reused[part.index] = r
    for n in stray:
        fs.rm(f"{root}/{n}")
    return reused


def _finish(plan: Plan, summary: Summary, lease: Lease, given: str) -> None:
    """Check that every part is there with its rows and that its footer names this job, that the
    job file is this run's and that this run still holds OUTPUT; then write ``_SUCCESS`` (last)."""
    fs, root = plan.out_fs, plan.out_root
    names = set(_listing(fs, root))
    missing = [p.name for p in plan.parts if p.name not in names]
    if missing:
        raise JobError(
            f"{len(missing)} part(s) are missing from OUTPUT after the run (e.g. {missing[0]}); rerun with --resume."
        )
    if summary.rows != sum(p.rows for p in plan.parts):
        raise JobError(
            f"the parts hold {summary.rows} input rows, the input has "
            f"{sum(p.rows for p in plan.parts)}; rerun with --resume."
        )

    def foreign(part: Part) -> str | None:
        try:
            rows, info = read_part_info(fs, f"{root}/{part.name}")
        except Exception as e:
            return f"its footer cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        if part_ok(plan, part, rows, info):
            return None
        job = (info or {}).get("job")
        return f"its footer names job {job}" if job != plan.job_id else f"its footer does not match its {rows} rows"

    bad = [(p, why) for p, why in zip(plan.parts, map_threads(foreign, plan.parts)) if why]
    if bad:
        p, why = bad[0]
        raise JobError(
            f"{len(bad)} part(s) in OUTPUT {given} are not this job's ({plan.job_id}), e.g. {p.name}: {why}; "
            "another run wrote into OUTPUT, so it is not marked finished. Rerun with --resume (parts that "
            "are not this job's are scored again)."
        )
    job = _read_json(fs, f"{root}/{JOB_FILE}")
    if not job or job.get("job_id") != plan.job_id or job.get("run") != lease.run:
        raise JobError(
            f"OUTPUT {given}'s {JOB_FILE} is not this run's (another run wrote into OUTPUT), so it is not "
            "marked finished. Rerun with --resume."
        )
    lease.check(fresh=True)
    record = {
        "job_id": plan.job_id,
        "run": lease.run,
        "partitions": len(plan.parts),
        "rows": summary.rows,
        "rows_written": summary.rows_written,
        "version": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    put_small(fs, root, SUCCESS_FILE, json.dumps(record).encode(), shown=given)


def is_finished(output: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """True if ``output`` is a finished ``score_dataset`` output (it has ``_SUCCESS``)."""
    fs, root = filesystem(normalize_path(output), storage_options)
    return bool(fs.exists(f"{root}/{SUCCESS_FILE}"))
