"""``nsfw-dask``: score a dataset on an embedded (or existing) Dask cluster, fetch weights, demo.

Every command has ``--help``.  Errors print one line naming the problem and the fix, and exit
non-zero (1: failed, 2: bad usage, 130: interrupted); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import re
import signal
import sys
import threading
import traceback
from typing import Any, Iterator

from .exceptions import NsfwDaskError
from .models import MODEL_SPECS
from .pipeline import DEFAULT_ROWS_PER_PARTITION

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
                   help="score on GPUs: an embedded LocalCUDACluster, one worker per GPU; each partition is read with "
                        "pyarrow and scored on its worker's GPU (needs nsfw-dask[gpu-cu12|13])")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _column_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a column name cannot be empty")
    return text


def _storage_options(text: str) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"anon\": false}}' ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return v


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--column", default=None, type=_column_name,
                   help="embedding column (parquet: default the only list-of-float column; parquet_npy: the "
                        "name given to the .npy embeddings, default 'embedding')")
    p.add_argument("--score-column", default="nsfw_score", type=_column_name,
                   help="name of the score column (default nsfw_score)")
    p.add_argument("--threshold", type=_probability, default=None,
                   help="also write is_nsfw = score >= T, <NA> where the score is NaN (and count rows over T)")
    p.add_argument("--filter", default="none", choices=["none", "keep-safe", "keep-nsfw"],
                   help="drop rows: keep-safe keeps score < T, keep-nsfw keeps score >= T "
                        "(T = --threshold, default 0.5); rows with a NaN score are kept by neither")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="rows per forward pass")
    p.add_argument("--keep-embeddings", nargs="?", const="binary", default=None, choices=["binary", "list"],
                   help="also write the embedding column: as each vector's raw bytes (fixed_size_binary, "
                        "the default form, fast) or 'list' (the input's Arrow list type, slow to write)")
    p.add_argument("--rows-per-partition", type=_positive_int, default=DEFAULT_ROWS_PER_PARTITION,
                   help=f"rows per task and output part at most (default {DEFAULT_ROWS_PER_PARTITION:,})")
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
                       description="Score INPUT and write OUTPUT: every input column except the embeddings, "
                                   "plus the score. OUTPUT is finished when it has _SUCCESS.")
    p.add_argument("input", metavar="INPUT",
                   help="parquet file, folder or glob (local or any fsspec URL), or a parquet_npy folder "
                        "(img_emb/img_emb_N.npy + metadata/metadata_N.parquet)")
    p.add_argument("output", metavar="OUTPUT",
                   help="output folder, local or an fsspec URL (s3://, gs://, abfs://, file://): one parquet part "
                        "per input partition, _SUCCESS when finished")
    _score_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="finish an interrupted run into OUTPUT: keep its committed parts, score the rest")
    g.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--storage-options", type=_storage_options, default=None, metavar="JSON",
                   help="fsspec options for INPUT and OUTPUT, e.g. '{\"profile\": \"laion\"}'")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
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
    p.add_argument("--file-rows", type=_positive_int, default=50_000,
                   help="rows per generated img_emb_N.npy / metadata_N.parquet pair (default 50,000)")
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
    loop) may catch the KeyboardInterrupt, and a run that was interrupted must still not
    mark its output finished (``score_dataset`` checks the flag before writing ``_SUCCESS``).
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


def _cli_hints(message: str) -> str:
    """Library messages name keywords (``column=``, ``model='vit-b-32'``); the CLI's fix is a flag."""
    message = re.sub(r"score_nsfw\(df, column=('[^']*'|\"[^\"]*\")\)", r"--column \1", message)
    message = re.sub(r"\bmodel=['\"]([\w-]+)['\"]", r"--model \1", message)
    message = re.sub(r"\bpass model_dir=", "pass --model-dir", message)
    message = message.replace("model_dir=", "--model-dir")
    return message.replace("pass column=", "pass --column").replace("Pass column=", "Pass --column")


def _check_gpu() -> None:
    from .gpu import cuda_available

    missing = [m for m in ("cudf", "dask_cudf", "dask_cuda", "cupy") if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"--gpu needs {', '.join(missing)}: pip install 'nsfw-dask[gpu-cu12]' (or [gpu-cu13]).")
    if not cuda_available():
        raise CLIError("--gpu: no CUDA device is visible; run without --gpu to score on the CPU.")


def _print_summary(s: dict[str, Any]) -> None:
    print(f"rows scored      {s['rows']:,}")
    reused = f" ({s['partitions_reused']:,} reused)" if s["partitions_reused"] else ""
    print(f"parts            {s['partitions']:,}{reused}")
    print(f"rows written     {s['rows_written']:,}  -> {s['output']}")
    print(f"time             {s['seconds']:.1f} s in all, {s['compute_seconds']:.1f} s read+score+write "
          f"({s['rows_per_s']:,.0f} rows/s scored)")
    if s["nan_scores"]:
        print(f"NaN scores       {s['nan_scores']:,}  (null or non-finite embeddings)")
    q = s["quantiles"]
    if any(v is not None for v in q.values()):
        # each value is its bin's lower edge: the true quantile lies in [v, v + 0.0001)
        print("score quantiles  " + "  ".join(
            f"{k}{'<0.0001' if v == 0 else f'={v:.4f}'}" for k, v in q.items()))
    else:
        print("score quantiles  (no scores: no rows with an embedding)")
    if s.get("threshold") is not None:
        pct = 100 * s["over_threshold"] / max(1, s["rows"] - s["nan_scores"])
        print(f"score >= {s['threshold']:<8g}{s['over_threshold']:,} rows ({pct:.2f}%)")


# ----------------------------------------------------------------------------- commands


def _run_score(args: argparse.Namespace, input_path: str, output: str) -> dict[str, Any]:
    from .pipeline import score_dataset

    if args.gpu:
        _check_gpu()
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    try:
        summary = score_dataset(
            input_path, output, column=args.column, model=args.model, exact=args.exact,
            threshold=args.threshold, filter=args.filter, keep_embeddings=args.keep_embeddings or False,
            resume=getattr(args, "resume", False), overwrite=args.overwrite, client=client,
            storage_options=getattr(args, "storage_options", None), score_column=args.score_column,
            batch_size=args.batch_size, model_dir=args.model_dir, gpu=args.gpu, n_workers=args.workers,
            threads_per_worker=args.threads_per_worker, rows_per_partition=args.rows_per_partition,
            progress=not args.no_progress and sys.stderr.isatty(), interrupted=_interrupted,
        )
    finally:
        if client is not None:
            client.close()
    d = summary.to_dict()
    d["histogram"] = summary.histogram
    return d


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during ``score``: the message says how to resume."""


def cmd_score(args: argparse.Namespace) -> int:
    try:
        summary = _run_score(args, args.input, args.output)
    except KeyboardInterrupt:
        raise _Interrupted(f"committed parts are kept in {args.output}; rerun the same command with --resume "
                           "to finish it") from None
    if args.json:
        summary.pop("histogram")
        print(json.dumps(summary))
    else:
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
    from . import demo

    spec = MODEL_SPECS[args.model]
    try:
        out = demo.prepare_folder(args.out)
    except demo.DemoFolderError as e:
        raise CLIError(f"--out {e}; choose a new or empty folder.", 2) from None
    data = out / "laion"
    print(f"generating {args.rows:,} unit-norm {spec.dim}-d float16 embeddings + metadata in {data}/ "
          "(LAION parquet_npy layout)")
    demo.write_demo_data(data, args.rows, args.file_rows, spec.dim)
    args.overwrite = True
    if args.threshold is None:
        args.threshold = 0.5
    summary = _run_score(args, str(data), str(out / "scored"))
    _print_summary(summary)
    png = out / "score_histogram.png"
    if demo.plot_histogram(summary["histogram"], png, f"{summary['rows']:,} generated embeddings, {args.model}"):
        print(f"histogram        {png}")
    return 0


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
    except _Interrupted as e:
        print(f"nsfw-dask: interrupted; {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("nsfw-dask: interrupted", file=sys.stderr)
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
