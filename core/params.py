"""Typed params: the names and types of every key of params.yaml, checked once at load.

params.yaml stays the one place for VALUES; these models hold names and types only. Every field is
required, except where a value may be null (`X | None`, still required) or a key may be absent
(`= None`: recognised by the code, which has its own default, but missing from params.yaml or from
some entries). `validate_params` dumps with exclude_unset, so an absent key stays absent.

All sections are strict and closed (`Section`: extra="forbid", strict=True): a typo'd key or a
value of the wrong type (a string for a number, a float for an int, "yes" for a bool) is refused,
named by its dotted path. Valid input comes back unchanged: `Number` keeps an int an int.

The ground floor: this module imports only pydantic and the standard library. It is one module
though over 400 lines because it is one schema, section by section in params.yaml's order.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

__all__ = ["Params", "ParamsError", "validate_params"]

# a float field: an int or a float (never a bool or a string), kept as given
Number = Annotated[int | float, Field(union_mode="left_to_right")]
Level = Literal["clean", "mild", "hard"]   # the noise levels (the `noise` section's keys, data/noise.py)
Auto = Literal["auto"]


class Section(BaseModel):
    """A params.yaml section: every key declared, each value of its declared type."""

    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------------------------------ data
class Synthetic(Section):
    instances: int
    views_per_instance: int
    image_size: int


class Dataset(Section):
    source: Literal["openclipart", "manifest", "synthetic"]
    root: str
    sharded: bool
    limit: int | None
    category_separator: str
    synthetic: Synthetic


class Ingest(Section):
    max_side: int
    min_side: int
    max_pixels: int
    max_aspect: Number
    max_bytes: int
    workers: int
    twin_hash_distance: int


class Validation(Section):
    quarantine_max_share: Number
    item_quarantine_max_share: Number
    title_min_chars: int
    title_max_chars: int
    category_max_depth: int
    category_pattern: str | None


class Splits(Section):
    val: Number
    test: Number


class Queries(Section):
    levels: list[Level]
    per_instance: int
    text_share: Number
    text_queries: bool
    text_image_level: Level
    text_words_level: Level
    image_format: str
    image_quality: int


class NoiseLevel(Section):
    """One level's probabilities and strength; an absent key is 0 (data/noise.py), so all optional."""

    clutter: Number | None = None
    geometric: Number | None = None
    occlusion: Number | None = None
    blur: Number | None = None
    light: Number | None = None
    jpeg: Number | None = None
    overlay: Number | None = None
    strength: Number | None = None
    text_typo: Number | None = None
    text_abbrev: Number | None = None
    text_number: Number | None = None


class Noise(Section):
    clean: NoiseLevel
    mild: NoiseLevel
    hard: NoiseLevel


# ----------------------------------------------------------------------------------------- model
class ModelBase(Section):
    vision: Literal["efficientnet_lite0", "dinov2_s14"]
    vision_layer: int | None
    image_size: int
    image_grid: int
    decoder_layers: int | None
    freeze_vision: bool
    visual_residual: Number
    text_residual: Number


class Finetune(Section):
    method: Literal["lora", "full"]
    lora_r: int
    lora_alpha: int
    lora_dropout: Number
    train_embeddings: bool
    new_parts_lr_scale: Number
    lora_targets: list[str] | None = None          # training/finetune.py; not in params.yaml


class Preset(Section):
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_dim: int
    vision_heads: int
    vocab: int
    min_pixels: int
    max_pixels: int
    # read by training/backbone.py with its own default; not in params.yaml
    max_positions: int | None = None
    patch_size: int | None = None
    merge_size: int | None = None
    vision_mlp_ratio: int | None = None
    window_size: int | None = None
    rope_theta: Number | None = None
    deepstack_indexes: list[int] | None = None
    vision_positions: int | None = None


class Presets(Section):
    tiny: Preset
    small: Preset


class Model(Section):
    family: str                                     # a key of training/backbone.py FAMILIES
    preset: Literal["packaged", "tiny", "small", "pretrained"]
    pretrained: str | None
    max_text_tokens: int
    base: ModelBase
    finetune: Finetune
    presets: Presets
    mrl_dims: list[int]
    mrl_weights: list[Number]
    mrl_temperatures: list[Number]
    served_dim: int
    dtype: str | None = None                        # training/backbone.py; not in params.yaml


# -------------------------------------------------------------------------------------- training
class Train(Section):
    batch_size: int
    lr: Number
    stage3_lr: Number
    weight_decay: Number
    warmup: Number
    stage1_steps: int
    stage3_steps: int
    hard_negatives: int
    hard_refresh_steps: int
    noisy_view_level: Level
    text_only_share: Number
    strategy: Literal["auto", "ddp", "ddp_spawn"]
    devices: int | str | list[int]                  # as Lightning takes it: 1, "auto", [0, 1]
    num_nodes: int
    precision: str | int                            # auto, or any Lightning precision ("bf16-mixed", 32)
    num_workers: int
    val_check_steps: int


class Prototypes(Section):
    organizer_k: int
    organizer_threshold: Number
    reviewer_z: Number
    text_weight: Number
    reviewer_min_spread: Number | None = None       # training/prototypes.py; not in params.yaml


class Margin(Section):
    margin: Number
    temperature: Number
    knn_k: int
    knn_refresh_steps: int
    similar_batch: bool
    sampler: Literal["knn", "random"]
    row_dtype: Literal["float32", "bfloat16", "float16"]
    row_update: Literal["sgd", "ema", "frozen"]
    row_renorm: bool
    ema_decay: Number
    head_lr: Number
    head_momentum: Number
    margin_warmup: Number
    views_per_prototype: int
    info_nce_weight: Number


class Mlflow(Section):
    tracking_uri: str
    artifact_root: str
    artifact_location: str                          # auto, or a path / URI
    experiment: str


# ---------------------------------------------------------------------------------------- compute
class Ray(Section):
    address: str | None                             # null: RAY_ADDRESS, else a local Ray
    actors: int
    batch_size: int | None


class Compute(Section):
    engine: Literal["local", "ray"]                 # item_embeddings: this process | retrieval/ray_embed.py
    ray: Ray


# -------------------------------------------------------------------------------------- retrieval
class Hnsw(Section):
    M: int
    ef_construction: int
    ef_search: int


class Ivfpq(Section):
    nlist: int | Auto
    m: int | Auto
    nbits: int
    nprobe: int
    train_size: int | Auto
    refine: Literal["sq8", "flat", "none"]
    k_factor: int


class Milvus(Section):
    uri: str                                        # a .db path (milvus-lite) or http(s)://host:19530
    collection_prefix: str
    index_type: str                                 # FLAT | HNSW | IVF_FLAT | IVF_SQ8 | AUTOINDEX | ...
    index_params: dict[str, int | float | str]      # Milvus's own names (M, efConstruction, nlist)
    search_params: dict[str, int | float | str]     # (ef, nprobe)
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"]
    insert_batch: int


class AnnIndex(Section):
    backend: Literal["faiss", "milvus"]
    kind: Literal["auto", "flat", "hnsw", "ivfpq"]
    exact_below: int
    hnsw_below: int
    hnsw: Hnsw
    ivfpq: Ivfpq
    recall_k: int
    recall_sample: int
    min_recall: Number
    use_gpu: bool | Auto
    keep_versions: int
    seed: int
    incremental: bool
    milvus: Milvus


class Hybrid(Section):
    lexical_weight: Number
    text_only_weight: Number
    lexical_candidates: int


class Limits(Section):
    max_bytes: int
    max_pixels: int
    min_side: int
    max_aspect: Number
    max_side: int | None
    formats: list[str]
    max_text_chars: int


class Serving(Section):
    model: str                                      # champion | a stage name | a checkpoint dir
    fallback_model: str
    registry_alias: str | None
    require_model_match: bool
    embed_batch_size: int
    candidates: int
    rerank: Literal["none", "point", "list", "gated"]
    top_k: int
    hybrid: Hybrid
    max_k: int
    host: str
    port: int
    concurrency: int
    queue: int
    timeout_s: Number
    body_read_timeout_s: Number
    max_concurrent_uploads: int
    reload_seconds: Number
    torch_threads: int
    thumbnail_size: int
    thumbnail_cache: int
    thumbnail_max_size: int
    limits: Limits


class Reranker(Section):
    chunk_size: int
    assign: Literal["round_robin", "contiguous"]
    merge: Literal["s", "s_minus_null", "r", "hybrid"]
    calibration: Literal["isotonic", "temperature", "identity"]
    train_queries: int
    queries_per_item: int
    query_levels: list[Level]
    text_share: Number
    instance_share: Number
    near_miss_depth: int
    point_positive_share: Number
    fusion: bool
    prefix_cache: bool
    val_queries: int
    steps: int
    batch_size: int
    point_batch_size: int
    lr: Number
    head_lr: Number
    weight_decay: Number
    warmup: Number
    tau: Number
    null_weight: Number
    lm_weight: Number
    absolute: bool
    absolute_weight: Number
    scorer_hidden: int
    scorer_input: Literal["concat", "interact"]
    query_crop: bool
    batch_size_infer: int
    image_cache_mb: int


# ------------------------------------------------------------------------- evaluation, operations
class Report(Section):
    queries_per_level: int
    rerank_queries_per_level: int
    bootstrap: int
    alpha: Number
    gallery: int


class Promotion(Section):
    metric: str
    latency_stat: str                               # a key of evaluation.metrics.latency_summary
    latency_budget_ms: Number
    rerank_latency_budget_ms: Number


class Schedule(Section):
    cron: str
    timezone: str
    sensor_seconds: int
    freshness_hours: Number


class Variant(Section):
    model: str
    weight: Number


class Simulate(Section):
    split: str
    queries: int
    users: int
    seed: int
    examine_decay: Number
    click: dict[int, Number]                        # judgment level -> P(click | examined)


class Ab(Section):
    enabled: bool
    salt: str
    variants: dict[str, Variant]                    # names are free: control, treatment, ...
    event_log: str | None
    simulate: Simulate


UNKNOWN_SECTION = "unknown section (only scalar keys may be added at the top level)"


def _scalar(value: Any) -> Any:
    if isinstance(value, dict):
        raise ValueError(UNKNOWN_SECTION)
    return value


class Params(Section):
    """The merged params of core.config.load_params. Besides the sections, the top level holds
    scalars: seed, workdir, what load_params adds (profile, params_dir) and any other scalar a
    caller adds through overrides (tests/test_cli_set.py); an unknown mapping there is refused."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Annotated[Any, BeforeValidator(_scalar)]]

    seed: int
    workdir: str
    dataset: Dataset
    ingest: Ingest
    validation: Validation
    splits: Splits
    queries: Queries
    noise: Noise
    model: Model
    train: Train
    prototypes: Prototypes
    margin: Margin
    mlflow: Mlflow
    compute: Compute
    ann_index: AnnIndex
    serving: Serving
    reranker: Reranker
    report: Report
    promotion: Promotion
    schedule: Schedule
    ab: Ab
    profile: str | None = None                      # added by load_params
    params_dir: str | None = None                   # added by load_params


# ---------------------------------------------------------------------------------------- errors
class ParamsError(ValueError):
    """Invalid params; `problems` lists (dotted path, what is wrong), one per offending key."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("invalid params: " + "; ".join(f"{path}: {what}" for path, what in problems))


EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
            "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
            "model_type": "a mapping", "model_attributes_type": "a mapping", "none_required": "null"}


def _locate(data: Any, loc: tuple) -> tuple[list[str], Any, bool]:
    """The dotted-path parts of an error location, walked through the input: parts that are not
    keys of the input (pydantic's union member tags such as 'int' or "literal['auto']") are dropped.
    Returns the parts, the parent mapping of the last part, and whether the error is about a key."""
    parts, node, parent = [], data, None
    for part in loc:
        if isinstance(node, dict) and part in node:
            parts.append(str(part))
            parent, node = node, node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parts.append(str(part))
            parent, node = None, node[part]
    return parts, parent, "[key]" in loc


def _problems(error: ValidationError, data: dict) -> list[tuple[str, str]]:
    by_path: dict[str, dict] = {}
    for e in error.errors(include_url=False):
        loc = tuple(e["loc"])
        parts, parent, is_key = _locate(data, loc)
        if e["type"] == "missing":
            parts.append(str(loc[-1]))
        path = ".".join(parts) or "<params>"
        slot = by_path.setdefault(path, {"expected": [], "other": [], "input": e["input"], "key": is_key})
        said = str(e.get("ctx", {}).get("error", "")) if e["type"] == "value_error" else ""
        if e["type"] == "extra_forbidden" or said == UNKNOWN_SECTION:
            siblings = [str(k) for k in (parent or {}) if str(k) != parts[-1]]
            near = difflib.get_close_matches(parts[-1], siblings, n=1)
            what = said or "unknown key"
            slot["other"].append(what + (f"; did you mean {'.'.join(parts[:-1] + near)!r}?" if near else ""))
        elif e["type"] == "missing":
            slot["other"].append("missing key")
        elif e["type"] == "literal_error":
            choices = e["ctx"]["expected"]
            slot["expected"].append(f"one of {choices}" if " or " in choices else choices)
        elif e["type"] in EXPECTED:
            slot["expected"].append(EXPECTED[e["type"]])
        else:
            slot["other"].append(said or e["msg"])
    out = []
    for path, slot in by_path.items():
        expected = list(dict.fromkeys(slot["expected"]))
        if "a number" in expected and "an integer" in expected:
            expected.remove("an integer")
        if expected:
            what = "bad key, " if slot["key"] else ""
            slot["other"].insert(0, f"{what}expected {' or '.join(expected)}, got {slot['input']!r}")
        out.append((path, "; ".join(dict.fromkeys(slot["other"]))))
    return out


def _same_order(dumped: Any, like: Any) -> Any:
    """`dumped` with its mappings' keys in the order of `like` (the input), recursively."""
    if isinstance(dumped, dict) and isinstance(like, dict):
        keys = [k for k in like if k in dumped] + [k for k in dumped if k not in like]
        return {k: _same_order(dumped[k], like.get(k)) for k in keys}
    if isinstance(dumped, list) and isinstance(like, list) and len(dumped) == len(like):
        return [_same_order(d, x) for d, x in zip(dumped, like)]
    return dumped


def validate_params(params: dict) -> dict:
    """The merged params checked against `Params`: returned as a plain dict equal to the input (keys
    in the same order); raises ParamsError (a ValueError) naming every offending key by its path."""
    try:
        model = Params.model_validate(params)
    except ValidationError as e:
        raise ParamsError(_problems(e, params)) from None
    return _same_order(model.model_dump(exclude_unset=True), params)
