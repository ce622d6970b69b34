"""Helpers for tests that run the CLI in subprocesses."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def run_concurrently(*cmds: list[str], max_workers: int = 2, **kw: Any) -> list[subprocess.CompletedProcess]:
    """``subprocess.run(cmd, capture_output=True, text=True, **kw)`` for each command, at most
    ``max_workers`` at once: independent processes (the CI machine has 2 cores, and a CLI process
    spends most of its few seconds importing torch on one of them).  The results come in the
    commands' order, each with ``.seconds``, the wall time of its own run."""

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, **kw)
        r.seconds = time.perf_counter() - t  # type: ignore[attr-defined]
        return r

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(run, cmds))
