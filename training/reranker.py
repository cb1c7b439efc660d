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
initialised to the embedding of their word ("yes", "no", "none", the index digits). A reranker starts from an embedder checkpoint (the lineage's
stage-1 / ID model: the backbone already tells products apart); its LM head starts as a copy of the
input embeddings because the embedder has none.

One module though over 400 lines: the two modes share one model, one prompt builder and one
forward pass, and splitting them would split the prompt layout the scores depend on.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from data.images import to_rgb_on_white
from training.backbone import IM_END, IM_START, SPECIAL_TOKENS, MLLMEmbedder, _family

POINT, LIST = "point", "list"
SYSTEM = "You are a product search reranker"
NULL_TOKEN, YES_TOKEN, NO_TOKEN = "<|NULL|>", "<|yes|>", "<|no|>"
MAX_CHUNK = 16
INDEX_TOKENS = [f"<|cand_{i}|>" for i in range(MAX_CHUNK)]
ANSWER_TOKENS = [NULL_TOKEN, YES_TOKEN, NO_TOKEN, *INDEX_TOKENS]
# the words new answer tokens start from: identical rows (the mean embedding) gave P(yes) = 0.5 for
# every pair and no gradient to tell yes from no; a pretrained LM already separates these words
ANSWER_WORDS = {NULL_TOKEN: "none", YES_TOKEN: "yes", NO_TOKEN: "no", **{t: str(i) for i, t in enumerate(INDEX_TOKENS)}}
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
    return to_rgb_on_white(Image.open(im) if isinstance(im, (str, Path)) else im)


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
            mean = w[:old].mean(0)
            for t in ANSWER_TOKENS:   # each new answer token starts as its word ("yes", "no", "none", "3")
                i = tok.convert_tokens_to_ids(t)
                words = [j for j in tok(" " + ANSWER_WORDS[t], add_special_tokens=False)["input_ids"] if j < old]
                if i >= old:
                    w[i] = w[words].mean(0) if words else mean
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
        from core.io import atomic_path

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

    def _check_chunk(self, b: int, cands: Sequence[Doc]) -> list:
        cands = list(cands)
        if self.mode == POINT and len(cands) != 1:
            raise ValueError(f"pointwise prompts hold one candidate, row {b} has {len(cands)}")
        if not 1 <= len(cands) <= MAX_CHUNK:
            raise ValueError(f"row {b}: a chunk holds 1..{MAX_CHUNK} candidates, got {len(cands)}")
        return cands

    def _plan_doc(self, b: int, si: int, doc: Doc, label: list[int], images: list) -> tuple:
        """(segment, label ids, text ids, n images) of one prompt doc (segment 0 the query, i+1
        candidate i); its images, and in point mode the query's centre crop, go onto `images`."""
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
        return si, label, self._text_ids(text), n_img

    def _plan_cands(self, b: int, cands: list, images: list) -> list[tuple]:
        labels = [self._cand_label if self.mode == POINT else [int(self.index_ids[i])] for i in range(len(cands))]
        return [self._plan_doc(b, i + 1, c, label, images) for i, (c, label) in enumerate(zip(cands, labels))]

    def _vision(self, images: list) -> tuple[dict, object]:
        """(pixel_values / image_grid_thw of `images`, an iterator of their token counts)."""
        if not images:
            return {}, iter([])
        pv, grid, tokens = self._pixels(images)
        return {"pixel_values": pv, "image_grid_thw": grid}, iter(tokens)

    def _join(self, head: list[int], segs: list[tuple], counts, tail: list[int]) -> tuple[list[int], list[int]]:
        """Token ids and pool segments of head + the planned segments + tail."""
        ids, seg = list(head), [-1] * len(head)
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
        return ids + tail, seg + [-1] * len(tail)

    def _pad(self, rows: list[tuple[list[int], list[int]]], padding_side: str = "right") -> dict:
        n, length = len(rows), max(len(r) for r, _ in rows)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        pool_seg = torch.full((n, length), -1, dtype=torch.long)
        for i, (r, s) in enumerate(rows):
            sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
            input_ids[i, sl] = torch.tensor(r)
            attention_mask[i, sl] = 1
            pool_seg[i, sl] = torch.tensor(s)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pool_seg": pool_seg}

    @property
    def _instr_tail(self) -> list[int]:
        return (self._list_instr if self.mode == LIST else self._point_instr) + self._tail

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
            cands = self._check_chunk(b, cands)
            plans.append([self._plan_doc(b, 0, q, self._query_label, images)] + self._plan_cands(b, cands, images))
        vision, counts = self._vision(images)
        batch = self._pad([self._join(self._head, segs, counts, self._instr_tail) for segs in plans], padding_side)
        mm = ((batch["input_ids"] == self.image_token_id) & (batch["attention_mask"] == 1)).int()
        return {**batch, "mm_token_type_ids": mm, "n_cands": torch.tensor([len(c) for c in candidates]), **vision}

    def prepare_split(self, queries: Sequence[Doc], candidates: Sequence[Sequence[Doc]]) -> tuple[dict, dict]:
        """prepare()'s prompts cut after the query segment, for prefix reuse: consecutive rows with
        the same query (as retrieval/rerank.py lays them out) share one prefix row (head + query).
        Returns (prefix batch: input_ids, attention_mask, pool_seg, pixel_values, image_grid_thw;
        suffix batch: the same for candidates + instruction + tail, plus n_cands and group [B], the
        prefix row of each suffix row). Both right-padded."""
        if len(queries) != len(candidates) or not queries:
            raise ValueError(f"prepare_split() needs one candidate list per query, got {len(queries)} and "
                             f"{len(candidates)}")
        firsts, group = [], []
        for b, q in enumerate(queries):
            if not firsts or not _same_doc(queries[firsts[-1]], q):
                firsts.append(b)
            group.append(len(firsts) - 1)
        pre_images, suf_images = [], []
        pre_plans = [[self._plan_doc(b, 0, queries[b], self._query_label, pre_images)] for b in firsts]
        suf_plans = [self._plan_cands(b, self._check_chunk(b, c), suf_images) for b, c in enumerate(candidates)]
        (pre_vision, pre_counts), (suf_vision, suf_counts) = self._vision(pre_images), self._vision(suf_images)
        pre = self._pad([self._join(self._head, p, pre_counts, []) for p in pre_plans])
        suf = self._pad([self._join([], p, suf_counts, self._instr_tail) for p in suf_plans])
        return ({**pre, **pre_vision}, {**suf, **suf_vision, "group": torch.tensor(group),
                                        "n_cands": torch.tensor([len(c) for c in candidates])})

    # ----------------------------------------------------------------------------- forward
    @staticmethod
    def answer_positions(attention_mask: Tensor) -> Tensor:
        """The last real token of each row (the answer is generated after it), any padding side."""
        idx = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
        return torch.where(attention_mask != 0, idx, -1).amax(-1)

    @staticmethod
    def _pool(hidden: Tensor, pool_seg: Tensor, n: int) -> Tensor:
        """[B, n, D] mean of each segment 0..n-1's tokens (zero where a segment has none)."""
        onehot = F.one_hot(pool_seg + 1, n + 1)[..., 1:].to(hidden.dtype)
        return torch.einsum("bls,bld->bsd", onehot, hidden) / onehot.sum(1).clamp_min(1)[..., None]

    def _outputs(self, logits: Tensor, n_cands: Tensor | None, z: Tensor | None) -> RerankOutput:
        """The mode's scores from the answer-position logits [B, V]; z [B, 1 + m, D]: the pooled
        query and candidate segments for the absolute scorer (list mode)."""
        if self.mode == POINT:
            return RerankOutput(logits, yes_logit=logits[:, self.yes_id] - logits[:, self.no_id])
        dev = logits.device
        m = int(n_cands.max())
        slots = torch.arange(m, device=dev)
        s = logits[:, self.index_ids[:m].to(dev)].masked_fill(slots[None, :] >= n_cands[:, None], float("-inf"))
        out = RerankOutput(logits, s=s, s_null=logits[:, self.null_id])
        if self.scorer is not None:
            z0, zi = z[:, :1].expand(-1, m, -1), z[:, 1:]
            parts = [z0, zi] + ([(z0 - zi).abs(), z0 * zi] if self.scorer_input == "interact" else [])
            pair = torch.cat(parts, -1)
            out.level_logits = self.scorer(pair.to(self.scorer[0].weight.dtype)).float()
        return out

    def forward(self, batch: dict) -> RerankOutput:
        dev = self.device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        pv, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        if pv is not None:
            pv, grid = pv.to(dev), grid.to(dev)
        hidden = self.family.forward(self.lm.model, ids, mask, batch["mm_token_type_ids"].to(dev), pv, grid)
        rows = torch.arange(ids.shape[0], device=dev)
        logits = self.lm.lm_head(hidden[rows, self.answer_positions(mask)]).float()   # [B, V]
        n_cands = batch["n_cands"].to(dev) if self.mode == LIST else None
        # mean-pool each segment's image tokens: query (0) and candidates 1..m
        z = self._pool(hidden, batch["pool_seg"].to(dev), int(n_cands.max()) + 1) if self.scorer is not None else None
        return self._outputs(logits, n_cands, z)

    @property
    def prefix_cacheable(self) -> bool:
        """Whether the backbone can continue from a key/value cache (run_cached: pailitao_vl). The
        Qwen-VL families number positions with M-RoPE from the whole prompt: they run uncached."""
        return callable(getattr(self.lm.model, "run_cached", None))

    def forward_cached(self, pre: dict, suf: dict) -> RerankOutput:
        """forward() of prepare_split()'s prompts (inference only): each distinct prefix runs once,
        its key/value cache is repeated over its suffix rows, and only the suffixes run after it,
        positions continuing after each prefix. Equal to forward() of the whole prompts up to
        floating-point error: causal attention makes the prefix states independent of the suffix."""
        if self.training:   # training keeps whole prompts: forward() (a cache under checkpointing is dropped)
            raise RuntimeError("forward_cached() is for inference; call eval() first")
        dev, model = self.device, self.lm.model
        pm, sm, group = pre["attention_mask"].to(dev), suf["attention_mask"].to(dev), suf["group"].to(dev)
        pv = lambda b: None if b.get("pixel_values") is None else b["pixel_values"].to(dev)  # noqa: E731
        h_pre, cache = model.run_cached(pre["input_ids"].to(dev), pm, pv(pre))
        cache.batch_select_indices(group)   # one copy of its prefix's keys/values per suffix row
        h_suf, _ = model.run_cached(suf["input_ids"].to(dev), torch.cat([pm[group], sm], 1), pv(suf), cache=cache)
        rows = torch.arange(sm.shape[0], device=dev)
        logits = self.lm.lm_head(h_suf[rows, self.answer_positions(sm)]).float()
        n_cands = suf["n_cands"].to(dev) if self.mode == LIST else None
        z = None
        if self.scorer is not None:   # z0 from the prefix pass: the query's states do not see the suffix
            m = int(n_cands.max())
            z = torch.cat([self._pool(h_pre, pre["pool_seg"].to(dev), 1)[group],
                           self._pool(h_suf, suf["pool_seg"].to(dev), m + 1)[:, 1:]], 1)
        return self._outputs(logits, n_cands, z)

    @torch.no_grad()
    def score(self, queries: Sequence[Doc], candidates: Sequence[Sequence[Doc]], batch_size: int = 16,
              prefix_cache: bool = False, timing: dict | None = None) -> list[dict]:
        """Inference, rows batched `batch_size` prompts at a time. Per row: list mode {s [m], s_null,
        r [m] (absolute) , levels [m, 4] (absolute)}; point mode {p_yes}. prefix_cache: rows of a
        batch that share their query (consecutive, same doc) compute the shared prompt prefix once
        (forward_cached; the same scores, fewer decoder tokens); ignored where not prefix_cacheable.
        timing: a dict that gets prepare_ms (prompts, pixels) and model_ms (forward passes) added."""
        was = self.training
        self.eval()
        cached = prefix_cache and self.prefix_cacheable
        out = []
        try:
            for i in range(0, len(queries), batch_size):
                q, c = queries[i:i + batch_size], candidates[i:i + batch_size]
                t0 = time.perf_counter()
                batch = self.prepare_split(q, c) if cached else (self.prepare(q, c),)
                t1 = time.perf_counter()
                o = self.forward_cached(*batch) if cached else self.forward(*batch)
                if timing is not None:
                    timing["prepare_ms"] = timing.get("prepare_ms", 0.0) + (t1 - t0) * 1e3
                    timing["model_ms"] = timing.get("model_ms", 0.0) + (time.perf_counter() - t1) * 1e3
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


def _same_doc(a: Doc, b: Doc) -> bool:
    """The same query doc: the same object, or the same image (object or path) and text."""
    if a is b:
        return True
    paths = isinstance(a[0], (str, Path)) and isinstance(b[0], (str, Path))
    same_image = a[0] is b[0] or (paths and str(a[0]) == str(b[0]))
    return same_image and a[1] == b[1]


def answer_targets(levels: Tensor, index_ids: Tensor, null_id: int) -> Tensor:
    """The token a listwise prompt should generate: the first instance candidate's index token,
    or NULL when the chunk has none. levels [B, M] (-1 = empty slot)."""
    inst = levels == 0
    first = torch.where(inst.any(-1), inst.float().argmax(-1), torch.zeros_like(levels[:, 0]))
    return torch.where(inst.any(-1), index_ids.to(levels.device)[first], torch.full_like(first, null_id))


def chunks_per_query(n: int, m: int) -> int:
    return math.ceil(n / m) if n else 0
