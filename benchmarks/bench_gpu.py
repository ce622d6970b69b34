"""The GPU check in ONE process: tests, parity, determinism, the kernel, the job, notebook 02.

Made for GPU machines that come rarely and briefly, with no network (``benchmarks/gpu_kit``
brings what they lack; its README gives the device-tool calls).  Writes ``<out>/bench_gpu.json``
after every section, so a run cut short still leaves what it measured; ``--state FILE`` also
merges the sections of earlier calls kept in FILE (``remote_setup.sh run`` keeps it in /tmp).

Sections (``--sections``, in this order by default):

* ``env``: machine, GPU name, driver, versions, the TF32 switches (set OFF for the whole run).
* ``parity``: on the GPU, in this process, on the L/14 reference inputs (``--reference``):
  ``score_tensor`` at batch sizes 1, 7, 256, 1,024, 4,096, 32,768 and whole, and ``score_nsfw``
  on pandas partitions (Arrow lists staged to the GPU) cut 1, 3, 17 ways and unevenly (and on
  cuDF partitions where cuDF imports): is every row's score bitwise the same?  Max differences:
  GPU vs CPU (``score_nsfw`` on each), GPU vs NeMo Curator's port run on the GPU (the head's
  ``forward``, one batch), and both vs the stored NeMo scores (contract: <= 1e-5).
* ``kernel``: fp32 sgemm with TF32 OFF (8192^3, best of ``--repeats``) -> L_gpu = FLOP/s /
  FLOP per row (2 x the head's multiply-adds: 426,496 for L/14, read off the loaded model);
  ``score_tensor`` on a device-resident float32 (and float16) tensor of ``--kernel-rows`` rows
  at several batch sizes (target >= 0.7 L_gpu); ``score_nsfw`` on a cuDF partition and on a
  pandas partition staged from the host, where possible.
* ``job``: ``nsfw-dask score --gpu`` and the same job on this machine's CPUs (no ``--gpu``,
  the default cluster), whole processes, on LAION-style parquet_npy float16 on local disk
  (``--work``), SMALL = 1 pair and LARGE = ``--large-pairs`` pairs of ``--rows-per-pair`` rows,
  ``--rounds`` interleaved rounds, default output.  Marginal rows/s = (rows_large - rows_small) /
  (median wall_large - median wall_small): start-up cancels.  Targets: GPU >= 10M rows/s and
  >= 5x the CPU job.  The GPU and CPU outputs of SMALL are compared row by row.
* ``tests``: ``pytest -m "gpu or gpu_api"`` on the GPU test modules (junit counts, failures).
* ``notebook``: ``notebooks/02_gpu_localcudacluster.ipynb`` executed with nbclient (its cell
  outputs, and the executed copy, go to ``<out>``); without nbclient/ipykernel its code cells run
  as one script.

Without a CUDA device every GPU section is recorded as ``{"status": "skipped", "reason": "no
CUDA device"}`` and the job section times only the CPU job: that is how its CPU parts are tested
(``tests/test_bench_gpu.py``).  ``--device cpu`` runs the parity and kernel sections' code on
the CPU, on as few rows as asked (``--parity-rows``, ``--kernel-rows``, ``--sgemm-n``): a smoke
test of that code against the current API, whose figures mean nothing.  ``--dry-run`` writes the
plan and does nothing else.

Uses only the public API (``score_nsfw``, ``nsfw_dask.scoring.score_tensor``, ``load_model``, the
CLI), so changes to the forward pass and the job's pipeline keep it working.

Run ``python benchmarks/bench_gpu.py --help``.  Needs the weights (NSFW_DASK_MODEL_DIR) and,
for ``parity``, the reference scores (NSFW_DASK_REFERENCE_DIR or ../shared/reference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "parity", "kernel", "job", "tests", "notebook")
GPU_SECTIONS = ("parity", "kernel", "tests", "notebook")
NO_CUDA = {"status": "skipped", "reason": "no CUDA device"}
GPU_TEST_MODULES = ("tests/test_gpu.py", "tests/test_gpu_cluster.py", "tests/test_gpu_api.py")
NOTEBOOK = ROOT / "notebooks" / "02_gpu_localcudacluster.ipynb"
TOL = 1e-5  # the contract: CPU vs GPU, GPU vs NeMo's port (reference README)
DIM = 768


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:  # noqa: BLE001 - no torch or a broken driver: no GPU sections
        return False


def _reference_dir(given: str | None) -> Path:
    for cand in (given, os.environ.get("NSFW_DASK_REFERENCE_DIR"), str(ROOT.parent / "shared" / "reference")):
        if cand and (Path(cand) / "l14_reference.npz").is_file():
            return Path(cand)
    raise FileNotFoundError("l14_reference.npz not found: pass --reference or set NSFW_DASK_REFERENCE_DIR")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls after one warm-up, each bracketed by a CUDA synchronisation."""
    fn()
    _sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return ts


def maxdiff(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = ~(np.isnan(a) | np.isnan(b))
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("inf")
    return float(np.max(np.abs(a[both] - b[both]))) if both.any() else 0.0


def bitwise(a: Any, b: Any) -> bool:
    import numpy as np

    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- env


def section_env(args: argparse.Namespace) -> dict[str, Any]:
    import importlib

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": cuda_available(),
        "versions": {},
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    for name in (
        "nsfw_dask",
        "torch",
        "numpy",
        "pandas",
        "pyarrow",
        "dask",
        "distributed",
        "cudf",
        "dask_cuda",
        "cupy",
    ):
        try:
            info["versions"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - recorded
            info["versions"][name] = f"not importable: {type(e).__name__}: {e}"[:200]
    if info["cuda"]:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
        info["torch_cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        info["tf32"] = {
            "matmul_before": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_before": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision_before": torch.get_float32_matmul_precision(),
        }
        _tf32_off()
        info["tf32"]["matmul_now"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _tf32_off() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


# ----------------------------------------------------------------------------- parity


def _arrow_frame(x: Any, index: Any = None) -> Any:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    n, dim = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    lists = pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x).reshape(-1)))
    return pd.DataFrame(
        {"id": np.arange(n), "embedding": pd.arrays.ArrowExtensionArray(lists)},
        index=index if index is not None else pd.RangeIndex(n),
    )


def _cuts(n: int, how: Any) -> list[tuple[int, int]]:
    if how == "uneven":
        bounds = [0, 1, 2, 100, 1000, 1001, n // 2, n - 3, n]
    else:
        bounds = [round(i * n / how) for i in range(how + 1)]
    bounds = sorted(set(b for b in bounds if 0 <= b <= n))
    return list(zip(bounds[:-1], bounds[1:]))


def section_parity(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import torch

    from nsfw_dask import load_model, score_nsfw
    from nsfw_dask.scoring import score_tensor

    _tf32_off()
    ref_dir = _reference_dir(args.reference)
    with np.load(ref_dir / "l14_reference.npz") as d:
        x, nemo = d["inputs"].astype(np.float32), d["nemo_scores"]
    if args.parity_rows:
        x, nemo = x[: args.parity_rows], nemo[: args.parity_rows]
    n = len(x)
    dev = torch.device(args.device)
    head = load_model("vit-l-14", device=dev)
    xg = torch.from_numpy(x).to(dev)

    res: dict[str, Any] = {"device": str(dev), "rows": n, "reference": str(ref_dir), "tolerance": TOL}
    # 1. batch sizes, score_tensor, device-resident float32
    whole = score_tensor(head, xg, batch_size=n, device=dev).cpu().numpy()
    per_bs = {}
    for bs in (1, 7, 256, 1024, 4096, 32768):
        s = score_tensor(head, xg, batch_size=bs, device=dev).cpu().numpy()
        per_bs[str(bs)] = {"bitwise_equal_to_whole": bitwise(s, whole), "max_diff_to_whole": maxdiff(s, whole)}
    again = score_tensor(head, xg, batch_size=n, device=dev).cpu().numpy()
    res["batch_sizes"] = per_bs
    res["repeat_bitwise"] = bitwise(again, whole)

    # 2. partitionings, score_nsfw on pandas partitions staged to the GPU (default batch size)
    frame = _arrow_frame(x, pd.Index(np.arange(n) * 3 + 7))
    gpu_whole = score_nsfw(frame, device=dev)["nsfw_score"].to_numpy()
    parts = {}
    for how in (1, 3, 17, "uneven"):
        got = np.concatenate(
            [score_nsfw(frame.iloc[a:b], device=dev)["nsfw_score"].to_numpy() for a, b in _cuts(n, how)]
        )
        parts[str(how)] = {
            "bitwise_equal_to_whole": bitwise(got, gpu_whole),
            "max_diff_to_whole": maxdiff(got, gpu_whole),
        }
    res["pandas_partitionings"] = parts
    res["pandas_vs_score_tensor_bitwise"] = bitwise(gpu_whole, whole)

    # 3. cuDF partitions, where cuDF imports (the data stays on the GPU)
    try:
        import cudf
        import pyarrow as pa

        table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        gdf = cudf.DataFrame.from_arrow(table)
        cu_whole = score_nsfw(gdf)["nsfw_score"].values.get()
        cu_parts = {}
        for how in (1, 3, 17, "uneven"):
            got = np.concatenate([score_nsfw(gdf.iloc[a:b])["nsfw_score"].values.get() for a, b in _cuts(n, how)])
            cu_parts[str(how)] = {
                "bitwise_equal_to_whole": bitwise(got, cu_whole),
                "max_diff_to_whole": maxdiff(got, cu_whole),
            }
        res["cudf_partitionings"] = cu_parts
        res["cudf_vs_pandas_gpu_max_diff"] = maxdiff(cu_whole, gpu_whole)
    except Exception as e:  # noqa: BLE001 - recorded: the rest of the section still counts
        res["cudf_partitionings"] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}

    # 4. differences that must stay within 1e-5
    cpu = score_nsfw(frame, device="cpu")["nsfw_score"].to_numpy()
    with torch.inference_mode():
        port = head(xg).reshape(-1).float().cpu().numpy()  # NeMo Curator's forward, one batch, GPU
    diffs = {
        "gpu_vs_cpu": maxdiff(gpu_whole, cpu),
        "gpu_vs_nemo_port_on_gpu": maxdiff(whole, port),
        "gpu_vs_stored_nemo_scores": maxdiff(whole, nemo),
        "nemo_port_on_gpu_vs_stored_nemo_scores": maxdiff(port, nemo),
        "cpu_vs_stored_nemo_scores": maxdiff(cpu, nemo),
    }
    res["max_diff"] = diffs
    res["within_tolerance"] = all(v <= TOL for v in diffs.values())
    checks = [v["bitwise_equal_to_whole"] for v in (*per_bs.values(), *parts.values())]
    if isinstance(res.get("cudf_partitionings"), dict) and "status" not in res["cudf_partitionings"]:
        checks += [v["bitwise_equal_to_whole"] for v in res["cudf_partitionings"].values()]
    res["bitwise_across_batch_sizes_and_partitionings"] = all(checks) and res["repeat_bitwise"]
    return res


# ----------------------------------------------------------------------------- kernel


def head_flop_per_row(head: Any) -> int:
    """2 x the multiply-adds of the head's Linear layers (426,496 for L/14)."""
    import torch

    return 2 * sum(m.in_features * m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear))


def section_kernel(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from nsfw_dask import load_model, score_nsfw
    from nsfw_dask.scoring import score_tensor

    _tf32_off()
    dev = torch.device(args.device)
    res: dict[str, Any] = {"device": str(dev), "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    # L_gpu: fp32 sgemm, TF32 off
    m = args.sgemm_n
    a = torch.randn(m, m, device=dev)
    b = torch.randn(m, m, device=dev)
    ts = timed(lambda: torch.mm(a, b), max(5, args.repeats))
    a = b = torch.empty(0)  # the 8192^2 operands go back to the allocator
    flops = [2 * m**3 / t for t in ts]
    head = load_model("vit-l-14", device=dev)
    fpr = head_flop_per_row(head)
    peak = max(flops)
    l_gpu = peak / fpr
    res["sgemm"] = {"n": m, "tflops_best": peak / 1e12, "tflops_median": statistics.median(flops) / 1e12}
    res["flop_per_row"] = fpr
    res["L_gpu_rows_per_s"] = l_gpu

    n = args.kernel_rows
    x = torch.randn(n, DIM, device=dev)
    x /= x.norm(dim=1, keepdim=True)
    out: dict[str, Any] = {}
    for dtype in (torch.float32, torch.float16):
        xd = x if dtype == torch.float32 else x.to(dtype)
        for bs in args.kernel_batch_sizes:
            t = timed(lambda xd=xd, bs=bs: score_tensor(head, xd, batch_size=bs, device=dev), args.repeats)
            rate = n / statistics.median(t)
            out[f"{str(dtype).removeprefix('torch.')}/batch_{bs}"] = {
                "rows_per_s": rate,
                "of_L_gpu": rate / l_gpu,
                "seconds": t,
            }
        del xd
    res["score_tensor"] = out
    best32 = max(v["rows_per_s"] for k, v in out.items() if k.startswith("float32"))
    res["score_tensor_float32_best_of_L_gpu"] = best32 / l_gpu
    res["target_of_L_gpu"] = 0.7
    res["meets_target"] = best32 / l_gpu >= 0.7

    rows = min(n, args.partition_rows)
    host = x[:rows].cpu().numpy()
    del x
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    frame = _arrow_frame(host)
    try:
        t = timed(lambda: score_nsfw(frame, device=dev), max(2, args.repeats // 2))
        res["score_nsfw_pandas_staged"] = {"rows": rows, "rows_per_s": rows / statistics.median(t), "seconds": t}
    except Exception as e:  # noqa: BLE001
        res["score_nsfw_pandas_staged"] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    try:
        import cudf
        import pyarrow as pa

        gdf = cudf.DataFrame.from_arrow(pa.Table.from_pandas(frame, preserve_index=False))
        t = timed(lambda: score_nsfw(gdf), max(2, args.repeats // 2))
        rate = rows / statistics.median(t)
        res["score_nsfw_cudf"] = {"rows": rows, "rows_per_s": rate, "of_L_gpu": rate / l_gpu, "seconds": t}
    except Exception as e:  # noqa: BLE001
        res["score_nsfw_cudf"] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    return res


# ----------------------------------------------------------------------------- job


def write_parquet_npy(folder: Path, pairs: int, rows: int, seed: int) -> int:
    """LAION's layout: img_emb/img_emb_N.npy (float16 unit vectors) + metadata/metadata_N.parquet
    (url, caption, key).  Embeddings drawn on the GPU when there is one (fast), else numpy."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    rng = np.random.default_rng(seed)
    words = np.array("photo of a the dog cat red blue green woman man car house tree beach sunset city".split())
    pool = pa.array([" ".join(rng.choice(words, 8)) for _ in range(4096)])
    gen = None
    if cuda_available():
        import torch

        gen = torch.Generator(device="cuda").manual_seed(seed)
    start = 0
    for i in range(pairs):
        if gen is not None:
            import torch

            x = torch.randn(rows, DIM, device="cuda", generator=gen)
            x = (x / x.norm(dim=1, keepdim=True)).half().cpu().numpy()
        else:
            x = rng.standard_normal((rows, DIM), dtype=np.float32)
            x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", x)
        key = pc.utf8_lpad(pa.array(np.arange(start, start + rows)).cast(pa.string()), 9, "0")
        url = pc.binary_join_element_wise("https://images.example.org/", key, ".jpg", "")
        caption = pc.take(pool, pa.array(rng.integers(0, len(pool), rows)))
        pq.write_table(
            pa.table({"url": url, "caption": caption, "key": key}), folder / "metadata" / f"metadata_{i}.parquet"
        )
        start += rows
    return start


def _run_job(src: Path, out: Path, extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)  # outside the timed window
    cmd = [sys.executable, "-m", "nsfw_dask", "score", str(src), str(out), "--json", "--no-progress", "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd + extra)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    reported = json.loads(lines[-1]) if lines else {}
    return {"wall_s": wall, "rows": reported.get("rows"), "compute_seconds": reported.get("compute_seconds")}


def _marginal(small: list[float], large: list[float], rows_small: int, rows_large: int) -> dict[str, Any]:
    ms, ml = statistics.median(small), statistics.median(large)
    d: dict[str, Any] = {"median_small_s": ms, "median_large_s": ml, "wall_small_s": small, "wall_large_s": large}
    d["marginal_rows_per_s"] = (rows_large - rows_small) / (ml - ms) if ml > ms else None
    d["whole_process_rows_per_s_large"] = rows_large / ml
    return d


def _read_scores(out: Path) -> Any:
    import pandas as pd

    parts = sorted(out.glob("part.*.parquet"))
    return pd.concat([pd.read_parquet(p, columns=["key", "nsfw_score"]) for p in parts], ignore_index=True)


def section_job(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nsfw-bench-gpu-"))
    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    t0 = time.perf_counter()
    rows = {
        "small": write_parquet_npy(data / "small", 1, args.rows_per_pair, seed=1),
        "large": write_parquet_npy(data / "large", args.large_pairs, args.rows_per_pair, seed=2),
    }
    res: dict[str, Any] = {
        "input": "parquet_npy, float16, local disk",
        "rows": rows,
        "generate_seconds": time.perf_counter() - t0,
        "rounds": args.rounds,
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kinds: dict[str, list[str]] = {"cpu": shlex.split(args.cpu_job_args)}
    if cuda_available():
        kinds = {"gpu": ["--gpu", *shlex.split(args.gpu_job_args)], **kinds}
        res["commands"] = {
            k: ["nsfw-dask", "score", "IN", "OUT", "--json", "--no-progress", *v] for k, v in kinds.items()
        }
    else:
        res["gpu"] = dict(NO_CUDA)
        res["commands"] = {"cpu": ["nsfw-dask", "score", "IN", "OUT", "--json", "--no-progress", *kinds["cpu"]]}
    runs: dict[str, list[dict[str, Any]]] = {f"{k}/{s}": [] for k in kinds for s in ("small", "large")}
    for r in range(args.rounds):
        for kind, extra in kinds.items():
            for size in ("small", "large"):
                rec = _run_job(data / size, work / f"out-{kind}-{size}", extra, env)
                if rec["rows"] is not None and rec["rows"] != rows[size]:
                    raise RuntimeError(f"{kind} {size}: the job reported {rec['rows']} rows, expected {rows[size]}")
                runs[f"{kind}/{size}"].append(rec)
                print(f"  job {kind:3s} {size:5s} round {r + 1}: {rec['wall_s']:7.2f} s", flush=True)
    for kind in kinds:
        small = [x["wall_s"] for x in runs[f"{kind}/small"]]
        large = [x["wall_s"] for x in runs[f"{kind}/large"]]
        res[kind] = _marginal(small, large, rows["small"], rows["large"])
        res[kind]["compute_seconds_large"] = [x["compute_seconds"] for x in runs[f"{kind}/large"]]
    if "gpu" in kinds:
        g, c = res["gpu"].get("marginal_rows_per_s"), res["cpu"].get("marginal_rows_per_s")
        res["gpu_over_cpu"] = g / c if g and c else None
        res["targets"] = {"gpu_marginal_rows_per_s": 10e6, "gpu_over_cpu": 5.0}
        res["meets_targets"] = bool(g and g >= 10e6 and res["gpu_over_cpu"] and res["gpu_over_cpu"] >= 5.0)
        a, b = _read_scores(work / "out-gpu-small"), _read_scores(work / "out-cpu-small")
        a, b = a.sort_values("key").reset_index(drop=True), b.sort_values("key").reset_index(drop=True)
        same_rows = a["key"].tolist() == b["key"].tolist()
        res["gpu_vs_cpu_output"] = {
            "same_rows": same_rows,
            "max_diff": maxdiff(a["nsfw_score"].to_numpy(), b["nsfw_score"].to_numpy()) if same_rows else None,
        }
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- tests


def section_tests(args: argparse.Namespace) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    junit = Path(args.out) / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "-m", "gpu or gpu_api"]
    cmd += [*GPU_TEST_MODULES, f"--junitxml={junit}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.tests_timeout, check=False)
    res: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode}
    res["seconds"] = time.perf_counter() - t0
    (Path(args.out) / "gpu-tests.log").write_text(proc.stdout + proc.stderr)
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        assert suite is not None
        res.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        res["failed"] = [
            f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:400]}"
            for case in suite.iter("testcase")
            for bad in list(case.findall("failure")) + list(case.findall("error"))
        ]
    res["tail"] = (proc.stdout + proc.stderr)[-2000:]
    return res


# ----------------------------------------------------------------------------- notebook


def _code_cells(nb: dict[str, Any]) -> list[str]:
    cells = []
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            src = "".join(c["source"])
            cells.append("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln for ln in src.splitlines()))
    return cells


def section_notebook(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"notebook": str(NOTEBOOK.relative_to(ROOT))}
    try:
        import nbformat
        from nbclient import NotebookClient

        mode = "nbclient"
    except ImportError as e:
        mode, why = "script", f"{e}"
    res["mode"] = mode
    if mode == "nbclient":
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = NotebookClient(
            nb, timeout=args.notebook_timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        )
        error = None
        try:
            client.execute()
        except Exception as e:  # noqa: BLE001 - CellExecutionError and kernel failures are the result
            error = f"{type(e).__name__}: {e}"[:3000]
        nbformat.write(nb, out / "02_gpu_localcudacluster.executed.ipynb")
        outputs = []
        for i, c in enumerate(c for c in nb.cells if c.cell_type == "code"):
            text = "".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
            errs = [
                f"{o.get('ename')}: {o.get('evalue')}" for o in c.get("outputs", []) if o.get("output_type") == "error"
            ]
            outputs.append({"cell": i, "stdout": text[-1500:], "errors": errs})
        res.update({"ok": error is None, "error": error, "cells": outputs})
    else:
        script = "\n\n".join(_code_cells(json.loads(NOTEBOOK.read_text())))
        (out / "02_gpu_localcudacluster.py").write_text(script)
        env = {**os.environ, "MPLBACKEND": "Agg"}
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            timeout=args.notebook_timeout,
            cwd=ROOT,
        )
        res.update(
            {
                "why_script": why,
                "ok": proc.returncode == 0,
                "stdout": proc.stdout[-4000:],
                "stderr": proc.stderr[-3000:],
            }
        )
    res["seconds"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- driver

RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": section_env,
    "parity": section_parity,
    "kernel": section_kernel,
    "job": section_job,
    "tests": section_tests,
    "notebook": section_notebook,
}


def write(result: dict[str, Any], out: Path, state: Path | None) -> None:
    text = json.dumps(result, indent=1, default=str)
    (out / "bench_gpu.json").write_text(text)
    if state is not None:
        state.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results"), help="folder for bench_gpu.json")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--state", help="JSON of earlier calls to merge (and to update): sections not run now are kept")
    p.add_argument("--dry-run", action="store_true", help="write the plan to bench_gpu.json and exit")
    p.add_argument("--reference", help="folder with l14_reference.npz (default $NSFW_DASK_REFERENCE_DIR, ../shared)")
    p.add_argument(
        "--device",
        default="cuda:0",
        help="where parity and kernel run; 'cpu' only smoke-tests their code (its figures mean nothing)",
    )
    p.add_argument("--sgemm-n", type=int, default=8192, help="the sgemm behind L_gpu is n x n x n")
    p.add_argument("--parity-rows", type=int, help="parity on the first N reference rows (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernel-rows", type=int, default=4 << 20)
    p.add_argument("--kernel-batch-sizes", type=int, nargs="+", default=[32768, 262144, 1 << 20, 4 << 20])
    p.add_argument("--partition-rows", type=int, default=1 << 20, help="rows of the cuDF / pandas partitions timed")
    p.add_argument("--work", help="folder for the job's data (default: a temporary folder, removed)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--rows-per-pair", type=int, default=500_000)
    p.add_argument("--large-pairs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpu-job-args", default="", help='extra CLI options for the --gpu job, e.g. "--batch-size 65536"')
    p.add_argument("--cpu-job-args", default="", help='extra CLI options for the CPU job, e.g. "--workers 4"')
    p.add_argument("--tests-timeout", type=int, default=420)
    p.add_argument("--notebook-timeout", type=int, default=420)
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in RUNNERS]
    if unknown:
        p.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = Path(args.state) if args.state else None
    result: dict[str, Any] = {}
    if state is not None and state.is_file():
        result = json.loads(state.read_text())
    result.setdefault("sections", {})
    result["last_call"] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv[1:] if argv is None else argv,
        "sections": sections,
        "cuda": cuda_available(),
    }
    if args.dry_run:
        result["last_call"]["dry_run"] = True
        result["plan"] = {
            s: ("runs" if s not in GPU_SECTIONS or cuda_available() else NO_CUDA["reason"] + ": skipped")
            for s in sections
        }
        write(result, out, state)
        print(json.dumps(result["plan"], indent=1))
        return 0
    failed = []
    for name in sections:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        on_cpu = name in ("parity", "kernel") and args.device == "cpu"  # a smoke test of their code
        if name in GPU_SECTIONS and not cuda_available() and not on_cpu:
            rec: dict[str, Any] = dict(NO_CUDA)
        else:
            try:
                rec = {"status": "ok", **RUNNERS[name](args)}
            except Exception as e:  # noqa: BLE001 - recorded, and the next section still runs
                rec = {
                    "status": "error",
                    "error": f"{type(e).__name__}: {e}"[:3000],
                    "traceback": traceback.format_exc()[-4000:],
                }
                failed.append(name)
        rec["section_seconds"] = time.perf_counter() - t0
        result["sections"][name] = rec
        write(result, out, state)
        print(f"   {name}: {rec['status']} ({rec['section_seconds']:.1f} s)", flush=True)
    print(f"wrote {out / 'bench_gpu.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
