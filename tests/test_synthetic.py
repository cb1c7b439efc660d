"""data/synthetic.py: the procedural catalog follows the manifest contract, is deterministic,
idempotent and atomic, and poses a same-instance problem (twins, near-identical siblings)."""
from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import synthetic
from data.synthetic import SYNTHETIC_TAG, generate

CATEGORY_RE = re.compile(r"^[a-z0-9][a-z0-9_\- ]*(/[a-z0-9][a-z0-9_\- ]*)*$")
ARGS = dict(instances=24, views_per_instance=3, image_size=48, seed=0)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "catalog", **ARGS)


def test_tag():
    assert SYNTHETIC_TAG == "synthetic"


def test_contract(catalog: Path):
    items = _rows(catalog / "items.csv")
    images = _rows(catalog / "images.csv")
    assert list(items[0]) == ["item_id", "title", "category", "group_id"]
    assert list(images[0]) == ["item_id", "image", "view"]
    ids = [r["item_id"] for r in items]
    assert len(ids) == len(set(ids)) >= ARGS["instances"]
    assert all(r["title"].strip() for r in items)
    for r in items:
        assert CATEGORY_RE.match(r["category"]), r["category"]
        assert r["category"] in synthetic.CATEGORIES
    assert set(r["group_id"] for r in items) <= set(ids)
    assert len(set(r["group_id"] for r in items)) == ARGS["instances"]

    per_item = defaultdict(Counter)
    for r in images:
        assert r["view"] in ("catalog", "shopper")
        per_item[r["item_id"]][r["view"]] += 1
        path = catalog / r["image"]
        assert not Path(r["image"]).is_absolute() and path.is_file(), r["image"]
        with Image.open(path) as im:
            im.load()
            assert im.mode == "RGB"
            assert im.size == (ARGS["image_size"], ARGS["image_size"])
    assert set(per_item) == set(ids)
    for item_id, views in per_item.items():
        assert views["catalog"] == 1, item_id
        assert views["shopper"] == ARGS["views_per_instance"] - 1, item_id
    # nothing in images/ that images.csv does not list
    listed = {r["image"] for r in images}
    assert {f"images/{p.name}" for p in (catalog / "images").iterdir()} == listed


def test_catalog_view_is_on_white_and_shopper_is_not(catalog: Path):
    images = _rows(catalog / "images.csv")
    for r in images[:12]:
        arr = np.asarray(Image.open(catalog / r["image"]))
        corners = arr[[0, 0, -1, -1], [0, -1, 0, -1]]
        if r["view"] == "catalog":
            assert (corners == 255).all(), r["image"]
        else:
            assert not (corners >= 250).all(), r["image"]


def test_groups_have_twins(catalog: Path):
    items = _rows(catalog / "items.csv")
    sizes = Counter(r["group_id"] for r in items)
    assert max(sizes.values()) == 2
    assert sum(1 for n in sizes.values() if n == 2) >= 1
    for r in items:                    # a singleton's group is its own item_id
        if sizes[r["group_id"]] == 1:
            assert r["group_id"] == r["item_id"]
    # twins share a category
    cats = defaultdict(set)
    for r in items:
        cats[r["group_id"]].add(r["category"])
    assert all(len(c) == 1 for c in cats.values())


def test_instances_of_a_leaf_differ(catalog: Path):
    items = _rows(catalog / "items.csv")
    images = _rows(catalog / "images.csv")
    cat_img = {r["item_id"]: r["image"] for r in images if r["view"] == "catalog"}
    first_of_group = {}
    for r in items:
        first_of_group.setdefault(r["group_id"], r)
    by_leaf = defaultdict(list)
    for r in first_of_group.values():
        by_leaf[r["category"]].append(np.asarray(Image.open(catalog / cat_img[r["item_id"]])))
    assert any(len(v) >= 2 for v in by_leaf.values())
    for leaf, arrs in by_leaf.items():
        for i in range(len(arrs)):
            for j in range(i + 1, len(arrs)):
                assert not np.array_equal(arrs[i], arrs[j]), leaf


def test_titles_help_but_do_not_decide():
    insts, listings = synthetic._plan(400, 0)
    titles = Counter(inst.title() for inst in insts)
    assert any(n > 1 for n in titles.values())          # distinct instances with one title
    colours = Counter(inst.colour for inst in insts)
    assert max(colours.values()) > 10                    # many instances share a colour
    assert len({inst.leaf for inst in insts}) == len(synthetic.LEAVES)


def test_deterministic(tmp_path: Path, catalog: Path):
    other = generate(tmp_path / "again", **ARGS)
    assert _digest(other) == _digest(catalog)


def test_seed_changes_output(tmp_path: Path, catalog: Path):
    other = generate(tmp_path / "seed1", **{**ARGS, "seed": 1})
    assert _digest(other) != _digest(catalog)


def test_idempotent_and_regenerates(tmp_path: Path):
    out = tmp_path / "cat"
    args = dict(instances=6, views_per_instance=2, image_size=32, seed=3)
    assert generate(out, **args) == out
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    inode = out.stat().st_ino
    assert generate(str(out), **args) == out            # same args: untouched
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert out.stat().st_ino == inode

    generate(out, **{**args, "instances": 9})           # other args: replaced
    items = _rows(out / "items.csv")
    assert len({r["group_id"] for r in items}) == 9
    assert len(list((out / "images").iterdir())) == len(_rows(out / "images.csv"))
    generate(out, **{**args, "image_size": 40})
    with Image.open(out / _rows(out / "images.csv")[0]["image"]) as im:
        assert im.size == (40, 40)
    # no temporary or old siblings left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat"]


def test_refuses_foreign_directory(tmp_path: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(out, instances=2, image_size=16)
    assert (out / "precious.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    generate(empty, instances=2, image_size=16)
    assert (empty / "items.csv").is_file()


@pytest.mark.parametrize("kwargs, name", [
    (dict(instances=0), "instances"),
    (dict(instances=-3), "instances"),
    (dict(instances=2.5), "instances"),
    (dict(instances=4, image_size=15), "image_size"),
    (dict(instances=4, views_per_instance=0), "views_per_instance"),
    (dict(instances=4, seed=-1), "seed"),
])
def test_bad_args(tmp_path: Path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_single_view_and_minimum_size(tmp_path: Path):
    out = generate(tmp_path / "small", instances=3, views_per_instance=1, image_size=16)
    images = _rows(out / "images.csv")
    assert {r["view"] for r in images} == {"catalog"}
    assert len(images) == len(_rows(out / "items.csv"))
