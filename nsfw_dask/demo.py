"""``nsfw-dask demo``'s data and plot: a generated LAION-style dataset and a histogram of its scores.

The scoring itself is the main job (:func:`nsfw_dask.score_dataset`); the CLI calls these around it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("nsfw_dask.demo")

#: The file that marks a folder as the demo's own (its data may be regenerated in it).
MARKER = ".nsfw-dask-demo"


class DemoFolderError(ValueError):
    """The folder asked for is not empty and was not made by the demo: nothing is written to it."""


def prepare_folder(out: str | os.PathLike[str] | None) -> Path:
    """The demo's folder, created and marked: ``out`` (new, empty, or an earlier demo's) or a new
    temporary folder.  Raises :class:`DemoFolderError` for a folder holding anything else."""
    folder = Path(out).expanduser().absolute() if out else Path(tempfile.mkdtemp(prefix="nsfw-dask-demo-"))
    marker = folder / MARKER
    if folder.exists() and any(folder.iterdir()) and not marker.exists():
        raise DemoFolderError(f"{folder} is not empty and not an earlier demo folder")
    folder.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return folder


def write_demo_data(folder: Path, rows: int, file_rows: int, dim: int) -> None:
    """A LAION-style parquet_npy folder: float16 unit-norm vectors + url/caption/key metadata.

    ``folder`` is replaced if it exists.  The data are the same for the same arguments (seed 0).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(0, rows, file_rows)):
        n = min(file_rows, rows - start)
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", x.astype(np.float16))
        keys = [f"{i:05d}{j:04d}" for j in range(n)]
        pq.write_table(
            pa.table(
                {
                    "url": [f"https://example.org/images/{k}.jpg" for k in keys],
                    "caption": [f"generated sample {k}" for k in keys],
                    "key": keys,
                }
            ),
            folder / "metadata" / f"metadata_{i}.parquet",
        )


def plot_histogram(hist: np.ndarray, path: Path, title: str) -> bool:
    """Write the score histogram (100 bins, log scale) to ``path`` as a PNG.

    ``hist`` is the job summary's fine histogram (a multiple of 100 bins over [0, 1]).  Returns
    False, with a warning, where matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'nsfw-dask[bench]'); no histogram PNG")
        return False
    coarse = hist.reshape(100, -1).sum(axis=1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(100) / 100 + 0.005, coarse, width=0.01)
    ax.set_yscale("log")
    ax.set_xlabel("nsfw_score")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
