"""Shared fixtures: tiny params in a temp workdir with its own MLflow store, and small catalogs
built by the tests themselves (an openclipart-like tree, a manifest directory)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from core.config import deep_merge, load_params


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def make_params(tmp_path, mlflow_uri):
    """load_params('tiny') with workdir in tmp_path (plus any overrides)."""
    def make(overrides: dict | None = None, profile: str = "tiny") -> dict:
        return load_params(profile, deep_merge({"workdir": str(tmp_path / "work")}, overrides or {}))
    return make


def draw_product(kind: int, size=(120, 90), color=(200, 40, 40), seed=0, mode="RGBA") -> Image.Image:
    """A distinct little drawing on a transparent (or white) background."""
    rng = np.random.default_rng(seed * 7919 + kind)
    im = Image.new(mode, size, (255, 255, 255, 0) if mode == "RGBA" else "white")
    d = ImageDraw.Draw(im)
    w, h = size
    pts = [(int(x * w), int(y * h)) for x, y in rng.uniform(0.1, 0.9, size=(5 + kind % 3, 2))]
    d.polygon(pts, fill=color + ((255,) if mode == "RGBA" else ()), outline=(0, 0, 0) + ((255,) if mode == "RGBA" else ()))
    d.ellipse([w * 0.3, h * 0.3, w * 0.3 + 10 + kind * 3, h * 0.3 + 8 + kind * 2], fill=(20, 20, 160) + ((255,) if mode == "RGBA" else ()))
    return im


def _save(im: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@pytest.fixture
def openclipart_tree(tmp_path) -> Path:
    """A small tree shaped like /usr/share/openclipart/png, with each kind of twin planted."""
    root = tmp_path / "openclipart"
    colour = draw_product(1, color=(220, 120, 0))
    _save(colour, root / "food/desserts/cone1_ganson.png")
    _save(colour.convert("LA"), root / "food/desserts/cone1_bw_ganson.png")            # bw twin
    _save(draw_product(2), root / "transportation/hummer_01.png")
    _save(draw_product(2).resize((240, 180)), root / "transportation/vehicles/hummer_01.png")  # size twin
    flask = _save(draw_product(3, color=(0, 150, 0)), root / "science/flask_02.png")
    (root / "education").mkdir(parents=True)
    shutil.copy(flask, root / "education/flask_02.png")                                 # byte twin
    _save(draw_product(4, color=(30, 30, 200)), root / "animals/birds/Parrot_Jon_01.png")
    _save(draw_product(5, color=(120, 0, 120)), root / "animals/birds/parrot_jon_02.png")
    _save(draw_product(6, color=(90, 60, 30)), root / "computer/icons/viewmag+.png")
    _save(draw_product(7, color=(10, 160, 160)), root / "computer/icons/viewmag-.png")
    _save(draw_product(8, color=(160, 160, 10)), root / "recreation/music/CD_Player/cd_player_01.png")
    return root


def write_manifest(root: Path, n_items: int = 12, bad: dict | None = None, groups: dict | None = None,
                   splits: dict | None = None, queries: bool = False) -> Path:
    """A manifest directory in the data contract; `bad` maps item index -> planted bad image kind."""
    root.mkdir(parents=True, exist_ok=True)
    items, images = [], []
    cats = ["apparel/hats", "apparel/shirts", "kitchen/mugs"]
    for i in range(n_items):
        iid = f"item{i:03d}"
        items.append({"item_id": iid, "title": f"product {i}", "category": cats[i % 3],
                      "group_id": (groups or {}).get(i, iid), "split": (splits or {}).get(i, "")})
        rel = f"img/{iid}.png"
        kind = (bad or {}).get(i)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        good = draw_product(i, seed=1, mode="RGB")
        if kind is None:
            good.save(path)
        else:
            plant_bad_image(path, kind, good)
        images.append({"item_id": iid, "image": rel, "view": "catalog"})
        if i % 4 == 0 and kind is None:  # an extra shopper view of some items
            _save(draw_product(i, seed=1, mode="RGB").rotate(10, fillcolor="gray"), root / f"img/{iid}_shop.png")
            images.append({"item_id": iid, "image": f"img/{iid}_shop.png", "view": "shopper"})
    pd.DataFrame(items).to_csv(root / "items.csv", index=False)
    pd.DataFrame(images).to_csv(root / "images.csv", index=False)
    if queries:
        _save(draw_product(1, seed=1, mode="RGB").rotate(20, fillcolor="gray"), root / "q/q1.png")
        pd.DataFrame([{"query_id": "q1", "image": "q/q1.png", "text": "", "item_id": "item001"},
                      {"query_id": "q2", "image": "", "text": "product 2 mug", "item_id": "item002"}]
                     ).to_csv(root / "queries.csv", index=False)
    return root


def plant_bad_image(path: Path, kind: str, good: Image.Image) -> None:
    import io
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        buf = io.BytesIO()
        good.save(buf, format="PNG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "not_image":
        path.write_text("this is not an image\n")
    elif kind == "bomb":  # 30000 x 30000 1-bit PNG: ~100 kB on disk, 900 M pixels when decoded
        Image.new("1", (30000, 30000)).save(path, format="PNG")
    elif kind == "missing":
        pass
    else:
        raise ValueError(kind)


@pytest.fixture
def manifest_dir(tmp_path) -> Path:
    return write_manifest(tmp_path / "manifest")


# ---------------------------------------------------------------- retrieval, serving, A/B, browser
@pytest.fixture(scope="session")
def tiny_lineage(tmp_path_factory) -> dict:
    """The whole tiny lineage (data, trained embedders, item_embeddings, ann_index) built once per
    session and shared by the pipeline, serving, A/B and browser tests. Its MLflow store is its own
    (in params, so it holds whatever MLFLOW_TRACKING_URI other tests set later)."""
    from pailitao.lineage import run_lineage

    root = tmp_path_factory.mktemp("tiny_lineage")
    uri = f"sqlite:///{root}/mlflow.db"
    params = load_params("tiny", {"workdir": str(root / "work"), "mlflow": {"tracking_uri": uri}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        run_lineage(params)
    return params


@pytest.fixture(scope="session")
def tiny_ab(tiny_lineage) -> dict:
    """tiny_lineage with the A/B split on and the control's own index built (pailitao ab build)."""
    from pailitao.stages.retrieval import build_variant_indexes
    from serving.ab import variants_from_params

    params = deep_merge(tiny_lineage, {"ab": {"enabled": True}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", params["mlflow"]["tracking_uri"])
        build_variant_indexes(params, variants_from_params(params))
    return params


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An ASGI app under uvicorn on a free 127.0.0.1 port, in a thread (lifespan included)."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def image_bytes(im, fmt: str = "PNG") -> bytes:
    """A PIL image encoded as an upload would carry it."""
    import io
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_query_sets(tmp_path_factory):
    """The tiny profile's synthetic catalog, its splits and its rendered query sets, built once with
    the domain functions (no stage, no MLflow): (params, catalog, splits, queries, query root)."""
    from types import SimpleNamespace

    from data.ingest import build_catalog
    from data.queries import build_query_sets
    from data.sources import load_source
    from data.splits import assign_splits
    from core.config import Paths

    root = tmp_path_factory.mktemp("tiny_query_sets")
    params = load_params("tiny", {"workdir": str(root / "work")})
    catalog = build_catalog(load_source(params, Paths.from_params(params)), root / "catalog", params["ingest"],
                            params["validation"])
    splits = assign_splits(catalog.items, params["splits"], params["seed"])
    queries, _ = build_query_sets(catalog, splits, params["queries"], params["noise"], params["seed"], root / "queries")
    return SimpleNamespace(params=params, catalog=catalog, splits=splits, queries=queries, root=root / "queries")
