"""Generative MLLM reranker (PAPER.md "Reranker") on the Qwen2-VL-family wrapper of training/backbone.py.

Two modes share the model, the prompt builder and the forward pass:

* ``point``: one prompt per (query, candidate); score = P(<|yes|>) against <|no|> at the answer
  position (the last prompt token). The query also shows a centre crop of its image, like the
  paper's pointwise model (clutter robustness).
* ``list`` (chunkwise listwise): one prompt holds the query and m <= M indexed candidates
  ``<|cand_0|> ... <|cand_{m-1}|>``; at the answer position the logits of those index tokens and of
  ``<|NULL|>`` are the local scores s in R^(m+1). In the same forward pass the absolute scorer
  mean-pools each image's token span (z0 for the query, z_i per candidate) and maps [z0 || z_i] to
  four relevance levels; r_i = P(level 0 = instance).

The answer tokens are added as special tokens (one id each, whatever the tokenizer), their rows
initialised to the mean embedding. A reranker starts from an embedder checkpoint (the lineage's
stage-1 / ID model: the backbone already tells products apart); its LM head starts as a copy of the
input embeddings because the embedder has none.
"""
from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from training.backbone import (IM_END, IM_START, SPECIAL_TOKENS, MLLMEmbedder, _family, _to_rgb)

POINT, LIST = "point", "list"
SYSTEM = "You are a product search reranker"
NULL_TOKEN, YES_TOKEN, NO_TOKEN = "<|NULL|>", "<|yes|>", "<|no|>"
MAX_CHUNK = 16
INDEX_TOKENS = [f"<|cand_{i}|>" for i in range(MAX_CHUNK)]
ANSWER_TOKENS = [NULL_TOKEN, YES_TOKEN, NO_TOKEN, *INDEX_TOKENS]
N_LEVELS = 4
SETTINGS_FILE = "reranker.json"
SCORER_FILE = "scorer.pt"
CALIBRATION_FILE = "calibration.json"
# the absolute scorer's input: the paper's [z0 || zi], or with the matching features |z0 - zi| and
# z0 * zi (InferSent-style) that a small MLP cannot easily form from the concatenation alone
SCORER_INPUTS = {"concat": 2, "interact": 4}
LM_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
              "qwen3_vl": "Qwen3VLForConditionalGeneration"}

Doc = tuple  # (PIL image or None, text or None, cache key or None)


@dataclass
class RerankOutput:
    answer_logits: Tensor          # [B, V] next-token logits at the answer position
    s: Tensor | None = None        # [B, M] index-token logits (list), -inf on empty slots
    s_null: Tensor | None = None   # [B] NULL-token logit (list)
    level_logits: Tensor | None = None  # [B, M, 4] absolute scorer (list, when absolute)
    yes_logit: Tensor | None = None     # [B] logit(yes) - logit(no) (point)

    @property
    def r(self) -> Tensor | None:
        """P(instance) per candidate from the absolute scorer."""
        return None if self.level_logits is None else self.level_logits.float().softmax(-1)[..., 0]


def lm_class(family: str) -> type:
    """The family's model class with an LM head (what a reranker trains)."""
    fam = _family(family)
    if fam.lm_class_name:
        import importlib
        return getattr(importlib.import_module(fam.module), fam.lm_class_name)
    import transformers
    return getattr(transformers, LM_CLASSES[family])


def _open(im) -> Image.Image:
    """A PIL image, or a path opened on demand (catalog images whose pixels are cached are never read)."""
    return _to_rgb(Image.open(im) if isinstance(im, (str, Path)) else im)


def center_crop(im: Image.Image, share: float = 0.6) -> Image.Image:
    w, h = im.size
    cw, ch = max(1, round(w * share)), max(1, round(h * share))
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


class MLLMReranker(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer, image_processor, family: str = "qwen2_vl",
                 mode: str = LIST, absolute: bool = True, max_text_tokens: int = 24,
                 scorer_hidden: int = 256, query_crop: bool = True, cache_mb: float = 0.0,
                 scorer_input: str = "concat"):
        super().__init__()
        if mode not in (POINT, LIST):
            raise ValueError(f"unknown reranker mode {mode!r}: use {POINT!r} or {LIST!r}")
        self.lm, self.tokenizer, self.image_processor = lm, tokenizer, image_processor
        self.family = _family(family)
        self.mode, self.absolute = mode, bool(absolute and mode == LIST)
        self.max_text_tokens, self.query_crop = int(max_text_tokens), bool(query_crop)
        dim = int(lm.config.get_text_config().hidden_size)
        self.scorer_hidden = int(scorer_hidden)
        if scorer_input not in SCORER_INPUTS:
            raise ValueError(f"unknown scorer_input {scorer_input!r}: use one of {SCORER_INPUTS}")
        self.scorer_input = scorer_input
        self.scorer = nn.Sequential(nn.Linear(SCORER_INPUTS[scorer_input] * dim, self.scorer_hidden), nn.GELU(),
                                    nn.Linear(self.scorer_hidden, N_LEVELS)) if self.absolute else None
        conv = tokenizer.convert_tokens_to_ids
        missing = [t for t in ANSWER_TOKENS + [IM_START, IM_END] if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer lacks the reranker tokens {missing}; build with from_embedder()")
        self.null_id, self.yes_id, self.no_id = conv(NULL_TOKEN), conv(YES_TOKEN), conv(NO_TOKEN)
        self.index_ids = torch.tensor([conv(t) for t in INDEX_TOKENS])
        cfg = lm.config
        self.image_token_id, self.vs_id, self.ve_id = (int(cfg.image_token_id), int(cfg.vision_start_token_id),
                                                       int(cfg.vision_end_token_id))
        self.pad_id = int(tokenizer.pad_token_id)
        enc = self._enc
        nl = enc("\n")
        self._head = [conv(IM_START)] + enc("system\n" + SYSTEM) + [conv(IM_END)] + nl + [conv(IM_START)] + enc("user\n")
        self._tail = [conv(IM_END)] + nl + [conv(IM_START)] + enc("assistant\n")
        self._nl, self._space = nl, enc(" ")
        self._query_label, self._cand_label = enc("Query:"), enc("Candidate:")
        self._list_instr = enc("Reply with the index of the same product, or ") + [self.null_id] + enc(" if none is.")
        self._point_instr = (enc("Is the candidate the same product as the query? Answer ") + [self.yes_id]
                             + enc(" or ") + [self.no_id] + enc("."))
        self._specials = [s for s in set(SPECIAL_TOKENS) | set(ANSWER_TOKENS) if s]
        self._cache: OrderedDict = OrderedDict()
        self.cache_bytes, self._cached_bytes = int(float(cache_mb) * 2**20), 0
        self._cache_lock = threading.Lock()   # the service reranks on a thread pool

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_embedder(cls, path, mode: str = LIST, absolute: bool = True, scorer_hidden: int = 256,
                      query_crop: bool = True, max_text_tokens: int | None = None,
                      scorer_input: str = "concat") -> "MLLMReranker":
        """A new reranker whose backbone starts from an embedder checkpoint directory."""
        emb = MLLMEmbedder.from_pretrained(path)
        tok = emb.tokenizer
        tok.add_tokens([t for t in ANSWER_TOKENS if t not in tok.get_vocab()], special_tokens=True)
        lm = lm_class(emb.family.name)(emb.model.config)
        lm.model.load_state_dict(emb.model.state_dict())
        old = lm.get_input_embeddings().num_embeddings
        if len(tok) > old:
            lm.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            w = lm.get_input_embeddings().weight
            w[old:] = w[:old].mean(0)                    # new answer tokens: the mean embedding
            lm.lm_head.weight.copy_(w)                   # the embedder has no LM head: start tied
        return cls(lm, tok, emb.image_processor, family=emb.family.name, mode=mode, absolute=absolute,
                   max_text_tokens=max_text_tokens or emb.max_text_tokens, scorer_hidden=scorer_hidden,
                   query_crop=query_crop, scorer_input=scorer_input)

    def settings(self) -> dict:
        return dict(version=1, family=self.family.name, mode=self.mode, absolute=self.absolute,
                    max_text_tokens=self.max_text_tokens, scorer_hidden=self.scorer_hidden,
                    query_crop=self.query_crop, scorer_input=self.scorer_input)

    def save_pretrained(self, path) -> None:
        """LM (transformers form), tokenizer, image processor, scorer weights and reranker.json,
        written to a temp sibling and renamed (a reader never sees half a checkpoint)."""
        from pailitao.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            self.lm.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            self.image_processor.save_pretrained(tmp)
            if self.scorer is not None:
                torch.save(self.scorer.state_dict(), tmp / SCORER_FILE)
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2))
            if (Path(path) / CALIBRATION_FILE).is_file():   # keep a fitted calibrator across re-saves
                (tmp / CALIBRATION_FILE).write_bytes((Path(path) / CALIBRATION_FILE).read_bytes())

    @classmethod
    def from_pretrained(cls, path, cache_mb: float = 0.0) -> "MLLMReranker":
        from transformers import AutoTokenizer

        import training.vlm  # noqa: F401  (registers the pailitao_vl config)

        path = Path(path)
        if not (path / SETTINGS_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a reranker checkpoint (no {SETTINGS_FILE})")
        st = json.loads((path / SETTINGS_FILE).read_text())
        lm = lm_class(st["family"]).from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ip = _family(st["family"]).image_processor_class().from_pretrained(path, local_files_only=True)
        model = cls(lm, tok, ip, family=st["family"], mode=st["mode"], absolute=st["absolute"],
                    max_text_tokens=st["max_text_tokens"], scorer_hidden=st["scorer_hidden"],
                    query_crop=st.get("query_crop", True), cache_mb=cache_mb,
                    scorer_input=st.get("scorer_input", "concat"))
        if model.scorer is not None:
            model.scorer.load_state_dict(torch.load(path / SCORER_FILE, map_location="cpu", weights_only=True))
        return model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    # ----------------------------------------------------------------------------- prompts
    def _enc(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text_ids(self, text: str | None) -> list[int]:
        if text is None:
            return []
        text = str(text)
        for s in self._specials:   # a title must never inject a control token
            text = text.replace(s, "")
        text = " ".join(text.split())
        return self._enc(" " + text)[: self.max_text_tokens] if text else []

    def _pixels(self, docs: list[tuple[Image.Image, object]]) -> tuple[Tensor, Tensor, list[int]]:
        """pixel_values / image_grid_thw of images in order, and tokens per image. Images with a
        key are processed once and kept (LRU, at most cache_mb of pixel values: a 224 px image is
        0.6 MB, so an entry count would let a catalog's candidates fill gigabytes): catalog images
        repeat."""
        done: list[tuple[Tensor, Tensor] | None] = []
        todo = []
        with self._cache_lock:
            for im, key in docs:
                key = str(im) if key is None and isinstance(im, (str, Path)) else key
                hit = self._cache.get(key) if key is not None and self.cache_bytes else None
                if hit is not None:
                    self._cache.move_to_end(key)
                else:
                    todo.append(len(done))
                done.append(hit)
        if todo:
            out = self.image_processor(images=[_open(docs[i][0]) for i in todo], return_tensors="pt")
            grids = out["image_grid_thw"].long()
            pieces = torch.split(out["pixel_values"].float(), grids.prod(-1).tolist())
            for i, pv, g in zip(todo, pieces, grids):
                done[i] = (pv, g)
                key = str(docs[i][0]) if docs[i][1] is None and isinstance(docs[i][0], (str, Path)) else docs[i][1]
                if key is None or pv.nbytes > self.cache_bytes:
                    continue
                with self._cache_lock:
                    if key not in self._cache:
                        self._cache[key] = (pv.clone(), g)   # a copy: a split is a view of the whole batch
                        self._cached_bytes += pv.nbytes
                        while self._cached_bytes > self.cache_bytes:
                            self._cached_bytes -= self._cache.popitem(last=False)[1][0].nbytes
        pv = torch.cat([d[0] for d in done])
        grid = torch.stack([d[1] for d in done])
        return pv, grid, self.family.image_tokens(self.lm.config, grid)

    def prepare(self, queries: Sequence[Doc], candidates: Sequence[Sequence[Doc]], padding_side: str = "right") -> dict:
        """Tokenise a batch of prompts. list mode: row b = queries[b] + candidates[b] (1..MAX_CHUNK
        docs); point mode: candidates[b] holds exactly one doc. A Doc is (image | None, text | None,
        cache key | None). Returns input_ids, attention_mask, mm_token_type_ids, pixel_values,
        image_grid_thw, pool_seg ([B, L] the segment each token mean-pools into: 0 query, i+1
        candidate i, -1 none) and n_cands [B]."""
        if len(queries) != len(candidates) or not queries:
            raise ValueError(f"prepare() needs one candidate list per query, got {len(queries)} and {len(candidates)}")
        images: list[tuple[Image.Image, object]] = []
        plans = []   # per row: list of (segment, label ids, text ids, n images)
        for b, (q, cands) in enumerate(zip(queries, candidates)):
            cands = list(cands)
            if self.mode == POINT and len(cands) != 1:
                raise ValueError(f"pointwise prompts hold one candidate, row {b} has {len(cands)}")
            if not 1 <= len(cands) <= MAX_CHUNK:
                raise ValueError(f"row {b}: a chunk holds 1..{MAX_CHUNK} candidates, got {len(cands)}")
            segs = []
            for si, (doc, label) in enumerate([(q, self._query_label)] + [
                    (c, self._cand_label if self.mode == POINT else [int(self.index_ids[i])]) for i, c in enumerate(cands)]):
                im, text = doc[0], doc[1]
                if im is None and not text:
                    raise ValueError(f"row {b}: {'the query' if si == 0 else f'candidate {si - 1}'} has neither image nor text")
                n_img = 0
                if im is not None:
                    images.append((im, doc[2] if len(doc) > 2 else None))
                    n_img = 1
                    if si == 0 and self.mode == POINT and self.query_crop:
                        images.append((center_crop(_open(im)), None))
                        n_img = 2
                segs.append((si, label, self._text_ids(text), n_img))
            plans.append(segs)
        vision: dict = {}
        counts = iter([])
        if images:
            pv, grid, tokens = self._pixels(images)
            vision, counts = {"pixel_values": pv, "image_grid_thw": grid}, iter(tokens)
        rows, segrows = [], []
        for segs in plans:
            ids, seg = list(self._head), [-1] * len(self._head)
            for si, label, text_ids, n_img in segs:
                part, pool = list(label) + text_ids, [-1] * len(label) + [si] * len(text_ids)
                for _ in range(n_img):
                    n = next(counts)
                    part += self._space + [self.vs_id] + [self.image_token_id] * n + [self.ve_id]
                    pool += [-1] * (len(self._space) + 1) + [si] * n + [-1]
                if n_img:   # pool the image's span only (the paper's z): drop the text tokens
                    pool = [p if t == self.image_token_id else -1 for p, t in zip(pool, part)]
                ids += part + self._nl
                seg += pool + [-1] * len(self._nl)
            instr = self._list_instr if self.mode == LIST else self._point_instr
            ids += instr + self._tail
            seg += [-1] * (len(instr) + len(self._tail))
            rows.append(ids)
            segrows.append(seg)
        n, length = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        pool_seg = torch.full((n, length), -1, dtype=torch.long)
        for i, (r, s) in enumerate(zip(rows, segrows)):
            sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
            input_ids[i, sl] = torch.tensor(r)
            attention_mask[i, sl] = 1
            pool_seg[i, sl] = torch.tensor(s)
        mm = ((input_ids == self.image_token_id) & (attention_mask == 1)).int()
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm,
                "pool_seg": pool_seg, "n_cands": torch.tensor([len(c) for c in candidates]), **vision}

    # ----------------------------------------------------------------------------- forward
    @staticmethod
    def answer_positions(attention_mask: Tensor) -> Tensor:
        """The last real token of each row (the answer is generated after it), any padding side."""
        idx = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
        return torch.where(attention_mask != 0, idx, -1).amax(-1)

    def forward(self, batch: dict) -> RerankOutput:
        dev = self.device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        pv, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pv is not None:
            pv, grid = pv.to(dev), grid.to(dev)
        hidden = self.family.forward(self.lm.model, ids, mask, batch["mm_token_type_ids"].to(dev), pv, grid)
        rows = torch.arange(ids.shape[0], device=dev)
        logits = self.lm.lm_head(hidden[rows, self.answer_positions(mask)]).float()   # [B, V]
        if self.mode == POINT:
            return RerankOutput(logits, yes_logit=logits[:, self.yes_id] - logits[:, self.no_id])
        n_cands = batch["n_cands"].to(dev)
        m = int(n_cands.max())
        slots = torch.arange(m, device=dev)
        s = logits[:, self.index_ids[:m].to(dev)].masked_fill(slots[None, :] >= n_cands[:, None], float("-inf"))
        out = RerankOutput(logits, s=s, s_null=logits[:, self.null_id])
        if self.scorer is not None:
            # mean-pool each segment's image tokens: one-hot [B, L, 1 + m] over segments 0..m
            onehot = F.one_hot(batch["pool_seg"].to(dev) + 1, m + 2)[..., 1:].to(hidden.dtype)
            z = torch.einsum("bls,bld->bsd", onehot, hidden) / onehot.sum(1).clamp_min(1)[..., None]
            z0, zi = z[:, :1].expand(-1, m, -1), z[:, 1:]
            parts = [z0, zi] + ([(z0 - zi).abs(), z0 * zi] if self.scorer_input == "interact" else [])
            pair = torch.cat(parts, -1)
            out.level_logits = self.scorer(pair.to(self.scorer[0].weight.dtype)).float()
        return out

    @torch.no_grad()
    def score(self, queries: Sequence[Doc], candidates: Sequence[Sequence[Doc]], batch_size: int = 16) -> list[dict]:
        """Inference, rows batched `batch_size` prompts at a time. Per row: list mode {s [m], s_null,
        r [m] (absolute) , levels [m, 4] (absolute)}; point mode {p_yes}."""
        was = self.training
        self.eval()
        out = []
        try:
            for i in range(0, len(queries), batch_size):
                o = self.forward(self.prepare(queries[i:i + batch_size], candidates[i:i + batch_size]))
                for b in range(o.answer_logits.shape[0]):
                    if self.mode == POINT:
                        out.append({"p_yes": float(torch.sigmoid(o.yes_logit[b]))})
                        continue
                    m = len(candidates[i + b])
                    row = {"s": o.s[b, :m].cpu().numpy(), "s_null": float(o.s_null[b])}
                    if o.level_logits is not None:
                        lv = o.level_logits[b, :m].softmax(-1).cpu().numpy()
                        row.update(r=lv[:, 0], levels=lv)
                    out.append(row)
        finally:
            self.train(was)
        return out


def answer_targets(levels: Tensor, index_ids: Tensor, null_id: int) -> Tensor:
    """The token a listwise prompt should generate: the first instance candidate's index token,
    or NULL when the chunk has none. levels [B, M] (-1 = empty slot)."""
    inst = levels == 0
    first = torch.where(inst.any(-1), inst.float().argmax(-1), torch.zeros_like(levels[:, 0]))
    return torch.where(inst.any(-1), index_ids.to(levels.device)[first], torch.full_like(first, null_id))


def chunks_per_query(n: int, m: int) -> int:
    return math.ceil(n / m) if n else 0
