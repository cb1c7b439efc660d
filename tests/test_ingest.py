"""Safe ingestion: every planted bad image is quarantined with its reason and never crashes a
run; validation turns the quarantined share into a pass or a fail; writes are atomic."""
import os

import pandas as pd
import pytest

from data import images as img
from data import ingest
from data.ingest import build_catalog
from data.schema import Catalog
from data.sources import load_manifest
from data.validation import failed_errors, validate_catalog
from pailitao.stages import data as stages
from core.config import Paths
from tests.conftest import write_manifest

BAD = {1: "empty", 2: "truncated", 3: "not_image", 4: "bomb", 5: "missing"}
REASONS = {"empty": img.EMPTY, "truncated": img.CORRUPT, "not_image": img.NOT_IMAGE,
           "bomb": img.TOO_MANY_PIXELS, "missing": img.MISSING}


def test_bad_images_are_quarantined_with_their_reason(tmp_path, make_params):
    params = make_params()
    root = write_manifest(tmp_path / "m", n_items=20, bad=BAD)
    cat = build_catalog(load_manifest(root), tmp_path / "cat", params["ingest"], params["validation"])
    q = cat.quarantine.set_index("item_id")["reason"]
    for i, kind in BAD.items():
        assert q[f"item{i:03d}"].startswith(REASONS[kind]), (kind, q[f"item{i:03d}"])
    assert len(cat.quarantine) == len(BAD)
    ok = cat.ok_images
    assert len(ok) == len(cat.images) - len(BAD)
    for rel in ok["path"]:
        with img.Image.open(cat.image_file(rel)) as im:
            assert im.mode == "RGB" and max(im.size) <= params["ingest"]["max_side"]


def test_quarantine_share_decides_the_check(tmp_path, make_params):
    root = write_manifest(tmp_path / "m", n_items=20, bad=BAD)  # 5 of 25 images bad: 20%
    strict = make_params({"validation": {"quarantine_max_share": 0.1}})
    cat = build_catalog(load_manifest(root), tmp_path / "cat", strict["ingest"], strict["validation"])
    names = {o.name for o in failed_errors(validate_catalog(cat, strict["validation"], strict["ingest"]))}
    assert "images_decode" in names
    lenient = make_params({"validation": {"quarantine_max_share": 0.5}})
    outcomes = {o.name: o for o in validate_catalog(cat, lenient["validation"], lenient["ingest"])}
    assert outcomes["images_decode"].passed
    assert "5" in outcomes["images_decode"].description


def test_size_rules_use_params(tmp_path, make_params):
    params = make_params({"ingest": {"min_side": 100, "max_aspect": 1.2}})
    root = write_manifest(tmp_path / "m", n_items=2)
    # drawings are 120 x 90
    cat = build_catalog(load_manifest(root), tmp_path / "cat", params["ingest"], params["validation"])
    assert cat.quarantine["reason"].str.startswith(img.TOO_SMALL).all()


def test_decoding_untrusted_bytes_names_the_problem():
    cfg = {"max_bytes": 1000, "max_pixels": 10_000, "min_side": 2, "max_aspect": 10, "max_side": 64}
    with pytest.raises(img.BadImage, match=img.TOO_LARGE_FILE):
        img.decode_rgb(b"x" * 2000, cfg)
    with pytest.raises(img.BadImage, match=img.NOT_IMAGE):
        img.decode_rgb(b"GIF89a-not-really", cfg)


def test_duplicate_item_id_blocks_validated_catalog(tmp_path, make_params):
    root = write_manifest(tmp_path / "m", n_items=6)
    items = (root / "items.csv").read_text().splitlines()
    (root / "items.csv").write_text("\n".join(items + [items[1]]) + "\n")
    params = make_params({"dataset": {"source": "manifest", "root": str(root)}})
    stages.raw_catalog(params)
    with pytest.raises(stages.ValidationFailed, match="unique_item_id"):
        stages.validated_catalog(params)
    assert not Paths.from_params(params).asset("validated_catalog").exists()


def test_failed_rebuild_keeps_the_previous_catalog(tmp_path, make_params, monkeypatch):
    params = make_params()
    root = write_manifest(tmp_path / "m", n_items=4)
    out = tmp_path / "cat"
    first = build_catalog(load_manifest(root), out, params["ingest"], params["validation"])

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ingest, "normalize_all", boom)
    with pytest.raises(RuntimeError):
        build_catalog(load_manifest(root), out, params["ingest"], params["validation"])
    again = Catalog.load(out)
    assert again.meta == first.meta and len(again.items) == 4
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written leftovers


def test_second_ingest_reuses_normalized_images(tmp_path, make_params):
    params = make_params()
    root = write_manifest(tmp_path / "m", n_items=4)
    out = tmp_path / "cat"
    a = build_catalog(load_manifest(root), out, params["ingest"], params["validation"])
    inode = {r: os.stat(a.image_file(r)).st_ino for r in a.ok_images["path"]}
    b = build_catalog(load_manifest(root), out, params["ingest"], params["validation"])
    assert b.meta["fingerprint"] == a.meta["fingerprint"]
    assert all(os.stat(b.image_file(r)).st_ino == i for r, i in inode.items())  # linked, not rewritten


def test_parallel_reingest_with_byte_twins(tmp_path, make_params):
    """Two workers meeting byte-identical images (which share one normalized file), twice."""
    params = make_params({"ingest": {"workers": 2}})
    root = write_manifest(tmp_path / "m", n_items=8)
    images = pd.read_csv(root / "images.csv")
    twins = pd.DataFrame({"item_id": images["item_id"].iloc[0], "image": images["image"].tolist() * 10})
    pd.concat([images, twins]).to_csv(root / "images.csv", index=False)  # > 64 images: the pool runs
    for _ in range(2):
        cat = build_catalog(load_manifest(root), tmp_path / "cat", params["ingest"], params["validation"])
        assert len(cat.quarantine) == 0 and len(cat.images) == len(images) + len(twins)
