"""A manifest's image paths stay inside the manifest directory: an absolute path, a URL, a path
(or symlink) leading outside, and anything that is not a regular file are quarantined with their
reason before the target is ever stat'ed or opened; good rows next to them pass."""
import builtins
import io
import os
import pathlib

import pandas as pd
import pytest
from PIL import Image

from data.ingest import build_catalog
from data.sources import load_manifest
from tests.conftest import draw_product, write_manifest

URL = "http://example.com/a.png"


@pytest.fixture
def hostile_manifest(tmp_path):
    """write_manifest's good rows plus one item per hostile image path; returns (root, rows, forbidden)
    where rows maps item_id -> expected reason prefix and forbidden = (no_open, no_stat) path sets."""
    base = tmp_path.resolve()   # compare real paths: tmp_path itself may sit behind a symlink
    root = write_manifest(base / "m", n_items=3)
    for name in ("outside.png", "absolute.png", "secret.png", "outdir/inner.png"):
        (base / name).parent.mkdir(exist_ok=True)
        draw_product(9, seed=2, mode="RGB").save(base / name)
    (root / "link.png").symlink_to(base / "secret.png")
    (root / "linkdir").symlink_to(base / "outdir")
    os.mkfifo(root / "pipe.png")
    (root / "adir.png").mkdir()
    rows = {"bad_parent": ("../outside.png", "path outside the catalog"),
            "bad_absolute": (str(base / "absolute.png"), "absolute path"),
            "bad_symlink": ("link.png", "path outside the catalog"),
            "bad_symlinkdir": ("linkdir/inner.png", "path outside the catalog"),
            "bad_url": (URL, "URL, not a file in the catalog"),
            "bad_s3": ("s3://bucket/a.png", "URL, not a file in the catalog"),
            "bad_fifo": ("pipe.png", "not a regular file"),
            "bad_dir": ("adir.png", "not a regular file")}
    items = pd.read_csv(root / "items.csv", dtype=str, keep_default_na=False)
    images = pd.read_csv(root / "images.csv", dtype=str, keep_default_na=False)
    extra_items = [{"item_id": i, "title": f"hostile {i}", "category": "kitchen/mugs", "group_id": i,
                    "split": ""} for i in rows]
    extra_images = [{"item_id": i, "image": p, "view": "catalog"} for i, (p, _) in rows.items()]
    pd.concat([items, pd.DataFrame(extra_items)]).to_csv(root / "items.csv", index=False)
    pd.concat([images, pd.DataFrame(extra_images)]).to_csv(root / "images.csv", index=False)
    draw_product(1, seed=1, mode="RGB").save(root / "q1.png")
    pd.DataFrame([{"query_id": "q_ok", "image": "q1.png", "text": "", "item_id": "item001"},
                  {"query_id": "q_out", "image": "../outside.png", "text": "", "item_id": "item002"},
                  {"query_id": "q_fifo", "image": "pipe.png", "text": "", "item_id": "item002"}]
                 ).to_csv(root / "queries.csv", index=False)
    outside = {base / "outside.png", base / "absolute.png", base / "secret.png", base / "outdir",
               base / "outdir/inner.png", root / "link.png", root / "linkdir", root / "linkdir/inner.png",
               root / "http:/example.com/a.png", root / "s3:/bucket/a.png"}
    no_stat = {str(p) for p in outside}
    no_open = no_stat | {str(root / "pipe.png"), str(root / "adir.png")}
    return root, {i: reason for i, (_, reason) in rows.items()}, (no_open, no_stat)


def _target(arg) -> str | None:
    if isinstance(arg, int):
        return None
    try:
        path = os.fspath(arg)
    except TypeError:   # a BytesIO handed to Image.open
        return None
    return os.path.abspath(os.fsdecode(path))


def guard(monkeypatch, forbidden: set[str], verb: str, owner, name: str, touched: list) -> None:
    """Wrap owner.name so that a call on a forbidden path fails the test instead of touching it
    (a FIFO opened for reading would block the test forever)."""
    real = getattr(owner, name)

    def wrapper(target, *args, **kwargs):
        if _target(target) in forbidden:
            touched.append((verb, name, _target(target)))
            pytest.fail(f"{name} {verb} a path that must not be touched: {target}")
        return real(target, *args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)


def test_paths_leaving_the_catalog_are_quarantined_untouched(hostile_manifest, make_params, tmp_path,
                                                             monkeypatch):
    root, reasons, (no_open, no_stat) = hostile_manifest
    params = make_params({"ingest": {"workers": 1}})
    touched: list = []
    for owner, name in [(builtins, "open"), (io, "open"), (os, "open"), (pathlib.Path, "open"),
                        (pathlib.Path, "read_bytes"), (pathlib.Path, "read_text"), (Image, "open")]:
        guard(monkeypatch, no_open, "opened", owner, name, touched)
    guard(monkeypatch, no_stat, "stat'ed", os, "stat", touched)   # os.path.getsize, Path.stat use it

    cat = build_catalog(load_manifest(root), tmp_path / "cat", params["ingest"], params["validation"])

    assert touched == []
    q = cat.quarantine.set_index("item_id")["reason"]
    for item_id, prefix in reasons.items():
        assert q[item_id].startswith(prefix), (item_id, q[item_id])
    assert len(cat.quarantine) == len(reasons)       # the good rows all pass
    assert set(cat.ok_images["item_id"]) == {"item000", "item001", "item002"}
    assert q["bad_parent"] == "path outside the catalog (../outside.png)"
    queries = pd.read_parquet(cat.root / "queries.parquet").set_index("query_id")
    assert queries.loc["q_ok", "status"] == "ok"
    assert queries.loc["q_out", "reason"].startswith("path outside the catalog")
    assert queries.loc["q_fifo", "reason"].startswith("not a regular file")


def test_good_manifest_paths_resolve_inside_the_catalog(tmp_path):
    root = write_manifest(tmp_path / "m", n_items=3)
    (root / "sub").mkdir()
    (root / "sub" / "alias.png").symlink_to(root / "img" / "item000.png")   # a link that stays inside
    images = pd.read_csv(root / "images.csv")
    images.loc[len(images)] = ["item001", "sub/../sub/alias.png", "shopper"]
    images.to_csv(root / "images.csv", index=False)
    src = load_manifest(root)
    assert src.images["refused"].isna().all()
    assert src.images["source_path"].iloc[-1] == str((root / "img" / "item000.png").resolve())
