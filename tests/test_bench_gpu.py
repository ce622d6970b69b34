"""``benchmarks/bench_gpu.py`` and the GPU kit (``benchmarks/gpu_kit``), on CPU.

The GPU figures themselves need a GPU; what runs here is what can break before one is reached:
argument parsing, the plan, the JSON (written after every section, merged across calls), the
"no CUDA device" records, the job timing harness on the CPU job (whole CLI processes, rows
checked), the committed wheel manifest, and the kit's packing, its pieces' size limit, its
sha256 sums and its reassembly by ``remote_setup.sh`` (with a small hand-made wheel, no network).
Nothing here is a timing: the job is run on a few thousand rows only to exercise the harness.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
KIT_DIR = ROOT / "benchmarks" / "gpu_kit"
sys.path.insert(0, str(KIT_DIR))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402
import kit  # noqa: E402

no_cuda = pytest.mark.skipif(bench_gpu.cuda_available(), reason="checks the records made without a CUDA device")


def _run_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


# -- bench_gpu.py ------------------------------------------------------------------------------


@no_cuda
def test_dry_run_writes_the_plan(tmp_path: Path) -> None:
    assert bench_gpu.main(["--out", str(tmp_path), "--dry-run"]) == 0
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["last_call"]["dry_run"] is True and result["last_call"]["cuda"] is False
    assert result["plan"] == {
        "env": "runs",
        "parity": "no CUDA device: skipped",
        "kernel": "no CUDA device: skipped",
        "job": "runs",
        "tests": "no CUDA device: skipped",
        "notebook": "no CUDA device: skipped",
    }
    assert result["sections"] == {}


def test_unknown_section_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench_gpu.main(["--out", str(tmp_path), "--sections", "env,speed"])
    assert info.value.code == 2
    assert "unknown ['speed']" in capsys.readouterr().err


def test_cuts_cover_every_row_once() -> None:
    for n in (5384, 1001, 17):
        for how in (1, 3, 17, "uneven"):
            cuts = bench_gpu._cuts(n, how)
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(a < b for a, b in cuts) and all(b == c for (_, b), (c, _) in zip(cuts, cuts[1:]))


def test_bitwise_and_maxdiff() -> None:
    import numpy as np

    a = np.array([0.1, np.nan, 0.5], dtype=np.float32)
    assert bench_gpu.bitwise(a, a.copy()) and not bench_gpu.bitwise(a, a + np.float32(1e-7))
    assert bench_gpu.maxdiff(a, a) == 0.0
    assert bench_gpu.maxdiff(a, np.array([0.1, 0.2, 0.5], dtype=np.float32)) == float("inf")  # NaN moved
    assert bench_gpu.maxdiff(a, a + np.float32(2e-6)) == pytest.approx(2e-6, rel=0.1)


def test_marginal() -> None:
    d = bench_gpu._marginal([5.0, 6.0, 5.5], [9.0, 9.5, 10.0], 1000, 9000)
    assert d["marginal_rows_per_s"] == pytest.approx(8000 / 4.0)
    assert bench_gpu._marginal([5.0], [4.0], 1000, 9000)["marginal_rows_per_s"] is None  # no growth: no figure


@no_cuda
@pytest.mark.weights
def test_cpu_only_run_times_the_cpu_job_and_records_no_cuda(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state.json"
    proc = _run_bench(
        "--out",
        str(out),
        "--state",
        str(state),
        "--rows-per-pair",
        "2000",
        "--large-pairs",
        "2",
        "--rounds",
        "1",
        "--cpu-job-args=--workers 1 --threads-per-worker 1",
        "--work",
        str(tmp_path / "work"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "bench_gpu.json").read_text())
    assert json.loads(state.read_text()) == result
    sections = result["sections"]
    assert list(sections) == list(bench_gpu.SECTIONS)
    assert sections["env"]["status"] == "ok" and sections["env"]["cuda"] is False
    for name in ("parity", "kernel", "tests", "notebook"):
        assert sections[name]["status"] == "skipped" and sections[name]["reason"] == "no CUDA device", name
    job = sections["job"]
    assert job["status"] == "ok", job
    assert job["gpu"] == {"status": "skipped", "reason": "no CUDA device"}
    assert job["rows"] == {"small": 2000, "large": 4000}
    assert job["commands"]["cpu"][-4:] == ["--workers", "1", "--threads-per-worker", "1"]
    assert len(job["cpu"]["wall_small_s"]) == 1 and len(job["cpu"]["wall_large_s"]) == 1
    assert "marginal_rows_per_s" in job["cpu"]
    assert not (tmp_path / "work").exists()  # the generated data is removed

    # a later call merges: env again, the job kept
    proc = _run_bench("--out", str(tmp_path / "out2"), "--state", str(state), "--sections", "env")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads((tmp_path / "out2" / "bench_gpu.json").read_text())
    assert merged["sections"]["job"] == job
    assert merged["last_call"]["sections"] == ["env"]


@pytest.mark.weights
def test_parity_and_kernel_code_runs_on_cpu(tmp_path: Path) -> None:
    """``--device cpu``: the parity and kernel sections' code against today's public API
    (``score_tensor``, ``score_nsfw``, ``load_model``), on a few rows; the figures mean nothing
    here, the structure and the parity verdicts do (on one CPU thread count, bitwise holds)."""
    args = ["--out", str(tmp_path), "--sections", "parity,kernel", "--device", "cpu", "--parity-rows", "300"]
    args += ["--sgemm-n", "128", "--kernel-rows", "3000", "--kernel-batch-sizes", "1024", "3000"]
    args += ["--partition-rows", "2000", "--repeats", "1"]
    proc = _run_bench(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sections = json.loads((tmp_path / "bench_gpu.json").read_text())["sections"]
    parity, kernel = sections["parity"], sections["kernel"]
    assert parity["status"] == "ok" and parity["device"] == "cpu" and parity["rows"] == 300, parity
    assert set(parity["batch_sizes"]) == {"1", "7", "256", "1024", "4096", "32768"}
    assert set(parity["pandas_partitionings"]) == {"1", "3", "17", "uneven"}
    assert parity["within_tolerance"] is True, parity["max_diff"]
    assert parity["bitwise_across_batch_sizes_and_partitionings"] is True
    assert kernel["status"] == "ok" and kernel["flop_per_row"] == 426_496
    assert set(kernel["score_tensor"]) == {
        "float32/batch_1024",
        "float32/batch_3000",
        "float16/batch_1024",
        "float16/batch_3000",
    }
    assert kernel["score_nsfw_pandas_staged"]["rows"] == 2000


def test_generated_parquet_npy_is_laion_shaped(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    rows = bench_gpu.write_parquet_npy(tmp_path / "d", 2, 300, seed=3)
    assert rows == 600
    x = np.load(tmp_path / "d" / "img_emb" / "img_emb_1.npy")
    assert x.dtype == np.float16 and x.shape == (300, 768)
    np.testing.assert_allclose(np.linalg.norm(x.astype(np.float32), axis=1), 1.0, atol=2e-3)
    meta = pq.read_table(tmp_path / "d" / "metadata" / "metadata_1.parquet").to_pydict()
    assert list(meta) == ["url", "caption", "key"]
    assert (
        meta["key"][:2] == ["000000300", "000000301"] and meta["url"][0] == "https://images.example.org/000000300.jpg"
    )


# -- the GPU kit -------------------------------------------------------------------------------


def test_manifest_pins_what_the_gpu_run_used() -> None:
    pins = {kit._norm(n): (v, d) for n, v, d in kit.read_manifest()}
    assert pins["numpy"][0] == "2.4.6"  # numpy 2.5 breaks `import cudf` (numba-cuda's np.row_stack)
    for name, version in (("cudf-cu13", "26.10.2"), ("libcudf-cu13", "26.10.2"), ("dask-cudf-cu13", "26.10.2")):
        assert pins[name][0] == version
    for name, version in (("dask", "2026.7.1"), ("distributed", "2026.7.1"), ("pandas", "3.0.6")):
        assert pins[name][0] == version
    for needed in ("rmm-cu13", "dask-cuda", "pytest", "nbclient", "ipykernel", "matplotlib", "click", "filelock"):
        assert needed in pins, needed
    carried_from_image = [n for n in pins if kit.ON_THE_IMAGE.fullmatch(n)]
    assert not carried_from_image, f"would shadow the GPU image's own builds: {carried_from_image}"
    assert "nvidia-libnvcomp-cu13" in pins  # libcudf needs it; the image does not have it


def _tiny_wheel(folder: Path) -> Path:
    """A valid pure-Python wheel, ``kit_probe-0.1``, made by hand (no network, no build)."""
    path = folder / "kit_probe-0.1-py3-none-any.whl"
    files = {
        "kit_probe/__init__.py": b"VALUE = 42\n",
        "kit_probe-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: kit-probe\nVersion: 0.1\n",
        "kit_probe-0.1.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
            digest = hashlib.sha256(data).digest()
            import base64

            record.append(f"{name},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}")
        record.append("kit_probe-0.1.dist-info/RECORD,,")
        z.writestr("kit_probe-0.1.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _small_kit(tmp_path: Path, piece_bytes: int) -> tuple[Path, dict, dict[str, bytes]]:
    src = tmp_path / "src"
    (src / "wheels").mkdir(parents=True)
    wheel = _tiny_wheel(src / "wheels")
    blobs = {f"data/weights/w{i}.pth": os.urandom(3000 + 777 * i) for i in range(3)}
    files = [(wheel, f"wheels/{wheel.name}")]
    for name, data in blobs.items():
        p = src / name.replace("/", "_")
        p.write_bytes(data)
        files.append((p, name))
    blobs[f"wheels/{wheel.name}"] = wheel.read_bytes()
    out = tmp_path / "gpu-kit"
    record = kit.pack(files, out, piece_bytes)
    return out, record, blobs


def test_pack_cuts_pieces_under_the_limit_with_their_sums(tmp_path: Path) -> None:
    out, record, blobs = _small_kit(tmp_path, piece_bytes=4096)
    pieces = record["pieces"]
    assert len(pieces) >= 3
    for i, p in enumerate(pieces, start=1):
        path = out / p["path"]
        assert path == out / f"{i:02d}" / f"kit.tar.{i:02d}"
        assert path.stat().st_size == p["bytes"] <= 4096
        assert hashlib.sha256(path.read_bytes()).hexdigest() == p["sha256"]
        # each transfer folder is self-contained: the piece, the sums, the record
        assert sorted(x.name for x in path.parent.iterdir()) == sorted([path.name, "SHA256SUMS", "kit.json"])
    joined = b"".join((out / p["path"]).read_bytes() for p in pieces)
    assert hashlib.sha256(joined).hexdigest() == record["tar_sha256"]
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert sums[-1] == f"{record['tar_sha256']}  kit.tar" and len(sums) == len(pieces) + 1
    got = kit.unpack(out, tmp_path / "unpacked")
    assert sorted(got) == sorted(blobs)
    for name, data in blobs.items():
        assert (tmp_path / "unpacked" / name).read_bytes() == data


def test_the_default_piece_fits_one_transfer() -> None:
    """The device tool carries <= 64 MiB per call, the checkout (tracked files) included."""
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT, check=True).stdout
    checkout = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    assert kit.PIECE_MIB * 2**20 + 64 * 1024 + checkout < 64 * 2**20 - 1 * 2**20, checkout


def _remote(tmp_path: Path, checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KIT": str(tmp_path / "remote-kit"), "SITE": str(tmp_path / "site"), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(KIT_DIR / "remote_setup.sh"), *args], capture_output=True, text=True, env=env, cwd=checkout
    )


def test_remote_setup_stashes_joins_checks_and_installs(tmp_path: Path) -> None:
    out, record, _ = _small_kit(tmp_path, piece_bytes=4096)
    checkout = tmp_path / "checkout"  # each device call lays the checkout anew, carrying one piece
    for p in record["pieces"]:
        if checkout.exists():
            shutil.rmtree(checkout)
        (checkout / "gpu-kit").mkdir(parents=True)
        shutil.copytree(out / p["transfer"], checkout / "gpu-kit" / p["transfer"])
        proc = _remote(tmp_path, checkout, "stash", p["transfer"])
        assert proc.returncode == 0, proc.stderr
        assert not list((checkout / "gpu-kit" / p["transfer"]).glob("kit.tar.*")), "the piece was not moved"
    proc = _remote(tmp_path, checkout, "unpack")
    assert proc.returncode == 0, proc.stderr
    assert "kit joined and checked" in proc.stderr
    assert (tmp_path / "remote-kit" / "unpacked" / "data" / "weights" / "w2.pth").is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import kit_probe; print(kit_probe.VALUE)"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert probe.stdout.strip() == "42", probe.stderr


def test_remote_setup_refuses_a_bad_or_missing_piece(tmp_path: Path) -> None:
    out, record, _ = _small_kit(tmp_path, piece_bytes=4096)
    checkout = tmp_path / "checkout"
    first = record["pieces"][0]
    (checkout / "gpu-kit").mkdir(parents=True)
    shutil.copytree(out / first["transfer"], checkout / "gpu-kit" / first["transfer"])
    piece = checkout / "gpu-kit" / first["transfer"] / f"kit.tar.{first['transfer']}"
    data = bytearray(piece.read_bytes())
    data[100] ^= 0xFF
    piece.write_bytes(bytes(data))
    proc = _remote(tmp_path, checkout, "stash", first["transfer"])
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr
    proc = _remote(tmp_path, checkout, "unpack")  # the other pieces never came
    assert proc.returncode == 2 and "missing" in proc.stderr, proc.stderr
    proc = _remote(tmp_path, checkout, "stash", "07")
    assert proc.returncode == 2 and 'carry: ["gpu-kit/07"]' in proc.stderr
