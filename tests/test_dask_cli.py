"""``dask nsfw ...`` (the ``dask_cli`` entry point) and ``nsfw-dask ...`` are the same click group:
help, one-line usage errors (exit 2), the same output, Ctrl-C -> 130, and ``--help`` imports no torch.

Mostly through real subprocesses of the installed ``dask`` and ``nsfw-dask`` scripts: the
``dask_cli`` entry point exists once the package metadata is installed (``pip install -e .``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _cli import run_concurrently

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("score", "fetch-weights", "demo")
CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--no-progress"]

# The installed scripts (beside this Python), as a user types them; `python -m nsfw_dask` is
# what tests/test_cli.py runs.
BIN = Path(sys.executable).parent
NSFW_DASK = [sys.executable, str(BIN / "nsfw-dask")]
DASK_NSFW = [sys.executable, str(BIN / "dask"), "nsfw"]
BOTH = pytest.mark.parametrize("prog", [NSFW_DASK, DASK_NSFW], ids=["nsfw-dask", "dask-nsfw"])


def run(prog: list[str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*prog, *args], capture_output=True, text=True, env=dict(os.environ), timeout=timeout)


def run_all(*cmds: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Independent runs, two at a time (``_cli.run_concurrently``), in the given order."""
    return run_concurrently(*cmds, env=dict(os.environ), timeout=timeout)


@pytest.fixture()
def shared(shared_scheduler: str) -> list[str]:
    """The session's cluster (1 worker x 1 thread, conftest.py): the job without starting a
    cluster and loading the model for each run (not for a run that is interrupted)."""
    return ["--scheduler", shared_scheduler, "--no-progress"]


def test_entry_point_is_registered():
    assert (BIN / "nsfw-dask").is_file() and (BIN / "dask").is_file(), "install the package: pip install -e ."
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="dask_cli")}
    assert "nsfw" in eps, "no dask_cli entry point 'nsfw': reinstall the metadata (pip install --no-deps -e .)"
    assert eps["nsfw"].value == "nsfw_dask.cli:nsfw"
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("nsfw-dask") == "nsfw_dask.cli:main"


def test_literal_copies_match_the_library():
    """cli.py copies two values so that --help need not import the library's torch modules."""
    from nsfw_dask import cli
    from nsfw_dask.models import MODEL_SPECS
    from nsfw_dask.pipeline import DEFAULT_ROWS_PER_PARTITION

    assert cli.MODEL_NAMES == tuple(sorted(MODEL_SPECS))
    assert cli.DEFAULT_ROWS_PER_PARTITION == DEFAULT_ROWS_PER_PARTITION


@BOTH
def test_help_lists_the_commands(prog):
    r, *per_command = run_all([*prog, "--help"], *([*prog, cmd, "-h"] for cmd in COMMANDS))
    assert r.returncode == 0, r.stderr
    path = "dask nsfw" if prog is DASK_NSFW else "nsfw-dask"
    assert f"Usage: {path} [OPTIONS] COMMAND [ARGS]..." in r.stdout, r.stdout
    for cmd in COMMANDS:
        assert f"  {cmd} " in r.stdout, (cmd, r.stdout)
    for cmd, r in zip(COMMANDS, per_command):
        assert r.returncode == 0, r.stderr
        assert f"Usage: {path} {cmd} [OPTIONS]" in r.stdout, r.stdout
        assert "--model [vit-b-32|vit-l-14]" in r.stdout and "--verbose" in r.stdout


def test_dask_lists_nsfw():
    r = run(DASK_NSFW[:-1], "--help")
    assert r.returncode == 0, r.stderr
    assert "  nsfw " in r.stdout and "Score CLIP image embeddings" in r.stdout, r.stdout
    assert "nsfw" not in r.stderr, r.stderr  # dask warns when an entry point fails to load


def usage_cases(path: str, src: str, out: str) -> list[tuple[list[str], str, str]]:
    """(arguments, part of the message, part of the usage hint) for ``path`` (the command as typed)."""
    return [
        ([], "Missing command", f"usage: {path} [OPTIONS] COMMAND [ARGS]...; see {path} --help"),
        (["bogus"], "No such command 'bogus'", f"see {path} --help"),
        (["--bogus"], "--bogus", f"see {path} --help"),
        (["score"], "Missing argument 'INPUT'", f"usage: {path} score [OPTIONS] INPUT OUTPUT; see {path} score --help"),
        (["score", src], "Missing argument 'OUTPUT'", f"{path} score"),
        (["score", src, out, "--batch-size", "0"], "'--batch-size': expected a positive integer, got 0", "score"),
        (["score", src, out, "--workers", "-1"], "'--workers': expected a positive integer, got -1", "score"),
        (["score", src, out, "--rows-per-partition", "x"], "expected a positive integer, got 'x'", "score"),
        (["score", src, out, "--threshold", "1.5"], "'--threshold': expected a number in [0, 1], got 1.5", "score"),
        (["score", src, out, "--score-column", " "], "'--score-column': a column name cannot be empty", "score"),
        (["score", src, out, "--column", ""], "a column name cannot be empty", "score"),
        (["score", src, out, "--model", "vit-h-14"], "'--model'", "score"),
        (["score", src, out, "--filter", "maybe"], "'--filter'", "score"),
        (["score", src, out, "--keep-embeddings", "csv"], "'--keep-embeddings'", "score"),
        (["score", src, out, "--storage-options", "[1]"], "expected a JSON object, got '[1]'", "score"),
        (["score", src, out, "--storage-options", "{x"], "expected a JSON object", "score"),
        (["score", src, out, "--resume", "--overwrite"], "--overwrite: not allowed with --resume", "score"),
        (["demo", "--rows", "0"], "'--rows': expected a positive integer, got 0", f"{path} demo"),
        (["fetch-weights", "--json"], "--json", f"{path} fetch-weights"),
    ]


def check_usage_line(code: int, out: str, err: str, message: str, usage: str) -> None:
    """Exit 2 and exactly one line on stderr: ``nsfw-dask: error: ... (usage: ...)``."""
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nsfw-dask: error: ") and "usage: " in lines[0], lines[0]
    assert message in lines[0] and usage in lines[0], (message, usage, lines[0])
    assert "Traceback" not in err and not out


@pytest.fixture(scope="module")
def dask_cli():
    """dask's own click group with the ``nsfw`` entry point registered, as ``dask`` does it."""
    from dask import cli

    if "nsfw" not in cli.cli.commands:
        (ep,) = [ep for ep in importlib.metadata.entry_points(group="dask_cli") if ep.name == "nsfw"]
        cli._register_command_ep(cli.cli, ep)
    return cli.cli


def test_usage_errors_are_one_line_exit_2(tmp_path, capsys, dask_cli):
    """Every case both ways, in this process: ``main`` (the console script) and dask's click
    main in standalone mode (what ``dask nsfw`` runs)."""
    from nsfw_dask.cli import main

    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    for args, message, usage in usage_cases("nsfw-dask", src, out):
        code = main(args)
        check_usage_line(code, *capsys.readouterr(), message, usage)
    for args, message, usage in usage_cases("dask nsfw", src, out):
        with pytest.raises(SystemExit) as e:
            dask_cli.main(["nsfw", *args], prog_name="dask")
        check_usage_line(e.value.code, *capsys.readouterr(), message, usage)
    assert not (tmp_path / "out").exists()


@BOTH
def test_usage_error_from_the_real_commands(prog, tmp_path):
    path = "dask nsfw" if prog is DASK_NSFW else "nsfw-dask"
    cases = [usage_cases(path, "in", "out")[i] for i in (0, 5, 16)]
    for (_args, message, usage), r in zip(cases, run_all(*([*prog, *args] for args, _, _ in cases))):
        check_usage_line(r.returncode, r.stdout, r.stderr, message, usage)


@BOTH
def test_other_errors_keep_their_own_line(prog, tmp_path):
    """An error found by the job (not by click) is the job's one line, exit 1, no usage hint."""
    r = run(prog, "score", str(tmp_path / "nothing"), str(tmp_path / "out"), *CLUSTER)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsfw-dask: error: ") and "usage:" not in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- no torch for --help

# cli.py alone, without running nsfw_dask/__init__.py (which imports the whole library): a bare
# parent package lets ``import nsfw_dask.cli`` run only cli.py and what it imports.
CLI_ALONE = textwrap.dedent("""
    import sys, types
    pkg = types.ModuleType("nsfw_dask")
    pkg.__path__ = [sys.argv[1]]
    sys.modules["nsfw_dask"] = pkg
    from nsfw_dask.cli import main
    codes = [main([*args, "--help"]) for args in ([], ["score"], ["fetch-weights"], ["demo"])]
    heavy = ("torch", "numpy", "pandas", "pyarrow", "dask", "distributed")
    print(codes, sorted({m.split(".")[0] for m in sys.modules} & set(heavy)), file=sys.stderr)
""")


def test_cli_module_imports_nothing_heavy():
    r = subprocess.run(
        [sys.executable, "-c", CLI_ALONE, str(ROOT / "nsfw_dask")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[0, 0, 0, 0] []", r.stderr


def imported_packages(*args: str) -> set[str]:
    """Top-level packages a Python run imports (``python -X importtime``); it must exit 0."""
    r = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return {
        ln.rsplit("|", 1)[-1].strip().split(".")[0]
        for ln in r.stderr.splitlines()
        if ln.startswith("import time:") and "|" in ln
    }


@BOTH
def test_help_does_not_import_torch(prog):
    """The whole command, as a user runs it: the console script's or dask's help."""
    assert "torch" not in imported_packages("-c", "import nsfw_dask")  # the package loads it lazily
    assert "torch" not in imported_packages(*prog[1:], "--help")
    assert "torch" not in imported_packages(*prog[1:], "score", "--help")


# ----------------------------------------------------------------------------- the same job


def _parquet_npy(root: Path, rows: list[int], dim: int = 768) -> Path:
    """Random unit-norm float16 embeddings in the LAION parquet_npy layout (not LAION's data)."""
    rng = np.random.default_rng(12)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    start = 0
    for i, n in enumerate(rows):
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x.astype(np.float16))
        pd.DataFrame(
            {"url": [f"u{j}" for j in range(start, start + n)], "row": np.arange(start, start + n)}
        ).to_parquet(root / "metadata" / f"metadata_{i}.parquet")
        start += n
    return root


def _read(out: Path) -> pd.DataFrame:
    assert (out / "_SUCCESS").is_file(), sorted(p.name for p in out.iterdir())
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part.*.parquet"))], ignore_index=True)


@pytest.mark.weights
def test_dask_nsfw_score_equals_nsfw_dask_score(tmp_path, shared):
    src = _parquet_npy(tmp_path / "laion", [300, 200])
    opts = ["--threshold", "0.5", "--rows-per-partition", "100", *shared]
    got = {}
    progs = (("a", NSFW_DASK), ("b", DASK_NSFW))
    runs = run_all(*([*prog, "score", str(src), str(tmp_path / name), *opts] for name, prog in progs))
    for (name, _prog), r in zip(progs, runs):
        assert r.returncode == 0, r.stderr
        assert "rows scored      500" in r.stdout and "parts            5" in r.stdout and "score >= 0.5" in r.stdout
        lines = [ln for ln in r.stdout.splitlines() if not ln.startswith(("time ", "rows written "))]
        got[name] = (lines, _read(tmp_path / name))
    assert got["a"][0] == got["b"][0]
    pd.testing.assert_frame_equal(got["a"][1], got["b"][1])
    assert got["a"][1]["row"].tolist() == list(range(500))


@pytest.mark.weights
def test_dask_nsfw_ctrl_c_exits_130_and_nsfw_dask_resumes(tmp_path, shared):
    """Ctrl-C under ``dask nsfw``: exit 130 naming --resume, never finished; ``nsfw-dask score
    --resume`` finishes it with the right scores."""
    from nsfw_dask import NSFWScorer

    # 40 parts of 100 rows at one row per forward pass: the run lasts well past its first part
    rows = [2_000, 2_000]
    src = _parquet_npy(tmp_path / "laion", rows)
    opts = ["--rows-per-partition", "100"]
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*DASK_NSFW, "score", str(src), str(out), "--batch-size", "1", *opts, *CLUSTER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not (out.exists() and list(out.glob("part.*.parquet"))):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "nsfw-dask: interrupted" in err and "--resume" in err, err
    assert not (out / "_SUCCESS").exists()
    r = run(NSFW_DASK, "score", str(src), str(out), "--resume", "--json", *opts, *shared)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["partitions_reused"] >= 1
    got = _read(out)
    assert got["row"].tolist() == list(range(sum(rows)))
    x = np.concatenate([np.load(src / "img_emb" / f"img_emb_{i}.npy") for i in range(2)])
    expected = NSFWScorer(device="cpu")(x.astype(np.float32)).numpy()
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)
