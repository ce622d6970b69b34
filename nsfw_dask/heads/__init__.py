"""LAION's CLIP heads, as data: one :class:`HeadSpec` per head (no torch here).

A head is its name, the score column it writes, its weights per CLIP model (a
:class:`~nsfw_dask._specs.ModelSpec`: file, pinned URL, SHA-256), how its input is prepared, the
range its scores live in, and a one-line description.  Everything else works for every head from
this table: the forward runner (:mod:`nsfw_dask._forward`), weights resolution, verification and
offline copies (:mod:`nsfw_dask.weights`), the model cache and worker plugin, the job's
description, resume checks and summary.  Adding a head is one entry here, plus its torch module
in this package if none of the existing ones reads its weights.

========================  ================================================================
head                      what it is
========================  ================================================================
``nsfw``                  LAION's CLIP-based NSFW detector (NeMo Curator's port; ``exact``:
                          LAION's original model).  Sigmoid, 0 = safe, 1 = NSFW.
                          Modules: :mod:`nsfw_dask.models`, :mod:`nsfw_dask.exact`.
``aesthetic``             LAION's improved aesthetic predictor ("aesthetic v2",
                          ``sac+logos+ava1-l14-linearMSE.pth``): Linear 768-1024-128-64-16-1,
                          no activation, on L2-normalised embeddings.  Scores ~1-10.
                          Module: :mod:`nsfw_dask.heads.aesthetic`.
``aesthetic-v1``          LAION's first aesthetic predictor (``nn.Linear(768|512, 1)``) on
                          L2-normalised embeddings: the ``aesthetic`` column of LAION-5B.
========================  ================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .._specs import HEAD_WEIGHT_SPECS, MODEL_SPECS, ModelSpec, get_spec

__all__ = ["HEADS", "HeadSpec", "get_head", "parse_heads"]


@dataclass(frozen=True)
class HeadSpec:
    """One head: its name, score column, weights per CLIP model, preprocessing, output range."""

    name: str
    score_column: str
    #: CLIP model name ("vit-l-14", "vit-b-32") -> the weights' :class:`ModelSpec`
    weights: Mapping[str, ModelSpec]
    #: True: the head L2-normalises each embedding itself (its upstream inference code does);
    #: False: it scores the embedding as given, and the norm check applies (``normalize=`` opts in)
    normalizes: bool
    #: What a zero vector scores under the head's own normalisation: "nan" (``x / x.norm()``: 0/0)
    #: or "bias" (upstream replaces a zero norm by 1: the head's value at 0).  Heads that do not
    #: normalise follow ``normalize=``: a zero vector gets NaN there.
    zero_norm: str
    #: The range its scores are summarised over (histogram bins, quantiles); outside it is clipped
    output_range: tuple[float, float]
    #: One line for ``--help`` and the docs: what it is, where its weights come from
    description: str
    #: Rows whose score passes this are what LAION's published subsets kept (documentation only)
    laion_filter: str = ""

    def spec_for(self, model: str) -> ModelSpec:
        """The weights for CLIP ``model``; a one-line error naming the models this head has."""
        clip = get_spec(model).name  # "l14" -> "vit-l-14"; an unknown model: its own error
        spec = self.weights.get(clip)
        if spec is None:
            raise ValueError(
                f"The {self.name!r} head has no weights for {clip} embeddings; it scores "
                f"{', '.join(sorted(self.weights))} embeddings. Score {clip} embeddings with another head, "
                "or pass model= one of those."
            )
        return spec

    def clip_models(self) -> list[str]:
        return sorted(self.weights)


HEADS: dict[str, HeadSpec] = {
    "nsfw": HeadSpec(
        name="nsfw",
        score_column="nsfw_score",
        weights=MODEL_SPECS,
        normalizes=False,
        zero_norm="nan",
        output_range=(0.0, 1.0),
        description=(
            "LAION's CLIP-based NSFW detector (punsafe: 0 safe .. 1 NSFW), NeMo Curator's port; "
            "github.com/LAION-AI/CLIP-based-NSFW-Detector (MIT)"
        ),
        laion_filter="punsafe < 0.5",
    ),
    "aesthetic": HeadSpec(
        name="aesthetic",
        score_column="aesthetic_score",
        weights={"vit-l-14": HEAD_WEIGHT_SPECS["aesthetic-vit-l-14"]},
        normalizes=True,
        zero_norm="bias",
        output_range=(0.0, 10.0),
        description=(
            "LAION's improved aesthetic predictor (aesthetic v2, ~1..10; NeMo Curator's AestheticScorer), "
            "ViT-L/14 only; github.com/christophschuhmann/improved-aesthetic-predictor (Apache-2.0)"
        ),
        laion_filter="aesthetic > 5 (Stable Diffusion's improved-aesthetics subsets)",
    ),
    "aesthetic-v1": HeadSpec(
        name="aesthetic-v1",
        score_column="aesthetic_v1_score",
        weights={
            "vit-l-14": HEAD_WEIGHT_SPECS["aesthetic-v1-vit-l-14"],
            "vit-b-32": HEAD_WEIGHT_SPECS["aesthetic-v1-vit-b-32"],
        },
        normalizes=True,
        zero_norm="nan",
        output_range=(0.0, 10.0),
        description=(
            "LAION's aesthetic predictor v1 (linear, ~1..10; the 'aesthetic' column of LAION-5B and its "
            "laion-aesthetic / laion-art subsets); github.com/LAION-AI/aesthetic-predictor (MIT)"
        ),
        laion_filter="aesthetic > 7 (laion-aesthetic), > 8 (laion-art)",
    ),
}


def get_head(name: str | HeadSpec) -> HeadSpec:
    """The :class:`HeadSpec` called ``name`` (``"nsfw"``, ``"aesthetic"``, ``"aesthetic-v1"``)."""
    if isinstance(name, HeadSpec):
        return name
    key = str(name).strip().lower().replace("_", "-")
    head = HEADS.get(key)
    if head is None:
        raise ValueError(f"Expected a head among {sorted(HEADS)} but got {name!r}.")
    return head


def parse_heads(heads: str | Iterable[str | HeadSpec]) -> tuple[HeadSpec, ...]:
    """``"nsfw,aesthetic"`` or ``("nsfw", "aesthetic")`` -> the head specs, in that order, each once."""
    items = [h for h in heads.split(",")] if isinstance(heads, str) else list(heads)
    out: list[HeadSpec] = []
    for h in items:
        if isinstance(h, str) and not h.strip():
            continue
        spec = get_head(h)
        if spec in out:
            raise ValueError(f"The {spec.name!r} head is listed twice in heads={heads!r}.")
        out.append(spec)
    if not out:
        raise ValueError(f"Expected at least one head among {sorted(HEADS)} but got heads={heads!r}.")
    return tuple(out)
