"""MLLM2vec embedding backbone (VLM2Vec-style) on a Qwen2-VL-family decoder.

A decoder MLLM reads a chat-template prompt

    <|im_start|>system\\nYou are a relevance embedding generator<|im_end|>\\n
    <|im_start|>user\\nInput Text: {text}\\nInput Image: <|vision_start|><|image_pad|>*n<|vision_end|><|im_end|>\\n
    <|im_start|>assistant\\n<|EMB|>

(the text part and/or the image part; at least one) and the embedding is the final hidden state at
the appended ``<|EMB|>`` token (last-token pooling under causal attention), L2-normalised.

Models are built from a preset config (random init, ``tiny`` / ``small``) with a byte-level BPE
tokenizer trained offline on the catalog titles, or loaded from a local directory (``pretrained``):
a directory written by :meth:`MLLMEmbedder.save_pretrained`, or a real Qwen2-VL / Qwen2.5-VL
checkpoint directory whose tokenizer gets ``<|EMB|>`` added. Nothing is ever downloaded.

Everything that depends on the model family (config building, how many placeholder tokens an image
takes, the forward call) lives in :data:`FAMILIES`; the rest is family-agnostic.

One module though over 500 lines: the prompt layout, the tokenizer set-up and the pooling are one
contract with the reranker and every saved checkpoint; it changes as one thing.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from data.images import to_rgb_on_white
from training.vlm import TEXT_INPUTS

EMB_TOKEN = "<|EMB|>"
SYSTEM_PROMPT = "You are a relevance embedding generator"
PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, EMB_TOKEN]
TEXT_LABEL, IMAGE_LABEL = "Input Text:", "Input Image:"
SETTINGS_FILE = "mllm2vec.json"
SETTINGS_VERSION = 1

__all__ = ["EMB_TOKEN", "SYSTEM_PROMPT", "SPECIAL_TOKENS", "FAMILIES", "Family", "MLLMEmbedder",
           "build_tokenizer", "mrl_prefix"]


def mrl_prefix(emb: Tensor, dim: int) -> Tensor:
    """A Matryoshka prefix of an embedding, re-normalised."""
    return F.normalize(emb[..., :dim], dim=-1)


# --------------------------------------------------------------------------------------- tokenizer

def build_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained offline on `texts` (plus the prompt words), wrapped for transformers.

    Special tokens (ids 0..7, in this order): <|endoftext|> (pad), <|im_start|>, <|im_end|>,
    <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>, <|EMB|>. Deterministic for a
    given input. Byte-level, so every string round-trips (no unknown token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # the template words occur in every sequence: weight them so they merge into few tokens
    prompt = ["system", "user", "assistant", SYSTEM_PROMPT, TEXT_LABEL, IMAGE_LABEL]
    # prepare() encodes a title after "Input Text:", i.e. with a leading space: train on it that way
    corpus = [" " + " ".join(str(t).split()) for t in texts if t] + prompt * 50
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=PAD_TOKEN,
                                   extra_special_tokens=SPECIAL_TOKENS[1:])


# ---------------------------------------------------------------------------------------- families

def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) like Qwen2-VL (16/24/24)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_config(p: dict, vocab: int, ids: dict) -> dict:
    hidden, heads = int(p["hidden"]), int(p["heads"])
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"preset: hidden {hidden} must split into {heads} heads of even size")
    return dict(hidden_size=hidden, intermediate_size=int(p["intermediate"]),
                num_hidden_layers=int(p["layers"]), num_attention_heads=heads,
                num_key_value_heads=int(p.get("kv_heads", heads)), vocab_size=int(vocab),
                rope_scaling={"type": "mrope", "mrope_section": _mrope_section(hidden // heads)},
                max_position_embeddings=int(p.get("max_positions", 4096)),
                bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])


def _vision_common(p: dict) -> dict:
    return dict(depth=int(p["vision_depth"]), num_heads=int(p["vision_heads"]), in_channels=3,
                patch_size=int(p.get("patch_size", 14)), spatial_merge_size=int(p.get("merge_size", 2)),
                temporal_patch_size=2)


def _qwen2_vl_config(p: dict, vocab: int, ids: dict):
    from transformers import Qwen2VLConfig
    vision = dict(_vision_common(p), embed_dim=int(p["vision_dim"]), hidden_size=int(p["hidden"]),
                  mlp_ratio=int(p.get("vision_mlp_ratio", 4)))
    return Qwen2VLConfig(text_config=_text_config(p, vocab, ids), vision_config=vision,
                         image_token_id=ids["image"], video_token_id=ids["video"],
                         vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])


def _qwen2_5_vl_config(p: dict, vocab: int, ids: dict):
    from transformers import Qwen2_5_VLConfig
    depth = int(p["vision_depth"])
    vision = dict(_vision_common(p), hidden_size=int(p["vision_dim"]), out_hidden_size=int(p["hidden"]),
                  intermediate_size=int(p["vision_dim"]) * int(p.get("vision_mlp_ratio", 4)),
                  window_size=int(p.get("window_size", 112)),
                  # full attention every 8th block and at the last one (32 blocks -> 7, 15, 23, 31)
                  fullatt_block_indexes=[i for i in range(depth) if i % 8 == 7 or i == depth - 1])
    return Qwen2_5_VLConfig(text_config=_text_config(p, vocab, ids), vision_config=vision,
                            image_token_id=ids["image"], video_token_id=ids["video"],
                            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])


def _qwen_image_tokens(config, image_grid_thw: Tensor) -> list[int]:
    """Placeholder tokens per image: t*h*w patches merged merge_size x merge_size."""
    merge = int(config.vision_config.spatial_merge_size)
    return (image_grid_thw.prod(-1) // merge**2).tolist()


def _qwen_forward(model, input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor,
                  pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
    """last_hidden_state [B, L, D] of a Qwen2-VL-style model (M-RoPE positions padding-aware)."""
    kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask,
                                  mm_token_type_ids=mm_token_type_ids, use_cache=False)
    if pixel_values is not None:
        # get_rope_index builds 3-D positions over the unpadded tokens of each row
        kwargs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    else:
        # text only: the model would number positions 0..L-1 including left padding; count real tokens
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        kwargs["position_ids"] = pos
    return model(**kwargs).last_hidden_state


def _qwen3_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's interleaved M-RoPE split of head_dim/2 frequencies: (t, h, w) = (24, 20, 20) at
    head_dim 128, h and w taking every third frequency from 1 and 2 (so 3 * h <= head_dim/2)."""
    half = head_dim // 2
    hw = half * 20 // 64
    return [half - 2 * hw, hw, hw]


def _qwen3_vl_config(p: dict, vocab: int, ids: dict):
    """Qwen3-VL from a preset. Unlike Qwen2(.5)-VL: explicit head_dim, interleaved M-RoPE in
    rope_parameters, q/k norms, and a vision tower with learned (interpolated) position embeddings
    and DeepStack: the merged features of `deepstack_indexes` vision blocks are added at the image
    tokens after the first decoder layers (default: blocks d/4-1, d/2-1, 3d/4-1, as Qwen3-VL-2B/4B:
    5, 11, 17 of 24). Upstream uses patch_size 16: set it in a Qwen3-VL preset (from_params' image
    processor reads the same key, default 14). The forward call is Qwen2-VL's (_qwen_forward):
    Qwen3VLModel takes the same inputs and does DeepStack and its rope index itself."""
    from transformers import Qwen3VLConfig
    text = _text_config(p, vocab, ids)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    del text["rope_scaling"]
    text.update(head_dim=head_dim, rope_parameters={
        "rope_type": "default", "rope_theta": float(p.get("rope_theta", 5_000_000)),
        "mrope_section": _qwen3_mrope_section(head_dim), "mrope_interleaved": True})
    depth = int(p["vision_depth"])
    deepstack = p.get("deepstack_indexes") or sorted({depth * k // 4 - 1 for k in (1, 2, 3)} - {-1})
    vision = dict(_vision_common(p), hidden_size=int(p["vision_dim"]), out_hidden_size=int(p["hidden"]),
                  intermediate_size=int(p["vision_dim"]) * int(p.get("vision_mlp_ratio", 4)),
                  num_position_embeddings=int(p.get("vision_positions", 2304)),   # a square (48 x 48)
                  deepstack_visual_indexes=[int(i) for i in deepstack])
    return Qwen3VLConfig(text_config=text, vision_config=vision,
                         image_token_id=ids["image"], video_token_id=ids["video"],
                         vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])


@dataclass(frozen=True)
class Family:
    """The family-specific bits of a VLM backbone."""

    name: str
    model_type: str                                    # config.model_type of checkpoints of this family
    model_class_name: str                              # the transformers base-model class
    build_config: Callable[[dict, int, dict], Any]     # (preset, vocab, token ids) -> config
    image_tokens: Callable[[Any, Tensor], list[int]]   # (config, image_grid_thw) -> tokens per image
    forward: Callable[..., Tensor]                     # (model, ids, mask, mm types, pixels, grid) -> hidden
    module: str = "transformers"                       # where the model classes live
    image_processor_name: str = "Qwen2VLImageProcessorPil"
    lm_class_name: str | None = None                   # with an LM head (the reranker); None: see reranker.LM_CLASSES

    def model_class(self) -> type:
        import importlib
        return getattr(importlib.import_module(self.module), self.model_class_name)

    def image_processor_class(self) -> type:
        import importlib
        return getattr(importlib.import_module(self.module), self.image_processor_name)


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2_vl", "qwen2_vl", "Qwen2VLModel", _qwen2_vl_config,
                       _qwen_image_tokens, _qwen_forward),
    "qwen2_5_vl": Family("qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLModel", _qwen2_5_vl_config,
                         _qwen_image_tokens, _qwen_forward),
    "qwen3_vl": Family("qwen3_vl", "qwen3_vl", "Qwen3VLModel", _qwen3_vl_config,
                       _qwen_image_tokens, _qwen_forward),
}


def _vl_config(p: dict, vocab: int, ids: dict):
    raise ValueError("the pailitao_vl family is built from packaged weights (model.preset: packaged, "
                     "training/pretrained.py), not from a size preset")


def _vl_image_tokens(config, image_grid_thw: Tensor) -> list[int]:
    """A fixed number of pooled tokens per image."""
    return [config.image_tokens] * int(image_grid_thw.shape[0])


def _vl_forward(model, input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor,
                pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
    return model(input_ids, attention_mask=attention_mask, pixel_values=pixel_values).last_hidden_state


# the packaged pretrained base (training/vlm.py): vision tower -> pooled tokens -> projector -> SmolLM2
FAMILIES["pailitao_vl"] = Family("pailitao_vl", "pailitao_vl", "PailitaoVLModel", _vl_config, _vl_image_tokens,
                                 _vl_forward, module="training.vlm", image_processor_name="PailitaoVLImageProcessor",
                                 lm_class_name="PailitaoVLForConditionalGeneration")


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def _family_of_config(config) -> Family:
    for fam in FAMILIES.values():
        if fam.model_type == getattr(config, "model_type", None):
            return fam
    raise ValueError(f"unsupported model_type {getattr(config, 'model_type', None)!r}; "
                     f"supported: {sorted(f.model_type for f in FAMILIES.values())}")


def _image_processor(min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2):
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                                    patch_size=int(patch_size), merge_size=int(merge_size),
                                    temporal_patch_size=2)


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[str(value)]


# ------------------------------------------------------------------------------------------- model

class MLLMEmbedder(nn.Module):
    """Embedding = L2-normalised final hidden state at the <|EMB|> token of a VLM decoder."""

    def __init__(self, model: nn.Module, tokenizer, image_processor, family: str = "qwen2_vl",
                 max_text_tokens: int = 24, preset: str | None = None,
                 mrl_dims: Sequence[int] | None = None, padding_side: str = "right"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = _family(family)
        self.max_text_tokens = int(max_text_tokens)
        self.preset = preset
        self.mrl_dims = [int(d) for d in mrl_dims] if mrl_dims else None
        self.padding_side = padding_side
        cfg = model.config
        conv = tokenizer.convert_tokens_to_ids
        self.emb_token_id = int(conv(EMB_TOKEN))
        self.image_token_id = int(cfg.image_token_id)
        self.vision_start_id = int(cfg.vision_start_token_id)
        self.vision_end_id = int(cfg.vision_end_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else conv(PAD_TOKEN) or 0)
        unk = getattr(tokenizer, "unk_token_id", None)
        for name, i in (("<|EMB|>", self.emb_token_id), ("<|im_start|>", conv(IM_START)),
                        ("<|im_end|>", conv(IM_END))):
            if i is None or (unk is not None and i == unk):
                raise ValueError(f"tokenizer lacks the special token {name}")
        enc = self._encode_plain
        im_start, im_end = int(conv(IM_START)), int(conv(IM_END))
        # constant pieces of the template, as token ids
        self._head = ([im_start] + enc("system\n" + SYSTEM_PROMPT) + [im_end] + enc("\n")
                      + [im_start] + enc("user\n"))
        self._text_label = enc(TEXT_LABEL)
        self._image_label = enc(IMAGE_LABEL + " ")
        self._sep = enc("\n")
        self._tail = [im_end] + enc("\n") + [im_start] + enc("assistant\n") + [self.emb_token_id]
        self._special_strings = [s for s in set(SPECIAL_TOKENS) | set(getattr(tokenizer, "all_special_tokens", []))
                                 if s]

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_params(cls, model_params: dict, titles: Sequence[str]) -> "MLLMEmbedder":
        """Build from params["model"]: a preset config + a tokenizer trained on `titles`, or
        preset `pretrained`: load model_params["pretrained"] (a local directory)."""
        preset = model_params.get("preset")
        family = _family(model_params.get("family", "qwen2_vl"))
        if preset == "packaged":   # built above this module: it needs the converted packaged weights
            raise ValueError("model preset 'packaged' is built by training.pretrained.build_base_model "
                             "(the base_model stage), not MLLMEmbedder.from_params")
        if preset == "pretrained":
            path = model_params.get("pretrained")
            if not path:
                raise ValueError("model preset 'pretrained' needs model.pretrained (a local checkpoint directory)")
            return cls.from_pretrained(path, model_params=model_params)
        presets = model_params.get("presets") or {}
        if preset not in presets:
            raise ValueError(f"unknown model preset {preset!r}; choose one of "
                             f"{sorted(list(presets) + ['pretrained', 'packaged'])}")
        p = presets[preset]
        tokenizer = build_tokenizer(list(titles), int(p["vocab"]))
        conv = tokenizer.convert_tokens_to_ids
        ids = dict(pad=conv(PAD_TOKEN), eos=conv(IM_END), image=conv(IMAGE_PAD), video=conv(VIDEO_PAD),
                   vision_start=conv(VISION_START), vision_end=conv(VISION_END))
        config = family.build_config(p, max(int(p["vocab"]), len(tokenizer)), ids)
        model = family.model_class()(config)
        dtype = _dtype(model_params.get("dtype"))
        if dtype is not None:
            model = model.to(dtype)
        image_processor = _image_processor(p.get("min_pixels", 3136), p.get("max_pixels", 3136),
                                           p.get("patch_size", 14), p.get("merge_size", 2))
        return cls(model, tokenizer, image_processor, family=family.name,
                   max_text_tokens=int(model_params.get("max_text_tokens", 24)), preset=preset,
                   mrl_dims=model_params.get("mrl_dims"))

    @classmethod
    def from_pretrained(cls, path, model_params: dict | None = None) -> "MLLMEmbedder":
        """Load a directory written by save_pretrained, or a real Qwen2-VL / Qwen2.5-VL checkpoint
        directory (its tokenizer gets <|EMB|> added; embeddings are resized when needed).
        `model_params` (optional) may override max_text_tokens, dtype and, via
        presets.pretrained.{min_pixels,max_pixels}, the image resolution."""
        from transformers import AutoConfig, AutoTokenizer

        import training.vlm  # noqa: F401  (registers the pailitao_vl config with AutoConfig)

        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        mp = model_params or {}
        settings: dict = {}
        if (path / SETTINGS_FILE).is_file():
            settings = json.loads((path / SETTINGS_FILE).read_text())
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        family = _family(settings["family"]) if settings.get("family") else _family_of_config(config)
        dtype = _dtype(mp.get("dtype")) or torch.float32
        model = family.model_class().from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = family.image_processor_class().from_pretrained(path, local_files_only=True)
        over = (mp.get("presets") or {}).get("pretrained") or {}
        if family.name != "pailitao_vl" and (over.get("min_pixels") or over.get("max_pixels")):
            # change the pixel budget only: reload with it, so the checkpoint's own mean/std, patch and
            # merge size stay (a fresh _image_processor() had CLIP mean/std: wrong for Qwen3-VL's 0.5)
            image_processor = family.image_processor_class().from_pretrained(
                path, local_files_only=True, **{k: int(over[k]) for k in ("min_pixels", "max_pixels") if over.get(k)})
        if EMB_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([EMB_TOKEN], special_tokens=True)
            emb = model.get_input_embeddings()
            if len(tokenizer) > emb.num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
                emb = model.get_input_embeddings()
            with torch.no_grad():  # a fresh row: the mean embedding, not whatever the checkpoint had there
                new = tokenizer.convert_tokens_to_ids(EMB_TOKEN)
                emb.weight[new] = emb.weight[: min(new, emb.num_embeddings)].float().mean(0).to(emb.weight.dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD_TOKEN if PAD_TOKEN in tokenizer.get_vocab() else tokenizer.eos_token
        return cls(model, tokenizer, image_processor, family=family.name,
                   max_text_tokens=int(mp.get("max_text_tokens", settings.get("max_text_tokens", 24))),
                   preset=settings.get("preset", "pretrained"),
                   mrl_dims=mp.get("mrl_dims", settings.get("mrl_dims")),
                   padding_side=settings.get("padding_side", "right"))

    def save_pretrained(self, path) -> None:
        """transformers form (model.safetensors + config.json, tokenizer files, preprocessor_config.json)
        plus mllm2vec.json with our settings. Atomic: written to a temp sibling, then renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            self.image_processor.save_pretrained(tmp)
            settings = dict(version=SETTINGS_VERSION, family=self.family.name, preset=self.preset,
                            max_text_tokens=self.max_text_tokens, padding_side=self.padding_side,
                            dim=self.dim, emb_token=EMB_TOKEN, system_prompt=SYSTEM_PROMPT)
            if self.mrl_dims:
                settings["mrl_dims"] = self.mrl_dims
            (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "text_config", cfg).hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self):
        return self.model.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)

    # ------------------------------------------------------------------------------ preprocessing
    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _clean(self, text: str | None) -> str | None:
        if text is None:
            return None
        text = str(text)
        for s in self._special_strings:  # a title must never inject a control token
            text = text.replace(s, "")
        text = " ".join(text.split())
        return text or None

    def prepare(self, images: Sequence[Image.Image | None] | None,
                texts: Sequence[str | None] | None) -> dict[str, Tensor]:
        """Tokenise a batch: input_ids, attention_mask, mm_token_type_ids (1 at image tokens) and,
        when any image is present, pixel_values / image_grid_thw. Padding side: self.padding_side."""
        if images is None and texts is None:
            raise ValueError("prepare() needs images and/or texts")
        n = len(images) if images is not None else len(texts)
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if n == 0:
            raise ValueError("prepare() got an empty batch")
        texts = [self._clean(t) for t in texts]
        for i, (im, t) in enumerate(zip(images, texts)):
            if im is None and t is None:
                raise ValueError(f"item {i} has neither an image nor text")

        present = [to_rgb_on_white(im) for im in images if im is not None]
        vision: dict[str, Tensor] = {}
        counts: list[int] = []
        if present:
            out = self.image_processor(images=present, return_tensors="pt")
            vision = {"pixel_values": out["pixel_values"].float(),
                      "image_grid_thw": out["image_grid_thw"].long()}
            counts = self.family.image_tokens(self.model.config, vision["image_grid_thw"])
        with_text = [t for t in texts if t is not None]
        text_ids = iter(self.tokenizer([" " + t for t in with_text], add_special_tokens=False)["input_ids"]
                        if with_text else [])
        count_iter = iter(counts)

        rows: list[list[int]] = []
        for im, t in zip(images, texts):
            ids = list(self._head)
            if t is not None:
                ids += self._text_label + list(next(text_ids))[: self.max_text_tokens]
                if im is not None:
                    ids += self._sep
            if im is not None:
                ids += (self._image_label + [self.vision_start_id] + [self.image_token_id] * next(count_iter)
                        + [self.vision_end_id])
            ids += self._tail
            rows.append(ids)

        length = max(len(r) for r in rows)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if self.padding_side == "left" else slice(0, len(r))
            input_ids[i, sl] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, sl] = 1
        mm_token_type_ids = ((input_ids == self.image_token_id) & (attention_mask == 1)).int()
        extra = self.model.text_inputs(texts) if hasattr(self.model, "text_inputs") else {}
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mm_token_type_ids": mm_token_type_ids, **vision, **extra}

    # ------------------------------------------------------------------------------------ forward
    def emb_positions(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Index of the (last) <|EMB|> token in each row; works under left and right padding."""
        hit = input_ids == self.emb_token_id
        if attention_mask is not None:
            hit = hit & (attention_mask != 0)
        if not bool(hit.any(-1).all()):
            raise ValueError("a row has no <|EMB|> token; build batches with prepare()")
        idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return torch.where(hit, idx, -1).amax(-1)

    def forward(self, batch: dict) -> Tensor:
        """[B, dim] L2-normalised hidden state at <|EMB|> (float32)."""
        dev = self.device
        input_ids = batch["input_ids"].to(dev)
        attention_mask = batch.get("attention_mask")
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev))
        mm = batch.get("mm_token_type_ids")
        mm = (input_ids == self.image_token_id).int() if mm is None else mm.to(dev)
        pixel_values = batch.get("pixel_values")
        grid = batch.get("image_grid_thw")
        if pixel_values is not None:
            pixel_values, grid = pixel_values.to(dev), grid.to(dev)
        pos = self.emb_positions(input_ids, attention_mask)
        if hasattr(self.model, "embed"):   # a model with its own embedding readout (training/vlm.py)
            text = {k: batch[k].to(dev) for k in TEXT_INPUTS if k in batch}
            return F.normalize(self.model.embed(input_ids, attention_mask, pixel_values, pos, **text).float(), dim=-1)
        hidden = self.family.forward(self.model, input_ids, attention_mask, mm, pixel_values, grid)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
        return F.normalize(h.float(), dim=-1)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image | None] | None, texts: Sequence[str | None] | None,
               batch_size: int = 32, dim: int | None = None, progress: bool = False) -> np.ndarray:
        """float32 [N, dim or self.dim], L2-normalised (a Matryoshka prefix is re-normalised)."""
        n = len(images) if images is not None else len(texts) if texts is not None else 0
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        width = self.dim if dim is None else int(dim)
        if not 0 < width <= self.dim:
            raise ValueError(f"dim {dim} outside 1..{self.dim}")
        was_training = self.training
        self.eval()
        out: list[np.ndarray] = []
        starts = range(0, n, max(1, int(batch_size)))
        if progress:
            from core.console import progress as bar
            starts = bar(starts, "encode", unit="batch")
        try:
            for s in starts:
                emb = self.forward(self.prepare(images[s:s + batch_size], texts[s:s + batch_size]))
                if width != self.dim:
                    emb = mrl_prefix(emb, width)
                out.append(emb.float().cpu().numpy())
        finally:
            self.train(was_training)
        if not out:
            return np.zeros((0, width), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
