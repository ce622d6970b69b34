"""The GPU kit: what a GPU machine without network needs to run ``benchmarks/bench_gpu.py``.

GPU machines here come rarely and briefly, with Python 3.12, torch (CUDA), CuPy, pyarrow and numba
but no dask, RAPIDS or network; each transfer to one carries at most 64 MiB (the checkout included)
and it is released after a short idle spell.  ``make gpu-kit`` (``python benchmarks/gpu_kit/kit.py
build``) prepares, on a machine with network:

* the wheels pinned in ``benchmarks/gpu_kit/wheels.txt`` (the versions of the first GPU run, with
  their sha256; ``pip download --require-hashes --no-deps`` for Python 3.12, manylinux x86_64),
  downloaded once into ``gpu-kit/wheels/`` and reused;
* LAION's weights and the reference scores the GPU tests read (from ``$NSFW_DASK_MODEL_DIR`` /
  ``../shared``; never committed);

packed as ONE uncompressed tar cut into pieces of at most ``--piece-mib`` MiB (default 60), one
piece per transfer folder: ``gpu-kit/01/kit.tar.01``, ``gpu-kit/02/kit.tar.02``, ...  Each folder
also holds ``SHA256SUMS`` (every piece and the whole tar) and ``kit.json`` (contents, sizes).
``gpu-kit/`` is git-ignored.  ``benchmarks/gpu_kit/remote_setup.sh`` moves each piece to /tmp on the
GPU machine as it arrives, then joins, checks, installs and runs; ``benchmarks/gpu_kit/README.md``
gives the exact sequence of device-tool calls.

Other commands: ``check-resolution`` (``make gpu-api-check``: what ``pip install
"nsfw-dask[gpu-cu13]"`` resolves for Python 3.12, where numpy 2.5 exists) and ``lock`` (rewrites
``wheels.txt`` from a resolution of the pins below).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MANIFEST = HERE / "wheels.txt"
PYTHON_VERSION = "3.12"  # the GPU machines' Python
# pip matches --platform tags literally: list every manylinux tag the pinned wheels carry
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_26_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
)
PIECE_MIB = 60  # + the checkout (~1 MB) stays under the device tool's 64 MiB per call
PIECE_NAME = "kit.tar"
#: What the GPU machine's image provides (the first GPU run); never carried: carrying them would
#: shadow the image's CUDA builds.  torch 2.11.0+cu130, CuPy 14.2.0, pyarrow 25.0.1, numba 0.68.0,
#: numba-cuda 0.30.4, cuda-bindings 13.3.1, cuda-core 1.2.0 and the CUDA libraries torch brings.
ON_THE_IMAGE = re.compile(
    r"(torch|triton|cupy-cuda\d+x|pyarrow|numba|numba-cuda|numba-cuda-mlir|llvmlite|cuda-bindings|cuda-core"
    r"|cuda-pathfinder|cuda-toolkit|cuda-python|nvidia-(?!libnvcomp).*)"
)
#: The pins ``lock`` resolves (the first GPU run's carried versions, plus what the GPU tests,
#: bench_gpu.py and the notebook import).
LOCK_PINS = (
    "cudf-cu13==26.10.2",
    "pylibcudf-cu13==26.10.2",
    "libcudf-cu13==26.10.2",
    "dask-cudf-cu13==26.10.2",
    "rmm-cu13==26.10.0",
    "dask-cuda==26.10.0",
    "dask==2026.7.1",
    "distributed==2026.7.1",
    "pandas==3.0.6",
    "numpy==2.4.6",
    "click>=8.1",
    "filelock>=3.12",
    "pytest",
    "nbclient",
    "nbformat",
    "ipykernel",
    "matplotlib",
    "psutil",
    "packaging",
)
DATA_FILES = {
    # the GPU tests, bench_gpu.py's parity checks and exact mode (tests/test_gpu.py)
    "weights": (
        "clip_ViT-L-14_openai_binary_nsfw_head.pth",
        "clip_ViT-B-32_openai_binary_nsfw_head.pth",
        "clip_autokeras_binary_nsfw.zip",
        "clip_autokeras_nsfw_b32.zip",
        "l14_keras_vocab.json",
        "b32_keras_vocab.json",
        "README.md",
        "LICENSE-laion.md",
    ),
    "reference": (
        "l14_reference.npz",
        "b32_reference.npz",
        "l14_special.npz",
        "b32_special.npz",
        "README.md",
    ),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION]
    for tag in PLATFORMS:
        args += ["--platform", tag]
    return args


# ----------------------------------------------------------------------------- the manifest


def read_manifest(path: Path = MANIFEST) -> list[tuple[str, str, str]]:
    """``(name, version, sha256)`` of every pinned wheel (``name==version --hash=sha256:...``)."""
    pins = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if m is None:
            raise SystemExit(f"{path}: cannot read {line!r}; expected 'name==version --hash=sha256:<64 hex>'")
        pins.append((m.group(1), m.group(2), m.group(3)))
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock(out: Path = MANIFEST) -> None:
    """Resolve :data:`LOCK_PINS` for Python 3.12 and write the carried wheels with their sha256."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report), "--target", str(Path(tmp) / "t"), *pip_platform_args(), *LOCK_PINS]
        subprocess.run(cmd, check=True)
        installs = json.loads(report.read_text())["install"]
    lines = [
        "# Wheels carried to a GPU machine by `make gpu-kit` (benchmarks/gpu_kit/kit.py): Python 3.12,",
        "# manylinux x86_64, CUDA 13.  The versions of the first GPU run (cudf 26.10.2, dask 2026.7.1,",
        "# pandas 3.0.6, numpy 2.4.6: numpy 2.5 breaks `import cudf`, see pyproject.toml) and what the GPU",
        "# tests, bench_gpu.py and notebook 02 import.  Not carried (the machine's image has them):",
        "# torch, CuPy, pyarrow, numba, numba-cuda, cuda-bindings/-core, the CUDA libraries (kit.ON_THE_IMAGE).",
        "# Regenerate with `python benchmarks/gpu_kit/kit.py lock` (needs a current pip).",
    ]
    kept = sorted(
        (i["metadata"]["name"], i["metadata"]["version"], i["download_info"]["archive_info"]["hashes"]["sha256"])
        for i in installs
        if not ON_THE_IMAGE.fullmatch(_norm(i["metadata"]["name"]))
    )
    lines += [f"{name}=={version} --hash=sha256:{digest}" for name, version, digest in kept]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(kept)} pinned wheels to {out}")


# ----------------------------------------------------------------------------- downloading


def _wheel_matches(path: Path, name: str, version: str) -> bool:
    stem = path.name.split("-")
    return len(stem) >= 2 and _norm(stem[0]) == _norm(name) and stem[1] == version


def download(pins: list[tuple[str, str, str]], cache: Path) -> list[Path]:
    """The pinned wheels in ``cache``, downloaded only if missing (each checked by sha256)."""
    cache.mkdir(parents=True, exist_ok=True)

    def present() -> dict[str, Path]:
        found = {}
        for name, version, digest in pins:
            for p in cache.glob("*.whl"):
                if _wheel_matches(p, name, version) and sha256_file(p) == digest:
                    found[name] = p
        return found

    have = present()
    missing = [(n, v, d) for n, v, d in pins if n not in have]
    if missing:
        print(f"downloading {len(missing)} of {len(pins)} wheels into {cache}", flush=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
            for name, version, digest in missing:
                req.write(f"{name}=={version} --hash=sha256:{digest}\n")
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--quiet"]
            subprocess.run([*cmd, *pip_platform_args(), "-d", str(cache), "-r", req.name], check=True)
        finally:
            os.unlink(req.name)
        have = present()
    lost = [n for n, _, _ in pins if n not in have]
    if lost:
        raise SystemExit(f"wheels missing or with a wrong sha256 after the download: {lost}")
    return [have[n] for n, _, _ in pins]


# ----------------------------------------------------------------------------- packing


class _PieceWriter:
    """A write-only stream that cuts what it gets into numbered files of at most ``size`` bytes:
    ``out/01/kit.tar.01``, ``out/02/kit.tar.02``, ...  and hashes every piece and the whole."""

    def __init__(self, out: Path, size: int) -> None:
        self.out, self.size = out, size
        self.pieces: list[dict[str, Any]] = []
        self.whole = hashlib.sha256()
        self._f: BinaryIO | None = None
        self._h = hashlib.sha256()
        self._n = 0

    def _open(self) -> None:
        k = len(self.pieces) + 1
        folder = self.out / f"{k:02d}"
        folder.mkdir(parents=True)
        path = folder / f"{PIECE_NAME}.{k:02d}"
        self.pieces.append({"transfer": f"{k:02d}", "path": f"{k:02d}/{path.name}", "bytes": 0})
        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        self._n = 0

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.pieces[-1]["bytes"] = self._n
            self.pieces[-1]["sha256"] = self._h.hexdigest()
            self._f = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._f is None or self._n == self.size:
                self._close()
                self._open()
            take = min(len(view), self.size - self._n)
            chunk = view[:take]
            assert self._f is not None
            self._f.write(chunk)
            self._h.update(chunk)
            self.whole.update(chunk)
            self._n += take
            view = view[take:]
        return len(data)

    def close(self) -> None:
        self._close()


def pack(files: Iterable[tuple[Path, str]], out: Path, piece_bytes: int) -> dict[str, Any]:
    """Tar ``(path, name in the tar)`` pairs into pieces under ``out``; returns the kit record."""
    if out.exists():
        for old in out.iterdir():  # earlier pieces and records; the wheel cache stays
            if old.name != "wheels":
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    writer = _PieceWriter(out, piece_bytes)
    contents = []
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for path, name in files:
            tar.add(path, arcname=name, recursive=False)
            contents.append({"name": name, "bytes": path.stat().st_size})
    writer.close()
    record = {
        "format": 1,
        "piece_bytes": piece_bytes,
        "pieces": writer.pieces,
        "tar_bytes": sum(p["bytes"] for p in writer.pieces),
        "tar_sha256": writer.whole.hexdigest(),
        "contents": contents,
    }
    sums = "".join(f"{p['sha256']}  {PIECE_NAME}.{p['transfer']}\n" for p in writer.pieces)
    sums += f"{record['tar_sha256']}  {PIECE_NAME}\n"
    for p in writer.pieces:  # every transfer carries the sums and the record (a few kB)
        (out / p["transfer"] / "SHA256SUMS").write_text(sums)
        (out / p["transfer"] / "kit.json").write_text(json.dumps(record, indent=1))
    (out / "SHA256SUMS").write_text(sums)
    (out / "kit.json").write_text(json.dumps(record, indent=1))
    return record


def build(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    pins = read_manifest(Path(args.manifest))
    wheels = download(pins, out / "wheels")
    files = [(w, f"wheels/{w.name}") for w in wheels]
    for kind, folder in (("weights", args.weights), ("reference", args.reference)):
        for name in DATA_FILES[kind]:
            path = Path(folder) / name
            if not path.is_file():
                raise SystemExit(f"{path} not found: pass --{kind} DIR (LAION's files, never committed)")
            files.append((path, f"data/{kind}/{name}"))
    files.append((Path(args.manifest), "wheels.txt"))
    record = pack(files, out, int(args.piece_mib * 2**20))
    record["wheels"] = len(wheels)
    (out / "kit.json").write_text(json.dumps(record, indent=1))
    mib = record["tar_bytes"] / 2**20
    print(
        f"gpu kit: {len(wheels)} wheels + {len(files) - len(wheels) - 1} data files, {mib:.1f} MiB in "
        f"{len(record['pieces'])} pieces of <= {args.piece_mib} MiB under {out}"
    )
    for p in record["pieces"]:
        print(f"  transfer {p['transfer']}: {p['path']}  {p['bytes'] / 2**20:6.1f} MiB  sha256 {p['sha256'][:16]}")
    return 0


def unpack(kit: Path, dest: Path) -> list[str]:
    """Join and check the pieces under ``kit`` (as laid out by :func:`pack`), extract into ``dest``.
    What ``remote_setup.sh`` does with shell tools; for tests on CPU."""
    record = json.loads((kit / "kit.json").read_text())
    whole = hashlib.sha256()
    dest.mkdir(parents=True, exist_ok=True)
    joined = dest / PIECE_NAME
    with open(joined, "wb") as f:
        for p in record["pieces"]:
            data = (kit / p["path"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != p["sha256"]:
                raise SystemExit(f"{p['path']}: sha256 mismatch")
            whole.update(data)
            f.write(data)
    if whole.hexdigest() != record["tar_sha256"]:
        raise SystemExit("the joined tar's sha256 does not match kit.json")
    with tarfile.open(joined) as tar:
        tar.extractall(dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dest)
        names = tar.getnames()
    joined.unlink()
    return names


# ----------------------------------------------------------------------------- resolution check


def extra_requirements(extra: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What ``pip install "nsfw-dask[<extra>]"`` asks for: the dependencies plus the extra's."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"][extra]]


def resolve(requirements: list[str], python_version: str) -> dict[str, str]:
    """``{name: version}`` that this pip resolves for ``requirements`` on ``python_version``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report), "--target", str(Path(tmp) / "t")]
        cmd += ["--only-binary=:all:", "--python-version", python_version]
        for tag in PLATFORMS:
            cmd += ["--platform", tag]
        subprocess.run([*cmd, *requirements], check=True)
        return {
            _norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
        }


def check_resolution(args: argparse.Namespace) -> int:
    """A fresh ``pip install "nsfw-dask[<extra>]"`` on Python 3.12 must not get numpy 2.5 while
    the numba-cuda it gets registers ``np.row_stack`` (numba-cuda <= 0.30.x)."""
    from packaging.version import Version

    got = resolve(extra_requirements(args.extra), args.python_version)
    numpy, numba_cuda = got.get("numpy"), got.get("numba-cuda")
    where = f"nsfw-dask[{args.extra}] on Python {args.python_version}"
    print(f"pip resolves {where}: numpy {numpy}, numba-cuda {numba_cuda}")
    if numpy is None:
        raise SystemExit("numpy is not in the resolution")
    if Version(numpy) >= Version("2.5") and (numba_cuda is None or Version(numba_cuda) < Version("0.31")):
        raise SystemExit(
            f"nsfw-dask[{args.extra}] resolves numpy {numpy} with numba-cuda {numba_cuda} on Python "
            f"{args.python_version}: `import cudf` fails (np.row_stack); keep numpy<2.5 in the GPU extras"
        )
    if args.show_unbounded and numba_cuda is not None:  # why the bound is there
        # cuDF 26.10.2 pins numba<0.65 (numpy<2.5); with a newer numba (the first GPU image had
        # 0.68 and numpy 2.5) nothing but our bound keeps numpy 2.5 away from this numba-cuda
        free = resolve([f"numba-cuda=={numba_cuda}", "numba>=0.65", "numpy"], args.python_version)
        print(
            f"  numba-cuda {numba_cuda} with numba {free.get('numba')} and no numpy bound gets numpy "
            f"{free.get('numpy')}: `import cudf` would fail there (np.row_stack)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download the pinned wheels (once) and cut the kit into pieces")
    b.add_argument("--out", default=str(ROOT / "gpu-kit"))
    b.add_argument("--manifest", default=str(MANIFEST))
    b.add_argument("--piece-mib", type=float, default=PIECE_MIB)
    shared = ROOT.parent / "shared"
    b.add_argument("--weights", default=os.environ.get("NSFW_DASK_MODEL_DIR") or str(shared / "weights"))
    b.add_argument("--reference", default=os.environ.get("NSFW_DASK_REFERENCE_DIR") or str(shared / "reference"))
    c = sub.add_parser("check-resolution", help="what a fresh install of the GPU extra resolves (no download)")
    c.add_argument("--extra", default="gpu-cu13")
    c.add_argument("--python-version", default=PYTHON_VERSION)
    c.add_argument("--show-unbounded", action="store_true", help="also resolve numba-cuda without the numpy bound")
    sub.add_parser("lock", help="rewrite wheels.txt from a resolution of the pins (needs network)")
    u = sub.add_parser("unpack", help="join, check and extract a kit (what remote_setup.sh does)")
    u.add_argument("kit")
    u.add_argument("dest")
    args = p.parse_args(argv)
    if args.command == "build":
        return build(args)
    if args.command == "check-resolution":
        return check_resolution(args)
    if args.command == "lock":
        lock()
        return 0
    names = unpack(Path(args.kit), Path(args.dest))
    print(f"unpacked {len(names)} files into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
