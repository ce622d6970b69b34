"""The main job (``nsfw-dask score``) as users run it: whole processes, timed from outside, in ONE run.

Writes ``<out>/bench_job.json`` (machine, versions, timestamp, every raw wall time, every figure)
and prints a short table.  All data is generated under a temporary folder (``--work DIR`` to
choose it; a temporary one is removed at the end), never in the repository.

Data: a LAION-style parquet_npy folder (``img_emb/img_emb_N.npy``, float16 unit-norm 768-d, beside
``metadata/metadata_N.parquet`` with url / caption / key strings), SMALL = 1 pair x 50,000 rows and
LARGE = 4 pairs x 200,000 rows; and the same rows as parquet files with an Arrow
``list<float32>`` ``embedding`` column (row groups of 50,000 rows).

Figures.  Every "marginal" rate is ``(rows_large - rows_small) / (median wall_large - median
wall_small)`` over whole processes, so fixed costs (interpreter start, imports, cluster start, model
load) cancel and what remains is the per-row cost of the job at scale.  Runs are interleaved
(small, large, small, large, ... across all kinds in each round) and medians are used.

* ``limit``: L, the rows/s the L/14 head could reach from the measured sgemm peak
  (``bench_scoring.sgemm_flops`` / ``bench_scoring.head_flops_per_row``), measured before and after
  the runs; the higher one is used.  ``limit.same_rounds``: the same 2048^3 sgemm (all cores) timed
  ``--sgemm-per-round`` times in every round, between the job runs, and its median: what the
  cores sustain while the job's runs are being measured.  A best-of peak catches the clock at its
  highest (on this VM 141-187 GFLOP/s on the same day); every figure is given against both
  (``of_limit``: the peak; ``of_limit_same_rounds``: the rounds' median).
* ``cli_npy``: ``python -m nsfw_dask score IN OUT --json --no-progress --overwrite`` on parquet_npy:
  marginal rows/s and its ratio to L.
* ``script_npy``: the simplest single-process script a user could write (np.load mmap, the head
  in chunks of 4,096 rows, pyarrow read of the metadata, ``pq.write_table``; its text is in the
  JSON), marginal rows/s the same way; ``cli_over_script`` = CLI / script (target >= 2).
* ``cli_parquet``: the CLI on the list<float32> parquet copy.  ``read_only_parquet``: a whole
  process that starts the same LocalCluster the CLI starts by default
  (``nsfw_dask.pipeline.default_cluster_shape``) and, per partition of the same plan (``plan_input``), only
  reads that partition with the job's own reader (``nsfw_dask.io.read_parquet_rows``) and returns its row
  count: the floor.  ``overhead`` = (CLI marginal time - read marginal time) / read marginal time
  (target <= 0.10); the marginal time includes scoring and writing.
* ``memory``: the CLI on SMALL and LARGE parquet_npy with ``--rows-per-partition`` = the SMALL
  rows (so both run partitions of the same size; LARGE just has more of them; ``--quick`` polls
  its timed cli_npy runs, which then use that partition size), polling the RSS of
  the CLI process's descendants every 0.1 s; max worker peak RSS for SMALL vs LARGE (about equal
  when memory is bounded by the partition, not the dataset).  ``rss - shared`` (anonymous memory,
  without the page-cache pages of the memory-mapped .npy) is reported next to RSS.
* ``keep_embeddings``: default vs ``--keep-embeddings`` (binary) vs ``--keep-embeddings list`` on
  LARGE parquet_npy: wall, rows/s (rows / median wall, whole process), output size.
* ``heads`` (issue 22): ``--heads nsfw,aesthetic`` on the list<float32> parquet copy and on
  parquet_npy, and ``--heads aesthetic`` alone on the parquet copy, timed like the others:
  marginal time of both heads over NSFW only (targets <= 1.1 parquet, <= 1.2 parquet_npy) and of
  two separate runs (NSFW only + aesthetic only) over one read of both (target >= 1.8).
* ``projection``: hours to score 5.85e9 embeddings on ONE node like this one at the measured CLI
  marginal rate (CPU, this machine's cores) -- a projection, not a measurement.

Duration: the default sizes take about 10 minutes on a quiet 2-core machine (~60 whole-process
runs' worth of CPU; twice that when other work shares the cores); ``--quick`` about 2 minutes
(fixed process start-up dominates it: a smoke test, its marginal figures mean nothing).  Disk:
about 3 GB of generated data and 1.3 GB for the largest output, under the work folder.

Run ``python benchmarks/bench_job.py --help``.  Needs the weights (NSFW_DASK_MODEL_DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
LAION_EMBEDDINGS = 5.85e9
DIM = 768  # ViT-L/14
MODEL = "vit-l-14"

# The simplest single-process script a user could write (run as a whole process).
USER_SCRIPT = """\
import glob, json, os, sys
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import nsfw_dask

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
model = nsfw_dask.load_model("vit-l-14", device="cpu")
rows = 0
for npy in sorted(glob.glob(os.path.join(src, "img_emb", "img_emb_*.npy"))):
    n = os.path.basename(npy)[len("img_emb_"):-len(".npy")]
    emb = np.load(npy, mmap_mode="r")
    scores = np.empty(len(emb), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(emb), 4096):
            x = torch.from_numpy(np.asarray(emb[i:i + 4096], dtype=np.float32))
            scores[i:i + 4096] = model(x)[:, 0].numpy()
    table = pq.read_table(os.path.join(src, "metadata", f"metadata_{n}.parquet"))
    table = table.append_column("nsfw_score", pa.array(scores))
    pq.write_table(table, os.path.join(dst, f"metadata_{n}.parquet"))
    rows += len(emb)
print(json.dumps({"rows": rows}))
"""

# A read-only pass on the CLI's default cluster: per partition of the job's plan, read the rows
# with the job's reader and return the row count.
READ_ONLY_SCRIPT = """\
import json, logging, os, sys, time


def read_part(fs, part):
    from nsfw_dask.io import read_parquet_rows

    return read_parquet_rows(fs, part.source, part.start, part.stop).num_rows


def main():
    from distributed import Client, LocalCluster, as_completed
    from nsfw_dask.pipeline import default_cluster_shape, default_worker_env, plan_input

    t0 = time.perf_counter()
    plan = plan_input(sys.argv[1])
    # the CLI's default layout (nsfw_dask.pipeline._cluster with no --workers/--threads-per-worker)
    workers, threads = default_cluster_shape()
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", silence_logs=logging.CRITICAL,
                      env=default_worker_env()) as cluster, \\
            Client(cluster) as c:
        t1 = time.perf_counter()
        futs = c.map(read_part, [plan.in_fs] * len(plan.parts), plan.parts, pure=False)
        rows = 0
        for f in as_completed(futs):
            rows += f.result()
        t2 = time.perf_counter()
    print(json.dumps({"rows": rows, "partitions": len(plan.parts), "workers": workers,
                      "threads_per_worker": threads, "compute_seconds": t2 - t1,
                      "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    for name in ("distributed", "asyncio", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    main()
"""


# ----------------------------------------------------------------------------- data


def _text_pool(rng: Any, n_chars: int) -> str:
    words = [
        "photo",
        "of",
        "a",
        "the",
        "dog",
        "cat",
        "red",
        "blue",
        "green",
        "woman",
        "man",
        "car",
        "house",
        "tree",
        "beach",
        "sunset",
        "city",
        "night",
        "vintage",
        "poster",
        "illustration",
        "portrait",
        "landscape",
        "black",
        "white",
        "wooden",
        "table",
        "chair",
        "logo",
        "vector",
        "art",
        "print",
        "modern",
        "style",
        "design",
        "summer",
        "winter",
        "flowers",
        "garden",
        "kitchen",
        "interior",
        "wedding",
        "dress",
        "shoes",
        "watch",
        "street",
        "mountain",
        "river",
        "lake",
        "sky",
        "cloud",
        "stock",
        "image",
        "free",
        "download",
        "hd",
        "wallpaper",
        "small",
        "large",
        "old",
        "new",
        "cute",
        "happy",
        "family",
        "kids",
        "children",
        "food",
        "pizza",
        "coffee",
        "book",
        "cover",
    ]
    idx = rng.integers(0, len(words), n_chars // 5)
    return " ".join(words[i] for i in idx)[:n_chars]


def _strings(rng: Any, pool: str, n: int, lo: int, hi: int) -> list[str]:
    lengths = rng.integers(lo, hi + 1, n)
    starts = rng.integers(0, len(pool) - hi - 1, n)
    return [pool[s : s + k] for s, k in zip(starts.tolist(), lengths.tolist())]


def write_parquet_npy(folder: Path, pairs: int, rows_per_pair: int, seed: int) -> int:
    """A LAION-style parquet_npy folder; returns its row count."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    rng = np.random.default_rng(seed)
    domains = [
        "cdn.shopify.com",
        "i.pinimg.com",
        "images.example.org",
        "media.istockphoto.com",
        "upload.wikimedia.org",
        "img.photobucket.example",
        "static.flickr.example",
    ]
    pool = _text_pool(rng, 2_000_000)
    url_pool = pool.replace(" ", "/")
    row = 0
    for i in range(pairs):
        x16 = np.empty((rows_per_pair, DIM), dtype=np.float16)
        for a in range(0, rows_per_pair, 50_000):
            b = min(rows_per_pair, a + 50_000)
            x = rng.standard_normal((b - a, DIM), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            x16[a:b] = x
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", x16)
        dom = rng.integers(0, len(domains), rows_per_pair).tolist()
        tails = _strings(rng, url_pool, rows_per_pair, 40, 65)
        urls = [f"https://{domains[d]}/{t}.jpg"[:90] for d, t in zip(dom, tails)]
        captions = _strings(rng, pool, rows_per_pair, 40, 80)
        keys = [f"{row + j:09d}" for j in range(rows_per_pair)]
        pq.write_table(
            pa.table({"url": urls, "caption": captions, "key": keys}), folder / "metadata" / f"metadata_{i}.parquet"
        )
        row += rows_per_pair
    return row


def write_parquet_list(src: Path, dst: Path, row_group_rows: int) -> int:
    """The parquet_npy folder as parquet files with url, caption, key, embedding list<float32>."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    dst.mkdir(parents=True)
    rows = 0
    for npy in sorted((src / "img_emb").glob("img_emb_*.npy")):
        n = npy.stem[len("img_emb_") :]
        meta = pq.read_table(src / "metadata" / f"metadata_{n}.parquet")
        x = np.load(npy).astype(np.float32)
        k, dim = x.shape
        offsets = pa.array(np.arange(0, (k + 1) * dim, dim, dtype=np.int32))
        emb = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1)))
        table = meta.append_column("embedding", emb)
        pq.write_table(table, dst / f"part_{n}.parquet", row_group_size=row_group_rows)
        rows += k
    return rows


def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Generate (or reuse, when --work holds the same sizes) the four inputs."""
    want = {
        "small": [1, args.rows_small],
        "large": [args.large_pairs, args.rows_per_pair],
        "row_group_rows": args.row_group_rows,
        "dim": DIM,
        "format": 1,
    }
    manifest = work / "data" / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("sizes") == want:
        print(f"reusing the data in {work / 'data'}")
        return json.loads(manifest.read_text())
    if (work / "data").exists():
        shutil.rmtree(work / "data")
    t0 = time.perf_counter()
    info: dict[str, Any] = {"sizes": want, "paths": {}, "rows": {}}
    for size, (pairs, rows) in (("small", want["small"]), ("large", want["large"])):
        npy = work / "data" / f"{size}_npy"
        n = write_parquet_npy(npy, pairs, rows, seed=1 if size == "small" else 2)
        pqt = work / "data" / f"{size}_parquet"
        write_parquet_list(npy, pqt, args.row_group_rows)
        info["paths"][f"{size}_npy"] = str(npy)
        info["paths"][f"{size}_parquet"] = str(pqt)
        info["rows"][size] = n
        info["bytes"] = info.get("bytes", {})
        info["bytes"][f"{size}_npy"] = _tree_bytes(npy)
        info["bytes"][f"{size}_parquet"] = _tree_bytes(pqt)
    info["generate_seconds"] = time.perf_counter() - t0
    manifest.write_text(json.dumps(info, indent=1))
    print(f"generated data in {time.perf_counter() - t0:.1f} s under {work / 'data'}")
    return info


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- running processes


class Runner:
    """Runs whole processes, timed from outside, and keeps every raw figure."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.raw: dict[str, list[dict[str, Any]]] = {}
        self.out_dir = work / "out"
        self.user_script = work / "user_script.py"
        self.user_script.write_text(USER_SCRIPT)
        self.read_only_script = work / "read_only_pass.py"
        self.read_only_script.write_text(READ_ONLY_SCRIPT)

    def cli(self, src: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "nsfw_dask",
            "score",
            src,
            str(self.out_dir),
            "--json",
            "--no-progress",
            "--overwrite",
            *extra,
        ]

    def command(self, kind: str, src: str) -> list[str]:
        if kind.startswith("cli"):
            extra = {
                "cli_keep_binary": ["--keep-embeddings"],
                "cli_keep_list": ["--keep-embeddings", "list"],
                "cli_npy_heads": ["--heads", "nsfw,aesthetic"],
                "cli_parquet_heads": ["--heads", "nsfw,aesthetic"],
                "cli_parquet_aesthetic": ["--heads", "aesthetic"],
            }.get(kind, [])
            return self.cli(src, *extra)
        if kind == "script_npy":
            return [sys.executable, str(self.user_script), src, str(self.out_dir)]
        if kind == "read_only_parquet":
            return [sys.executable, str(self.read_only_script), src]
        raise ValueError(kind)

    def run(
        self,
        kind: str,
        size: str,
        src: str,
        *,
        cmd: list[str] | None = None,
        poll_rss: bool = False,
        record: bool = True,
    ) -> dict[str, Any]:
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)  # outside the timed window
        cmd = cmd or self.command(kind, src)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        if poll_rss:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.work
            )
            rss = _poll_rss(proc)
            stdout, stderr = proc.communicate()
            rc = proc.returncode
        else:
            r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=self.env, cwd=self.work)
            stdout, stderr, rc, rss = r.stdout, r.stderr, r.returncode, None
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if rc != 0:
            raise RuntimeError(f"{kind} {size} failed (exit {rc}): {' '.join(cmd)}\n{stderr[-3000:]}")
        lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
        reported = json.loads(lines[-1]) if lines else {}
        rec: dict[str, Any] = {
            "kind": kind,
            "size": size,
            "wall_s": wall,
            "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
            "reported": reported,
        }
        if self.out_dir.exists():
            rec["output_bytes"] = _tree_bytes(self.out_dir)
        if rss is not None:
            rec["rss"] = rss
        if record:
            self.raw.setdefault(f"{kind}/{size}", []).append(rec)
        print(
            f"  {kind:20s} {size:5s} {wall:7.2f} s"
            + (f"  ({reported.get('rows', '?'):,} rows)" if isinstance(reported.get("rows"), int) else ""),
            flush=True,
        )
        return rec

    def walls(self, kind: str, size: str) -> list[float]:
        return [r["wall_s"] for r in self.raw.get(f"{kind}/{size}", [])]


def _poll_rss(proc: subprocess.Popen[str], interval: float = 0.1) -> dict[str, Any]:
    """Max RSS (and RSS - shared) per descendant process of ``proc`` while it runs."""
    import psutil

    root = psutil.Process(proc.pid)
    peak: dict[int, dict[str, Any]] = {}
    root_peak = 0
    while proc.poll() is None:
        try:
            root_peak = max(root_peak, root.memory_info().rss)
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for ch in children:
            try:
                mi = ch.memory_info()
                d = peak.get(ch.pid)
                if d is None:
                    cmd = " ".join(ch.cmdline())
                    d = peak[ch.pid] = {
                        "pid": ch.pid,
                        "worker": "spawn_main" in cmd and "resource_tracker" not in cmd,
                        "cmd": cmd[:120],
                        "peak_rss": 0,
                        "peak_rss_minus_shared": 0,
                    }
                d["peak_rss"] = max(d["peak_rss"], mi.rss)
                d["peak_rss_minus_shared"] = max(d["peak_rss_minus_shared"], mi.rss - mi.shared)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        time.sleep(interval)
    workers = [d for d in peak.values() if d["worker"]]
    return {
        "cli_process_peak_rss": root_peak,
        "processes": list(peak.values()),
        "workers": len(workers),
        "max_worker_peak_rss": max((d["peak_rss"] for d in workers), default=None),
        "max_worker_peak_rss_minus_shared": max((d["peak_rss_minus_shared"] for d in workers), default=None),
    }


# ----------------------------------------------------------------------------- figures


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def marginal(runner: Runner, kind: str, rows: dict[str, int]) -> dict[str, Any]:
    ws, wl = runner.walls(kind, "small"), runner.walls(kind, "large")
    ms, ml = _median(ws), _median(wl)
    d: dict[str, Any] = {
        "rows_small": rows["small"],
        "rows_large": rows["large"],
        "wall_small_s": ws,
        "wall_large_s": wl,
        "median_small_s": ms,
        "median_large_s": ml,
    }
    if ms is None or ml is None:
        return d
    dt = ml - ms
    d["marginal_s"] = dt
    # CPU seconds of the whole process tree: less sensitive than wall time to other work on the machine
    cs = [r["cpu_s"] for r in runner.raw.get(f"{kind}/small", [])]
    cl = [r["cpu_s"] for r in runner.raw.get(f"{kind}/large", [])]
    d["cpu_small_s"], d["cpu_large_s"] = cs, cl
    d["marginal_cpu_s"] = statistics.median(cl) - statistics.median(cs)
    d["marginal_rows_per_s"] = (rows["large"] - rows["small"]) / dt if dt > 0 else None
    d["whole_process_rows_per_s_large"] = rows["large"] / ml
    rep = [r["reported"] for r in runner.raw.get(f"{kind}/large", [])]
    if rep and "compute_seconds" in rep[0]:
        d["reported_compute_s_large"] = [r["compute_seconds"] for r in rep]
        d["reported_compute_s_small"] = [r["reported"]["compute_seconds"] for r in runner.raw.get(f"{kind}/small", [])]
    if rep and "rows" in rep[0]:
        bad = [r["rows"] for r in rep if r["rows"] != rows["large"]]
        if bad:
            raise RuntimeError(f"{kind} reported {bad[0]} rows for LARGE, expected {rows['large']}")
    return d


def sgemm_samples(runs: int, n: int = 2048) -> list[float]:
    """FLOP/s of ``runs`` back-to-back n^3 sgemms on all cores: ``bench_scoring``'s timing loop
    (the one behind L's peak), every sample kept."""
    sys.path.insert(0, str(BENCH_DIR))
    import bench_scoring
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    _, ts = bench_scoring.median_time(lambda: torch.mm(a, b), runs)
    return [2 * n**3 / t for t in ts]


def measure_limit(repeats: int) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH_DIR))
    import bench_scoring

    from nsfw_dask.models import get_spec

    spec = get_spec(MODEL)
    flops = bench_scoring.sgemm_flops(repeats)
    per_row = bench_scoring.head_flops_per_row(spec)
    g = bench_scoring.measure_G(MODEL, repeats=max(3, repeats))
    return {"sgemm_flops": flops, "head_flops_per_row": per_row, "rows_per_s": flops / per_row, "G": g}


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "machine": platform.machine(),
    }
    try:
        info["nproc_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in fl]
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        pass
    info["loadavg_start"] = os.getloadavg()
    versions = {}
    import importlib

    for mod in ("nsfw_dask", "torch", "numpy", "pandas", "pyarrow", "dask", "distributed", "psutil", "fsspec"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            versions[mod] = None
    info["versions"] = versions
    return info


# ----------------------------------------------------------------------------- main


def run_all(args: argparse.Namespace, work: Path, result: dict[str, Any]) -> None:
    data = prepare_data(args, work)
    result["data"] = data
    rows = data["rows"]
    P = data["paths"]
    env = dict(os.environ)
    runner = Runner(work, env)
    result["user_script"] = USER_SCRIPT
    result["read_only_script"] = READ_ONLY_SCRIPT

    print("L (sgemm peak), before the runs")
    lim0 = measure_limit(args.limit_repeats)

    # warm-up: one untimed run of each kind (imports compiled, caches warm); not with --quick
    if not args.quick:
        print("warm-up (not counted)")
        for kind, src in (
            ("cli_npy", P["small_npy"]),
            ("script_npy", P["small_npy"]),
            ("read_only_parquet", P["small_parquet"]),
        ):
            result.setdefault("warmup", []).append(runner.run(kind, "small", src, record=False))

    kinds = [("cli_npy", "npy"), ("script_npy", "npy"), ("cli_parquet", "parquet"), ("read_only_parquet", "parquet")]
    if not args.no_heads:  # issue 22: two heads from one read, against NSFW only and two runs
        kinds += [("cli_parquet_heads", "parquet"), ("cli_parquet_aesthetic", "parquet"), ("cli_npy_heads", "npy")]
    keep = [] if args.no_keep_embeddings else ["cli_keep_binary", "cli_keep_list"]
    mem_rpp = rows["small"]  # SMALL is one partition; LARGE is many of the same size
    # --quick saves two processes: the memory figures come from its timed cli_npy runs, which then
    # use the memory runs' partition size (its timings mean nothing anyway)
    mem_kind = "cli_npy" if args.quick else "cli_npy_memory"
    sgemm_rounds: list[list[float]] = []
    for rnd in range(args.repeats):
        print(f"round {rnd + 1}/{args.repeats}")
        for kind, fmt in kinds:
            for size in ("small", "large"):
                src = P[f"{size}_{fmt}"]
                if kind == mem_kind:
                    runner.run(
                        kind, size, src, cmd=runner.cli(src, "--rows-per-partition", str(mem_rpp)), poll_rss=True
                    )
                else:
                    runner.run(kind, size, src)
        if rnd < args.keep_repeats:
            for kind in keep:  # interleaved with the default-option runs of the same round
                runner.run(kind, "large", P["large_npy"])
        rates = sgemm_samples(args.sgemm_per_round)
        sgemm_rounds.append(rates)
        print(
            f"  {'sgemm (L, same rounds)':20s}       {statistics.median(rates) / 1e9:7.1f} GFLOP/s median", flush=True
        )

    if mem_kind == "cli_npy_memory":
        print("worker memory (RSS polled every 0.1 s)")
        for size in ("small", "large"):
            src = P[f"{size}_npy"]
            runner.run(mem_kind, size, src, cmd=runner.cli(src, "--rows-per-partition", str(mem_rpp)), poll_rss=True)

    print("L (sgemm peak), after the runs")
    lim1 = measure_limit(args.limit_repeats)
    limit = dict(lim0 if lim0["rows_per_s"] >= lim1["rows_per_s"] else lim1)
    limit["rows_per_s_before"] = lim0["rows_per_s"]
    limit["rows_per_s_after"] = lim1["rows_per_s"]
    flat = [x for r in sgemm_rounds for x in r]
    med = statistics.median(flat)
    limit["same_rounds"] = {
        "sgemm_flops_samples": sgemm_rounds,
        "sgemm_flops_median": med,
        "rows_per_s": med / limit["head_flops_per_row"],
    }
    result["limit"] = limit
    L = limit["rows_per_s"]
    L_rounds = limit["same_rounds"]["rows_per_s"]
    # G: the head's four GEMMs alone at their best batch, before and after the runs; the higher one
    G = max(lim0["G"]["rows_per_s"], lim1["G"]["rows_per_s"])
    result["G"] = {"rows_per_s": G, "before": lim0["G"], "after": lim1["G"], "of_limit": G / L}

    fig: dict[str, Any] = {}
    for kind, _ in kinds:
        fig[kind] = marginal(runner, kind, rows)
        r = fig[kind].get("marginal_rows_per_s")
        fig[kind]["of_limit"] = r / L if r else None
        fig[kind]["of_limit_same_rounds"] = r / L_rounds if r else None
        fig[kind]["of_G"] = r / G if r else None
    fig["cli_npy"]["target_of_G"] = 0.8
    c, s = fig["cli_npy"].get("marginal_rows_per_s"), fig["script_npy"].get("marginal_rows_per_s")
    fig["cli_over_script"] = {"ratio": c / s if c and s else None, "target": 2.0}
    if c and s:
        fig["cli_over_script"]["meets_target"] = c / s >= 2.0
    cm, rm = fig["cli_parquet"].get("marginal_s"), fig["read_only_parquet"].get("marginal_s")
    over = (cm - rm) / rm if cm and rm and cm > 0 and rm > 0 else None  # None: noise swamped a marginal
    fig["parquet_overhead"] = {
        "cli_marginal_s": cm,
        "read_marginal_s": rm,
        "overhead": over,
        "target": 0.10,
        "meets_target": None if over is None else over <= 0.10,
        "read_only_marginal_rows_per_s": fig["read_only_parquet"].get("marginal_rows_per_s"),
    }

    if not args.no_heads:
        fig["heads"] = heads_figures(fig)

    mem: dict[str, Any] = {"rows_per_partition": mem_rpp, "runs": mem_kind}
    for size in ("small", "large"):
        rec = runner.raw[f"{mem_kind}/{size}"][0]
        mem[size] = {
            "rows": rows[size],
            "partitions": rec["reported"].get("partitions"),
            "wall_s": rec["wall_s"],
            **{k: v for k, v in rec["rss"].items() if k != "processes"},
        }
    a, b = mem["small"]["max_worker_peak_rss"], mem["large"]["max_worker_peak_rss"]
    mem["large_over_small"] = b / a if a and b else None
    a2, b2 = mem["small"]["max_worker_peak_rss_minus_shared"], mem["large"]["max_worker_peak_rss_minus_shared"]
    mem["large_over_small_minus_shared"] = b2 / a2 if a2 and b2 else None
    fig["memory"] = mem

    if keep:
        ke: dict[str, Any] = {}
        for kind, label in (("cli_npy", "default"), ("cli_keep_binary", "binary"), ("cli_keep_list", "list")):
            recs = runner.raw.get(f"{kind}/large", [])
            w = [r["wall_s"] for r in recs]
            comp = [r["reported"]["compute_seconds"] for r in recs if "compute_seconds" in r["reported"]]
            ke[label] = {
                "wall_s": w,
                "median_wall_s": _median(w),
                "rows": rows["large"],
                "rows_per_s_whole_process": rows["large"] / _median(w) if w else None,
                "reported_compute_s": comp,
                "rows_per_s_compute": rows["large"] / _median(comp) if comp else None,
                "output_bytes": recs[-1].get("output_bytes") if recs else None,
            }
        for label in ("binary", "list"):
            if ke["default"]["median_wall_s"] and ke[label]["median_wall_s"]:
                ke[label]["added_s_vs_default"] = ke[label]["median_wall_s"] - ke["default"]["median_wall_s"]
        ke["default"]["runs"] = (
            "cli_npy, LARGE, all rounds"
            if mem_kind != "cli_npy"
            else f"cli_npy, LARGE, with --rows-per-partition {mem_rpp} (--quick)"
        )
        fig["keep_embeddings"] = ke

    cr = fig["cli_npy"].get("marginal_rows_per_s")
    fig["projection"] = {
        "embeddings": LAION_EMBEDDINGS,
        "label": f"PROJECTION (not measured): one node like this one ({os.cpu_count()} CPUs, CPU scoring, "
        "parquet_npy input on local disk) at the measured CLI marginal rate",
        "cli_marginal_rows_per_s": cr,
        "hours_per_node": LAION_EMBEDDINGS / cr / 3600 if cr else None,
        "hours_per_node_parquet": (
            LAION_EMBEDDINGS / fig["cli_parquet"]["marginal_rows_per_s"] / 3600
            if fig["cli_parquet"].get("marginal_rows_per_s")
            else None
        ),
    }
    result["figures"] = fig
    result["raw"] = runner.raw


def heads_figures(fig: dict[str, Any]) -> dict[str, Any]:
    """Issue 22: ``--heads nsfw,aesthetic`` against the NSFW-only job and against two runs (one
    per head), as ratios of marginal times (whole processes, the same interleaved rounds)."""

    def t(kind: str) -> float | None:
        v = fig.get(kind, {}).get("marginal_s")
        return v if v and v > 0 else None

    both_pq, nsfw_pq, aes_pq = t("cli_parquet_heads"), t("cli_parquet"), t("cli_parquet_aesthetic")
    both_npy, nsfw_npy = t("cli_npy_heads"), t("cli_npy")
    out: dict[str, Any] = {
        "parquet_heads_over_nsfw_only": both_pq / nsfw_pq if both_pq and nsfw_pq else None,
        "parquet_two_runs_over_one_read": (nsfw_pq + aes_pq) / both_pq if both_pq and nsfw_pq and aes_pq else None,
        "npy_heads_over_nsfw_only": both_npy / nsfw_npy if both_npy and nsfw_npy else None,
        "targets": {
            "parquet_heads_over_nsfw_only": "<= 1.1",
            "parquet_two_runs_over_one_read": ">= 1.8",
            "npy_heads_over_nsfw_only": "<= 1.2",
        },
    }
    return out


def _fmt_rate(x: float | None) -> str:
    return f"{x:14,.0f}" if x else f"{'n/a':>14s}"


def print_table(result: dict[str, Any]) -> None:
    f = result["figures"]
    L = result["limit"]["rows_per_s"]
    Lr = result["limit"]["same_rounds"]["rows_per_s"]
    d = result["data"]["rows"]
    mb = 2**20
    print()
    print(
        f"L = {L:,.0f} rows/s (sgemm {result['limit']['sgemm_flops'] / 1e9:.1f} GFLOP/s; "
        f"before {result['limit']['rows_per_s_before']:,.0f}, after {result['limit']['rows_per_s_after']:,.0f})"
    )
    print(
        f"L, same rounds = {Lr:,.0f} rows/s (median sgemm "
        f"{result['limit']['same_rounds']['sgemm_flops_median'] / 1e9:.1f} GFLOP/s between the runs)"
    )
    print(
        f"SMALL {d['small']:,} rows, LARGE {d['large']:,} rows; medians of {result['args']['repeats']} "
        "interleaved whole-process runs"
    )
    G = result["G"]["rows_per_s"]
    print(f"G = {G:,.0f} rows/s = {G / L:.2f} L (the head's four GEMMs alone, best batch; target: CLI npy >= 0.8 G)")
    print(
        f"{'figure (marginal = ΔROWS / Δmedian wall)':44s} {'rows/s':>14s} {'÷ L':>6s} {'÷ Lr':>6s} {'÷ G':>6s}"
        "   median wall S / L"
    )
    for kind, label in (
        ("cli_npy", "CLI, parquet_npy"),
        ("script_npy", "single-process script, parquet_npy"),
        ("cli_parquet", "CLI, parquet list<float32>"),
        ("read_only_parquet", "read-only pass, same cluster (floor)"),
    ):
        v = f[kind]
        r = v.get("marginal_rows_per_s")
        print(
            f"{label:44s} {_fmt_rate(r)} {(r / L if r else float('nan')):6.2f} "
            f"{(r / Lr if r else float('nan')):6.2f} {(r / G if r else float('nan')):6.2f}   "
            f"{v['median_small_s']:.2f} s / {v['median_large_s']:.2f} s"
        )
    h = f.get("heads")
    if h:

        def r(x: float | None) -> str:
            return f"{x:.2f}x" if x else "n/a"

        print(
            f"--heads nsfw,aesthetic: parquet {r(h['parquet_heads_over_nsfw_only'])} the NSFW-only time "
            "(target <= 1.1), "
            f"two runs take {r(h['parquet_two_runs_over_one_read'])} one read's (target >= 1.8); "
            f"parquet_npy {r(h['npy_heads_over_nsfw_only'])} (target <= 1.2)"
        )
    cs = f["cli_over_script"]["ratio"]
    print(f"CLI ÷ script (parquet_npy): {cs:.2f}x (target >= 2x)" if cs else "CLI ÷ script: n/a")
    o = f["parquet_overhead"]
    if o["overhead"] is not None:
        print(
            f"parquet: CLI marginal {o['cli_marginal_s']:.2f} s vs read-only {o['read_marginal_s']:.2f} s: "
            f"overhead {100 * o['overhead']:.0f}% (target <= 10%)"
        )
    m = f["memory"]
    if m["small"]["max_worker_peak_rss"]:
        print(
            f"max worker peak RSS ({m['rows_per_partition']:,}-row partitions): "
            f"SMALL {m['small']['max_worker_peak_rss'] / mb:,.0f} MB ({m['small']['partitions']} part), "
            f"LARGE {m['large']['max_worker_peak_rss'] / mb:,.0f} MB ({m['large']['partitions']} parts); "
            f"without shared pages {m['small']['max_worker_peak_rss_minus_shared'] / mb:,.0f} / "
            f"{m['large']['max_worker_peak_rss_minus_shared'] / mb:,.0f} MB"
        )
    if "keep_embeddings" in f:
        print(
            f"{'CLI on LARGE parquet_npy':30s} {'rows/s (process)':>16s} {'(compute)':>10s} "
            f"{'wall':>8s} {'output':>10s}"
        )
        for label, v in f["keep_embeddings"].items():
            name = {"default": "default", "binary": "--keep-embeddings", "list": "--keep-embeddings list"}[label]
            out = f"{v['output_bytes'] / mb:,.0f} MB" if v["output_bytes"] else "?"
            comp = f"{v['rows_per_s_compute']:10,.0f}" if v["rows_per_s_compute"] else f"{'n/a':>10s}"
            print(f"{name:30s} {v['rows_per_s_whole_process']:16,.0f} {comp} {v['median_wall_s']:7.2f}s {out:>10s}")
    if result["args"]["quick"]:
        print("(--quick: a smoke test; its data is too small for the marginal figures to mean anything)")
    p = f["projection"]
    if p["hours_per_node"]:
        print(f"{p['label']}: {p['embeddings']:.3g} embeddings in {p['hours_per_node']:,.1f} h per node")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results", help="folder for bench_job.json (default: results/)")
    p.add_argument(
        "--work",
        default=None,
        help="folder for the generated data and outputs (default: a new temporary folder, removed "
        "at the end); data there of the same sizes is reused",
    )
    p.add_argument(
        "--quick", action="store_true", help="small data, 1 round, no warm-up: a smoke test (about 2 minutes)"
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--rows-small", type=int, default=None, help="rows of SMALL (1 pair; default 50,000)")
    p.add_argument("--large-pairs", type=int, default=None, help="pairs in LARGE (default 4)")
    p.add_argument("--rows-per-pair", type=int, default=None, help="rows per LARGE pair (default 200,000)")
    p.add_argument("--row-group-rows", type=int, default=50_000, help="parquet row group rows (default 50,000)")
    p.add_argument(
        "--keep-repeats",
        type=int,
        default=None,
        help="rounds that also run --keep-embeddings binary/list on LARGE (default 1)",
    )
    p.add_argument("--no-keep-embeddings", action="store_true", help="skip the --keep-embeddings runs")
    p.add_argument("--no-heads", action="store_true", help="skip the --heads nsfw,aesthetic runs (issue 22's figures)")
    p.add_argument("--limit-repeats", type=int, default=5, help="sgemm repeats for L (best of >= 10)")
    p.add_argument(
        "--sgemm-per-round", type=int, default=10, help="sgemms timed in each round for L, same rounds (median)"
    )
    args = p.parse_args(argv)
    q = args.quick
    args.repeats = args.repeats or (1 if q else 3)
    args.rows_small = args.rows_small or (5_000 if q else 50_000)
    args.large_pairs = args.large_pairs or (2 if q else 4)
    args.rows_per_pair = args.rows_per_pair or (20_000 if q else 200_000)
    if q:
        args.row_group_rows = min(args.row_group_rows, 10_000)
    args.keep_repeats = 1 if args.keep_repeats is None else args.keep_repeats
    if not os.environ.get("NSFW_DASK_MODEL_DIR"):
        print("bench_job: set NSFW_DASK_MODEL_DIR to the folder with LAION's weights", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "timestamp": time.time(),
        "argv": sys.argv[1:] if argv is None else argv,
        "model": MODEL,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "machine": machine_info(),
    }
    t0 = time.perf_counter()
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
        remove = False
    else:
        work = Path(tempfile.mkdtemp(prefix="nsfw-bench-job-"))
        remove = True
    print(f"work folder {work}")
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"note: load average {load:.1f} on {os.cpu_count()} CPUs at the start: other work is running, "
            "the figures will be noisy"
        )
    try:
        run_all(args, work, result)
    finally:
        if remove:
            shutil.rmtree(work, ignore_errors=True)
        elif (work / "out").exists():
            shutil.rmtree(work / "out", ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["bench_seconds"] = time.perf_counter() - t0
    path = out / "bench_job.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"benchmark took {result['bench_seconds']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
