"""The exactness contract of the default mode, checked on the CPU at hand (README, "Exactness").

1. **Deterministic** (``tests/test_determinism.py``): bitwise identical scores for any batch size,
   partitioning, thread and worker count, on one machine.
2. **Within 1e-5 of NeMo Curator's port**: NeMo's ``NSFWModel`` (``nsfw_dask.models.NSFWModel``
   is its code) computed here, in this process, at the batch sizes its scorer is called with, and
   the stored ``nemo_scores`` (computed on another CPU: compared within the same 1e-5, never bit
   for bit; their last bits follow that CPU's BLAS kernels).
3. **No less accurate than NeMo's port** against a float64 evaluation of the same network, both
   computed here (with this CPU's kernels) at the same GEMM shape: mean errors on the unit-norm
   rows and on all rows, maximum errors on the unit-norm rows.

Why item 3 compares *mean* errors, and the maximum only with slack: a score's float32 error is
rounding noise, and the largest error over a few thousand rows is set by one or two rows.  NeMo's
own port moves its maximum from 2.6e-6 (batch 1) to 4.3e-6 (batch 256) on the reference set, and
on 20,000 fresh raw Gaussian rows ours was 1.41e-5 where NeMo's was 1.22e-5 while on 20,000 unit
ones ours was 6.4e-7 where NeMo's was 7.9e-7 (same mean errors within 2 %): the maximum alone
cannot tell two equally accurate implementations apart.  The mean over thousands of rows can:
the fully folded head (mean subtracted through the bias, not per element) is 30-50 % worse in
mean on the CLIP-like groups, and ``test_the_criterion_rejects_the_fully_folded_head`` shows the
criterion catches it.

Run with ``-rA -s`` to see the side-by-side table (docs/exact.md quotes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REFERENCE_DIR

from nsfw_dask import load_model, score_nsfw
from nsfw_dask.models import NSFWModel

from _frames import make_frame

pytestmark = pytest.mark.weights

#: Contract item 2: on unit-norm embeddings (what CLIP heads are given) NeMo's port and ours
#: stay within this of each other on every CPU and GPU measured (4.2e-7 on an Intel Xeon).
TOL_NEMO = 1e-5
#: Raw, unnormalised rows (norm ~27, the "forgot to normalise" case) amplify float32 rounding:
#: NeMo's port moves by 3.5e-6 between its own batch sizes, ours is 7.2e-6 from NeMo's batch-1
#: scores on an Intel Xeon, and CPU vs GPU differed by 3.0e-5 on such rows (GPU_RUN.md).
TOL_NEMO_RAW = 5e-5
#: Contract item 3: mean error over a group of >= 1,000 rows may exceed NeMo's by this factor
#: (rounding noise in a mean of that many rows is a few %, the fully folded head's loss 30-50 %).
MEAN_SLACK = 1.10
#: ... and the largest error by this factor (extreme-value noise, see the module docstring).
MAX_SLACK = 1.5

HEADS = {"l14": "vit-l-14", "b32": "vit-b-32"}


@dataclass
class Reference:
    tag: str
    model: str
    x: np.ndarray
    group: np.ndarray  # the reference set's group name per row
    f64: np.ndarray  # float64 evaluation of the same network (NaN where it gives NaN)

    @property
    def unit(self) -> np.ndarray:
        """Rows with (near) unit-norm embeddings: every group but ``raw_gaussian``."""
        return self.group != "raw_gaussian"


def _groups(tag: str, rows: np.ndarray) -> np.ndarray:
    spec = json.loads((REFERENCE_DIR / f"{tag}_groups.json").read_text())
    name = np.empty(len(rows), dtype=object)
    for g in spec["groups"]:
        name[(rows >= g["start"]) & (rows < g["stop"])] = g["name"]
    assert not any(v is None for v in name)
    return name


def _float64(model: str, x: np.ndarray) -> np.ndarray:
    head = load_model(model)
    h64 = NSFWModel(model).double()
    h64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    with torch.inference_mode():
        return h64(torch.from_numpy(x).double()).view(-1).numpy()


@pytest.fixture(scope="module", params=sorted(HEADS))
def ref(request) -> Reference:
    tag = request.param
    data = np.load(REFERENCE_DIR / f"{tag}_reference.npz")
    x = np.ascontiguousarray(data["inputs"])
    return Reference(tag, HEADS[tag], x, _groups(tag, data["rows"]), _float64(HEADS[tag], x))


def nemo_port(model: str, x: np.ndarray, batch_size: int) -> np.ndarray:
    """NeMo Curator's ``NSFWModel.forward`` in float32, batch by batch, computed here."""
    head = load_model(model)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        return torch.cat([head(xt[i : i + batch_size]) for i in range(0, len(x), batch_size)]).view(-1).numpy()


def ours(model: str, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    df = make_frame({"emb": x}, index=pd.RangeIndex(len(x)))
    return score_nsfw(df, model=model, batch_size=batch_size)["nsfw_score"].to_numpy(np.float32)


def errors(scores: np.ndarray, f64: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    ok = rows & ~np.isnan(f64)
    e = np.abs(scores.astype(np.float64) - f64)[ok]
    return float(e.max()), float(e.mean())


def test_within_1e5_of_nemo_port_computed_here(ref: Reference) -> None:
    got = ours(ref.model, ref.x)
    for bs in (1, 256, len(ref.x)):
        nemo = nemo_port(ref.model, ref.x, bs)
        assert np.array_equal(np.isnan(got), np.isnan(nemo))
        d = np.abs(got.astype(np.float64) - nemo)
        assert np.nanmax(d[ref.unit]) <= TOL_NEMO, f"{ref.tag}, NeMo at batch {bs}: {np.nanmax(d[ref.unit]):.3g}"
        assert np.nanmax(d) <= TOL_NEMO_RAW, f"{ref.tag}, NeMo at batch {bs}, raw rows: {np.nanmax(d):.3g}"
        print(
            f"{ref.tag}: ours vs NeMo's port at batch {bs}: max |diff| {np.nanmax(d):.2e}, "
            f"unit-norm rows {np.nanmax(d[ref.unit]):.2e}"
        )


def test_within_1e5_of_stored_nemo_scores(l14_ref: dict[str, np.ndarray]) -> None:
    """The stored scores come from an AMD EPYC (AVX2): another CPU's kernels, so 1e-5, not bits."""
    got = ours("vit-l-14", np.ascontiguousarray(l14_ref["inputs"]))
    np.testing.assert_allclose(got, l14_ref["nemo_scores"], rtol=0, atol=TOL_NEMO)


def _side_by_side(ref: Reference, candidates: dict[str, np.ndarray]) -> dict[str, dict[str, tuple[float, float]]]:
    table: dict[str, dict[str, tuple[float, float]]] = {}
    sets = {"unit-norm": ref.unit, "raw": ~ref.unit, "all": np.ones(len(ref.x), bool)}
    for name, s in candidates.items():
        table[name] = {k: errors(s, ref.f64, rows) for k, rows in sets.items() if rows.any()}
    print(f"\n{ref.tag}: |score - float64| max / mean")
    for name, row in table.items():
        print(f"  {name:18s}" + "  ".join(f"{k}: {mx:.2e} / {mn:.2e}" for k, (mx, mn) in row.items()))
    return table


def test_no_less_accurate_than_nemo_port(ref: Reference) -> None:
    """Against NeMo's port at the same GEMM shape as ours: the whole set as one batch (our default
    batch covers it; NeMo Curator 0.x scores a partition as one batch).  Batches 1 and 256 are
    printed beside it: MKL computes short GEMMs with other kernels, which on some code paths are
    more accurate (AVX2 with 2 threads: NeMo's module at 256 rows 4.1e-9 mean error on 20,000 unit
    rows, at 4,096 rows 5.0e-9, ours 5.0e-9, an unfolded variant of ours 5.0e-9: a property of the
    shape, not of the folded division)."""
    nemo = {bs: nemo_port(ref.model, ref.x, bs) for bs in (1, 256, len(ref.x))}
    got = {None: ours(ref.model, ref.x), 1: ours(ref.model, ref.x[:300], 1)}  # batch 1: 300 rows suffice
    assert np.array_equal(got[1].view(np.uint32), got[None][:300].view(np.uint32))  # item 1, in passing
    candidates = {"NeMo, batch 1": nemo[1], "NeMo, batch 256": nemo[256], "NeMo, one batch": nemo[len(ref.x)]}
    table = _side_by_side(ref, {**candidates, "nsfw_dask": got[None]})
    mine, theirs = table["nsfw_dask"], table["NeMo, one batch"]
    for rows in ("unit-norm", "all"):
        assert mine[rows][1] <= MEAN_SLACK * theirs[rows][1], (
            f"{ref.tag} {rows}: mean error {mine[rows][1]:.3g} vs {theirs[rows][1]:.3g}"
        )
    # the maximum only on the unit-norm rows: on the 128 raw rows (norm ~27) it is one row's
    # rounding luck (on 20,000 raw rows ours was 1.41e-5 and NeMo's 1.22e-5, mean errors equal)
    assert mine["unit-norm"][0] <= MAX_SLACK * theirs["unit-norm"][0], (
        f"{ref.tag}: max error {mine['unit-norm'][0]:.3g} vs {theirs['unit-norm'][0]:.3g}"
    )


def _fully_folded(model: str, x: np.ndarray) -> np.ndarray:
    """The head with the normalization folded into the first layer entirely (weights *and* bias
    from float64): what ``nsfw_dask._forward`` does NOT do."""
    head = load_model(model)
    std = head.norm.variance.double().sqrt()
    w1 = head.linear_1.weight.double() / std
    b1 = (head.linear_1.bias.double() - w1 @ head.norm.mean.double()).float()
    layers = [(w1.float(), b1)] + [
        (getattr(head, f"linear_{i}").weight, getattr(head, f"linear_{i}").bias) for i in range(2, head.n_linear + 1)
    ]
    out = []
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        for i in range(0, len(x), 256):
            h = xt[i : i + 256]
            for j, (w, b) in enumerate(layers):
                h = torch.addmm(b, h, w.t())
                if j < len(layers) - 1:
                    h = h.relu()
            out.append(torch.sigmoid(h.view(-1)))
    return torch.cat(out).numpy()


@pytest.fixture(scope="module")
def l14(l14_ref) -> Reference:
    x = np.ascontiguousarray(l14_ref["inputs"])
    return Reference("l14", "vit-l-14", x, _groups("l14", l14_ref["rows"]), _float64("vit-l-14", x))


def test_the_criterion_rejects_the_fully_folded_head(l14: Reference) -> None:
    """The accuracy test has teeth: on the CLIP-like rows (drawn around LAION's normalization mean,
    as real embeddings are; the groups synthetic_fp16 and spread of the L/14 set) the fully folded
    head loses the per-element exactness of ``x - mean``."""
    ref = l14
    clip_like = np.isin(ref.group, ["synthetic_fp16", "spread"])
    nemo = errors(nemo_port(ref.model, ref.x, 256), ref.f64, clip_like)
    folded = errors(_fully_folded(ref.model, ref.x), ref.f64, clip_like)
    mine = errors(ours(ref.model, ref.x), ref.f64, clip_like)
    print(f"\nCLIP-like rows, mean |error|: NeMo {nemo[1]:.2e}, fully folded {folded[1]:.2e}, nsfw_dask {mine[1]:.2e}")
    assert folded[1] > MEAN_SLACK * nemo[1] >= mine[1]
