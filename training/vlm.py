"""Pailitao-VL base model: a pretrained vision tower -> image tokens pooled to a fixed grid -> MLP
projector -> a pretrained causal decoder (Llama architecture), as a real transformers model.

It is what a Qwen-VL checkpoint is, built from parts that install offline (training/pretrained.py
converts them once): the tower's feature map is average-pooled to `image_grid` x `image_grid`
tokens that replace the `<|image_pad|>` placeholders of the chat prompt, so the MLLM2vec prompt,
`<|EMB|>` pooling, the reranker's indexed chunks and the absolute scorer work unchanged.

A frozen tower (`freeze_vision`, the CPU default) is never trained and stays in eval mode (its
batch-norm statistics are the pretrained ones); its pooled features are cached by pixel content,
in memory and, when :func:`use_feature_cache` names a directory, on disk: catalog images and the
seeded noisy training views are encoded by the tower once across all stages.

One module though near 500 lines: config, image processor and model are one transformers model
(registered together with AutoConfig) and change together.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import BaseModelOutputWithPast

MODEL_TYPE = "pailitao_vl"
FEATURE_CACHE_ENV = "PAILITAO_FEATURE_CACHE"
PROCESSOR_FILE = "preprocessor_config.json"


# ------------------------------------------------------------------------------------------ config

class PailitaoVLConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vision_tower: str = "efficientnet_lite0"   # a key of VISION_TOWERS
    vision_layer: int | None = None            # dinov2: hidden state of this block (None = the last)
    image_size: int = 224
    image_grid: int = 2                        # image tokens per image = image_grid ** 2
    freeze_vision: bool = True
    image_token_id: int = 0
    video_token_id: int = 0
    vision_start_token_id: int = 0
    vision_end_token_id: int = 0
    tie_word_embeddings: bool = False          # the reranker's LM head starts as a copy, then trains apart
    # the text term of the readout (see TextNgrams): character n-grams of the words, hashed
    text_ngram_range: tuple[int, int] | list[int] = (3, 5)
    text_ngram_buckets: int = 1 << 18          # hash space of the n-gram weights (idf)
    text_embed_rows: int = 1 << 14             # rows of the hash-embedding table
    text_embed_hashes: int = 4                 # rows summed per n-gram (signed)

    @property
    def image_tokens(self) -> int:
        return int(self.image_grid) ** 2


# ----------------------------------------------------------------------------------- vision towers

class EfficientNetTower(nn.Module):
    """EfficientNet-Lite0 (ImageNet-1k): the 1280-channel map before the classifier."""

    channels, mean, std = 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)   # (x - 127.5) / 127.5

    def __init__(self, config: PailitaoVLConfig):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=int(config.image_size))
        self.net._fc = nn.Identity()   # classifier unused: only extract_features runs

    def prepare(self) -> None:
        """Channels-last weights: the depthwise convolutions run about a quarter faster on a CPU.
        Called outside inference mode (parameters made inside it could never train again)."""
        if not self.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last):
            self.net.to(memory_format=torch.channels_last)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.net.extract_features(pixel_values.contiguous(memory_format=torch.channels_last))


class Dinov2Tower(nn.Module):
    """DINOv2 ViT-S/14: patch tokens of one block's hidden state as a map (the last blocks of the
    packaged model were tuned for saliency, so an earlier block can retrieve instances better)."""

    channels, mean, std = 384, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, config: PailitaoVLConfig):
        super().__init__()
        from transformers import Dinov2Model

        from training.dinov2_onnx import dinov2_config
        self.net = Dinov2Model(dinov2_config())
        self.layer = config.vision_layer

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.net(pixel_values=pixel_values, output_hidden_states=self.layer is not None)
        h = out.last_hidden_state if self.layer is None else out.hidden_states[int(self.layer)]
        patches = h[:, 1:]                                  # drop CLS: the grid is what gets pooled
        side = int(round(patches.shape[1] ** 0.5))
        return patches.transpose(1, 2).reshape(h.shape[0], h.shape[-1], side, side)


VISION_TOWERS = {"efficientnet_lite0": EfficientNetTower, "dinov2_s14": Dinov2Tower}


def vision_tower_class(name: str):
    if name not in VISION_TOWERS:
        raise ValueError(f"unknown vision tower {name!r}; choose one of {sorted(VISION_TOWERS)}")
    return VISION_TOWERS[name]


# ----------------------------------------------------------------------------------- feature cache

_CACHE_DIR: Path | None = None


def use_feature_cache(path: str | os.PathLike | None) -> None:
    """Keep frozen-tower features on disk under `path` (None: memory only). Also read from the
    environment (PAILITAO_FEATURE_CACHE) so worker processes inherit it."""
    global _CACHE_DIR
    _CACHE_DIR = Path(path) if path else None
    if path:
        os.environ[FEATURE_CACHE_ENV] = str(path)
    else:
        os.environ.pop(FEATURE_CACHE_ENV, None)


def _cache_dir() -> Path | None:
    return _CACHE_DIR or (Path(os.environ[FEATURE_CACHE_ENV]) if os.environ.get(FEATURE_CACHE_ENV) else None)


class FeatureCache:
    """Pooled tower features [T, C] (float16) keyed by the tower's identity and the pixels."""

    def __init__(self, capacity: int = 50000):
        self.mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self.capacity = capacity

    def get(self, key: str) -> np.ndarray | None:
        if key in self.mem:
            self.mem.move_to_end(key)
            return self.mem[key]
        root = _cache_dir()
        if root is not None and (f := root / key[:2] / f"{key}.npy").is_file():
            try:
                arr = np.load(f)
            except (OSError, ValueError):   # a torn file from a killed run: recompute it
                return None
            self._remember(key, arr)
            return arr
        return None

    def put(self, key: str, arr: np.ndarray) -> None:
        self._remember(key, arr)
        root = _cache_dir()
        if root is not None:
            d = root / key[:2]
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{key}.{os.getpid()}.tmp.npy"
            np.save(tmp, arr)
            os.replace(tmp, d / f"{key}.npy")   # readers never see half a file

    def _remember(self, key: str, arr: np.ndarray) -> None:
        self.mem[key] = arr
        if len(self.mem) > self.capacity:
            self.mem.popitem(last=False)


# ------------------------------------------------------------------------------------- text term

MAX_TEXT_CHARS = 256   # words beyond this do not reach the n-gram term (a query is a few words)


@functools.lru_cache(maxsize=4)
def _char_wb(lo: int, hi: int):
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(analyzer="char_wb", ngram_range=(lo, hi)).build_analyzer()


def char_ngrams(text: str, lo: int, hi: int) -> list[str]:
    """Character n-grams of each lower-cased word padded with spaces: scikit-learn's char_wb, the
    analyzer the lexical side of search (retrieval/lexical.py) uses too."""
    return _char_wb(int(lo), int(hi))(text[:MAX_TEXT_CHARS])


class TextNgrams(nn.Module):
    """The words as a sum of hashed character n-gram vectors (DSSM's letter n-gram hashing, with the
    hash embedding of Svenstrup et al.: each n-gram sums `hashes` signed rows of one table), weighted
    by (1 + log tf) * idf and L2-normalised: a dense, trainable sketch of a character TF-IDF vector.
    Why: misspelt, reordered, foreign-language shopper words share character n-grams with the title
    where they share no BPE token, and a 4-layer decoder trained for minutes learns no such matching."""

    def __init__(self, config: PailitaoVLConfig, dim: int):
        super().__init__()
        self.lo, self.hi = (int(x) for x in config.text_ngram_range)
        self.buckets, self.rows, self.hashes = (int(config.text_ngram_buckets), int(config.text_embed_rows),
                                                int(config.text_embed_hashes))
        self.table = nn.Parameter(torch.randn(self.rows, dim) / dim ** 0.5)
        self.register_buffer("idf", torch.ones(self.buckets))

    def _hash(self, gram: str) -> tuple[int, list[int], list[float]]:
        h = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=16).digest(), "little")
        bucket, h = h % self.buckets, h >> 32
        rows, signs = [], []
        for _ in range(self.hashes):
            rows.append(h % self.rows)
            signs.append(1.0 if (h >> 20) & 1 else -1.0)
            h >>= 21
        return bucket, rows, signs

    def inputs(self, texts) -> dict[str, Tensor]:
        """Tensors for forward() from a batch of texts (None: no words): per distinct n-gram of each
        row its row index, log-tf weight, idf bucket, table rows and signs."""
        sample, weight, bucket, rows, signs = [], [], [], [], []
        for i, t in enumerate(texts):
            grams, counts = np.unique(char_ngrams(t, self.lo, self.hi), return_counts=True) if t else ([], [])
            for g, c in zip(grams, counts):
                b, r, sg = self._hash(str(g))
                sample.append(i), weight.append(1.0 + float(np.log(c))), bucket.append(b), rows.append(r)
                signs.append(sg)
        k = self.hashes
        return {"ngram_sample": torch.tensor(sample, dtype=torch.long),
                "ngram_weight": torch.tensor(weight, dtype=torch.float32),
                "ngram_bucket": torch.tensor(bucket, dtype=torch.long),
                "ngram_rows": torch.tensor(rows, dtype=torch.long).reshape(-1, k),
                "ngram_signs": torch.tensor(signs, dtype=torch.float32).reshape(-1, k)}

    def forward(self, n: int, ngram_sample: Tensor, ngram_weight: Tensor, ngram_bucket: Tensor,
                ngram_rows: Tensor, ngram_signs: Tensor) -> Tensor:
        """[n, dim] unit vectors (zero for a row without words)."""
        w = ngram_weight.to(self.table.dtype) * self.idf[ngram_bucket].to(self.table.dtype)
        vec = (self.table[ngram_rows] * ngram_signs.to(self.table.dtype)[..., None]).sum(1) * w[:, None]
        out = torch.zeros(n, self.table.shape[1], dtype=self.table.dtype, device=self.table.device)
        return F.normalize(out.index_add(0, ngram_sample, vec), dim=-1)

    @torch.no_grad()
    def fit_idf(self, documents) -> None:
        """Smoothed idf (scikit-learn's) of each n-gram bucket over `documents` (the catalog titles)."""
        df = np.zeros(self.buckets)
        for d in documents:
            if d:
                df[list({self._hash(g)[0] for g in char_ngrams(str(d), self.lo, self.hi)})] += 1
        self.idf.copy_(torch.from_numpy(np.log((1 + len(documents)) / (1 + df)) + 1))


TEXT_INPUTS = ("ngram_sample", "ngram_weight", "ngram_bucket", "ngram_rows", "ngram_signs")


# ------------------------------------------------------------------------------------------- model

class PailitaoVLPreTrainedModel(PreTrainedModel):
    config_class = PailitaoVLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True


class PailitaoVLModel(PailitaoVLPreTrainedModel):
    def __init__(self, config: PailitaoVLConfig):
        super().__init__(config)
        tower_cls = vision_tower_class(config.vision_tower)
        self.vision_tower = tower_cls(config)
        dim = int(config.text_config.hidden_size)
        self.projector = nn.Sequential(nn.LayerNorm(tower_cls.channels), nn.Linear(tower_cls.channels, dim),
                                       nn.GELU(), nn.Linear(dim, dim))
        self.language_model = AutoModel.from_config(config.text_config)
        # the embedding readout (see embed()); both are set from data when the base model is built
        self.emb_center = nn.Parameter(torch.zeros(dim))
        self.visual_readout = nn.Linear(tower_cls.channels, dim, bias=False)
        self.text_ngrams = TextNgrams(config, dim)
        self.text_scale = nn.Parameter(torch.zeros(()))   # 0: no text term (set by calibration)
        self.features = FeatureCache()
        self._tower_id: str | None = None
        self.post_init()
        self.freeze_vision(bool(config.freeze_vision))

    def freeze_vision(self, frozen: bool = True) -> None:
        self.config.freeze_vision = bool(frozen)
        self.vision_tower.requires_grad_(not frozen)
        if frozen:
            self.vision_tower.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_vision:   # pretrained batch-norm statistics stay as they are
            self.vision_tower.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def tower_id(self) -> str:
        """Identity of the frozen tower's weights and pooling (the cache key's prefix)."""
        if self._tower_id is None:
            h = hashlib.blake2b(digest_size=8)
            h.update(json.dumps([self.config.vision_tower, self.config.vision_layer, self.config.image_size,
                                 self.config.image_grid]).encode())
            for k, v in sorted(self.vision_tower.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().numpy().tobytes()[:4096])   # a weight sample suffices
                h.update(str(float(v.detach().float().sum())).encode())
            self._tower_id = h.hexdigest()
        return self._tower_id

    def pooled_features(self, pixel_values: Tensor) -> Tensor:
        """[N, T, C] tower features average-pooled to the image grid (cached when frozen)."""
        g = int(self.config.image_grid)
        if not self.config.freeze_vision:
            getattr(self.vision_tower, "prepare", lambda: None)()
            fmap = self.vision_tower(pixel_values)
            return F.adaptive_avg_pool2d(fmap, g).flatten(2).transpose(1, 2)
        self.vision_tower.eval()
        tid = self.tower_id()
        pv = pixel_values.detach().float().cpu().contiguous()
        keys = [tid + hashlib.blake2b(p.numpy().tobytes(), digest_size=12).hexdigest() for p in pv]
        found = [self.features.get(k) for k in keys]
        # one tower pass per distinct image: a reranker batch repeats its query in every prompt
        todo = list({keys[i]: i for i, f in reversed(list(enumerate(found))) if f is None}.values())
        if todo:
            getattr(self.vision_tower, "prepare", lambda: None)()
            with torch.inference_mode():
                fmap = self.vision_tower(pixel_values[todo])
                new = F.adaptive_avg_pool2d(fmap.float(), g).flatten(2).transpose(1, 2)
            done = dict(zip((keys[i] for i in todo), new.to(torch.float16).cpu().numpy()))
            for k, f in done.items():
                self.features.put(k, f)
            found = [done[k] if f is None else f for k, f in zip(keys, found)]
        return torch.from_numpy(np.stack(found)).to(pixel_values.device, torch.float32)

    def project(self, pooled: Tensor) -> Tensor:
        """[N, T, D] image tokens in the decoder's embedding space from pooled tower features."""
        return self.projector(pooled.to(self.projector[1].weight.dtype))

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self.project(self.pooled_features(pixel_values))

    def _input_embeds(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None
                      ) -> tuple[Tensor, Tensor | None]:
        """(token embeddings with the projected images in the real placeholder tokens, pooled tower
        features [N_images, T, C] or None)."""
        embeds = self.get_input_embeddings()(input_ids)
        pooled = None
        if pixel_values is not None:
            pooled = self.pooled_features(pixel_values)
            img = self.project(pooled).to(embeds.dtype)
            slots = (input_ids == self.config.image_token_id) & (attention_mask != 0)
            if int(slots.sum()) != img.shape[0] * img.shape[1]:
                raise ValueError(f"{int(slots.sum())} image placeholder tokens for {img.shape[0]} images of "
                                 f"{img.shape[1]} tokens each")
            embeds = embeds.masked_scatter(slots[..., None].expand_as(embeds), img.reshape(-1, img.shape[-1]))
        return embeds, pooled

    def _run(self, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None,
             position_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(last hidden state [B, L, D], pooled tower features [N_images, T, C] or None)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, pooled = self._input_embeds(input_ids, attention_mask, pixel_values)
        if position_ids is None:   # count real tokens only, so left padding does not shift positions
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
        return out.last_hidden_state, pooled

    def run_cached(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                   cache=None, position_ids: Tensor | None = None):
        """Inference continuing the tokens held in `cache` (a transformers DynamicCache, extended in
        place; None: start one): (last hidden state of `input_ids` [B, L, D], the cache).
        attention_mask covers cached + new tokens ([B, cached + L]; zeros may sit anywhere, e.g. a
        padded prefix); position_ids default to the real tokens counted over that whole mask, so
        new tokens continue after each row's own prefix. The reranker's prefix reuse runs on it."""
        from transformers import DynamicCache

        n = input_ids.shape[1]
        embeds, _ = self._input_embeds(input_ids, attention_mask[:, -n:], pixel_values)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
        if cache is None:
            cache = DynamicCache(config=self.config.text_config)
        # newer transformers 5.x name the decoder's past_key_values argument `cache`: pass whichever it takes
        kw = "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else "past_key_values"
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=True, **{kw: cache})
        return out.last_hidden_state, cache

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, mm_token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, **kwargs) -> BaseModelOutputWithPast:
        return BaseModelOutputWithPast(last_hidden_state=self._run(input_ids, attention_mask, pixel_values,
                                                                   position_ids)[0])

    def text_inputs(self, texts) -> dict[str, Tensor]:
        """What embed() needs besides the prompt for the text term (MLLMEmbedder.prepare adds it)."""
        return self.text_ngrams.inputs(texts)

    def embed(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None, positions: Tensor,
              **text: Tensor) -> Tensor:
        """The embedding readout at `positions` (the <|EMB|> token of each row, at most one image a
        row): the hidden state minus `emb_center` plus `visual_readout` of the row's mean pooled tower
        feature plus `text_scale` times the row's character n-gram vector (`text`: text_inputs()'s
        tensors; without them, no text term). Why: a pretrained decoder's last-token state is dominated by a few huge constant
        dimensions (every image has cosine ~0.999 to every other), and a few hundred CPU steps cannot
        teach it to relay the tower; with the centre removed and the tower's own signal added, the
        decoder starts from what the tower knows and learns to refine it with the text."""
        hidden, pooled = self._run(input_ids, attention_mask, pixel_values)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h = hidden[rows, positions] - self.emb_center.to(hidden.dtype)
        if pooled is not None:
            has = (input_ids == self.config.image_token_id).any(-1)
            if int(has.sum()) != pooled.shape[0]:
                raise ValueError("the embedding readout takes at most one image per row")
            vis = self.visual_readout(pooled.mean(1).to(self.visual_readout.weight.dtype)).to(h.dtype)
            h = h.index_add(0, rows[has], vis)
        if text and float(self.text_scale.detach()) != 0.0:
            t = self.text_ngrams(h.shape[0], **{k: v.to(h.device) for k, v in text.items()})
            h = h + (self.text_scale * t).to(h.dtype)
        return h


class PailitaoVLForConditionalGeneration(PailitaoVLPreTrainedModel):
    """The base model plus an LM head: the generative reranker reads answer-token logits."""

    def __init__(self, config: PailitaoVLConfig):
        super().__init__(config)
        self.model = PailitaoVLModel(config)
        self.lm_head = nn.Linear(int(config.text_config.hidden_size), int(config.text_config.vocab_size), bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: Tensor, **kwargs):
        hidden = self.model(input_ids, **kwargs).last_hidden_state
        return self.lm_head(hidden)


AutoConfig.register(MODEL_TYPE, PailitaoVLConfig, exist_ok=True)
AutoModel.register(PailitaoVLConfig, PailitaoVLModel, exist_ok=True)


# --------------------------------------------------------------------------------- image processor

class PailitaoVLImageProcessor:
    """Pads an image to a square on white (the catalog convention; shapes are not squashed),
    resizes it to the tower's input size and normalises it. Returns pixel_values [N, 3, S, S] and
    image_grid_thw [N, 3] of ones (one fixed-size image each: the Qwen-style interface callers use)."""

    def __init__(self, size: int = 224, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        self.size = int(size)
        self.image_mean, self.image_std = [float(x) for x in image_mean], [float(x) for x in image_std]

    @classmethod
    def for_config(cls, config: PailitaoVLConfig) -> "PailitaoVLImageProcessor":
        tower = vision_tower_class(config.vision_tower)
        return cls(config.image_size, tower.mean, tower.std)

    def to_dict(self) -> dict:
        return {"image_processor_type": type(self).__name__, "size": self.size,
                "image_mean": self.image_mean, "image_std": self.image_std}

    def save_pretrained(self, path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path, **_) -> "PailitaoVLImageProcessor":
        d = json.loads((Path(path) / PROCESSOR_FILE).read_text())
        return cls(d["size"], d["image_mean"], d["image_std"])

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        from data.images import to_rgb_on_white

        arr = np.stack([np.asarray(ImageOps.pad(to_rgb_on_white(im), (self.size, self.size), Image.Resampling.BICUBIC,
                                                color=(255, 255, 255)), dtype=np.float32) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0
        mean, std = torch.tensor(self.image_mean)[:, None, None], torch.tensor(self.image_std)[:, None, None]
        return {"pixel_values": (x - mean) / std, "image_grid_thw": torch.ones(len(arr), 3, dtype=torch.long)}
