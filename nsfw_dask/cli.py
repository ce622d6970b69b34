"""``nsfw-dask``: score a dataset on an embedded (or existing) Dask cluster, fetch weights, demo.

Every command has ``--help``.  Errors print one line naming the problem and the fix, and exit
non-zero (1: failed, 2: bad usage, 130: interrupted); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .exceptions import EmbeddingFormatError, NsfwDaskError
from .models import MODEL_SPECS

logger = logging.getLogger("nsfw_dask.cli")

_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
_BINS = 10_000  # histogram resolution of the summary's quantiles (1e-4)


class CLIError(Exception):
    """An error the CLI reports as one line (exit code ``code``)."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


# ----------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit-l-14", choices=sorted(MODEL_SPECS),
                   help="LAION head: vit-l-14 (768-d CLIP ViT-L/14) or vit-b-32 (512-d); default vit-l-14")
    p.add_argument("--model-dir", default=None,
                   help="folder with the weights (default: $NSFW_DASK_MODEL_DIR, the user cache, a download)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more and show tracebacks")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=_positive_int, default=None, help="worker processes of the embedded cluster")
    g.add_argument("--threads-per-worker", type=_positive_int, default=None, help="threads per worker process")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use an existing Dask scheduler (tcp://host:8786) instead of an embedded cluster")
    g.add_argument("--gpu", action="store_true",
                   help="embedded LocalCUDACluster and cuDF partitions (needs a GPU and nsfw-dask[gpu-cu12|13])")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--column", default=None, help="embedding column (default: the only list-of-float column)")
    p.add_argument("--score-column", default="nsfw_score", help="name of the score column (default nsfw_score)")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="also write is_nsfw = score >= T, <NA> where the score is NaN (and count rows over T)")
    p.add_argument("--filter", default="none", choices=["none", "keep-safe", "keep-nsfw"],
                   help="drop rows: keep-safe keeps score < T, keep-nsfw keeps score >= T "
                        "(T = --threshold, default 0.5); rows with a NaN score are kept by neither")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="rows per forward pass")
    p.add_argument("--exact", action="store_true",
                   help="reproduce LAION's original AutoKeras model (LAION-5B's punsafe) instead of "
                        "NeMo Curator's torch port; needs LAION's SavedModel zip (see fetch-weights --exact)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsfw-dask",
        description="Score CLIP image embeddings for NSFW content with LAION's detector on Dask.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("score", help="score a parquet dataset (or LAION parquet_npy folder) into parquet",
                       description="Score INPUT and write OUTPUT: every input column plus the score.")
    p.add_argument("input", metavar="INPUT",
                   help="parquet file, folder or glob (local or any fsspec URL), or a parquet_npy folder "
                        "(img_emb/img_emb_N.npy + metadata/metadata_N.parquet)")
    p.add_argument("output", metavar="OUTPUT", help="output parquet folder (written atomically)")
    _score_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _cluster_args(p)
    _common(p)

    p = sub.add_parser("fetch-weights", help="download and verify the weights, print where they are",
                       description="Download LAION's weights (pinned URL + SHA-256) and print the path.")
    p.add_argument("--url", default=None, help="a mirror URL (the pinned SHA-256 still applies)")
    p.add_argument("--exact", action="store_true",
                   help="also fetch LAION's original SavedModel zip and extract its vocabularies (for --exact)")
    _common(p)

    p = sub.add_parser("demo", help="generate a sample dataset, score it, print a summary, plot a histogram",
                       description="The main job, end to end, on generated unit-norm embeddings.")
    p.add_argument("--rows", type=_positive_int, default=300_000, help="rows to generate (default 300,000)")
    p.add_argument("--out", default=None, help="folder for data, scores and the PNG (default: a temp folder)")
    p.add_argument("--partition-rows", type=_positive_int, default=50_000, help="rows per parquet row group / partition")
    _score_args(p)
    _cluster_args(p)
    _common(p)
    return parser


# ----------------------------------------------------------------------------- helpers


_interrupted = threading.Event()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so clean-up (temporary output) runs.

    Both signals also set ``_interrupted``: library code on the way (dask's client, the event
    loop) may catch the KeyboardInterrupt, and a run that was interrupted must still not put
    its output in place (``_run_score`` checks the flag before the final rename).
    """
    def handler(signum: int, frame: Any) -> None:
        _interrupted.set()
        raise KeyboardInterrupt(f"signal {signum}")

    _interrupted.clear()
    try:
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    from distributed import Client

    if args.scheduler:
        with Client(args.scheduler) as c:
            yield c
        return
    if args.gpu:
        from .gpu import cuda_available, local_cuda_cluster

        if not cuda_available():
            raise CLIError("--gpu: no CUDA device is visible; run without --gpu to score on the CPU.")
        try:
            cluster = local_cuda_cluster(**({"n_workers": args.workers} if args.workers else {}))
        except ModuleNotFoundError as e:
            raise CLIError(f"--gpu: {e}") from e
    else:
        from distributed import LocalCluster

        n_cpu = os.cpu_count() or 1
        workers = args.workers or (1 if args.threads_per_worker else min(n_cpu, 4))
        threads = args.threads_per_worker or max(1, n_cpu // workers)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                               dashboard_address=None,
                               silence_logs=logging.WARNING if args.verbose else logging.CRITICAL)
    with cluster, Client(cluster) as c:
        yield c


def _is_nsfw(s: Any, threshold: float) -> Any:
    """``score >= threshold`` as a nullable boolean: <NA> where the score is NaN (no embedding)."""
    flag = s >= threshold
    if hasattr(flag, "to_pandas"):  # cuDF: bool columns hold nulls natively
        return flag.mask(s.isna())
    return flag.astype("boolean").mask(s.isna())


def _hist_chunk(s: Any) -> Any:
    """Histogram of one partition's scores as a pandas Series indexed by bin (pandas or cuDF in)."""
    import pandas as pd

    v = s.to_numpy() if not hasattr(s, "to_pandas") else s.to_pandas().to_numpy()
    v = np.asarray(v, dtype=np.float64)
    h, _ = np.histogram(v[~np.isnan(v)], bins=_BINS, range=(0.0, 1.0))
    return pd.Series(h, index=pd.RangeIndex(_BINS))


def _hist_sum(parts: Any) -> Any:
    return parts.groupby(level=0).sum()


def _summarise(total: int, nan: int, over: int, hist: Any) -> dict[str, Any]:
    hist = np.asarray(hist, dtype=np.int64).reshape(-1)
    cum = np.cumsum(hist)
    n_scored = int(cum[-1]) if len(cum) else 0
    quantiles = {}
    for q in _QUANTILES:
        if n_scored:
            k = int(np.searchsorted(cum, q * n_scored, side="left"))
            quantiles[f"p{int(q * 100):02d}"] = round((k + 0.5) / _BINS, 4)
    return {"rows": int(total), "nan_scores": int(nan), "over_threshold": int(over),
            "quantiles": quantiles, "histogram": hist}


def _is_url(path: str) -> bool:
    return "://" in path


def _check_paths(input_path: str, output: Path, overwrite: bool) -> None:
    out = output.expanduser().resolve()
    if output.exists() and not overwrite:
        raise CLIError(f"{output} already exists; pass --overwrite to replace it, or choose another OUTPUT.", 2)
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise CLIError(f"OUTPUT {output} is the current folder or one of its parents; choose a new folder.", 2)
    if not _is_url(input_path) and not any(c in input_path for c in "*?["):
        src = Path(input_path).expanduser().resolve()
        if not src.exists():
            raise CLIError(f"INPUT {input_path} not found (a parquet file, folder, glob or URL); check the path.")
        if src == out or out in src.parents or src in out.parents:
            raise CLIError(f"OUTPUT {output} overlaps INPUT {input_path}; write to a separate folder.", 2)


def _run_score(args: argparse.Namespace, input_path: str, output: Path) -> dict[str, Any]:
    import dask
    import dask.dataframe as dd
    import pandas as pd
    from distributed import progress

    from .io import is_parquet_npy, read_input
    from .plugin import NSFWModelPlugin
    from .scoring import nsfw_meta
    from .weights import resolve_weights

    if _is_url(str(output)):
        raise CLIError("OUTPUT must be a local path (the run is written to a temporary sibling and "
                       "renamed into place); copy the result to object storage afterwards.", 2)
    _check_paths(input_path, output, args.overwrite)
    if args.filter != "none" and args.threshold is None:
        args.threshold = 0.5
    if args.model_dir:
        args.model_dir = str(Path(args.model_dir).expanduser().resolve())  # workers may have another cwd
    resolve_weights(args.model, args.model_dir)  # fail fast, on the client, with the fix in the message
    if getattr(args, "exact", False):
        from .exact import load_vocabulary

        load_vocabulary(args.model, args.model_dir)  # the SavedModel zip too, before any worker starts

    npy = is_parquet_npy(input_path)
    score_kwargs: dict[str, Any] = {}
    if args.gpu:
        _check_gpu()
        if npy:  # pandas partitions over memory-mapped .npy: scored on the GPU batch by batch
            score_kwargs["device"] = "cuda"
    try:
        if args.gpu and not npy:
            with dask.config.set({"dataframe.backend": "cudf"}):
                ddf = dd.read_parquet(input_path)  # cuDF reads list columns natively
        else:
            ddf = read_input(input_path)
    except (FileNotFoundError, OSError) as e:
        raise CLIError(f"cannot read INPUT {input_path}: {str(e).splitlines()[-1]}") from e
    for col in (args.score_column, "is_nsfw" if args.threshold is not None else None):
        if col is not None and col in ddf.columns:
            raise CLIError(f"INPUT already has a column {col!r}; pass --score-column with another name "
                           "(is_nsfw is added with --threshold).", 2)

    t0 = time.perf_counter()
    _remove_stale_partials(output)
    tmp = output.parent / f".{output.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    output.parent.mkdir(parents=True, exist_ok=True)
    done = False
    futures: list[Any] = []
    try:
        with _client(args) as client:
            try:
                device = "cuda" if args.gpu else "cpu"
                client.register_plugin(NSFWModelPlugin(args.model, device=device, model_dir=args.model_dir,
                                                       exact=args.exact))
                meta = nsfw_meta(ddf, column=args.column, score_column=args.score_column)  # column errors here
                sources = None if npy else _partition_sources(ddf)
                scored = ddf.map_partitions(
                    _score_partition, column=args.column, model=args.model, score_column=args.score_column,
                    batch_size=args.batch_size, model_dir=args.model_dir, exact=args.exact, meta=meta,
                    **score_kwargs,
                )
                s = scored[args.score_column]
                if args.threshold is not None:
                    scored = scored.assign(is_nsfw=s.map_partitions(_is_nsfw, args.threshold))
                written = scored
                if args.filter == "keep-safe":
                    written = scored[s < args.threshold]
                elif args.filter == "keep-nsfw":
                    written = scored[s >= args.threshold]
                # summary as tree reductions (nothing per partition piles up on the client)
                hist = s.reduction(chunk=_hist_chunk, aggregate=_hist_sum, combine=_hist_sum,
                                   meta=pd.Series([], dtype="int64"))
                over = (s >= args.threshold).sum() if args.threshold is not None else 0
                stats = [s.size, s.isna().sum(), over, hist, written[args.score_column].size]
                write = written.to_parquet(str(tmp), write_index=True, compute=False)
                # one graph: scoring runs once and feeds the write and the summary
                t_compute = time.perf_counter()
                futures = client.compute([write, *stats])
                if not args.no_progress and sys.stdout.isatty():
                    progress(futures)
                    print(file=sys.stderr)
                try:
                    _, total, nan, over_n, hist_v, kept_rows = client.gather(futures)
                except EmbeddingFormatError as e:
                    raise _located(e, sources) from e
                compute_seconds = time.perf_counter() - t_compute
            except BaseException:
                if futures:
                    client.cancel(futures)
                raise
        if _interrupted.is_set():  # a signal whose KeyboardInterrupt was swallowed on the way
            raise KeyboardInterrupt("interrupted")
        _swap_into_place(tmp, output, args.overwrite)
        done = True
    finally:
        if not done and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    summary = _summarise(total, nan, over_n, hist_v)
    summary.update(seconds=seconds, compute_seconds=compute_seconds,
                   rows_per_s=summary["rows"] / compute_seconds if compute_seconds else float("nan"),
                   rows_written=int(kept_rows), output=str(output), threshold=args.threshold)
    return summary


def _remove_stale_partials(output: Path) -> None:
    """Delete ``.OUTPUT.incomplete-<pid>-*`` folders left by runs that were killed (SIGKILL, OOM).

    Only those whose process is gone: a run still writing next to us is left alone.
    """
    pattern = re.compile(re.escape(f".{output.name}.incomplete-") + r"(\d+)-[0-9a-f]+$")
    try:
        siblings = list(output.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        m = pattern.match(p.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # alive (or a reused pid): not ours to remove
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        logging.getLogger(__name__).info("removing %s, left by a run that was killed", p)
        shutil.rmtree(p, ignore_errors=True)


def _score_partition(df: Any, partition_info: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """``score_nsfw`` on one partition; a bad-row error remembers which partition it came from."""
    from .scoring import score_nsfw

    try:
        return score_nsfw(df, **kwargs)
    except EmbeddingFormatError as e:
        e.partition = None if partition_info is None else partition_info.get("number")
        raise


def _partition_sources(ddf: Any) -> list[str] | None:
    """The parquet file (and row groups) behind each partition, where dask tells (best effort).

    dask's ``read_parquet`` numbers each partition's rows from 0, so "row 3" alone does not say
    where a bad row is; this list, kept on the client, lets the error name the file.
    """
    try:
        for expr in ddf.optimize().expr.walk():
            plan = getattr(expr, "_plan", None)
            if isinstance(plan, dict) and "parts" in plan:
                out = []
                for part in plan["parts"]:
                    path, row_groups = part["piece"][0], part["piece"][1]
                    out.append(str(path) if not row_groups else f"{path} (row groups {list(row_groups)})")
                return out if len(out) == ddf.npartitions else None
    except Exception:  # an internal API: never let it break a run
        return None
    return None


def _located(e: EmbeddingFormatError, sources: list[str] | None) -> Exception:
    n = getattr(e, "partition", None)
    if n is None:
        return e
    if sources is not None and 0 <= n < len(sources):
        where = f"in {sources[n]} (partition {n}; row labels count from 0 within each file or piece)"
    else:
        where = f"in partition {n} of INPUT (row labels count from 0 within each parquet file or piece)"
    return CLIError(f"{e} [{where}]")


def _cli_hints(message: str) -> str:
    """Our library messages suggest ``column=``; on the command line the fix is ``--column``."""
    message = re.sub(r"score_nsfw\(df, column=('[^']*'|\"[^\"]*\")\)", r"--column \1", message)
    return message.replace("pass column=", "pass --column").replace("Pass column=", "Pass --column")


def _check_gpu() -> None:
    from .gpu import cuda_available

    missing = [m for m in ("cudf", "dask_cudf", "dask_cuda", "cupy") if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"--gpu needs {', '.join(missing)}: pip install 'nsfw-dask[gpu-cu12]' (or [gpu-cu13]).")
    if not cuda_available():
        raise CLIError("--gpu: no CUDA device is visible; run without --gpu to score on the CPU.")


def _swap_into_place(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished temporary output into place (the old OUTPUT is removed only after)."""
    old = None
    if output.exists() and not overwrite:
        raise CLIError(f"{output} appeared while the job ran; the result was discarded. Rerun with "
                       "--overwrite or another OUTPUT.", 2)
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _print_summary(s: dict[str, Any]) -> None:
    print(f"rows scored      {s['rows']:,}")
    print(f"rows written     {s['rows_written']:,}  -> {s['output']}")
    print(f"time             {s['seconds']:.1f} s in all, {s['compute_seconds']:.1f} s read+score+write "
          f"({s['rows_per_s']:,.0f} rows/s)")
    if s["nan_scores"]:
        print(f"NaN scores       {s['nan_scores']:,}  (null or non-finite embeddings)")
    q = "  ".join(f"{k}={v:.4f}" for k, v in s["quantiles"].items())
    print(f"score quantiles  {q}")
    if s.get("threshold") is not None:
        pct = 100 * s["over_threshold"] / max(1, s["rows"] - s["nan_scores"])
        print(f"score >= {s['threshold']:<8g}{s['over_threshold']:,} rows ({pct:.2f}%)")


# ----------------------------------------------------------------------------- commands


def cmd_score(args: argparse.Namespace) -> int:
    summary = _run_score(args, args.input, Path(args.output))
    _print_summary(summary)
    return 0


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    from .weights import fetch_weights, resolve_file, resolve_weights

    if args.url or args.model_dir:
        path = fetch_weights(args.model, args.model_dir, url=args.url)
        print(path)
    else:
        print(resolve_weights(args.model, download=True).path)
    if args.exact:
        from .exact import load_vocabulary, read_savedmodel_vocabulary, write_vocabulary_cache
        from .models import get_spec
        from .weights import fetch_file

        keras = get_spec(args.model).keras
        assert keras is not None
        if args.model_dir:  # the zip and its extracted vocabularies into that folder
            zpath = fetch_file(keras.filename, keras.url, keras.sha256, args.model_dir)
            write_vocabulary_cache(read_savedmodel_vocabulary(zpath), keras, [zpath.parent])
            print(zpath)
        else:
            zpath = resolve_file(keras.filename, keras.url, keras.sha256, None, download=True,
                                 what=f"LAION's original {args.model} SavedModel")
            load_vocabulary(args.model, download=True)  # extracted and cached in the user cache
            print(zpath)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = MODEL_SPECS[args.model]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nsfw-dask-demo-"))
    marker = out / ".nsfw-dask-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise CLIError(f"--out {out} is not empty and not an earlier demo folder; choose a new or empty folder.", 2)
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    data = out / "embeddings"
    if data.exists():
        shutil.rmtree(data)
    data.mkdir()
    rng = np.random.default_rng(0)
    print(f"generating {args.rows:,} unit-norm {spec.dim}-d embeddings in {data}/")
    for i, start in enumerate(range(0, args.rows, args.partition_rows)):  # one file per partition
        n = min(args.partition_rows, args.rows - start)
        x = rng.standard_normal((n, spec.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        lists = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * spec.dim, spec.dim, dtype=np.int32)),
                                         pa.array(x.reshape(-1)))
        pq.write_table(pa.table({"id": np.arange(start, start + n), "embedding": lists}),
                       data / f"part.{i:05d}.parquet")
    args.overwrite = True
    if args.threshold is None:
        args.threshold = 0.5
    summary = _run_score(args, str(data), out / "scored.parquet")
    _print_summary(summary)
    png = out / "score_histogram.png"
    if _plot_histogram(summary["histogram"], png, f"{summary['rows']:,} generated embeddings, {args.model}"):
        print(f"histogram        {png}")
    return 0


def _plot_histogram(hist: np.ndarray, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'nsfw-dask[bench]'); no histogram PNG")
        return False
    coarse = hist.reshape(100, -1).sum(axis=1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(100) / 100 + 0.005, coarse, width=0.01)
    ax.set_yscale("log")
    ax.set_xlabel("nsfw_score")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _our_cause(e: BaseException) -> BaseException | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, NsfwDaskError):
            return e
        e = e.__cause__ or e.__context__
    return None


_COMMANDS = {"score": cmd_score, "fetch-weights": cmd_fetch_weights, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # no tracebacks from the cluster's shutdown after an error or interrupt
        for name in ("distributed", "asyncio", "tornado"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with _sigterm_as_interrupt():
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("nsfw-dask: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except (CLIError, NsfwDaskError, FileNotFoundError, FileExistsError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"nsfw-dask: error: {_cli_hints(str(e))}", file=sys.stderr)
        return getattr(e, "code", 1)
    except Exception as e:  # anything else: still one line unless --verbose
        cause = _our_cause(e)
        if cause is not None:  # e.g. dask's "Metadata inference failed" wrapping our error
            if args.verbose:
                traceback.print_exc()
            print(f"nsfw-dask: error: {_cli_hints(str(cause))}", file=sys.stderr)
            return 1
        if args.verbose:
            traceback.print_exc()
        print(f"nsfw-dask: error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
