"""The LAION heads' identities: shapes, weights files, pinned URLs and digests (no torch).

:data:`MODEL_SPECS` is the one place where the pinned digests and URLs live.  This module imports
nothing heavy, so the client side of the job (planning, the CLI, ``score_dataset`` with a remote
cluster) validates ``model`` and resolves weights without importing torch;
:mod:`nsfw_dask.models` re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEAD_WEIGHT_SPECS", "MODEL_SPECS", "KerasSpec", "ModelSpec", "get_spec"]

_LAION_COMMIT = "d499e9c87c68f1abf5418caef823c7b609714ca3"
_LAION_RAW = f"https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/{_LAION_COMMIT}/models"
# LAION's original AutoKeras SavedModels (``exact=True``), pinned to the commit that added them.
_LAION_KERAS_COMMIT = "d6bb8fe31fd4aecbfed7dfb62df4fe5858bfc014"
_LAION_KERAS_RAW = f"https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/{_LAION_KERAS_COMMIT}"


@dataclass(frozen=True)
class KerasSpec:
    """LAION's original AutoKeras SavedModel for one head: where its vocabularies come from.

    ``columns`` are the MultiCategoryEncoding columns (checked against the SavedModel's own
    metadata when it is read); ``vocab_digest`` pins what is extracted from it (see
    :func:`nsfw_dask.vocabulary.vocabulary_digest`), so a reader bug or a changed file cannot go
    unnoticed.
    """

    filename: str
    url: str
    sha256: str
    columns: tuple[int, ...]
    vocab_digest: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything that identifies one LAION head: shape, weights file, where to get it.

    :data:`MODEL_SPECS` is the one place where the pinned digests and URLs live: ``sha256`` of
    LAION's ``.pth`` bytes, ``content_digest`` of its tensors, and (``keras``) the SHA-256 and
    vocabulary digest of LAION's original SavedModel zip; :mod:`nsfw_dask.weights` and
    :mod:`nsfw_dask.vocabulary` read them from here.
    """

    name: str
    clip_model: str
    layers: tuple[int, ...]  # input dim, hidden dims..., 1
    filename: str
    url: str
    sha256: str
    # Other names the same weights are published under (NeMo Curator's layout), relative to a
    # model folder.  Their bytes are not pinned, so they are verified by tensor content instead.
    alias_paths: tuple[str, ...] = ()
    model_id: str = ""
    keras: KerasSpec | None = None
    # Digest of the tensors (names, dtypes, shapes, bytes; see
    # :func:`nsfw_dask.weights.state_dict_digest`) of LAION's file: accepts the same weights
    # stored under other names or containers (``alias_paths``).
    content_digest: str = ""
    # Which head these weights are (:mod:`nsfw_dask.heads`) and which module reads them:
    # "nsfw" (Normalization + Linear/ReLU MLP + sigmoid), "mlp" (Linear layers, no activation:
    # LAION's improved aesthetic predictor), "linear" (one nn.Linear: aesthetic v1).
    head: str = "nsfw"
    module: str = "nsfw"
    # What the file is, for messages ("LAION's CLIP ViT-L/14 NSFW head"); default from clip_model.
    title: str = ""

    @property
    def dim(self) -> int:
        return self.layers[0]

    @property
    def what(self) -> str:
        return self.title or f"LAION's {self.clip_model} NSFW head"

    @property
    def fetch_command(self) -> str:
        """The ``nsfw-dask fetch-weights`` command that gets this file."""
        clip = self.name if self.head == "nsfw" else "vit-" + self.name.rsplit("-vit-", 1)[1]
        return f"nsfw-dask fetch-weights --heads {self.head} --model {clip}"


MODEL_SPECS: dict[str, ModelSpec] = {
    "vit-l-14": ModelSpec(
        name="vit-l-14",
        clip_model="CLIP ViT-L/14",
        layers=(768, 64, 512, 256, 1),
        filename="clip_ViT-L-14_openai_binary_nsfw_head.pth",
        url=f"{_LAION_RAW}/clip_ViT-L-14_openai_binary_nsfw_head.pth",
        sha256="fc4d70d2eea4e948d13bc27bf7114f5e8d3bd317eb01a4b49b35dcf1a3d672c6",
        alias_paths=(
            "laion/clip-autokeras-binary-nsfw/clip_autokeras_binary_nsfw.pth",
            "clip_autokeras_binary_nsfw.pth",
        ),
        model_id="laion/clip-autokeras-binary-nsfw",
        keras=KerasSpec(
            filename="clip_autokeras_binary_nsfw.zip",
            url=f"{_LAION_KERAS_RAW}/clip_autokeras_binary_nsfw.zip",
            sha256="905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a",
            columns=(180, 316, 413, 440, 644),
            vocab_digest="9c5038d5a44e6061bfd30dcf6dd4ca88462d1290dd86e557ab888f0d79d399c0",
        ),
        content_digest="a30f02c2948427679a46f2bfc4cfb14bf0ef5cde1702489edbe9f5595dfec905",
    ),
    "vit-b-32": ModelSpec(
        name="vit-b-32",
        clip_model="CLIP ViT-B/32",
        layers=(512, 32, 32, 1),
        filename="clip_ViT-B-32_openai_binary_nsfw_head.pth",
        url=f"{_LAION_RAW}/clip_ViT-B-32_openai_binary_nsfw_head.pth",
        sha256="615f35e1364b40b14c30e770544345b82d8e558240692ad72eb8eafa466ef25c",
        model_id="laion/clip-autokeras-nsfw-b32",
        keras=KerasSpec(
            filename="clip_autokeras_nsfw_b32.zip",
            url=f"{_LAION_KERAS_RAW}/clip_autokeras_nsfw_b32.zip",
            sha256="78715ab9d64485167e8c9ade3b8e6761a17a16c24d114bd47431ac1dab46462b",
            columns=(92, 133, 312),
            vocab_digest="f7e6471095ed3ba40d552a346f6bb45895c24ac5f71d8de2f86db3e66e19890a",
        ),
        content_digest="0379fc5fa09f17171c61d1782e290d33f80c87e4716981dfb5b5b9984054fe5f",
    ),
}

# LAION's aesthetic predictors (issue 22): the improved predictor ("aesthetic v2",
# christophschuhmann/improved-aesthetic-predictor, Apache-2.0) and the v1 linear heads
# (LAION-AI/aesthetic-predictor, MIT), pinned by commit.
_AESTHETIC_V2_RAW = (
    "https://raw.githubusercontent.com/christophschuhmann/improved-aesthetic-predictor/"
    "6934dd81792f086e613a121dbce43082cb8be85e"
)
_AESTHETIC_V1_RAW = (
    "https://raw.githubusercontent.com/LAION-AI/aesthetic-predictor/6d122adad522ab246644d9dc1c6d7a3810ee255f"
)

#: The other heads' weights, by name (``HEADS`` in :mod:`nsfw_dask.heads` says which CLIP model
#: each serves).  Same machinery as :data:`MODEL_SPECS`: resolved, verified and cached alike.
HEAD_WEIGHT_SPECS: dict[str, ModelSpec] = {
    "aesthetic-vit-l-14": ModelSpec(
        name="aesthetic-vit-l-14",
        clip_model="CLIP ViT-L/14",
        layers=(768, 1024, 128, 64, 16, 1),
        filename="sac+logos+ava1-l14-linearMSE.pth",
        url=f"{_AESTHETIC_V2_RAW}/sac%2Blogos%2Bava1-l14-linearMSE.pth",
        sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
        model_id="ttj/sac-logos-ava1-l14-linearMSE",
        content_digest="cfee2820c22136e3f247359bc007025bdeeb11f0ba26cc8a1abb750617e99d58",
        head="aesthetic",
        module="mlp",
        title="LAION's improved aesthetic predictor (CLIP ViT-L/14)",
    ),
    "aesthetic-v1-vit-l-14": ModelSpec(
        name="aesthetic-v1-vit-l-14",
        clip_model="CLIP ViT-L/14",
        layers=(768, 1),
        filename="sa_0_4_vit_l_14_linear.pth",
        url=f"{_AESTHETIC_V1_RAW}/sa_0_4_vit_l_14_linear.pth",
        sha256="2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
        content_digest="583166434fbf2d00681a8359fbcb48bea433d1d8fe6bd530ffbdd70b07ba4baa",
        head="aesthetic-v1",
        module="linear",
        title="LAION's aesthetic predictor v1 (CLIP ViT-L/14)",
    ),
    "aesthetic-v1-vit-b-32": ModelSpec(
        name="aesthetic-v1-vit-b-32",
        clip_model="CLIP ViT-B/32",
        layers=(512, 1),
        filename="sa_0_4_vit_b_32_linear.pth",
        url=f"{_AESTHETIC_V1_RAW}/sa_0_4_vit_b_32_linear.pth",
        sha256="c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f",
        content_digest="e6b9bd119e8742d8404da5527b28a3d6fb5b1ba9b7b6bb7b66162547939eb182",
        head="aesthetic-v1",
        module="linear",
        title="LAION's aesthetic predictor v1 (CLIP ViT-B/32)",
    ),
}

_ALIASES = {
    "vit-l-14": "vit-l-14",
    "vit-l/14": "vit-l-14",
    "l14": "vit-l-14",
    "vit_l_14": "vit-l-14",
    "vit-b-32": "vit-b-32",
    "vit-b/32": "vit-b-32",
    "b32": "vit-b-32",
    "vit_b_32": "vit-b-32",
}


def get_spec(model: str | ModelSpec) -> ModelSpec:
    """Return the :class:`ModelSpec` for ``model``: the NSFW head of ``"vit-l-14"`` or
    ``"vit-b-32"``, or another head's weights by their name in :data:`HEAD_WEIGHT_SPECS`."""
    if isinstance(model, ModelSpec):
        return model
    name = str(model).strip().lower()
    if name in HEAD_WEIGHT_SPECS:
        return HEAD_WEIGHT_SPECS[name]
    key = _ALIASES.get(name)
    if key is None:
        raise ValueError(
            f"Expected model to be one of {sorted(MODEL_SPECS)} but got {model!r}; "
            "'vit-l-14' scores 768-d CLIP ViT-L/14 embeddings, 'vit-b-32' 512-d ViT-B/32 ones."
        )
    return MODEL_SPECS[key]
