"""A process-wide reduced float32 matmul precision (TF32, bfloat16) is refused, not scored with.

``torch.set_float32_matmul_precision("medium")`` (common in training code) makes torch compute
float32 matmuls on CPUs with bfloat16 support (AMX, AVX512-BF16) in bfloat16: measured on an
Intel Xeon, NeMo's port then moves by up to 0.066 on the L/14 reference set.  ``"high"`` /
``allow_tf32`` does the same with TF32 on a GPU (~1e-3).  Scoring raises
``ReducedPrecisionError`` with the fix instead of returning such scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REFERENCE_DIR

from nsfw_dask import ReducedPrecisionError, load_model, score_nsfw
from nsfw_dask._forward import _matmul_precision, check_matmul_precision

from _frames import make_frame

pytestmark = pytest.mark.weights


@pytest.fixture
def restore_precision():
    yield
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert _matmul_precision("cpu") == "ieee" and _matmul_precision("cuda") == "ieee"


@pytest.fixture(scope="module")
def x300() -> np.ndarray:
    return np.ascontiguousarray(np.load(REFERENCE_DIR / "l14_reference.npz")["inputs"][:300])


@pytest.fixture(scope="module")
def frame(x300) -> pd.DataFrame:
    return make_frame({"emb": x300}, index=pd.RangeIndex(100, 400))


def test_default_precision_is_full() -> None:
    assert _matmul_precision("cpu") == "ieee"
    assert _matmul_precision("cuda") == "ieee"
    check_matmul_precision(torch.device("cpu"))


@pytest.mark.parametrize(("setting", "prec"), [("medium", "bf16"), ("high", "tf32")])
def test_lowered_precision_is_refused_with_the_fix(frame, restore_precision, setting, prec) -> None:
    before = score_nsfw(frame, model="vit-l-14")["nsfw_score"].to_numpy()
    torch.set_float32_matmul_precision(setting)
    with pytest.raises(ReducedPrecisionError) as e:
        score_nsfw(frame, model="vit-l-14")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"set to {prec}" in msg and "torch.set_float32_matmul_precision('highest')" in msg
    torch.set_float32_matmul_precision("highest")
    after = score_nsfw(frame, model="vit-l-14")
    np.testing.assert_array_equal(after["nsfw_score"].to_numpy(), before)  # same process: bitwise
    assert after.index.equals(frame.index)


def test_the_setting_the_kernels_read_decides(restore_precision) -> None:
    """Legacy "medium", then the new API's CPU leaf back to "ieee": CPU matmuls are full float32
    again (what ``addmm`` does), so scoring on CPU is allowed; CUDA's TF32 is still on."""
    torch.set_float32_matmul_precision("medium")
    assert _matmul_precision("cpu") == "bf16"
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    assert _matmul_precision("cpu") == "ieee"
    check_matmul_precision(torch.device("cpu"))
    assert _matmul_precision("cuda") == "tf32"


def test_tf32_on_cuda_is_refused_without_a_gpu(restore_precision) -> None:
    """The CUDA switch is read the same way (the flag exists in CPU builds too)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    with pytest.raises(ReducedPrecisionError, match="on cuda are set to tf32"):
        check_matmul_precision(torch.device("cuda"))
    check_matmul_precision(torch.device("cpu"))  # TF32 on CUDA leaves CPU matmuls alone


def test_the_refusal_guards_a_real_error(x300, restore_precision) -> None:
    """Where the CPU has bfloat16 (AMX/AVX512-BF16), "medium" really changes the head's scores."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16 matmul: 'medium' changes nothing here")
    head = load_model("vit-l-14")
    x = torch.from_numpy(x300.copy())
    with torch.inference_mode():
        full = head(x).view(-1)
        torch.set_float32_matmul_precision("medium")
        low = head(x).view(-1)
    assert float((full - low).abs().max()) > 1e-4  # far outside the contract's 1e-5
