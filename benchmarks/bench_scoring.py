"""Throughput of nsfw_dask against the machine's limit and against peers' designs, in ONE run.

Writes ``<out>/bench_scoring.json`` (machine, versions, every figure; medians of repeated, interleaved
runs) and prints a summary table.  Figures (L/14 head unless --model says otherwise):

* ``limit``: L = measured peak sgemm FLOP/s (best of >= 5 runs) / head FLOPs per row
  (L/14: 426,496 FLOP = 213,248 MACs).
* ``raw_head``: the head on a contiguous float32 tensor, at several batch sizes.
* ``score_nsfw``: ``score_nsfw`` on an in-memory pandas partition (Arrow list<float32> column);
  ``of_limit_same_rounds`` divides by L computed from a 2048^3 sgemm timed in the same
  interleaved rounds (median), a ratio of medians taken under the same conditions.
* ``score_nsfw_exact``: the same with ``exact=True`` (LAION's original model), and its ratio to
  the default mode.
* ``peers``: the same rows as one whole-partition batch (NeMo Curator 0.x default) and as
  ``np.stack`` of an object column + head (NeMo Curator 1.x stage).
* ``dask``: parquet -> ``map_partitions(score_nsfw)`` -> parquet on a LocalCluster, against the
  same pipeline without scoring, for 1 worker x 2 threads and 2 workers x 1 thread; the time
  scoring adds is compared with N / L.
* ``worker_probe``: in a fresh process (as a new worker): import time, model load, latency of the
  first 1,024-row partition (load + first batch), and peak RSS while scoring the partition over
  the idle process with the model loaded, against embedding bytes x 1.1 + 100 MB.
* ``gpu`` (``--gpu``, where a CUDA device exists): the raw head and ``score_nsfw`` on a cuDF
  partition, the memory roofline (embedding bytes / measured device bandwidth), and
  ``dask_gpu``: the Dask pipeline on a LocalCUDACluster with the cuDF backend.  Not run by the
  authors (no GPU).

A PNG plot of the figures is written next to the JSON (needs matplotlib: ``nsfw-dask[bench]``).

Run ``python benchmarks/bench_scoring.py --help``.  Needs the weights (NSFW_DASK_MODEL_DIR).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

import nsfw_dask
from nsfw_dask import score_nsfw
from nsfw_dask.models import get_spec
from nsfw_dask.scoring import DEFAULT_BATCH_SIZE


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
    return interleaved_stats(fns, repeats)[0]


def interleaved_stats(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median and best seconds per function, run round-robin (drift hits all alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, {k: min(v) for k, v in times.items()}


def sgemm_flops(repeats: int, n: int = 4096) -> float:
    """Peak sgemm FLOP/s at ``n``^3 (4096 by default, the project's L): the best of several runs
    (a peak is what the limit L needs; noise on a shared machine only ever slows a run down)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    _, ts = median_time(lambda: torch.mm(a, b), max(5, 2 * repeats))
    return 2 * n**3 / min(ts)


def cpu_isa() -> dict[str, Any]:
    """The CPU's vector ISA as the kernels see it: flags from /proc/cpuinfo, torch's own choice
    (``ATEN_CPU_CAPABILITY``) and an MKL override (``MKL_ENABLE_INSTRUCTIONS``), if set."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("sse4_2", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    out: dict[str, Any] = {"flags": isa}
    with contextlib.suppress(Exception):
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    for var in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    return out


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
    info["isa"] = cpu_isa()
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


def four_gemms(head: Any, xn: torch.Tensor, bs: int) -> Callable[[], None]:
    """G's loop: the head's GEMMs alone, ``addmm`` into preallocated outputs, on pre-normalised
    input, ``bs`` rows at a time (no normalisation, ReLU, sigmoid or bookkeeping)."""
    n = xn.shape[0]
    layers = [
        (getattr(head, f"linear_{i}").weight.t().contiguous(), getattr(head, f"linear_{i}").bias)
        for i in range(1, head.n_linear + 1)
    ]
    outs = [torch.empty(bs, w.shape[1]) for w, _ in layers]

    def run() -> None:
        with torch.inference_mode():
            for i in range(0, n, bs):
                h = xn[i : i + bs]
                for (w, b), o in zip(layers, outs):
                    h = torch.addmm(b, h, w, out=o[: h.shape[0]])

    return run


def four_gemms_onednn(head: Any, xn: torch.Tensor, bs: int) -> Callable[[], None] | None:
    """The same four GEMMs through oneDNN (``torch.ops.mkldnn._linear_pointwise``, weights prepacked),
    reported next to G: the scorer uses MKL's ``addmm`` (oneDNN's unblocked K accumulation fails the
    contract's accuracy item on the first layer, docs/performance.md), so G stays MKL's, and this
    says how far that is from the fastest float32 GEMMs torch has here.  None without oneDNN."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_linear_pointwise"):
        return None
    layers = [
        (
            torch.ops.mkldnn._reorder_linear_weight(getattr(head, f"linear_{i}").weight, 4096),
            getattr(head, f"linear_{i}").bias,
        )
        for i in range(1, head.n_linear + 1)
    ]
    n = xn.shape[0]

    def run() -> None:
        with torch.inference_mode():
            for i in range(0, n, bs):
                h = xn[i : i + bs]
                for w, b in layers:
                    h = torch.ops.mkldnn._linear_pointwise(h, w, b, "none", [], "")

    return run


def measure_G(
    model: str = "vit-l-14",
    rows: int = 131_072,
    batch_sizes: tuple[int, ...] = (512, 1024, 2048, 4096),
    repeats: int = 5,
) -> dict[str, Any]:
    """G on its own (for bench_job): the four GEMMs' best rows/s over ``batch_sizes``."""
    spec = get_spec(model)
    head = nsfw_dask.load_model(spec)
    x = torch.from_numpy(make_embeddings(rows, spec.dim))
    with torch.inference_mode():
        xn = ((x - head.norm.mean) / head.norm.variance.sqrt()).contiguous()
    best = {bs: rows / min(median_time(four_gemms(head, xn, bs), repeats)[1]) for bs in batch_sizes}
    bs = max(best, key=lambda k: best[k])
    return {"rows_per_s": best[bs], "batch_size": bs, "by_batch": best}


def bench_in_memory(args: argparse.Namespace, result: dict[str, Any]) -> None:
    spec = get_spec(args.model)
    n = args.rows
    x = make_embeddings(n, spec.dim)
    xt = torch.from_numpy(x)
    head = nsfw_dask.load_model(spec)
    flops = head_flops_per_row(spec)
    gemm = sgemm_flops(args.repeats)
    limit = gemm / flops
    result["limit"] = {"sgemm_4096_flops": gemm, "head_flops_per_row": flops, "rows_per_s": limit}
    with torch.inference_mode():
        xn = ((xt - head.norm.mean) / head.norm.variance.sqrt()).contiguous()

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

    ga, gb = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fns: dict[str, Callable[[], None]] = {f"gemms_bs{bs}": four_gemms(head, xn, bs) for bs in args.batch_sizes}
    for bs in args.batch_sizes:
        fn = four_gemms_onednn(head, xn, bs)
        if fn is not None:
            fns[f"onednn_gemms_bs{bs}"] = fn
    fns.update(
        {
            f"score_nsfw_bs{bs}": (lambda bs=bs: score_nsfw(df, model=spec.name, batch_size=bs))
            for bs in args.batch_sizes
        }
    )
    fns.update({f"raw_head_bs{bs}": raw(bs) for bs in args.batch_sizes})
    fns["score_nsfw"] = lambda: score_nsfw(df, model=spec.name)
    fns["score_nsfw_exact"] = lambda: score_nsfw(df, model=spec.name, exact=True)
    fns["peer_whole_partition_one_batch"] = raw(n)
    fns["peer_np_stack_object_column"] = nemo_1x
    fns["sgemm_2048"] = lambda: [torch.mm(ga, gb) for _ in range(8)]
    med, best = interleaved_stats(fns, args.repeats)
    sgemm_rounds = 8 * 2 * 2048**3 / med.pop("sgemm_2048")
    best.pop("sgemm_2048")
    # The same limit from the sgemm median of the same interleaved rounds: a ratio of medians
    # measured under the same (noisy) conditions, next to the ratio to the best-ever peak.
    result["limit"]["sgemm_flops_same_rounds_median"] = sgemm_rounds
    result["limit"]["rows_per_s_same_rounds"] = limit_rounds = sgemm_rounds / flops
    rows = {k: n / v for k, v in med.items()}
    rows_best = {k: n / v for k, v in best.items()}

    def by_batch(prefix: str) -> dict[str, dict[str, float]]:
        return {
            k: {"rows_per_s": rows[k], "rows_per_s_best": rows_best[k], "of_limit": rows[k] / limit, "median_s": med[k]}
            for k in fns
            if k.startswith(prefix)
        }

    result["rows"] = n
    result["gemms"] = by_batch("gemms_bs")
    g_key = max(result["gemms"], key=lambda k: result["gemms"][k]["rows_per_s"])
    g = result["gemms"][g_key]["rows_per_s"]
    result["G"] = {
        "rows_per_s": g,
        "of_limit": g / limit,
        "of_limit_same_rounds": g / limit_rounds,
        "batch_size": int(g_key.removeprefix("gemms_bs")),
        "what": "the head's four GEMMs alone (addmm into preallocated outputs, pre-normalised input) at the best batch",
    }
    onednn = by_batch("onednn_gemms_bs")
    if onednn:
        o_key = max(onednn, key=lambda k: onednn[k]["rows_per_s"])
        result["G_onednn"] = {
            "rows_per_s": onednn[o_key]["rows_per_s"],
            "of_G": onednn[o_key]["rows_per_s"] / g,
            "batch_size": int(o_key.removeprefix("onednn_gemms_bs")),
            "by_batch": onednn,
            "what": "the same four GEMMs through oneDNN (not used by the scorer: less accurate first layer)",
        }
    result["raw_head"] = by_batch("raw_head_bs")
    result["score_nsfw_by_batch"] = {
        k: {**v, "of_G": v["rows_per_s"] / g} for k, v in by_batch("score_nsfw_bs").items()
    }
    best_bs = max(result["score_nsfw_by_batch"], key=lambda k: result["score_nsfw_by_batch"][k]["rows_per_s"])
    result["score_nsfw"] = {
        "rows_per_s": rows["score_nsfw"],
        "of_G": rows["score_nsfw"] / g,
        "of_limit": rows["score_nsfw"] / limit,
        "of_limit_same_rounds": rows["score_nsfw"] / limit_rounds,
        "median_s": med["score_nsfw"],
        "batch_size": DEFAULT_BATCH_SIZE["cpu"],
        "best_batch_size": int(best_bs.removeprefix("score_nsfw_bs")),
        "target_of_G": 0.9,
    }
    result["score_nsfw_exact"] = {
        "rows_per_s": rows["score_nsfw_exact"],
        "of_limit": rows["score_nsfw_exact"] / limit,
        "of_default_mode": rows["score_nsfw_exact"] / rows["score_nsfw"],
        "median_s": med["score_nsfw_exact"],
    }
    result["peers"] = {
        k: {"rows_per_s": rows[k], "of_limit": rows[k] / limit, "median_s": med[k]}
        for k in fns
        if k.startswith("peer_")
    }


def write_dataset(path: Path, n: int, dim: int, rows_per_file: int) -> None:
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, rows_per_file)):
        x = make_embeddings(min(rows_per_file, n - start), dim, seed=i)
        df = arrow_frame(x)
        df["id"] = np.arange(start, start + len(x))
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path / f"part.{i}.parquet")


def bench_dask(args: argparse.Namespace, result: dict[str, Any], workdir: Path, *, gpu: bool = False) -> None:
    """parquet -> map_partitions(score_nsfw) -> parquet, with and without scoring, per layout.

    ``gpu=True``: the same on a LocalCUDACluster with the cuDF backend (one layout: one worker per GPU).
    """
    import contextlib
    import shutil
    import uuid

    import dask
    from distributed import Client, LocalCluster

    spec = get_spec(args.model)
    n = args.dask_rows
    src = workdir / "input"
    if not src.exists():
        write_dataset(src, n, spec.dim, args.rows_per_partition)
    limit = result["limit"]["rows_per_s"]
    layouts = {}
    from nsfw_dask.io import read_parquet_embeddings

    partitions = None
    for workers, threads in [(None, None)] if gpu else args.layouts:
        if gpu:
            from nsfw_dask.gpu import local_cuda_cluster

            cluster_cm: Any = local_cuda_cluster()
            backend = dask.config.set({"dataframe.backend": "cudf"})
        else:
            cluster_cm = LocalCluster(
                n_workers=workers, threads_per_worker=threads, processes=True, dashboard_address=None, silence_logs=40
            )
            backend = contextlib.nullcontext()
        # one reader for both: cuDF partitions one per file (blocksize=None: dask_cudf would fuse
        # files into 1/32 of a GPU), pandas partitions with Arrow lists
        read_backend = "cudf" if gpu else "pandas"
        with cluster_cm as cluster, Client(cluster) as client, backend:
            client.register_plugin(nsfw_dask.NSFWModelPlugin(spec.name, device="cuda" if gpu else "cpu"))
            if gpu:
                workers, threads = len(client.scheduler_info()["workers"]), 1

            def pipeline(score: bool) -> Callable[[], None]:
                def run() -> None:  # called within this iteration of the loop only
                    ddf = read_parquet_embeddings(str(src), backend=read_backend)  # noqa: B023
                    if score:
                        ddf = ddf.map_partitions(score_nsfw, model=spec.name)
                    out = workdir / f"out-{uuid.uuid4().hex[:8]}"
                    ddf.to_parquet(str(out), write_index=False)
                    shutil.rmtree(out)

                return run

            # what the runs really use, after dask's optimizer (which may fuse partitions)
            partitions = read_parquet_embeddings(str(src), backend=read_backend).optimize().npartitions
            med = interleaved({"with_scoring": pipeline(True), "without_scoring": pipeline(False)}, args.repeats_dask)
        added = med["with_scoring"] - med["without_scoring"]
        layouts[("gpu " if gpu else "") + f"{workers}x{threads}"] = {
            "workers": workers,
            "threads_per_worker": threads,
            "with_scoring_s": med["with_scoring"],
            "without_scoring_s": med["without_scoring"],
            "rows_per_s_end_to_end": n / med["with_scoring"],
            "scoring_added_s": added,
            "ideal_added_s": n / limit,
            "added_over_ideal": added / (n / limit),
        }
    key = "dask_gpu" if gpu else "dask"
    result[key] = {
        "rows": n,
        "rows_per_file": args.rows_per_partition,
        "partitions": partitions,
        "rows_per_partition": n / partitions if partitions else None,
        "layouts": layouts,
    }


def _device_bandwidth(
    dev: torch.device, repeats: int, timed: Callable[[Callable[[], Any]], Callable[[], None]]
) -> float:
    """Device memory bandwidth from a 256 MiB device-to-device copy (bytes read + written per s)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy, _ = median_time(timed(lambda: dst.copy_(src)), repeats)
    return 2 * src.numel() / t_copy


def bench_gpu(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """cuDF / CUDA figures.  NOT RUN by the authors: no GPU was available."""
    import cudf

    spec = get_spec(args.model)
    n = args.rows
    x = make_embeddings(n, spec.dim)
    dev = torch.device("cuda", torch.cuda.current_device())
    xt = torch.from_numpy(x).to(dev)
    head = nsfw_dask.load_model(spec, device=dev)

    def timed(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            fn()
            torch.cuda.synchronize()

        return run

    bandwidth = _device_bandwidth(dev, args.repeats, timed)
    gdf = cudf.DataFrame.from_arrow(pa.Table.from_pandas(arrow_frame(x), preserve_index=False))

    def raw(bs: int) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for i in range(0, n, bs):
                    head(xt[i : i + bs])

        return timed(run)

    fns = {f"raw_head_bs{bs}": raw(bs) for bs in args.gpu_batch_sizes}
    fns["score_nsfw_cudf"] = timed(lambda: score_nsfw(gdf, model=spec.name))
    fns["score_nsfw_cudf_exact"] = timed(lambda: score_nsfw(gdf, model=spec.name, exact=True))
    med = interleaved(fns, args.repeats)
    # the sweep leaves work buffers sized to the largest batch (GBs) in this process: free them
    # before the LocalCUDACluster's workers want the same GPU
    from nsfw_dask.gpu import release_gpu_buffers

    fns.clear()
    xt = gdf = None  # the closures above are done: free their device memory
    release_gpu_buffers()
    roofline = bandwidth / (spec.dim * 4)
    result["gpu"] = {
        "device": torch.cuda.get_device_name(dev),
        "bandwidth_bytes_per_s": bandwidth,
        "memory_roofline_rows_per_s": roofline,
        "figures": {k: {"rows_per_s": n / v, "of_roofline": n / v / roofline} for k, v in med.items()},
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def probe(rows: int, model: str, import_s: float) -> dict[str, Any]:
    """Run in a FRESH process: first-partition latency and peak memory of scoring one partition."""
    spec = get_spec(model)
    first = arrow_frame(make_embeddings(1024, spec.dim, seed=1))
    t1 = time.perf_counter()
    nsfw_dask.score_nsfw(first, model=model)  # load + first batch, as on a fresh worker
    t_first = time.perf_counter() - t1
    load_s = nsfw_dask.model_cache_info()["models"][0]["seconds"]
    rss_base = _rss_bytes()  # a worker with the model loaded, before the partition exists
    x = make_embeddings(rows, spec.dim)
    df = arrow_frame(x)  # zero-copy over x
    emb_bytes = x.nbytes
    rss_data = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # reset the RSS high-water mark (VmHWM) to now
        f.write("5")
    out = nsfw_dask.score_nsfw(df, model=model)
    peak = _vm_hwm_bytes()
    assert len(out) == rows
    target = emb_bytes * 1.1 + 100 * 2**20
    return {
        "import_s": import_s,
        "load_s": load_s,
        "first_partition_1024_rows_s": t_first,
        "embedding_bytes": emb_bytes,
        "rss_base_bytes": rss_base,
        "rss_with_data_bytes": rss_data,
        "peak_rss_bytes": peak,
        "scoring_extra_bytes": peak - rss_data,
        "worker_peak_over_base_bytes": peak - rss_base,
        "target_bytes": target,
        "meets_target": (peak - rss_base) <= target,
    }


_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import nsfw_dask
t_import = time.perf_counter() - t0
sys.path.insert(0, {bench_dir!r})
import bench_scoring
print(json.dumps(bench_scoring.probe({rows}, {model!r}, t_import)))
"""


def bench_probe(args: argparse.Namespace, result: dict[str, Any]) -> None:
    import subprocess

    runs = []
    for _ in range(1 if args.quick else 3):
        code = _PROBE.format(bench_dir=str(Path(__file__).resolve().parent), rows=args.rows, model=args.model)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    med = {
        k: statistics.median([r[k] for r in runs])
        for k in runs[0]
        if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)
    }
    med["meets_target"] = all(r["meets_target"] for r in runs)
    med["runs"] = len(runs)
    result["worker_probe"] = med


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'nsfw-dask[bench]')")
        return False
    names, values = [], []
    for group in ("raw_head", "peers"):
        for k, v in result.get(group, {}).items():
            names.append(k)
            values.append(v["rows_per_s"])
    for k in ("score_nsfw", "score_nsfw_exact"):
        if k in result:
            names.append(k)
            values.append(result[k]["rows_per_s"])
    for k, v in result.get("dask", {}).get("layouts", {}).items():
        names.append(f"dask e2e {k}")
        values.append(v["rows_per_s_end_to_end"])
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1.5))
    ax.barh(names, values)
    ax.axvline(result["limit"]["rows_per_s"], color="k", linestyle="--", label="limit L (sgemm)")
    ax.set_xlabel("rows/s")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title(f"nsfw_dask {result['model']}, {result['machine'].get('cpu_model', '')}"[:90])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def print_table(result: dict[str, Any]) -> None:
    lim = result["limit"]["rows_per_s"]
    m = result.get("machine", {})
    print(f"CPU {m.get('cpu_model', '?')}, ISA {m.get('isa', {})}, torch threads {m.get('torch_threads')}")
    print(f"limit L = {lim:,.0f} rows/s (4096^3 sgemm {result['limit']['sgemm_4096_flops'] / 1e9:.1f} GFLOP/s)")
    if "G" in result:
        g = result["G"]
        print(f"G = {g['rows_per_s']:,.0f} rows/s = {g['of_limit']:.2f} L (four GEMMs alone, batch {g['batch_size']})")
        if "G_onednn" in result:
            o = result["G_onednn"]
            print(f"  (the same GEMMs through oneDNN: {o['rows_per_s']:,.0f} rows/s = {o['of_G']:.2f} G; not used)")
    print(f"{'figure':40s} {'rows/s':>14s} {'÷ L':>7s} {'÷ G':>7s}")
    gr = result.get("G", {}).get("rows_per_s")
    for group in ("gemms", "score_nsfw_by_batch", "raw_head", "peers"):
        for k, v in result.get(group, {}).items():
            of_g = f"{v['rows_per_s'] / gr:7.2f}" if gr else ""
            print(f"{k:40s} {v['rows_per_s']:14,.0f} {v['of_limit']:7.2f} {of_g}")
    if "score_nsfw" in result:
        v = result["score_nsfw"]
        print(
            f"{'score_nsfw (in-memory partition)':40s} {v['rows_per_s']:14,.0f} {v['of_limit']:7.2f} {v['of_G']:7.2f}"
            f"   (target >= {v['target_of_G']} G; batch {v['batch_size']}, best measured {v['best_batch_size']}; "
            f"{v['of_limit_same_rounds']:.2f} × L from the same rounds' sgemm median, "
            f"{result['limit']['rows_per_s_same_rounds']:,.0f} rows/s)"
        )
        e = result["score_nsfw_exact"]
        print(
            f"{'score_nsfw(exact=True)':40s} {e['rows_per_s']:14,.0f} {e['of_limit']:7.2f}"
            f"   ({e['of_default_mode']:.2f} × default mode)"
        )
    for k, v in {**result.get("dask", {}).get("layouts", {}), **result.get("dask_gpu", {}).get("layouts", {})}.items():
        print(
            f"{'dask parquet->score->parquet ' + k:40s} {v['rows_per_s_end_to_end']:14,.0f}"
            f"          scoring adds {v['scoring_added_s']:.2f} s = {v['added_over_ideal']:.2f} × N/L"
        )
    if "worker_probe" in result:
        w = result["worker_probe"]
        mb = 2**20
        print(
            f"fresh worker: import {w['import_s']:.2f} s, model load {w['load_s'] * 1000:.0f} ms, "
            f"first 1,024-row partition (load + score) {w['first_partition_1024_rows_s'] * 1000:.0f} ms"
        )
        print(
            f"peak memory scoring {result['rows']:,} rows: {w['worker_peak_over_base_bytes'] / mb:,.0f} MB over "
            f"the idle worker ({w['scoring_extra_bytes'] / mb:,.1f} MB beyond the data), for "
            f"{w['embedding_bytes'] / mb:,.0f} MB of embeddings "
            f"(target <= {w['target_bytes'] / mb:,.0f} MB: {'met' if w['meets_target'] else 'NOT met'})"
        )
    for k, v in result.get("gpu", {}).get("figures", {}).items():
        print(f"{'gpu ' + k:40s} {v['rows_per_s']:14,.0f}   {v['of_roofline']:.2f} of memory roofline")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rows and repeats (under a minute)")
    p.add_argument("--out", default="results", help="output folder (default: results/)")
    p.add_argument("--rows", type=int, default=None, help="rows in the partition (default 262,144)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 7)")
    p.add_argument("--model", default="vit-l-14")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--gpu-batch-sizes", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    p.add_argument("--gpu", action="store_true", help="also the cuDF/CUDA figures (needs a GPU + the GPU extra)")
    p.add_argument("--no-dask", action="store_true", help="skip the Dask end-to-end figures")
    args = p.parse_args(argv)
    args.rows = args.rows or (65_536 if args.quick else 262_144)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.repeats_dask = 1 if args.quick else 3
    args.dask_rows = 32_768 if args.quick else args.rows
    args.rows_per_partition = 16_384 if args.quick else 65_536
    args.layouts = [(1, 2), (2, 1)]
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu: no CUDA device is visible to torch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv[1:] if argv is None else argv,
        "model": args.model,
        "machine": machine_info(),
    }
    bench_in_memory(args, result)
    bench_probe(args, result)
    if args.gpu:
        bench_gpu(args, result)
    if not args.no_dask:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="nsfw-bench-") as tmp:
            bench_dask(args, result, Path(tmp))
            if args.gpu:
                bench_dask(args, result, Path(tmp), gpu=True)
    png = out / "bench_scoring.png"
    if plot(result, png):
        result["plot"] = str(png)
    path = out / "bench_scoring.json"
    path.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
