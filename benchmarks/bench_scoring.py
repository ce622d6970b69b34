"""Throughput of nsfw_dask against the machine's limit and against peers' designs, in ONE run.

Writes ``<out>/bench_scoring.json`` (machine, versions, every figure; medians of repeated, interleaved
runs) and prints a summary table.  Figures (L/14 head unless --model says otherwise):

* ``limit``: L = measured sgemm FLOP/s / head FLOPs per row (L/14: 426,496 FLOP = 213,248 MACs).
* ``raw_head``: the head on a contiguous float32 tensor, at several batch sizes.
* ``score_nsfw``: ``score_nsfw`` on an in-memory pandas partition (Arrow list<float32> column).
* ``peers``: the same rows as one whole-partition batch (NeMo Curator 0.x default) and as
  ``np.stack`` of an object column + head (NeMo Curator 1.x stage).

Run ``python benchmarks/bench_scoring.py --help``.  Needs the weights (NSFW_DASK_MODEL_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

import nsfw_dask
from nsfw_dask import score_nsfw
from nsfw_dask.models import get_spec


def head_flops_per_row(spec) -> int:
    return 2 * sum(a * b for a, b in zip(spec.layers[:-1], spec.layers[1:]))


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per function, running them round-robin so drift hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def sgemm_flops(repeats: int, n: int = 2048) -> float:
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t, _ = median_time(lambda: torch.mm(a, b), repeats)
    return 2 * n**3 / t


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {},
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import dask
    import distributed

    for mod in (nsfw_dask, torch, np, pd, pa, dask, distributed):
        info["versions"][mod.__name__] = getattr(mod, "__version__", "?")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_embeddings(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def arrow_frame(x: np.ndarray) -> pd.DataFrame:
    n, dim = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))  # zero-copy over x
    return pd.DataFrame({"id": np.arange(n), "embedding": pd.arrays.ArrowExtensionArray(lists)})


def bench_in_memory(args: argparse.Namespace, result: dict[str, Any]) -> None:
    spec = get_spec(args.model)
    n = args.rows
    x = make_embeddings(n, spec.dim)
    xt = torch.from_numpy(x)
    head = nsfw_dask.load_model(spec)
    flops = head_flops_per_row(spec)
    gemm = sgemm_flops(args.repeats)
    limit = gemm / flops
    result["limit"] = {"sgemm_flops": gemm, "head_flops_per_row": flops, "rows_per_s": limit}

    def raw(bs: int) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for i in range(0, n, bs):
                    head(xt[i : i + bs])
        return run

    df = arrow_frame(x)
    obj_col = pd.Series(list(x), dtype=object)  # what parquet gives without dtype_backend

    def nemo_1x() -> None:  # NeMo Curator 1.x: np.stack of the object column, then the head
        with torch.inference_mode():
            head(torch.from_numpy(np.stack(obj_col.to_numpy())))

    fns: dict[str, Callable[[], None]] = {f"raw_head_bs{bs}": raw(bs) for bs in args.batch_sizes}
    fns["score_nsfw"] = lambda: score_nsfw(df, model=spec.name)
    fns["peer_whole_partition_one_batch"] = raw(n)
    fns["peer_np_stack_object_column"] = nemo_1x
    med = interleaved(fns, args.repeats)
    rows = {k: n / v for k, v in med.items()}
    result["rows"] = n
    result["raw_head"] = {k: {"rows_per_s": rows[k], "of_limit": rows[k] / limit, "median_s": med[k]}
                          for k in fns if k.startswith("raw_head")}
    best_raw = max(result["raw_head"].values(), key=lambda d: d["rows_per_s"])["rows_per_s"]
    result["score_nsfw"] = {
        "rows_per_s": rows["score_nsfw"], "of_limit": rows["score_nsfw"] / limit,
        "vs_best_raw_head": rows["score_nsfw"] / best_raw, "median_s": med["score_nsfw"],
        "batch_size": nsfw_dask.DEFAULT_BATCH_SIZE["cpu"],
    }
    result["peers"] = {k: {"rows_per_s": rows[k], "of_limit": rows[k] / limit, "median_s": med[k]}
                       for k in fns if k.startswith("peer_")}


def print_table(result: dict[str, Any]) -> None:
    lim = result["limit"]["rows_per_s"]
    print(f"limit L = {lim:,.0f} rows/s (sgemm {result['limit']['sgemm_flops'] / 1e9:.1f} GFLOP/s)")
    print(f"{'figure':40s} {'rows/s':>14s} {'÷ L':>7s}")
    for group in ("raw_head", "peers"):
        for k, v in result.get(group, {}).items():
            print(f"{k:40s} {v['rows_per_s']:14,.0f} {v['of_limit']:7.2f}")
    if "score_nsfw" in result:
        v = result["score_nsfw"]
        print(f"{'score_nsfw (in-memory partition)':40s} {v['rows_per_s']:14,.0f} {v['of_limit']:7.2f}"
              f"   ({v['vs_best_raw_head']:.2f} × best raw head)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rows and repeats (under a minute)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--rows", type=int, default=None, help="rows in the partition (default 262,144)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 7)")
    p.add_argument("--model", default="vit-l-14")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    args = p.parse_args(argv)
    args.rows = args.rows or (65_536 if args.quick else 262_144)
    args.repeats = args.repeats or (3 if args.quick else 7)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv[1:] if argv is None else argv,
        "model": args.model,
        "machine": machine_info(),
    }
    bench_in_memory(args, result)
    path = out / "bench_scoring.json"
    path.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
