"""retrieval/ray_embed.py: compute.engine ray embeds the catalog on a Ray Data actor pool with the
same rows, order and vectors as the in-process path (a local Ray of 2 CPUs, the tiny synthetic
catalog, a tiny random-init embedder: no training, well under a minute)."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import Paths, deep_merge, load_params

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(params, catalog, checkpoint dir) in a temp workdir, with a local Ray of 2 CPUs for the module."""
    from data.ingest import build_catalog
    from data.sources import load_source
    from training.backbone import MLLMEmbedder

    root = tmp_path_factory.mktemp("ray_embed")
    params = load_params("tiny", {"workdir": str(root / "work"),
                                  "mlflow": {"tracking_uri": f"sqlite:///{root}/mlflow.db"}})
    paths = Paths.from_params(params)
    catalog = build_catalog(load_source(params, paths), paths.asset("validated_catalog"), params["ingest"],
                            params["validation"])
    torch.manual_seed(0)
    model_dir = root / "model"
    MLLMEmbedder.from_params(params["model"], catalog.items["title"].tolist()).save_pretrained(model_dir)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield params, catalog, model_dir
    ray.shutdown()


def test_ray_gives_the_in_process_embeddings(setup):
    from evaluation.retrieval import encode_gallery
    from retrieval.ray_embed import embed_with_ray, ray_engine
    from training.backbone import MLLMEmbedder

    params, catalog, model_dir = setup
    dim = params["model"]["served_dim"]
    g, local = encode_gallery(MLLMEmbedder.from_pretrained(model_dir), catalog, dim, batch_size=64)
    assert len(g) > 10
    g_ray, on_ray = encode_gallery(None, catalog, dim, 64, engine=ray_engine(str(model_dir), {"actors": 2,
                                                                                               "batch_size": 5}))
    pd.testing.assert_frame_equal(g, g_ray)
    assert on_ray.shape == local.shape and on_ray.dtype == np.float32
    assert np.allclose(on_ray, local, atol=1e-5)
    # rows in any order come back at their position
    rows = pd.DataFrame({"image": [str(catalog.image_file(p)) for p in g["path"]], "title": g["title"],
                         "position": np.arange(len(g))}).iloc[::-1]
    assert np.allclose(embed_with_ray(rows, str(model_dir), dim, 3, {"actors": 2}), local, atol=1e-5)


def test_item_embeddings_on_ray_writes_what_local_writes(setup):
    from pailitao.stages.retrieval import item_embeddings

    params, _, model_dir = setup
    paths = Paths.from_params(params)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", params["mlflow"]["tracking_uri"])
        for engine in ("local", "ray"):
            shutil.rmtree(paths.gallery_cache, ignore_errors=True)   # the cache would hand ray local's vectors
            p = deep_merge(params, {"compute": {"engine": engine, "ray": {"actors": 2, "batch_size": 8}}})
            res = item_embeddings(p, model=str(model_dir), out=paths.processed / f"emb-{engine}")
            assert res.info["engine"] == engine
            out[engine] = res.path
    assert np.allclose(np.load(out["ray"] / "embeddings.npy"), np.load(out["local"] / "embeddings.npy"), atol=1e-5)
    pd.testing.assert_frame_equal(pd.read_parquet(out["ray"] / "items.parquet"),
                                  pd.read_parquet(out["local"] / "items.parquet"))
    assert (out["ray"] / "meta.json").read_text() == (out["local"] / "meta.json").read_text()


def test_an_unreachable_cluster_is_named():
    from retrieval.ray_embed import RayUnavailable, _reachable

    with pytest.raises(RayUnavailable, match=r"'127\.0\.0\.1:1' cannot be reached"):
        _reachable("127.0.0.1:1", timeout=2)
    with pytest.raises(ConnectionError, match="compute.ray.address"):
        _reachable("127.0.0.1:1", timeout=2)
