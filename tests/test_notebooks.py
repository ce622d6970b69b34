"""The notebooks: 01 (CPU, LocalCluster) runs end to end here; 02 (GPU) is checked statically.

Both are stored without outputs.  02 needs a CUDA GPU and was never executed by the authors, so
only its structure is tested: valid nbformat, a first cell that states its requirements, and
code cells that parse.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CPU_NB = NOTEBOOKS / "01_cpu_localcluster.ipynb"
GPU_NB = NOTEBOOKS / "02_gpu_localcudacluster.ipynb"


def _read(path: Path) -> Any:
    return nbformat.read(path, as_version=4)


def _python_source(cell_source: str) -> str:
    """A code cell's source with IPython magics / shell escapes blanked (line numbers kept)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell_source.splitlines())


def _tagged(nb: Any, tag: str) -> Any:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell: Any) -> str:
    return "".join(
        o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream" and o.get("name") == "stdout"
    )


def _errors(nb: Any) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "error"
    ]


@pytest.mark.parametrize("path", [CPU_NB, GPU_NB], ids=lambda p: p.stem)
def test_notebook_stored_without_outputs(path: Path) -> None:
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{path.name}: code cell {i} has stored outputs"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"
        ast.parse(_python_source(cell.source), filename=f"{path.name}[code cell {i}]")


def test_gpu_notebook_is_valid() -> None:
    nb = _read(GPU_NB)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    text = first.source.lower()
    for needle in (
        "cuda gpu",
        "gpu-cu12",
        "gpu-cu13",
        "nsfw_dask_model_dir",
        "internet",
        "not executed by the authors",
    ):
        assert needle in text, f"first cell of {GPU_NB.name} does not mention {needle!r}"
    sources = []
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        src = _python_source(cell.source)
        ast.parse(src, filename=f"{GPU_NB.name}[code cell {i}]")
        sources.append(src)
    code = "\n".join(sources)
    for needle in (
        "local_cuda_cluster()",
        'NSFWModelPlugin(device="cuda")',
        '"dataframe.backend": "cudf"',
        "map_partitions(score_nsfw)",
        "data_ptr()",
        "list.leaves.values",
        "torch.cuda.synchronize()",
        "batch_size=bs",
        "cluster.close()",
    ):
        assert needle in code, f"{GPU_NB.name} lost {needle!r}"


@pytest.mark.weights
def test_cpu_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # jupyter_core < 5.8 warns (DeprecationWarning) at import unless this is set; harmless later
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    assert os.environ.get("NSFW_DASK_MODEL_DIR"), "conftest sets it when the weights are found"

    # The kernel must be this interpreter (this venv), whatever kernelspecs the user has
    # installed: a "python3" spec on JUPYTER_PATH comes before user and system ones.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (nsfw_dask tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless, as on CI: the notebook must not need a display
    workdir = tmp_path / "run"
    workdir.mkdir()

    nb = _read(CPU_NB)
    probe = nbformat.v4.new_code_cell(
        "import json, os, sys\n"
        "print(json.dumps({'executable': sys.executable, 'prefix': sys.prefix,"
        " 'model_dir': os.environ.get('NSFW_DASK_MODEL_DIR')}))"
    )
    nb.cells.insert(0, probe)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    t0 = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - t0
    assert not _errors(nb), _errors(nb)

    seen = json.loads(_stdout(nb.cells[0]))
    assert seen["executable"] == sys.executable and seen["prefix"] == sys.prefix, seen
    assert seen["model_dir"] == os.environ["NSFW_DASK_MODEL_DIR"], seen

    out = _stdout(_tagged(nb, "throughput"))
    m = re.search(r"scoring throughput: ([\d,]+) rows/s \(([\d,]+) rows", out)
    assert m, out
    rate, rows = (int(g.replace(",", "")) for g in m.groups())
    assert rate > 0 and rows > 0, out
    assert re.search(r"end-to-end throughput: [\d,]+ rows/s", out), out

    out = _stdout(_tagged(nb, "filter"))
    m = re.search(r"kept ([\d,]+) of ([\d,]+) rows", out)
    assert m, out
    kept, total = (int(g.replace(",", "")) for g in m.groups())
    assert total == rows and 0 < kept <= total, out

    hist = _tagged(nb, "histogram")
    assert any("image/png" in o.get("data", {}) for o in hist.outputs), hist.outputs
    m = re.search(r"([\d,]+) rows in the histogram", _stdout(hist))
    assert m and int(m.group(1).replace(",", "")) == rows, _stdout(hist)

    out = _stdout(_tagged(nb, "cache-info"))
    assert "model loads per worker: [1, 1]" in out, out

    assert list(workdir.iterdir()) == [], "the notebook wrote into its working directory"
    print(f"01_cpu_localcluster.ipynb executed in {elapsed:.1f} s; scoring {rate:,} rows/s")
