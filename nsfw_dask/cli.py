"""``nsfw-dask``: score a dataset on an embedded (or existing) Dask cluster, fetch weights, demo.

Every command has ``--help``.  Errors print one line naming the problem and the fix, and exit
non-zero (1: failed, 2: bad usage, 130: interrupted); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .exceptions import NsfwDaskError
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit-l-14", choices=sorted(MODEL_SPECS),
                   help="LAION head: vit-l-14 (768-d CLIP ViT-L/14) or vit-b-32 (512-d); default vit-l-14")
    p.add_argument("--model-dir", default=None,
                   help="folder with the weights (default: $NSFW_DASK_MODEL_DIR, the user cache, a download)")
    p.add_argument("-v", "--verbose", action="store_true", help="log more and show tracebacks")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=None, help="worker processes of the embedded cluster")
    g.add_argument("--threads-per-worker", type=int, default=None, help="threads per worker process")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="use an existing Dask scheduler (tcp://host:8786) instead of an embedded cluster")
    g.add_argument("--gpu", action="store_true",
                   help="embedded LocalCUDACluster and cuDF partitions (needs a GPU and nsfw-dask[gpu-cu12|13])")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--column", default=None, help="embedding column (default: the only list-of-float column)")
    p.add_argument("--score-column", default="nsfw_score", help="name of the score column (default nsfw_score)")
    p.add_argument("--threshold", type=float, default=None,
                   help="also write is_nsfw = score >= T (and count rows over T)")
    p.add_argument("--filter", default="none", choices=["none", "keep-safe", "keep-nsfw"],
                   help="drop rows: keep-safe keeps score < T, keep-nsfw keeps score >= T "
                        "(T = --threshold, default 0.5); rows with a NaN score are kept by neither")
    p.add_argument("--batch-size", type=int, default=None, help="rows per forward pass")


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
    _common(p)

    p = sub.add_parser("demo", help="generate a sample dataset, score it, print a summary, plot a histogram",
                       description="The main job, end to end, on generated unit-norm embeddings.")
    p.add_argument("--rows", type=int, default=300_000, help="rows to generate (default 300,000)")
    p.add_argument("--out", default=None, help="folder for data, scores and the PNG (default: a temp folder)")
    p.add_argument("--partition-rows", type=int, default=50_000, help="rows per parquet row group / partition")
    _score_args(p)
    _cluster_args(p)
    _common(p)
    return parser


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM unwind like Ctrl-C, so clean-up (temporary output) runs."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


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


def _partition_stats(df: Any, score_column: str, threshold: float | None) -> Any:
    """Histogram + counts of one partition's scores (a tiny frame; pandas or cuDF in, pandas out)."""
    import pandas as pd

    s = df[score_column]
    values = s.to_numpy() if hasattr(s, "to_numpy") else s.values_host
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    hist, _ = np.histogram(finite, bins=_BINS, range=(0.0, 1.0))
    over = int((finite >= threshold).sum()) if threshold is not None else 0
    row = {"rows": len(values), "nan": int(len(values) - len(finite)), "over": over, "hist": hist}
    return pd.DataFrame([row])


def _summarise(stats: Any) -> dict[str, Any]:
    total = stats[["rows", "nan", "over"]].sum()
    hist = np.sum(np.stack(list(stats["hist"])), axis=0) if len(stats) else np.zeros(_BINS, np.int64)
    cum = np.cumsum(hist)
    n_scored = int(cum[-1]) if len(cum) else 0
    quantiles = {}
    for q in _QUANTILES:
        if n_scored:
            k = int(np.searchsorted(cum, q * n_scored, side="left"))
            quantiles[f"p{int(q * 100):02d}"] = round((k + 0.5) / _BINS, 4)
    return {"rows": int(total["rows"]), "nan_scores": int(total["nan"]), "over_threshold": int(total["over"]),
            "quantiles": quantiles, "histogram": hist}


def _run_score(args: argparse.Namespace, input_path: str, output: Path) -> dict[str, Any]:
    import dask
    import dask.dataframe as dd
    from distributed import progress

    from .io import read_input
    from .plugin import NSFWModelPlugin
    from .scoring import nsfw_meta, score_nsfw
    from .weights import resolve_weights

    if output.exists() and not args.overwrite:
        raise CLIError(f"{output} already exists; pass --overwrite to replace it, or choose another OUTPUT.", 2)
    if args.filter != "none" and args.threshold is None:
        args.threshold = 0.5
    resolve_weights(args.model, args.model_dir)  # fail fast, on the client, with the fix in the message

    if args.gpu:
        dask.config.set({"dataframe.backend": "cudf"})
    try:
        ddf = read_input(input_path)
    except FileNotFoundError as e:
        raise CLIError(f"cannot read {input_path}: {e}") from e

    t0 = time.perf_counter()
    tmp = output.parent / f".{output.name}.incomplete-{uuid.uuid4().hex[:8]}"
    output.parent.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        with _client(args) as client:
            device = "cuda" if args.gpu else "cpu"
            client.register_plugin(NSFWModelPlugin(args.model, device=device, model_dir=args.model_dir))
            meta = nsfw_meta(ddf, column=args.column, score_column=args.score_column)  # column errors here
            scored = ddf.map_partitions(
                score_nsfw, column=args.column, model=args.model, score_column=args.score_column,
                batch_size=args.batch_size, model_dir=args.model_dir, meta=meta,
            )
            if args.threshold is not None:
                scored = scored.assign(is_nsfw=scored[args.score_column] >= args.threshold)
            written = scored
            if args.filter == "keep-safe":
                written = scored[scored[args.score_column] < args.threshold]
            elif args.filter == "keep-nsfw":
                written = scored[scored[args.score_column] >= args.threshold]
            stats = scored.map_partitions(_partition_stats, args.score_column, args.threshold,
                                          meta=_partition_stats_meta(), enforce_metadata=False)
            kept = written.map_partitions(len, meta=(None, "int64"), enforce_metadata=False)
            write = written.to_parquet(str(tmp), write_index=True, compute=False)
            # one graph: scoring runs once and feeds the write, the stats and the row count
            t_compute = time.perf_counter()
            futures = client.compute([write, stats, kept])
            if not args.no_progress and sys.stdout.isatty():
                progress(futures)
                print(file=sys.stderr)
            _, stats_df, kept_rows = client.gather(futures)
            compute_seconds = time.perf_counter() - t_compute
        _swap_into_place(tmp, output)
        done = True
    finally:
        if not done and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    summary = _summarise(stats_df)
    summary.update(seconds=seconds, compute_seconds=compute_seconds,
                   rows_per_s=summary["rows"] / compute_seconds if compute_seconds else float("nan"),
                   rows_written=int(np.sum(kept_rows)), output=str(output), threshold=args.threshold)
    return summary


def _partition_stats_meta() -> Any:
    import pandas as pd

    cols = {"rows": "int64", "nan": "int64", "over": "int64", "hist": "object"}
    return pd.DataFrame({k: pd.Series([], dtype=v) for k, v in cols.items()})


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished temporary output into place (the old OUTPUT is removed only after)."""
    old = None
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
    from .weights import fetch_weights, resolve_weights

    if args.url or args.model_dir:
        path = fetch_weights(args.model, args.model_dir, url=args.url)
        print(path)
    else:
        print(resolve_weights(args.model, download=True).path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec = MODEL_SPECS[args.model]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nsfw-dask-demo-"))
    out.mkdir(parents=True, exist_ok=True)
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
    try:
        with _sigterm_as_interrupt():
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("nsfw-dask: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except (CLIError, NsfwDaskError, FileNotFoundError, FileExistsError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"nsfw-dask: error: {e}", file=sys.stderr)
        return getattr(e, "code", 1)
    except Exception as e:  # anything else: still one line unless --verbose
        cause = _our_cause(e)
        if cause is not None:  # e.g. dask's "Metadata inference failed" wrapping our error
            if args.verbose:
                traceback.print_exc()
            print(f"nsfw-dask: error: {cause}", file=sys.stderr)
            return 1
        if args.verbose:
            traceback.print_exc()
        print(f"nsfw-dask: error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
