"""The registry's contract: registered pyfuncs take image bytes (never a path) and text, carry a
signature, an input example and tags tying them to the run and checkpoint that made them, and serve
under `mlflow models serve`; the search service pairs an index only with the model that built it,
at the index's dimension, and refuses in one line when there is nothing to serve."""
from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from pailitao.cli import main
from core.config import REPO_ROOT, Paths, deep_merge
from core.io import read_json, write_json
from retrieval.registry import EMBEDDER_NAMES, FINGERPRINT_TAG, RERANKER_NAMES, log_embedder
from core.tracking import start_run
from retrieval import index_store
from retrieval import pipeline as pl
from retrieval import models as rm
from retrieval import query as rq
from serving.app import build_searchers
from tests.conftest import draw_product, free_port, image_bytes, plant_bad_image


@pytest.fixture
def store(tiny_lineage, monkeypatch):
    """The tiny lineage's MLflow store, for the fluent API and any subprocess."""
    uri = tiny_lineage["mlflow"]["tracking_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def champion(client) -> tuple[str, str, str]:
    """(stage, registered name, version) of the embedder holding the champion alias."""
    for stage, name in EMBEDDER_NAMES.items():
        try:
            return stage, name, str(client.get_model_version_by_alias(name, "champion").version)
        except MlflowException:
            continue
    raise AssertionError("no embedder is champion after the tiny lineage")


# ------------------------------------------------------------------------------ pyfunc contract
def test_registered_models_carry_a_signature_an_input_example_and_their_origin(tiny_lineage, store):
    emb_meta = read_json(Paths.from_params(tiny_lineage).asset("item_embeddings") / "meta.json")
    names = [n for n in (*EMBEDDER_NAMES.values(), *RERANKER_NAMES.values())
             if store.search_model_versions(f"name='{n}'")]
    assert set(EMBEDDER_NAMES.values()) <= set(names) and RERANKER_NAMES["reranker_model"] in names
    for name in names:
        version = max(store.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        info = mlflow.models.get_model_info(f"models:/{name}/{version.version}")
        assert info.signature is not None and "image" in info.signature.inputs.input_names(), name
        assert info.saved_input_example_info, name
        assert version.tags[FINGERPRINT_TAG] and version.tags["pailitao.profile"] == "tiny", name
        if name in EMBEDDER_NAMES.values():
            assert version.tags["pailitao.dim"] == str(tiny_lineage["model"]["served_dim"])
            assert version.tags["pailitao.catalog_fingerprint"] == emb_meta["catalog_fingerprint"]
            assert info.signature.params.to_dict()[0]["default"] == tiny_lineage["model"]["served_dim"]


def test_embedder_pyfunc_embeds_image_bytes_and_text_never_a_path(tiny_lineage, store, tmp_path):
    stage, name, _ = champion(store)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    png, dim = image_bytes(draw_product(3, mode="RGB")), tiny_lineage["model"]["served_dim"]
    out = model.predict(pd.DataFrame({"image": [png, base64.b64encode(png).decode(), b""],
                                      "text": ["red mug", "red mug", "red mug"]}))
    assert out.shape == (3, dim)
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)            # bytes or base64: the same image
    assert not np.allclose(out[0], out[2], atol=1e-3)                # the third row is text only
    # the same embedding the search service computes for that upload
    info = rm.resolve_model(tiny_lineage)
    want = rm.load_embedder(info).encode([rq.decode_query_image(png, rq.QueryLimits.from_params(tiny_lineage))],
                                         ["red mug"], dim=dim)
    np.testing.assert_allclose(out[:1], want, atol=1e-5)
    path = tmp_path / "photo.png"
    path.write_bytes(png)
    bomb = tmp_path / "bomb.png"
    plant_bad_image(bomb, "bomb", None)
    for image, why in ((str(path), "base64"), (bomb.read_bytes(), "too many pixels"),
                       (b"this is not an image", "not an image")):
        with pytest.raises(MlflowException, match=why):
            model.predict(pd.DataFrame({"image": [image], "text": ["x"]}))
    with pytest.raises(MlflowException, match="image and/or a text"):
        model.predict(pd.DataFrame({"image": [b""], "text": [""]}))


def test_reranker_pyfunc_ranks_image_bytes(tiny_lineage, store):
    model = mlflow.pyfunc.load_model(f"models:/{RERANKER_NAMES['reranker_model']}/latest")
    emb_dir = Paths.from_params(tiny_lineage).asset("item_embeddings")
    items = pd.read_parquet(emb_dir / "items.parquet").head(5)
    images = [(emb_dir.parent / p).read_bytes() for p in items["image"]]
    df = pd.DataFrame({"query_id": "q1", "query_image": [images[0]] * 5, "query_text": "",
                       "image": images, "text": items["title"].tolist()})
    out = model.predict(df)
    assert sorted(out["rank"]) == [1, 2, 3, 4, 5] and list(out["query_id"]) == ["q1"] * 5
    assert np.all((out["p_instance"] >= 0) & (out["p_instance"] <= 1))
    with pytest.raises(MlflowException, match="base64"):   # catalog paths are not opened
        model.predict(df.assign(image=[str(emb_dir.parent / p) for p in items["image"]]))


def test_mlflow_models_serve_answers_image_and_text_rows(tiny_lineage, store):
    """`mlflow models serve` of the champion (about 20 s): one row with a base64 image, one with text only."""
    _, name, _ = champion(store)
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}   # its uvicorn
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        png = base64.b64encode(image_bytes(draw_product(2, mode="RGB"))).decode()
        body = {"dataframe_split": {"columns": ["image", "text"], "data": [[png, "red mug"], ["", "red mug"]]}}
        r = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        emb = np.asarray(r.json()["predictions"])
        assert emb.shape == (2, tiny_lineage["model"]["served_dim"])
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
        junk = {"dataframe_split": {"columns": ["image", "text"],
                                    "data": [[base64.b64encode(b"not an image at all").decode(), "x"]]}}
        r = httpx.post(f"{url}/invocations", json=junk, timeout=60)
        assert r.status_code == 400 and "not an image" in r.text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)   # its session: the server and its uvicorn worker
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ service pairing
def test_serve_with_nothing_published_says_so_in_one_line(tiny_lineage, store, tmp_path, monkeypatch, capsys):
    """A workdir with no index, a champion from a tiny run in the store, a profile serving another
    dim: one line naming the command that builds an index, exit code 2, no traceback."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served with nothing to serve"))
    work = tmp_path / "empty"
    code = main(["serve", "--profile", "tiny", "--workdir", str(work), "--set", "model.served_dim=128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no published index" in err[0] and f"pailitao run --profile tiny --out {work}" in err[0]


def _copy_index(params: dict, workdir: Path) -> dict:
    """params of a workdir holding only a copy of the tiny lineage's published index (no checkpoints)."""
    other = deep_merge(params, {"workdir": str(workdir)})
    src, dst = Paths.from_params(params), Paths.from_params(other)
    for asset in ("item_embeddings", "ann_index"):
        shutil.copytree(src.asset(asset), dst.asset(asset))
    return other


def test_a_champion_from_another_run_is_not_paired_with_this_index(tiny_lineage, store, tmp_path):
    """Another run (another catalog, another dim) registers under the same name and becomes
    champion: the service serves the registered version that built the published index, at the
    index's dim; when no checkpoint built it, it refuses."""
    stage, name, version = champion(store)
    paths = Paths.from_params(tiny_lineage)
    meta = index_store.load_current(paths.asset("ann_index")).meta
    elsewhere = deep_merge(tiny_lineage, {"model": {"served_dim": 64}})
    with start_run(stage, elsewhere, "another-catalog"):
        new = log_embedder(paths.asset("stage1_embedder") / "model", stage, elsewhere, "another-catalog")
    store.set_registered_model_alias(name, "champion", new)
    try:
        params = _copy_index(elsewhere, tmp_path / "work")
        assert rm.resolve_model(params).fingerprint != meta["model_version"]   # the new champion
        served = build_searchers(params)["default"]
        assert served.model.fingerprint == meta["model_version"] and served.dim == meta["dim"] == 32
        assert served.ready and served.search(None, "red mug").results
        assert store.get_model_version(name, new).tags["pailitao.catalog_fingerprint"] == "another-catalog"
        # an index no known checkpoint built: refused in one line, never served by the champion
        orphan = _copy_index(elsewhere, tmp_path / "orphan")
        root = Paths.from_params(orphan).asset("ann_index")
        vmeta = root / "versions" / index_store.current_version(root) / "meta.json"
        write_json({**read_json(vmeta), "model_version": "0" * 16}, vmeta)
        with pytest.raises(rm.NothingToServe, match="built by model 0000000000000000"):
            build_searchers(orphan)
    finally:
        store.set_registered_model_alias(name, "champion", version)
        store.delete_model_version(name, new)
