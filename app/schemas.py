"""Request and response bodies of the HTTP API (pydantic v2)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# ---- requests --------------------------------------------------------------------------------------------------

# Hard ceilings on every request field, above any allowed setting: validation never walks an absurd list or string.
# The configured limits (LRAEE_MAX_LABELS, LRAEE_MAX_LABEL_CHARS, ...) are tighter and are checked afterwards in
# ModelService.question, with messages that name them.
MAX_LIST_ITEMS = 10_000  # labels or templates (LRAEE_MAX_LABELS <= 10,000)
MAX_TEXT_CHARS = 1_000  # one label or template (LRAEE_MAX_LABEL_CHARS <= 200)
MAX_NAME_CHARS = 100  # an operating point's name
MAX_IMAGES = 1_024  # images of one batch (LRAEE_MAX_BATCH_IMAGES <= 1024)
MAX_IMAGE_CHARS = 1 << 30  # one base64 image; the body limit (LRAEE_MAX_INFLIGHT_BYTES) is far tighter
BoundedText = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Base64Image = Annotated[str, StringConstraints(max_length=MAX_IMAGE_CHARS)]
MAX_URL_CHARS = 8_192  # one image URL (signed object-store URLs run to a few thousand characters)
ImageUrlText = Annotated[str, StringConstraints(max_length=MAX_URL_CHARS)]


class ClassifyOptions(BaseModel):
    """What to classify against; shared by single and batch requests, JSON and multipart."""

    model_config = ConfigDict(extra="forbid")

    labels: list[BoundedText] = Field(
        max_length=MAX_LIST_ITEMS,
        description="Candidate labels (1..LRAEE_MAX_LABELS, unique, non-empty, at most LRAEE_MAX_LABEL_CHARS each)",
        examples=[["cat", "dog", "car"]],
    )
    templates: list[BoundedText] | None = Field(
        default=None,
        max_length=MAX_LIST_ITEMS,
        description="Prompt templates, each containing '{}' where the label goes; default: the checkpoint's "
        "calibration templates (GET /model: default_templates), else open_clip's 7 simple ImageNet templates",
        examples=[["a photo of a {}."]],
    )
    top_k: int = Field(default=5, description="Predictions returned (1..LRAEE_MAX_LABELS; capped at the label count)")
    operating_point: str | None = Field(
        default=None,
        max_length=MAX_NAME_CHARS,
        description="A stored operating point (see GET /model), or 'full' for the full-depth answer with no early "
        "exit; default: the checkpoint's default",
    )
    model: str | None = Field(
        default=None,
        max_length=MAX_NAME_CHARS,
        description="Which served model answers (GET /models); default: the first of LRAEE_CHECKPOINT",
        examples=["everyday"],
    )


class ClassifyJsonRequest(ClassifyOptions):
    """``POST /classify`` as JSON: the image as ``image`` (base64) or ``image_url``."""

    image: Base64Image | None = Field(default=None, description="The image file, base64 (plain or a data: URL)")
    image_url: ImageUrlText | None = Field(
        default=None,
        description="An http(s) URL the service fetches the image from (only when LRAEE_IMAGE_URLS is on)",
    )


class BatchJsonRequest(ClassifyOptions):
    """``POST /classify/batch`` as JSON."""

    images: list[Base64Image] = Field(
        max_length=MAX_IMAGES, description="Image files, base64 (plain or data: URLs); 1..LRAEE_MAX_BATCH_IMAGES"
    )


# Hugging Face zero-shot-image-classification task (POST /compat/huggingface): the shapes its clients send.
_HF_LABELS = "Candidate labels: a list, or one comma-separated string (what older huggingface_hub releases send)"


class HuggingFaceParameters(BaseModel):
    """``parameters`` of the Hugging Face task."""

    model_config = ConfigDict(extra="forbid")

    candidate_labels: list[str] | str | None = Field(default=None, description=_HF_LABELS)
    hypothesis_template: str | None = Field(
        default=None,
        description="The request's one prompt template, '{}' where the label goes (e.g. 'This is a photo of {}.'); "
        "default: the checkpoint's calibration templates, as on /classify",
    )
    operating_point: str | None = Field(
        default=None, description="LRA-EE extension: a stored threshold set (see GET /model)"
    )
    model: str | None = Field(
        default=None, description="LRA-EE extension: a served model (GET /models); or ?model= on the URL"
    )


class HuggingFaceInputs(BaseModel):
    """``inputs`` as an object: the older task schema, and what ``@huggingface/inference`` sends."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="The image file, base64 (plain or a data: URL), or an http(s) URL")
    candidate_labels: list[str] | str | None = Field(default=None, description=_HF_LABELS)


class HuggingFaceRequest(BaseModel):
    """``POST /compat/huggingface``: the image in ``inputs`` (or top-level ``image``), the labels in ``parameters``
    (or in ``inputs``)."""

    model_config = ConfigDict(extra="forbid")

    inputs: str | HuggingFaceInputs | None = Field(
        default=None, description="The image file as base64 or an http(s) URL, or {image, candidate_labels}"
    )
    image: str | None = Field(
        default=None, description="The image as base64 (older huggingface_hub releases send this)"
    )
    parameters: HuggingFaceParameters = Field(default_factory=HuggingFaceParameters)
    options: dict[str, Any] | None = Field(
        default=None, description="The serverless API's options (wait_for_model, use_cache): accepted, ignored"
    )


# OpenAI's embeddings (POST /v1/embeddings): what its SDK and the libraries built on it send.
EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's request, plus ``modality`` (Infinity's convention; the OpenAI SDK sends it
    through ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    input: EmbeddingInput = Field(
        description="A text or a list of them; with modality 'image', images as data: URIs, base64, or http(s) URLs "
        "(when LRAEE_IMAGE_URLS is on). Token-id arrays are not supported",
        examples=[["a photo of a cat.", "a photo of a dog."]],
    )
    model: str | None = Field(
        default=None, max_length=MAX_NAME_CHARS, description="A served model (GET /v1/models); default: the first"
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'float': lists of numbers; 'base64': little-endian float32 bytes, base64"
    )
    dimensions: int | None = Field(
        default=None, description="Must equal the model's embedding width when given (no shortening)"
    )
    modality: Literal["text", "image"] | None = Field(
        default=None,
        description="'image': every input is an image. Default: images when every input is a data:image/... URI, "
        "else texts",
    )
    user: str | None = Field(default=None, max_length=MAX_TEXT_CHARS, description="OpenAI's end-user id: ignored")


# ---- responses -------------------------------------------------------------------------------------------------


class PredictionOut(BaseModel):
    """One label and its probability over the request's label set."""

    label: str
    score: float


class Timing(BaseModel):
    """Where the request's time went, in milliseconds."""

    decode: float = Field(description="Decoding and preprocessing this image")
    queue: float = Field(description="Waiting for its engine batch to start")
    inference: float = Field(description="The engine batch this image was part of")


class ClassifyResponse(BaseModel):
    """The answer for one image."""

    predictions: list[PredictionOut] = Field(description="Top-k labels, highest score first")
    exit_layer: int = Field(description="1-based layer the answer came from (num_layers on the full-depth path)")
    num_layers: int = Field(description="Blocks in the vision tower")
    exited_early: bool = Field(description="True when the image skipped at least one block")
    exit_path: Literal["head", "full"] = Field(description="'head': an exit head answered; 'full': the CLIP path")
    gate_probability: float | None = Field(description="The gate's probability at the exit layer (null on 'full')")
    flops: float = Field(description="GFLOPs spent on this image, heads and gates included")
    flops_saved: float = Field(description="Fraction of full-depth FLOPs not spent (negative if heads cost more)")
    operating_point: str = Field(description="The operating point actually used")
    model: str = Field(description="The model that answered (its served name)")
    timing_ms: Timing


class BatchResponse(BaseModel):
    """One result per image, in request order."""

    results: list[ClassifyResponse]


class EmbeddingOut(BaseModel):
    """One input's embedding."""

    object: Literal["embedding"] = "embedding"
    index: int = Field(description="The input's position in the request")
    embedding: list[float] | str = Field(
        description="The unit full-depth embedding (FP32): numbers, or their little-endian float32 bytes in base64"
    )


class EmbeddingsUsage(BaseModel):
    """Tokens the text tower read (images count none)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """``POST /v1/embeddings``'s answer, in OpenAI's shape."""

    object: Literal["list"] = "list"
    data: list[EmbeddingOut]
    model: str = Field(description="The served model that embedded the inputs")
    usage: EmbeddingsUsage


class OpenAIModel(BaseModel):
    """One served model in OpenAI's ``/v1/models`` shape."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the model was loaded")
    owned_by: str = "lraee"


class OpenAIModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OperatingPointOut(BaseModel):
    """A stored threshold set."""

    thresholds: dict[str, dict[str, float]] = Field(
        description="Calibrated label count K -> candidate layer -> gate threshold (>= 1 never exits). A request's "
        "K between two calibrated counts follows each layer's threshold interpolated linearly in log K, below the "
        "smallest the smallest's; a single entry at K = 1 holds at every K"
    )
    promise: float | None = Field(
        default=None,
        description="Agreement with the full-depth top-1 this point promises on held-out images (null: none)",
    )
    label_cap: int | None = Field(
        default=None,
        description="The most labels a request may send for this point's exits to run; a request with more gets "
        "the full-depth answer at the full-depth cost (no exit head runs; calibration found exits too rare there "
        "to pay for the heads). null: no cap",
    )
    held_out: dict[str, Any] | None = Field(
        default=None,
        description="Measured by the build on its evaluation images, held out of fitting (no threshold was chosen "
        "on them) but validation images, not a sealed test set: the build recipe may have been tuned after reading "
        "them. Label count K -> agreement with full depth, FLOPs saved and rows (with `?full=true` also top-1, exit "
        'shares and the standard error); "words-K" keys: label sets of K everyday words (the image\'s word and K-1 '
        'others), where the checkpoint was built with word sets; "group-NAME" keys: label sets that are one class '
        "group whole (a dataset's own classes), where it was built with groups",
    )


class PrunedLayerOut(BaseModel):
    """A candidate layer removed by pathological-layer pruning."""

    layer: int
    inr: float
    reason: str


class ModelSummary(BaseModel):
    """What ``GET /model`` tells about the loaded checkpoint: a compact summary, and with ``?full=true`` the whole
    manifest too. No path of the serving machine appears in either."""

    model: str = Field(description="The name requests choose it by (an embedded checkpoint's name, else its id)")
    checkpoint_id: str = Field(description="The manifest's checkpoint id (also accepted as its name)")
    backbone: str = Field(description="open_clip architecture name", examples=["ViT-B-32"])
    backbone_source: str = Field(
        description="Where the weights come from: an open_clip pretrained tag, a weights file by name (in the "
        "checkpoint, or the backbone_weights setting), or random init with its seed",
        examples=["openai", "weights.safetensors (in the checkpoint)"],
    )
    quant_mode: str
    quantized_modules: int = Field(description="Modules converted to INT8 (dynamic, or static with calibrated scales)")
    num_layers: int
    image_size: int
    embedding_dimensions: int = Field(description="Width of its image and text embeddings (/v1/embeddings)")
    exit_heads: str = Field(description="Pooling of the exit heads: ssa (mean of the patch tokens) or cls ([CLS])")
    candidate_layers: list[int]
    pruned_layers: list[PrunedLayerOut]
    operating_points: dict[str, OperatingPointOut]
    default_operating_point: str
    default_templates: list[str] = Field(description="Prompt templates used when a request names none")
    limits: dict[str, int] = Field(description="Request limits of this service")
    manifest: dict[str, Any] | None = Field(
        default=None,
        description="With `?full=true`: the checkpoint's whole manifest (how it was built and calibrated, every "
        "figure it measured), absolute paths written as `${checkpoint}/...` or `${elsewhere}/NAME`; null otherwise",
    )


class ModelEntry(BaseModel):
    """One served model in ``GET /models``."""

    model: str = Field(description="The name requests choose it by (`model` on /classify, /v1/embeddings, ...)")
    default: bool = Field(description="True for the model a request that names none gets")
    checkpoint_id: str
    backbone: str
    quant_mode: str
    embedding_dimensions: int
    operating_points: list[str] = Field(description="What `operating_point` may name ('full' included)")
    default_operating_point: str


class ModelList(BaseModel):
    """``GET /models``: every model this service serves, the default first."""

    default: str
    models: list[ModelEntry]


class BandStateOut(BaseModel):
    """One threshold controller: an operating point's thresholds for one band of label counts."""

    operating_point: str
    labels: str = Field(description="the label counts this band covers, e.g. `2-4`, `10+`")
    promise: float = Field(description="agreement with the full-depth top-1 the checkpoint promises")
    offset: float = Field(description="rungs up the calibrated curve (0: calibrated; 1: the next stricter point's)")
    max_offset: float = Field(description="the top of the curve: thresholds of 1.0, no image leaves")
    verdict: Literal["unknown", "broken", "kept", "comfortable"] = Field(
        description="the last judgement of the current thresholds (unknown: too few samples since the last change)"
    )
    broken_since: float | None = Field(description="Unix time the promise was first estimated broken, until kept")
    estimate: float | None = Field(description="live agreement estimate at the current thresholds")
    lower: float | None
    upper: float | None
    answers: int = Field(description="live answers under the current thresholds (halved past a cap)")
    exits: int
    checks: int = Field(description="shadow checks of exits under the current thresholds (halved past a cap)")
    disagreements: int
    calibrated_thresholds: dict[str, float] = Field(description="layer -> the calibrated threshold, at `labels`' start")
    thresholds: dict[str, float] = Field(description="layer -> the threshold now, at the same label count")
    thresholds_at_labels: int
    corrections: dict[str, int] = Field(description="raises, relaxes and resets so far (not reset by a reset)")


class ThresholdChangeOut(BaseModel):
    """One change of a band's thresholds, with the evidence at the level it left."""

    at: float = Field(description="Unix time")
    operating_point: str
    band: str
    direction: Literal["raise", "relax", "reset"]
    offset_before: float
    offset_after: float
    estimate: float | None
    lower: float | None
    upper: float | None
    checks: int
    answers: int


class ThresholdStateOut(BaseModel):
    """A model's threshold controllers (`GET /thresholds`)."""

    model: str
    enabled: bool = Field(description="LRAEE_THRESHOLD_CONTROL on, and the checkpoint has promises to keep")
    shadow_rate: float
    bands: list[BandStateOut] = []
    changes: list[ThresholdChangeOut] = Field(default=[], description="the latest changes, oldest first")
    config: dict[str, float] = Field(default={}, description="the controllers' constants")


class Status(BaseModel):
    """Health probe answer."""

    status: str


class ErrorDetail(BaseModel):
    """The one error shape's inner object."""

    code: str = Field(examples=["invalid_image"])
    message: str
    status: int
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    """Every error the service answers."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "Malformed request (JSON, base64, multipart, empty image), or an image URL while fetching is off",
    401: "Missing or wrong API key",
    403: "An image URL this service will not fetch (scheme, credentials, an address not allowed)",
    404: "Unknown model (the message lists the served ones)",
    413: "Body, image bytes or image pixels over the limit",
    415: "Unsupported content type, or not an image",
    422: "Invalid labels, templates, top_k, operating point, a damaged image, or an image URL that failed",
    429: "Queue full, or too many image URLs being fetched; see Retry-After",
    503: "Model not loaded yet, or shutting down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries in the error shape for ``statuses``."""
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for a hand-written OpenAPI request body.

    Pydantic refers to nested models as ``#/$defs/Name``; inside an OpenAPI document that pointer resolves against
    the document's root, where there is no ``$defs``: ReDoc refuses the whole document. The models here nest
    without recursion, so inlining terminates.
    """
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                siblings = {key: resolve(value) for key, value in node.items() if key != "$ref"}
                return {**resolve(definitions[reference.removeprefix("#/$defs/")]), **siblings}
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
