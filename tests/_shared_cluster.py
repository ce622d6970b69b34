"""A Dask cluster in a process of its own, shared by CLI tests through ``--scheduler ADDRESS``.

Started once per test session by the ``shared_scheduler`` fixture (``conftest.py``): one worker
process (behind a nanny, as in the CLI's own cluster) with one thread, so a test's parts run one
after another as they do with ``--workers 1 --threads-per-worker 1``.  Prints the scheduler's
address on one line, then runs until its stdin is closed.
"""

from __future__ import annotations

import logging
import sys


def main() -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # a free port: never 8787, which other tests' clusters ask for
        silence_logs=logging.CRITICAL,
    ) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()  # until the test session closes the pipe (or ends)


if __name__ == "__main__":
    main()
