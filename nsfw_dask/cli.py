"""``nsfw-dask`` (also ``dask nsfw``): score a dataset on an embedded (or existing) Dask cluster,
fetch weights, demo.

A click group, registered both as the ``nsfw-dask`` console script (:func:`main`) and under
dask's ``dask_cli`` entry-point group (:data:`nsfw`, so ``dask nsfw score ...`` works like
``dask cuda worker ...``).  This module only parses arguments and dispatches: the job is
:func:`nsfw_dask.score_dataset`, the demo's data and plot are in :mod:`nsfw_dask.demo`.  Nothing
heavy (torch, numpy, pandas, dask) is imported here until a command runs (but importing
``nsfw_dask.cli`` runs ``nsfw_dask/__init__.py`` first, and that imports the library).

Every command has ``--help``.  Errors print one line naming the problem and the fix, and exit
non-zero (1: failed, 2: bad usage, 130: interrupted); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import click

from ._version import __version__
from .exceptions import NsfwDaskError

# Literal copies, checked against the library by tests/test_dask_cli.py: the library's own
# modules import torch, and ``--help`` must not.
MODEL_NAMES = ("vit-b-32", "vit-l-14")  # sorted(nsfw_dask.models.MODEL_SPECS)
DEFAULT_ROWS_PER_PARTITION = 262_144  # nsfw_dask.pipeline.DEFAULT_ROWS_PER_PARTITION
#: Seconds ``--scheduler`` waits for the scheduler to answer (distributed's own default, its
#: ``distributed.comm.timeouts.connect``, is 30 s: too long to learn of a typo).
DEFAULT_SCHEDULER_TIMEOUT = 10.0

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CLIError(Exception):
    """An error the CLI reports as one line (exit code ``code``)."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


# ----------------------------------------------------------------------------- usage errors


class UsageLineError(click.UsageError):
    """A click usage error (bad option, value, missing argument) shown as one line, exit code 2.

    ``nsfw-dask: error: <click's message> (usage: <command> [OPTIONS] ...; see <command> --help)``,
    the same ``nsfw-dask: error:`` line as every other error, whether run as ``nsfw-dask`` or as
    ``dask nsfw`` (where dask's click main shows it).
    """

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(" ".join(error.format_message().split()), error.ctx)

    def show(self, file: Any = None) -> None:
        hint = ""
        if self.ctx is not None:
            path = self.ctx.command_path
            usage = " ".join([path, *self.ctx.command.collect_usage_pieces(self.ctx)])
            hint = f" (usage: {usage}; see {path} --help)"
        click.echo(f"nsfw-dask: error: {self.message}{hint}", file=file, err=True)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except UsageLineError:
        raise
    except click.UsageError as e:
        raise UsageLineError(e) from None


class _Group(click.Group):
    """Parsing the group's own options, choosing the command and parsing the command's
    arguments all happen in ``parse_args``/``invoke``: their usage errors become one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _one_line_usage_errors():
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


# ----------------------------------------------------------------------------- option types


class _PositiveInt(click.ParamType):
    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            v = value
        else:
            try:
                v = int(value)
            except ValueError:
                self.fail(f"expected a positive integer, got {value!r}", param, ctx)
        if v < 1:
            self.fail(f"expected a positive integer, got {v}", param, ctx)
        return v


class _PositiveFloat(click.ParamType):
    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except ValueError:
            self.fail(f"expected a positive number, got {value!r}", param, ctx)
        if not v > 0:
            self.fail(f"expected a positive number, got {v}", param, ctx)
        return v


class _Probability(click.ParamType):
    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            v = float(value)
        except ValueError:
            self.fail(f"expected a number in [0, 1], got {value!r}", param, ctx)
        if not 0.0 <= v <= 1.0:
            self.fail(f"expected a number in [0, 1], got {v}", param, ctx)
        return v


class _ColumnName(click.ParamType):
    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not str(value).strip():
            self.fail("a column name cannot be empty", param, ctx)
        return str(value)


class _JSONObject(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            v = json.loads(value)
        except ValueError as e:
            self.fail(f"expected a JSON object, e.g. '{{\"anon\": false}}' ({e})", param, ctx)
        if not isinstance(v, dict):
            self.fail(f"expected a JSON object, got {value!r}", param, ctx)
        return v


POSITIVE_INT = _PositiveInt()
POSITIVE_FLOAT = _PositiveFloat()
PROBABILITY = _Probability()
COLUMN_NAME = _ColumnName()
JSON_OBJECT = _JSONObject()


def _options(*decorators: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Several click decorators as one; options keep the order they are listed in."""

    def apply(f: Any) -> Any:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


_common_options = _options(
    click.option(
        "--model",
        default="vit-l-14",
        type=click.Choice(MODEL_NAMES),
        help="the CLIP model of the embeddings: vit-l-14 (768-d ViT-L/14) or vit-b-32 (512-d); default vit-l-14",
    ),
    click.option(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="folder with the weights (default: $NSFW_DASK_MODEL_DIR, the user cache, a download)",
    ),
    click.option("-v", "--verbose", is_flag=True, help="log more and show tracebacks"),
)

_cluster_options = _options(
    click.option(
        "--workers", type=POSITIVE_INT, default=None, metavar="N", help="worker processes of the embedded cluster"
    ),
    click.option(
        "--threads-per-worker",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="threads per worker process, each scoring its own partition (--gpu: default "
        "max(2, min(8, cores // GPUs)), several partitions per GPU at once)",
    ),
    click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="use an existing Dask scheduler (tcp://host:8786) instead of an embedded cluster",
    ),
    click.option(
        "--scheduler-timeout",
        type=POSITIVE_FLOAT,
        default=DEFAULT_SCHEDULER_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for --scheduler to answer (default {DEFAULT_SCHEDULER_TIMEOUT:g})",
    ),
    click.option(
        "--gpu",
        is_flag=True,
        help="score on GPUs: an embedded LocalCUDACluster, one worker per GPU, several threads each; "
        "each partition is read with pyarrow and scored on its worker's GPU (needs nsfw-dask[gpu-cu12|13])",
    ),
    click.option("--no-progress", is_flag=True, help="no progress bar"),
)


def _heads_help() -> str:
    from .heads import HEADS

    each = "; ".join(f"{h.name} -> {h.score_column}: {h.description}" for h in HEADS.values())
    return f"the heads to score from one read, comma-separated (default nsfw). {each}"


_score_options = _options(
    click.option("--heads", default="nsfw", metavar="H[,H...]", help=_heads_help()),
    click.option(
        "--keep",
        "keep",
        multiple=True,
        metavar="HEAD OP VALUE",
        help="write only rows passing this, e.g. --keep 'nsfw<0.5' --keep 'aesthetic>=5' (repeatable; all must "
        "hold; a NaN score passes none; OP: < <= > >=); the summary counts the rows passing each",
    ),
    click.option(
        "--column",
        default=None,
        type=COLUMN_NAME,
        metavar="NAME",
        help="embedding column (parquet: default the only list-of-float column; parquet_npy: the "
        "name given to the .npy embeddings, default 'embedding')",
    ),
    click.option(
        "--score-column",
        default="nsfw_score",
        type=COLUMN_NAME,
        metavar="NAME",
        help="name of the score column (default nsfw_score)",
    ),
    click.option(
        "--threshold",
        type=PROBABILITY,
        default=None,
        metavar="T",
        help="also write is_nsfw = score >= T, <NA> where the score is NaN (and count rows over T)",
    ),
    click.option(
        "--filter",
        default="none",
        type=click.Choice(["none", "keep-safe", "keep-nsfw"]),
        help="drop rows: keep-safe keeps score < T, keep-nsfw keeps score >= T "
        "(T = --threshold, default 0.5); rows with a NaN score are kept by neither",
    ),
    click.option("--batch-size", type=POSITIVE_INT, default=None, metavar="N", help="rows per forward pass"),
    click.option(
        "--keep-embeddings",
        is_flag=False,
        flag_value="binary",
        default=None,
        type=click.Choice(["binary", "list"]),
        help="also write the embedding column: as each vector's raw bytes (fixed_size_binary, "
        "the default form, fast) or 'list' (the input's Arrow list type, slow to write)",
    ),
    click.option(
        "--rows-per-partition",
        type=POSITIVE_INT,
        default=DEFAULT_ROWS_PER_PARTITION,
        metavar="N",
        help=f"rows per task and output part at most (default {DEFAULT_ROWS_PER_PARTITION:,})",
    ),
    click.option(
        "--exact",
        is_flag=True,
        help="reproduce LAION's original AutoKeras model (LAION-5B's punsafe) instead of "
        "NeMo Curator's torch port; needs LAION's SavedModel zip (see fetch-weights --exact)",
    ),
    click.option(
        "--normalize",
        is_flag=True,
        help="L2-normalise each embedding before scoring (raw CLIP encode_image outputs; LAION's heads "
        "expect unit-length embeddings); a zero vector gets a NaN score",
    ),
    click.option(
        "--no-norm-check",
        "no_norm_check",
        is_flag=True,
        help="score embeddings whose norms are far from 1 as they are (by default a partition with a "
        "median L2 norm outside [0.5, 2] fails the job: they are not normalised)",
    ),
)


# ----------------------------------------------------------------------------- the commands


@click.group(name="nsfw", cls=_Group, context_settings=CONTEXT_SETTINGS, no_args_is_help=False)
@click.version_option(__version__, "--version", prog_name="nsfw-dask", message="%(prog)s %(version)s")
def nsfw() -> None:
    """Score CLIP image embeddings for NSFW content with LAION's detector on Dask."""


@nsfw.command(
    "score",
    context_settings=CONTEXT_SETTINGS,
    short_help="score a parquet dataset (or LAION parquet_npy folder) into parquet",
    help="Score INPUT and write OUTPUT: every input column except the embeddings, plus the score. "
    "OUTPUT is finished when it has _SUCCESS.\n\n"
    "INPUT: parquet file, folder or glob (local or any fsspec URL), or a parquet_npy folder "
    "(img_emb/img_emb_N.npy + metadata/metadata_N.parquet).\n\n"
    "OUTPUT: output folder, local or an fsspec URL (s3://, gs://, abfs://, file://): one parquet part "
    "per input partition, _SUCCESS when finished.",
)
@click.argument("input", metavar="INPUT")
@click.argument("output", metavar="OUTPUT")
@_score_options
@click.option(
    "--resume",
    is_flag=True,
    help="finish an interrupted run into OUTPUT: keep its committed parts, score the rest (not with --overwrite)",
)
@click.option("--overwrite", is_flag=True, help="replace OUTPUT if it exists (not with --resume)")
@click.option(
    "--storage-options",
    type=JSON_OBJECT,
    default=None,
    metavar="JSON",
    help='fsspec options for INPUT and OUTPUT, e.g. \'{"profile": "laion"}\'',
)
@click.option("--json", is_flag=True, help="print the summary as one JSON object on stdout")
@_cluster_options
@_common_options
@click.pass_context
def score_command(ctx: click.Context, **opts: Any) -> None:
    if opts["resume"] and opts["overwrite"]:
        raise click.UsageError("--overwrite: not allowed with --resume", ctx)
    ctx.exit(_execute(cmd_score, SimpleNamespace(**opts)))


@nsfw.command(
    "fetch-weights",
    context_settings=CONTEXT_SETTINGS,
    short_help="download and verify the weights, print where they are",
    help="Download the heads' weights (pinned URLs + SHA-256) and print where they are.",
)
@click.option("--url", default=None, help="a mirror URL (the pinned SHA-256 still applies)")
@click.option(
    "--exact",
    is_flag=True,
    help="also fetch LAION's original SavedModel zip and extract its vocabularies (for --exact)",
)
@click.option(
    "--heads",
    default=None,
    metavar="H[,H...]",
    help="only these heads' weights (default: every head with weights for --model: nsfw, aesthetic, aesthetic-v1)",
)
@_common_options
@click.pass_context
def fetch_weights_command(ctx: click.Context, **opts: Any) -> None:
    ctx.exit(_execute(cmd_fetch_weights, SimpleNamespace(**opts)))


@nsfw.command(
    "demo",
    context_settings=CONTEXT_SETTINGS,
    short_help="generate a sample dataset, score it, print a summary, plot a histogram",
    help="The main job, end to end, on generated unit-norm embeddings.",
)
@click.option("--rows", type=POSITIVE_INT, default=300_000, metavar="N", help="rows to generate (default 300,000)")
@click.option("--out", default=None, metavar="DIR", help="folder for data, scores and the PNG (default: a temp folder)")
@click.option(
    "--file-rows",
    type=POSITIVE_INT,
    default=50_000,
    metavar="N",
    help="rows per generated img_emb_N.npy / metadata_N.parquet pair (default 50,000)",
)
@_score_options
@_cluster_options
@_common_options
@click.pass_context
def demo_command(ctx: click.Context, **opts: Any) -> None:
    ctx.exit(_execute(cmd_demo, SimpleNamespace(**opts)))


def main(argv: list[str] | None = None) -> int:
    """``nsfw-dask`` (the console script) and ``python -m nsfw_dask``: run, return the exit code."""
    try:
        rv = nsfw.main(args=argv, prog_name="nsfw-dask", standalone_mode=False)
    except click.ClickException as e:  # usage errors (one line, see UsageLineError)
        e.show()
        return e.exit_code
    except (click.Abort, KeyboardInterrupt):  # Ctrl-C while parsing
        print("nsfw-dask: interrupted", file=sys.stderr)
        return 130
    return rv if isinstance(rv, int) else 0


# ----------------------------------------------------------------------------- running a command


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
    message = re.sub(r"\bmodel_dir=(['\"])(.*?)\1", r"--model-dir \2", message)
    message = re.sub(r"\bpass model_dir=", "pass --model-dir", message)
    message = message.replace("model_dir=", "--model-dir")
    return message.replace("pass column=", "pass --column").replace("Pass column=", "Pass --column")


def _our_cause(e: BaseException | None) -> BaseException | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, NsfwDaskError):
            return e
        e = e.__cause__ or e.__context__
    return None


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during ``score``: the message says how to resume."""


def _execute(command: Callable[[SimpleNamespace], int], args: SimpleNamespace) -> int:
    """Run a command with logging set up; every error becomes one line and an exit code."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:  # no tracebacks from the cluster's shutdown after an error or interrupt
        # distributed configures its loggers (level INFO) when first imported: import it first,
        # so the levels set here stay (``import nsfw_dask`` alone no longer imports it)
        import distributed  # noqa: F401

        for name in ("distributed", "asyncio", "tornado"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with _sigterm_as_interrupt():
            return command(args)
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
        print(f"nsfw-dask: error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)", file=sys.stderr)
        return 1


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
    print(
        f"time             {s['seconds']:.1f} s in all, {s['compute_seconds']:.1f} s read+score+write "
        f"({s['rows_per_s']:,.0f} rows/s scored)"
    )
    st = s.get("stages") or {}
    if st.get("task_s"):
        # where the tasks' time went, summed over the scored parts (docs/cli.md, "Summary")
        names = ("read", "metadata", "score", "build", "write")
        busy = st["task_s"] / (s["threads"] * s["compute_seconds"]) if s["threads"] and s["compute_seconds"] else 0
        print(
            "time per stage   "
            + ", ".join(f"{n} {st.get(n + '_s', 0.0):.1f} s" for n in names)
            + f"  (summed over the parts; {s['threads']} thread(s) on {s['workers']} worker(s), busy {100 * busy:.0f}%)"
        )
    heads = s.get("heads") or {}
    if len(heads) <= 1:  # one head (NSFW by default): the lines as they have always been
        if s["nan_scores"]:
            print(f"NaN scores       {s['nan_scores']:,}  (null or non-finite embeddings)")
        q = s["quantiles"]
        if any(v is not None for v in q.values()):
            # each value is its bin's lower edge: the true quantile lies in [v, v + 0.0001)
            print("score quantiles  " + "  ".join(f"{k}{'<0.0001' if v == 0 else f'={v:.4f}'}" for k, v in q.items()))
        else:
            print("score quantiles  (no scores: no rows with an embedding)")
    for h in heads.values() if len(heads) > 1 else []:  # per head, labelled by its column
        hq = h["quantiles"]
        shown = "  ".join(f"{k}={v:.4g}" for k, v in hq.items()) if any(v is not None for v in hq.values()) else "-"
        nan = f"  ({h['nan_scores']:,} NaN)" if h["nan_scores"] else ""
        print(f"{h['column']:<17s}{shown}{nan}")
    for k in s.get("keep") or []:
        pct = 100 * k["rows"] / max(1, s["rows"])
        print(f"keep {k['condition']:<12s}{k['rows']:,} rows pass ({pct:.2f}%)")
    nq = s.get("norms") or {}
    if nq.get("p50") is not None:
        zero = f", {nq['zero']:,} zero vectors (NaN scores)" if nq.get("normalized") and nq.get("zero") else ""
        print(
            f"embedding norms  p01~{nq['p01']:.3g}  p50~{nq['p50']:.3g}  p99~{nq['p99']:.3g}; "
            f"{nq['off_unit']:,} rows off unit length by > {nq['tolerance']:g}"
            + (" (scored after --normalize)" if nq.get("normalized") else "")
            + zero
        )
    if s.get("threshold") is not None:  # on the NSFW score, whichever head comes first
        nsfw_nan = heads["nsfw"]["nan_scores"] if "nsfw" in heads else s["nan_scores"]
        pct = 100 * s["over_threshold"] / max(1, s["rows"] - nsfw_nan)
        print(f"score >= {s['threshold']:<8g}{s['over_threshold']:,} rows ({pct:.2f}%)")


def _run_score(args: SimpleNamespace, input_path: str, output: str) -> dict[str, Any]:
    from .pipeline import score_dataset

    if args.gpu:
        _check_gpu()
    client = None
    if args.scheduler:
        from distributed import Client

        timeout = getattr(args, "scheduler_timeout", DEFAULT_SCHEDULER_TIMEOUT)
        try:
            client = Client(args.scheduler, timeout=timeout)
        except ValueError as e:  # an address distributed cannot parse
            raise CLIError(
                f"--scheduler {args.scheduler} is not a Dask scheduler address ({e}); pass tcp://HOST:PORT "
                "or drop --scheduler",
                2,
            ) from None
        except OSError as e:  # nothing answered within the timeout
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CLIError(
                f"no Dask scheduler at {args.scheduler} ({reason}); start one or drop --scheduler "
                f"(--scheduler-timeout S waits longer than {timeout:g} s)"
            ) from None
    try:
        # undecorated (pipeline._keyword_messages): the job's messages as written, naming CLI flags
        summary = inspect.unwrap(score_dataset)(
            input_path,
            output,
            column=args.column,
            model=args.model,
            exact=args.exact,
            threshold=args.threshold,
            filter=args.filter,
            keep_embeddings=args.keep_embeddings or False,
            resume=getattr(args, "resume", False),
            overwrite=args.overwrite,
            client=client,
            storage_options=getattr(args, "storage_options", None),
            score_column=args.score_column,
            batch_size=args.batch_size,
            model_dir=args.model_dir,
            gpu=args.gpu,
            n_workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            rows_per_partition=args.rows_per_partition,
            progress=not args.no_progress and sys.stderr.isatty(),
            interrupted=_interrupted,
            normalize=getattr(args, "normalize", False),
            norm_check=not getattr(args, "no_norm_check", False),
            heads=getattr(args, "heads", "nsfw"),
            keep=tuple(getattr(args, "keep", ()) or ()),
        )
    finally:
        if client is not None:
            client.close()
    d = summary.to_dict()
    d["histogram"] = summary.histogram
    return d


def cmd_score(args: SimpleNamespace) -> int:
    try:
        summary = _run_score(args, args.input, args.output)
    except KeyboardInterrupt:
        raise _Interrupted(
            f"committed parts are kept in {args.output}; rerun the same command with --resume to finish it"
        ) from None
    if args.json:
        summary.pop("histogram")
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def cmd_fetch_weights(args: SimpleNamespace) -> int:
    from .heads import HEADS, parse_heads
    from .weights import fetch_weights, resolve_file, resolve_weights

    given = getattr(args, "heads", None)
    try:
        heads = parse_heads(given) if given else [h for h in HEADS.values() if args.model in h.weights]
        specs = [h.spec_for(args.model) for h in heads]
    except ValueError as e:
        raise CLIError(f"{e}".replace("heads=", "--heads ").replace("model= one", "--model one"), 2) from None
    if args.url and len(specs) > 1:
        raise CLIError("--url is one file's mirror: pass --heads naming one head with it", 2)
    for spec in specs:
        if args.url or args.model_dir:
            print(fetch_weights(spec, args.model_dir, url=args.url))
        else:
            print(resolve_weights(spec, download=True).path)
    if args.exact:
        from ._specs import get_spec
        from .exact import load_vocabulary, read_savedmodel_vocabulary, write_vocabulary_cache
        from .weights import fetch_file

        keras = get_spec(args.model).keras
        assert keras is not None
        if args.model_dir:  # the zip and its extracted vocabularies into that folder
            zpath = fetch_file(keras.filename, keras.url, keras.sha256, args.model_dir)
            write_vocabulary_cache(read_savedmodel_vocabulary(zpath), keras, [zpath.parent])
            print(zpath)
        else:
            zpath = resolve_file(
                keras.filename,
                keras.url,
                keras.sha256,
                None,
                download=True,
                what=f"LAION's original {args.model} SavedModel",
            )
            load_vocabulary(args.model, download=True)  # extracted and cached in the user cache
            print(zpath)
    return 0


def cmd_demo(args: SimpleNamespace) -> int:
    from . import demo
    from ._specs import MODEL_SPECS

    spec = MODEL_SPECS[args.model]
    try:
        out = demo.prepare_folder(args.out)
    except demo.DemoFolderError as e:
        raise CLIError(f"--out {e}; choose a new or empty folder.", 2) from None
    data = out / "laion"
    print(
        f"generating {args.rows:,} unit-norm {spec.dim}-d float16 embeddings + metadata in {data}/ "
        "(LAION parquet_npy layout)"
    )
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


if __name__ == "__main__":
    sys.exit(main())
