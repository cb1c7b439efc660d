"""Procedural product catalog: a stand-in for the real catalog in scale tests and on machines
without the Debian openclipart tree.

`generate(out_dir, instances, ...)` writes a directory in the project's manifest contract:

  items.csv    item_id, title, category, group_id
  images.csv   item_id, image (relative path), view ("catalog" | "shopper")
  images/      the PNG files
  .complete    JSON marker with the generator arguments (written last, inside the atomic rename)

The catalog is built for the same-instance problem. A fixed tree of top-level functions and
leaf concepts gives each leaf its own silhouette; an instance is that silhouette plus a main
colour (shared by many instances), a pattern (solid / stripes / dots / checks) in a second
colour, a small logo (badge + letter or mark) at one of a few anchors, a size/aspect tweak and
a leaf-specific detail (clock hands, lace count, ...). About a third of the instances are
*variants* of an earlier instance of the same leaf that differ in exactly one fine detail, often
with the same title, so neither the category nor the text alone decides the instance.
About one instance in eight is listed twice (two item_ids, one group_id) with an identical or
near-identical catalog image. Every item has one catalog image (white background, object
centred) and `views_per_instance - 1` shopper views (rotated, rescaled, sheared, shadowed,
differently lit, on a non-white background, with sensor noise).

Deterministic: the same arguments give byte-identical files on one machine (numpy
default_rng, Pillow ImageDraw with no fonts, PNG with fixed options and no timestamps).

This module holds `generate`, the catalog plan (instances, variants, duplicate listings) and the
writing of the files; the leaves and their silhouettes are in data/synthetic_shapes.py and the
rendering of images in data/synthetic_render.py.
"""
from __future__ import annotations

import csv
import json
import math
import operator
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from data.synthetic_render import BADGES, GLYPHS, catalog_image, render_object, shopper_image
from data.synthetic_shapes import LEAVES, PALETTE, PATTERN_WORD, PATTERNS, Instance

SYNTHETIC_TAG = "synthetic"
GENERATOR_VERSION = 1          # bump when the output changes; a stale directory is regenerated
MARKER = ".complete"
CATALOG_VIEW, SHOPPER_VIEW = "catalog", "shopper"
ITEMS_FILE, IMAGES_FILE, IMAGES_DIR = "items.csv", "images.csv", "images"

_DUPLICATE_SHARE = 1 / 8       # instances listed twice
_VARIANT_SHARE = 0.35          # instances that copy an earlier one of their leaf but one detail
_PER_LEAF = 3                  # small catalogs use fewer leaves so each leaf has ~3 instances
_WHITE = (245, 245, 245)       # the off-white a pattern or badge may take besides PALETTE
_PATTERN_P = (0.3, 0.3, 0.2, 0.2)  # how often each of PATTERNS is drawn

CATEGORIES: tuple[str, ...] = tuple(leaf.category for leaf in LEAVES)


# ----------------------------------------------------------------------------- catalog plan

def _leaf_order(rng: np.random.Generator) -> list[int]:
    """All leaves, interleaved across top-level functions (so a prefix covers many functions)."""
    tops: dict[str, list[int]] = {}
    for k, leaf in enumerate(LEAVES):
        tops.setdefault(leaf.category.split("/")[0], []).append(k)
    groups = [list(rng.permutation(v)) for v in tops.values()]
    groups = [groups[k] for k in rng.permutation(len(groups))]
    order: list[int] = []
    while any(groups):
        for g in groups:
            if g:
                order.append(int(g.pop(0)))
    return order


def _jitter(rgb, rng, amount=12) -> tuple[int, int, int]:
    return tuple(int(np.clip(x + rng.integers(-amount, amount + 1), 0, 255)) for x in rgb)


def _other_colour(rng, exclude: int) -> tuple[int, int, int]:
    choices = [k for k in range(len(PALETTE)) if k != exclude] + [-1]
    k = int(rng.choice(choices))
    return _WHITE if k == -1 else PALETTE[k][1]


def _code(rng) -> str:
    return f"{chr(ord('a') + int(rng.integers(26)))}{int(rng.integers(10))}"


def _new_instance(rng: np.random.Generator, leaf: int) -> Instance:
    colour = int(rng.integers(len(PALETTE)))
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=_PATTERN_P))]
    badge_rgb = _other_colour(rng, colour)
    glyph_rgb = (250, 250, 250) if sum(badge_rgb) < 420 else (25, 25, 25)
    return Instance(
        leaf=leaf, colour=colour, rgb=_jitter(PALETTE[colour][1], rng), pattern=pattern,
        pattern_rgb=_other_colour(rng, colour), pattern_scale=float(rng.uniform(0.1, 0.22)),
        pattern_angle=int(rng.choice([0, 45, 90, 135])), glyph=int(rng.integers(len(GLYPHS))),
        badge=int(rng.integers(len(BADGES))), badge_rgb=badge_rgb, glyph_rgb=glyph_rgb,
        anchor=int(rng.integers(len(LEAVES[leaf].anchors))), scale=float(rng.uniform(0.84, 1.0)),
        aspect=float(rng.uniform(0.85, 1.18)), detail=float(rng.uniform()), code=_code(rng))


def _variant(rng: np.random.Generator, base: Instance) -> Instance:
    """A near-identical product: one fine detail changes; often the very same title."""
    what = ["glyph", "anchor", "badge", "badge_rgb", "scale", "detail", "shade"]
    if base.pattern != "solid":
        what += ["pattern_rgb", "pattern_scale"]
    if base.pattern == "stripes":
        what.append("pattern_angle")
    field = what[int(rng.integers(len(what)))]
    if field == "glyph":
        new = replace(base, glyph=int((base.glyph + rng.integers(1, len(GLYPHS))) % len(GLYPHS)))
    elif field == "anchor":
        n = len(LEAVES[base.leaf].anchors)
        new = replace(base, anchor=int((base.anchor + rng.integers(1, n)) % n))
    elif field == "badge":
        new = replace(base, badge=int((base.badge + rng.integers(1, len(BADGES))) % len(BADGES)))
    elif field == "badge_rgb":
        rgb = base.badge_rgb
        while rgb == base.badge_rgb:
            rgb = _other_colour(rng, base.colour)
        new = replace(base, badge_rgb=rgb, badge=base.badge or 1,
                      glyph_rgb=(250, 250, 250) if sum(rgb) < 420 else (25, 25, 25))
    elif field == "scale":
        new = replace(base, aspect=base.aspect * float(rng.choice([0.88, 1.12])))
    elif field == "detail":                                 # crosses every 0.5 / 1/3 threshold
        new = replace(base, detail=float((base.detail + rng.uniform(0.4, 0.6)) % 1.0))
    elif field == "shade":                                  # same named colour, another shade
        step = rng.uniform(16, 28, size=3) * rng.choice([-1, 1], size=3)
        rgb = tuple(int(np.clip(x + d, 0, 255)) for x, d in zip(base.rgb, step))
        if sum(abs(a - b) for a, b in zip(rgb, base.rgb)) < 30:   # clipped at black or white
            rgb = tuple(int(np.clip(x - d, 0, 255)) for x, d in zip(base.rgb, step))
        new = replace(base, rgb=rgb)
    elif field == "pattern_rgb":
        rgb = base.pattern_rgb
        while rgb == base.pattern_rgb:
            rgb = _other_colour(rng, base.colour)
        new = replace(base, pattern_rgb=rgb)
    elif field == "pattern_scale":
        new = replace(base, pattern_scale=base.pattern_scale * float(rng.choice([0.7, 1.4])))
    else:
        new = replace(base, pattern_angle=(base.pattern_angle + 45 * int(rng.integers(1, 4))) % 180)
    return new if rng.random() < 0.5 else replace(new, code=_code(rng))


def _plan(instances: int, seed: int) -> tuple[list[Instance], list[dict]]:
    """Instances and listings (item rows with the instance index and listing number)."""
    rng = np.random.default_rng(seed)
    order = _leaf_order(rng)
    active = order[:max(1, min(len(order), math.ceil(instances / _PER_LEAF)))]
    insts: list[Instance] = []
    seen: set[Instance] = set()
    for k in range(instances):
        leaf = active[k % len(active)]
        earlier = [j for j in range(k) if insts[j].leaf == leaf]
        while True:
            if earlier and rng.random() < _VARIANT_SHARE:
                inst = _variant(rng, insts[earlier[int(rng.integers(len(earlier)))]])
            else:
                inst = _new_instance(rng, leaf)
            if inst not in seen:
                break
        seen.add(inst)
        insts.append(inst)
    n_dup = max(1, int(round(instances * _DUPLICATE_SHARE)))
    dups = set(int(x) for x in rng.choice(instances, size=min(n_dup, instances), replace=False))
    listings = []
    for k, inst in enumerate(insts):
        listings.append({"instance": k, "listing": 0, "title": inst.title()})
        if k in dups:
            colour, pat = PALETTE[inst.colour][0], PATTERN_WORD[inst.pattern]
            noun = LEAVES[inst.leaf].noun
            titles = [inst.title(), f"{noun} {inst.code} {colour} {pat}",
                      f"{colour} {noun} {inst.code}", f"{pat} {colour} {noun} {inst.code}"]
            listings.append({"instance": k, "listing": 1,
                             "title": titles[int(rng.integers(len(titles)))],
                             "same_image": bool(rng.random() < 0.5)})
    perm = rng.permutation(len(listings))
    width = max(5, len(str(len(listings))))
    first: dict[int, str] = {}
    ordered = []
    for n, idx in enumerate(perm):
        row = dict(listings[int(idx)], item_id=f"syn{n:0{width}d}")
        first.setdefault(row["instance"], row["item_id"])
        ordered.append(row)
    for row in ordered:
        row["group_id"] = first[row["instance"]]
    return insts, ordered


# ----------------------------------------------------------------------------- writing

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _marker(instances: int, views: int, image_size: int, seed: int) -> dict:
    return {"generator": SYNTHETIC_TAG, "version": GENERATOR_VERSION, "instances": instances,
            "views_per_instance": views, "image_size": image_size, "seed": seed}


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _save_png(img: Image.Image, path: Path) -> None:
    img.save(path, format="PNG", optimize=False, compress_level=1)


def _write(tmp: Path, instances: int, views: int, image_size: int, seed: int) -> None:
    insts, listings = _plan(instances, seed)
    (tmp / IMAGES_DIR).mkdir()
    cache: dict[int, Image.Image] = {}
    item_rows, image_rows = [], []
    # listings of one instance share the rendered object; render in instance order
    for row in sorted(listings, key=lambda r: (r["instance"], r["listing"])):
        k, item_id = row["instance"], row["item_id"]
        inst = insts[k]
        if k not in cache:
            cache.clear()
            cache[k] = render_object(inst, image_size)
        obj = cache[k]
        rng = np.random.default_rng([seed, k, row["listing"]])
        if row["listing"] == 0 or row.get("same_image"):
            catalog = catalog_image(obj)
        else:
            catalog = catalog_image(obj, rng)
        rel = f"{IMAGES_DIR}/{item_id}_0.png"
        _save_png(catalog, tmp / rel)
        image_rows.append((item_id, rel, CATALOG_VIEW))
        for v in range(1, views):
            rel = f"{IMAGES_DIR}/{item_id}_{v}.png"
            _save_png(shopper_image(obj, rng), tmp / rel)
            image_rows.append((item_id, rel, SHOPPER_VIEW))
        item_rows.append((item_id, row["title"], LEAVES[inst.leaf].category, row["group_id"]))
    item_rows.sort()
    image_rows.sort()
    _write_csv(tmp / ITEMS_FILE, ["item_id", "title", "category", "group_id"], item_rows)
    _write_csv(tmp / IMAGES_FILE, ["item_id", "image", "view"], image_rows)
    (tmp / MARKER).write_text(json.dumps(_marker(instances, views, image_size, seed),
                                         sort_keys=True) + "\n")


def generate(out_dir: str | Path, instances: int, views_per_instance: int = 2,
             image_size: int = 160, seed: int = 0) -> Path:
    """Write a synthetic catalog directory (items.csv, images.csv, images/) at out_dir.

    Atomic: built in a temporary sibling and renamed onto out_dir. Idempotent: when out_dir
    already holds a complete catalog made with the same arguments (and generator version) it
    is returned untouched. A catalog made with other arguments is replaced. A non-empty
    out_dir that is not a synthetic catalog (no `.complete` marker) is refused with
    FileExistsError rather than deleted. Returns out_dir as a Path.
    """
    instances = _check_int("instances", instances, 1)
    views_per_instance = _check_int("views_per_instance", views_per_instance, 1)
    image_size = _check_int("image_size", image_size, 16)
    seed = _check_int("seed", seed, 0)
    out = Path(out_dir)
    want = _marker(instances, views_per_instance, image_size, seed)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory")
        if _read_marker(out) == want:
            return out
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise FileExistsError(f"{out}: non-empty directory that is not a synthetic catalog "
                                  f"(no {MARKER} marker); refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o755)
        _write(tmp, instances, views_per_instance, image_size, seed)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "d")
        try:
            os.replace(tmp, out)
        except OSError:
            # another process committed meanwhile; fine if it wrote what we were asked for
            if _read_marker(out) != want:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


__all__ = ["SYNTHETIC_TAG", "CATEGORIES", "GENERATOR_VERSION", "generate"]
