"""Prefix key/value-cache reuse in the generative reranker (MLLMReranker.score(prefix_cache=True)):
the prompts of one query share head + query, which run once; the scores must equal the whole-prompt
path, the decoder must really see fewer tokens, and families without a cache path fall back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.rerank import ChunkwiseReranker, PointwiseReranker, load_reranker
from tests.test_pretrained import _img, tiny_vl
from training.backbone import MLLMEmbedder
from training.reranker import LIST, POINT, MLLMReranker

TITLES = ["red chair model 1", "blue car toy", "green apple", "a very long lamp title with many more words in it",
          "chair", "yellow lamp model 7 large"]
QWEN_TINY = {"family": "qwen2_vl", "preset": "tiny", "max_text_tokens": 8,
             "presets": {"tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
                                  "vision_depth": 1, "vision_dim": 32, "vision_heads": 2, "vocab": 400,
                                  "min_pixels": 3136, "max_pixels": 3136}}}


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """A tiny packaged-family embedder (random EfficientNet tower at 64 px + a 2-layer Llama)."""
    path = tmp_path_factory.mktemp("prefix") / "embedder"
    tiny_vl(0).save_pretrained(path)
    return path


def _reranker(path, mode) -> MLLMReranker:
    torch.manual_seed(1)
    rr = MLLMReranker.from_embedder(path, mode=mode, scorer_hidden=16).eval()
    with torch.no_grad():   # an untrained head: P(yes) mid-range and varying, not saturated
        rr.lm.lm_head.weight.normal_(0, 0.05)
    return rr


# image + text, image only, text only
QUERIES = [(_img(1), "red chair", None), (_img(2), None, None), (None, "blue lamp model", None)]
# image + text (short and long titles), image only, text only: chunks of unequal token length
DOCS = [(_img(10), TITLES[0], None), (_img(11), None, None), (None, TITLES[3], None), (_img(12), TITLES[3], None),
        (_img(13), TITLES[4], None), (None, TITLES[1], None), (_img(14), None, None)]


def _rows(mode):
    """The prompts rank_many builds: per query, chunks of 4 + 3 (list) or one per doc (point)."""
    plan = [DOCS[:4], DOCS[4:]] if mode == LIST else [[d] for d in DOCS]
    rows_q = [q for q in QUERIES for _ in plan]
    return rows_q, [c for _ in QUERIES for c in plan]


@pytest.mark.parametrize("mode", [LIST, POINT])
@pytest.mark.parametrize("batch_size", [64, 5])   # 5: queries split over batches, several prefixes a batch
def test_prefix_cached_scores_equal_whole_prompts(vl_dir, mode, batch_size):
    rr = _reranker(vl_dir, mode)
    assert rr.prefix_cacheable and (rr.absolute if mode == LIST else rr.query_crop)
    rows_q, rows_d = _rows(mode)
    full = rr.score(rows_q, rows_d, batch_size=batch_size)
    cached = rr.score(rows_q, rows_d, batch_size=batch_size, prefix_cache=True)
    assert len(full) == len(cached) == len(rows_q)
    keys = ["s", "s_null", "r", "levels"] if mode == LIST else ["p_yes"]
    for a, b in zip(full, cached):
        assert sorted(a) == sorted(b) == sorted(keys)
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], atol=1e-4, rtol=0, err_msg=k)
    # not a degenerate match: the scores differ between prompts
    first = np.array([np.ravel(r[keys[0]])[0] for r in full])
    assert np.ptp(first) > 1e-3
    # the whole next-token distribution at the answer position, not only the read-out tokens
    with torch.no_grad():
        a = rr(rr.prepare(rows_q[:batch_size], rows_d[:batch_size])).answer_logits
        b = rr.forward_cached(*rr.prepare_split(rows_q[:batch_size], rows_d[:batch_size])).answer_logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)


def test_prefix_split_holds_the_query_and_its_crop(vl_dir):
    rr = _reranker(vl_dir, POINT)
    rows_q, rows_d = _rows(POINT)
    pre, suf = rr.prepare_split(rows_q, rows_d)
    whole = rr.prepare(rows_q, rows_d)
    assert pre["input_ids"].shape[0] == len(QUERIES) and suf["group"].tolist() == [g for g in range(3) for _ in DOCS]
    assert pre["pixel_values"].shape[0] == 2 * 2   # two image queries, each with its centre crop
    for b in range(len(rows_q)):   # prefix + suffix is exactly the whole prompt
        g = int(suf["group"][b])
        joined = torch.cat([pre["input_ids"][g][pre["attention_mask"][g] == 1],
                            suf["input_ids"][b][suf["attention_mask"][b] == 1]])
        assert torch.equal(joined, whole["input_ids"][b][whole["attention_mask"][b] == 1])


def _decoder_calls(rr) -> tuple[list, object]:
    """(the [batch, length] of each decoder call, the hook handle)."""
    calls = []
    handle = rr.lm.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("mode", [LIST, POINT])
def test_rerankers_run_each_prefix_once(vl_dir, mode, tmp_path):
    rr = _reranker(vl_dir, mode)
    make = (lambda cache: ChunkwiseReranker(rr, chunk_size=4, merge_how="hybrid", prefix_cache=cache)) if mode == LIST \
        else (lambda cache: PointwiseReranker(rr, prefix_cache=cache))
    calls, handle = _decoder_calls(rr)
    try:
        plain = make(False).rank_many(QUERIES, [DOCS] * 3)
        whole = list(calls)
        calls.clear()
        reused = make(True).rank_many(QUERIES, [DOCS] * 3)
    finally:
        handle.remove()
    n_rows = 3 * (2 if mode == LIST else len(DOCS))
    assert whole == [(n_rows, whole[0][1])]                  # one pass over the whole prompts
    assert len(calls) == 2 and calls[0][0] == len(QUERIES)   # one prefix row per query, then the suffixes
    assert calls[1][0] == n_rows
    tokens = lambda cs: sum(b * n for b, n in cs)  # noqa: E731
    assert tokens(calls) < tokens(whole)
    for a, b in zip(plain, reused):
        assert np.array_equal(a.order, b.order)
        np.testing.assert_allclose(b.score, a.score, atol=1e-4)
    with pytest.raises(RuntimeError, match="inference"):   # training never takes the cache path
        rr.train()
        rr.forward_cached(*rr.prepare_split(QUERIES[:1], [DOCS[:1]]))
    rr.eval()
    # the params' reranker.prefix_cache reaches the loaded reranker (default on)
    rr.save_pretrained(tmp_path / "rr")
    cfg = {"chunk_size": 4, "assign": "contiguous", "merge": "hybrid", "batch_size_infer": 8}
    assert load_reranker(tmp_path / "rr", cfg).prefix_cache is True
    assert load_reranker(tmp_path / "rr", {**cfg, "prefix_cache": False}).prefix_cache is False


def test_qwen_family_falls_back_to_whole_prompts(tmp_path):
    torch.manual_seed(0)
    emb = MLLMEmbedder.from_params(QWEN_TINY, TITLES)
    emb.save_pretrained(tmp_path / "emb")
    rr = MLLMReranker.from_embedder(tmp_path / "emb", mode=LIST, scorer_hidden=16).eval()
    assert not rr.prefix_cacheable   # M-RoPE positions: no cache path
    rows_q, rows_d = _rows(LIST)
    full = rr.score(rows_q, rows_d)
    cached = rr.score(rows_q, rows_d, prefix_cache=True)
    for a, b in zip(full, cached):
        assert b["s"].shape == (len(a["s"]),) and b["r"].shape == a["r"].shape
        np.testing.assert_allclose(b["s"], a["s"], atol=1e-5)
        np.testing.assert_allclose(b["r"], a["r"], atol=1e-5)
