"""Retrieval on the tiny lineage: item_embeddings and ann_index stages, the recall check, checked
query decoding, the Searcher (dedup, reranker hook, model/index guard), the champion lookup and
`pailitao search`."""
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.schema import Catalog
from evaluation.retrieval import cached_gallery, gallery
from pailitao.cli import main
from core.config import Paths, deep_merge
from core.io import read_json
from retrieval.registry import EMBEDDER_NAMES
from retrieval import index_store
from retrieval import pipeline as pl
from retrieval import models as rm
from retrieval import query as rq
from pailitao.stages.retrieval import ann_index, check_ann_index
from tests.conftest import image_bytes as png, plant_bad_image



@pytest.fixture(scope="module")
def searcher(tiny_lineage):
    return pl.build_searcher(tiny_lineage)


@pytest.fixture(scope="module")
def catalog(tiny_lineage):
    return Catalog.load(Paths.from_params(tiny_lineage).asset("validated_catalog"))


def test_item_embeddings_and_index_cover_the_catalog(tiny_lineage, catalog):
    paths = Paths.from_params(tiny_lineage)
    emb_dir = paths.asset("item_embeddings")
    emb, items, meta = np.load(emb_dir / "embeddings.npy"), pd.read_parquet(emb_dir / "items.parquet"), \
        read_json(emb_dir / "meta.json")
    g = gallery(catalog)
    assert emb.shape == (len(g), tiny_lineage["model"]["served_dim"]) and meta["n"] == len(g)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert list(items["image_id"]) == list(g["image_id"])
    served = rm.resolve_model(tiny_lineage)   # the champion the promotion gate chose
    assert meta["model"] == served.name in ("embedding_model", "baseline_embedder")
    assert meta["model_version"] == served.fingerprint == rm.model_fingerprint(paths.asset(served.name) / "model")
    assert (emb_dir.parent / items["image"].iloc[0]).is_file()   # paths resolve from the parent
    current = index_store.load_current(paths.asset("ann_index"))
    assert current.meta["model_version"] == meta["model_version"] and current.index.ntotal == len(g)
    passed, desc, info = check_ann_index(tiny_lineage)
    assert passed and info["recall"] == 1.0 and "recall@10" in desc


def test_item_embeddings_reuse_the_gallery_the_promotion_gate_embedded(tiny_lineage, catalog, tmp_path):
    """embedding_promotion embeds the catalog by both arms; item_embeddings reads the champion's
    pass from the cache instead of embedding the catalog again."""
    paths, dim = Paths.from_params(tiny_lineage), tiny_lineage["model"]["served_dim"]
    meta = read_json(paths.asset("item_embeddings") / "meta.json")
    cached = paths.gallery_cache / f"gallery-{meta['model_version']}-{dim}-{catalog.meta['fingerprint']}"
    np.testing.assert_array_equal(np.load(cached / "emb.npy"), np.load(paths.asset("item_embeddings") / "embeddings.npy"))
    served, loads = rm.resolve_model(tiny_lineage), []

    def load():
        loads.append(1)
        return rm.load_embedder(served)

    first = cached_gallery(tmp_path, served.fingerprint, load, catalog, dim)
    again = cached_gallery(tmp_path, served.fingerprint, load, catalog, dim)
    assert len(loads) == 1 and list(again[0]["image_id"]) == list(first[0]["image_id"])
    np.testing.assert_array_equal(again[1], first[1])
    assert Path(again[0]["image"].iloc[0]).is_file()
    cached_gallery(tmp_path, "another-checkpoint", load, catalog, dim)   # a retrained model misses
    assert len(loads) == 2


def test_recall_check_fails_and_keeps_serving_the_previous_version(tiny_lineage, tmp_path):
    paths = Paths.from_params(tiny_lineage)
    good = ann_index(tiny_lineage, out=tmp_path / "idx")
    bad_params = deep_merge(tiny_lineage, {"ann_index": {"min_recall": 1.01}})
    bad = ann_index(bad_params, out=tmp_path / "idx")
    passed, desc, _ = check_ann_index(bad_params, tmp_path / "idx")
    assert not passed and "kept but not made current" in desc
    assert index_store.current_version(tmp_path / "idx") == good.info["version"] != bad.info["version"]
    assert paths.asset("ann_index").is_dir()


@pytest.mark.parametrize("kind, error", [
    ("not_image", rq.UnsupportedImage), ("truncated", rq.CorruptImage), ("bomb", rq.TooLarge),
    ("empty", rq.EmptyQuery)])
def test_decode_rejects_bad_uploads_with_typed_errors(tmp_path, kind, error):
    path = tmp_path / "x.png"
    plant_bad_image(path, kind, Image.new("RGB", (64, 48), "red"))
    with pytest.raises(error):
        rq.decode_query_image(path.read_bytes(), rq.QueryLimits())


def test_decode_limits_formats_and_normalizes():
    limits = rq.QueryLimits(max_bytes=5000, max_side=100, formats=("JPEG", "PNG"))
    with pytest.raises(rq.UnsupportedImage, match="TIFF"):
        rq.decode_query_image(png(Image.new("RGB", (40, 40)), "TIFF"), limits)
    with pytest.raises(rq.TooLarge, match="bytes"):
        rq.decode_query_image(png(Image.effect_noise((200, 200), 80).convert("RGB")), limits)
    with pytest.raises(rq.UnusableImage, match="too small"):
        rq.decode_query_image(png(Image.new("RGB", (5, 40))), limits)
    rgba = Image.new("RGBA", (300, 150), (0, 0, 0, 0))
    im = rq.decode_query_image(png(rgba), limits)
    assert im.mode == "RGB" and im.size == (100, 50) and im.getpixel((5, 5)) == (255, 255, 255)


def test_search_returns_distinct_items_with_metadata_and_latency(searcher, catalog, tiny_lineage):
    g = gallery(catalog)
    first = g.iloc[0]
    res = searcher.search(catalog.image_file(first["path"]).read_bytes(), first["title"], k=5)
    d = res.to_dict()
    assert [r["rank"] for r in d["results"]] == [1, 2, 3, 4, 5]
    ids = [r["item_id"] for r in d["results"]]
    assert len(set(ids)) == len(ids)
    scores = [r["score"] for r in d["results"]]
    assert scores == sorted(scores, reverse=True)
    assert ids[0] == first["item_id"]   # the catalog image itself, with its title
    assert d["results"][0]["title"] == first["title"] and d["results"][0]["category"] == first["category"]
    assert set(d["latency_ms"]) == {"decode", "embed", "ann", "rerank", "total"}
    assert d["latency_ms"]["total"] >= d["latency_ms"]["embed"] > 0
    assert d["index_version"] == index_store.current_version(Paths.from_params(tiny_lineage).asset("ann_index"))
    text_only = searcher.search(None, "handbag", k=3)
    assert len(text_only.results) == 3 and text_only.latency_ms["decode"] < 5
    with pytest.raises(rq.EmptyQuery):
        searcher.search(b"", "  ")
    with pytest.raises(rq.TooLarge):
        searcher.search(None, "x" * 10_000)


def test_reranker_hook_reorders_the_candidates(tiny_lineage, searcher):
    seen = {}

    def reverse(query, cands):
        seen["n"], seen["dim"] = len(cands), query.embedding.shape
        return [pl.Candidate(**{**vars(c), "rerank_score": -i}) for i, c in enumerate(cands)][::-1]

    other = pl.build_searcher(tiny_lineage, reranker=reverse, embedder=searcher.embedder, info=searcher.model)
    plain = searcher.search(None, "red mug", k=3)
    reranked = other.search(None, "red mug", k=3)
    n_items = pd.read_parquet(searcher.embeddings_dir / "items.parquet")["item_id"].nunique()
    assert seen == {"n": min(tiny_lineage["serving"]["candidates"], n_items), "dim": (other.dim,)}
    assert reranked.results[0].rerank_score is not None
    assert [c.item_id for c in reranked.results] != [c.item_id for c in plain.results]


def test_an_index_built_by_another_model_is_refused(tiny_lineage, searcher):
    info = rm.ModelInfo("other", "elsewhere", searcher.model.path, "0000000000000000")
    other = pl.Searcher(searcher.embedder, info, searcher.index_dir, searcher.embeddings_dir, searcher.dim)
    assert not other.refresh() and not other.ready and "built by model" in other.last_error
    with pytest.raises(rq.NotReady, match="built by model"):
        other.search(None, "mug")
    lenient = pl.Searcher(searcher.embedder, info, searcher.index_dir, searcher.embeddings_dir, searcher.dim,
                          require_model_match=False)
    assert lenient.refresh() and lenient.search(None, "mug").results


def test_champion_alias_in_the_registry_wins(tiny_lineage):
    client = mlflow.MlflowClient(tiny_lineage["mlflow"]["tracking_uri"])
    name = EMBEDDER_NAMES["baseline_embedder"]
    local = rm.resolve_model(deep_merge(tiny_lineage, {"serving": {"registry_alias": None}}), "baseline_embedder")
    assert local.source.endswith("baseline_embedder/model")
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = client.get_model_version(name, str(version)).aliases   # the gate may have set it already
    client.set_registered_model_alias(name, "champion", version)
    try:
        info = rm.resolve_model(tiny_lineage, "baseline_embedder")
    finally:
        if "champion" not in aliases:
            client.delete_registered_model_alias(name, "champion")
    assert info.source == f"models:/{name}@champion (version {version})"
    assert ".registry" in info.path and info.fingerprint == local.fingerprint   # the same checkpoint


def test_cli_search_prints_json(tiny_lineage, catalog, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_lineage["mlflow"]["tracking_uri"])
    first = gallery(catalog).iloc[0]
    args = ["--profile", "tiny", "--workdir", tiny_lineage["workdir"]]
    assert main(["search", str(catalog.image_file(first["path"])), "--text", first["title"], "--k", "3", *args]) == 0
    out = capsys.readouterr().out
    body = json.loads(out[out.index("{"):])
    assert len(body["results"]) == 3 and body["results"][0]["item_id"] == first["item_id"]
    assert main(["search", *args]) == 2
    assert "image and/or a text" in capsys.readouterr().err


def test_hybrid_search_merges_the_lexical_matches_of_the_words(tiny_lineage, searcher, catalog):
    """serving.hybrid: a text query's words pull the item with that title to the top (the tiny
    random model alone cannot); lexical_weight 0 is the embedding order alone."""
    assert searcher.hybrid.text_only_weight > 0
    row = gallery(catalog).iloc[3]
    res = searcher.search(None, row["title"], k=5)
    assert res.results[0].title == row["title"] and res.results[0].lexical > 0.5
    assert [c.score for c in res.results] == sorted((c.score for c in res.results), reverse=True)
    # the merge sees the top serving.candidates whatever k is: fewer results are a prefix of more
    # (a light weight makes the merge depend on the depth of the dense list it floors to)
    light = pl.build_searcher(deep_merge(tiny_lineage, {"serving": {"hybrid": {"text_only_weight": 0.01}}}),
                              embedder=searcher.embedder, info=searcher.model)
    for title in gallery(catalog)["title"].head(12):
        deep = [c.item_id for c in light.search(None, title, k=8).results]
        assert [[c.item_id for c in light.search(None, title, k=k).results] for k in (1, 2)] == [deep[:1], deep[:2]]
    no_words = {"serving": {"hybrid": {"lexical_weight": 0.0, "text_only_weight": 0.0}}}
    off = pl.build_searcher(deep_merge(tiny_lineage, no_words), embedder=searcher.embedder, info=searcher.model)
    plain = off.search(None, row["title"], k=5)
    assert all(c.lexical is None for c in plain.results)
    assert [c.item_id for c in plain.results] == [c.item_id for c in
                                                  sorted(plain.results, key=lambda c: -c.score)]
