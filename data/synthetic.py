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
"""
from __future__ import annotations

import csv
import json
import math
import operator
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

SYNTHETIC_TAG = "synthetic"
GENERATOR_VERSION = 1          # bump when the output changes; a stale directory is regenerated
MARKER = ".complete"
CATALOG_VIEW, SHOPPER_VIEW = "catalog", "shopper"
ITEMS_FILE, IMAGES_FILE, IMAGES_DIR = "items.csv", "images.csv", "images"

_SS = 2                        # supersampling factor: draw at 2x, box-reduce to the asked size
_DUPLICATE_SHARE = 1 / 8       # instances listed twice
_VARIANT_SHARE = 0.35          # instances that copy an earlier one of their leaf but one detail
_PER_LEAF = 3                  # small catalogs use fewer leaves so each leaf has ~3 instances

# ----------------------------------------------------------------------------- vocabulary

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (205, 40, 45)), ("orange", (240, 130, 30)), ("yellow", (240, 205, 40)),
    ("green", (60, 150, 65)), ("teal", (30, 150, 150)), ("blue", (40, 90, 200)),
    ("navy", (30, 45, 100)), ("purple", (120, 60, 160)), ("pink", (235, 120, 170)),
    ("brown", (120, 75, 40)), ("black", (35, 35, 38)), ("grey", (135, 135, 140)),
    ("beige", (220, 200, 160)),
)
_WHITE = (245, 245, 245)
PATTERNS = ("solid", "stripes", "dots", "checks")
_PATTERN_P = (0.3, 0.3, 0.2, 0.2)
_PATTERN_WORD = {"solid": "plain", "stripes": "striped", "dots": "dotted", "checks": "checked"}

_FONT = {  # 5x5 bitmap letters: no font files, so rendering is identical everywhere
    "A": (".###.", "#...#", "#####", "#...#", "#...#"),
    "E": ("#####", "#....", "####.", "#....", "#####"),
    "H": ("#...#", "#...#", "#####", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "###..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#...#", "#...#"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#"),
    "S": (".####", "#....", ".###.", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "Z": ("#####", "...#.", "..#..", ".#...", "#####"),
}
_MARKS = ("star", "triangle", "diamond", "plus", "ring", "bolt")
GLYPHS: tuple[str, ...] = tuple(_FONT) + _MARKS
_BADGES = ("none", "circle", "square", "rounded")


@dataclass(frozen=True)
class _Leaf:
    category: str
    noun: str
    draw: object                      # callable(ctx, inst)
    anchors: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class _Instance:
    leaf: int
    colour: int                       # PALETTE index
    rgb: tuple[int, int, int]         # jittered main colour
    pattern: str
    pattern_rgb: tuple[int, int, int]
    pattern_scale: float              # period of the pattern, in object units
    pattern_angle: int                # stripes: degrees
    glyph: int                        # GLYPHS index
    badge: int                        # _BADGES index
    badge_rgb: tuple[int, int, int]
    glyph_rgb: tuple[int, int, int]
    anchor: int                       # index into the leaf's anchors
    scale: float
    aspect: float                     # width/height tweak
    detail: float                     # leaf-specific free parameter in [0, 1)
    code: str                         # model code in the title, e.g. "k7"

    def title(self) -> str:
        return (f"{PALETTE[self.colour][0]} {_PATTERN_WORD[self.pattern]} "
                f"{LEAVES[self.leaf].noun} {self.code}")


# ----------------------------------------------------------------------------- drawing

def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _dark(rgb) -> tuple[int, int, int]:
    return _mix(rgb, (0, 0, 0), 0.55)


def _light(rgb) -> tuple[int, int, int]:
    return _mix(rgb, (255, 255, 255), 0.55)


def _rgba(rgb) -> tuple[int, int, int, int]:
    return (*rgb, 255)


class _Ctx:
    """Draws in object units: (u, v) in [0, 1]^2 map onto the object's box on the canvas.
    A fill of "body" (or "body:<shade>") paints the instance's pattern through the shape."""

    def __init__(self, canvas: Image.Image, box: tuple[float, float, float, float],
                 pattern: Image.Image):
        self.canvas = canvas
        self.draw = ImageDraw.Draw(canvas)
        self.x0, self.y0, self.w, self.h = box
        self.unit = min(self.w, self.h)
        self._pattern = pattern                     # RGB, the body's pattern, already lit
        self._cache: dict[str, Image.Image] = {}

    def pt(self, u: float, v: float) -> tuple[float, float]:
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def pts(self, seq) -> list[tuple[float, float]]:
        return [self.pt(u, v) for u, v in seq]

    def box(self, b) -> list[float]:
        (x0, y0), (x1, y1) = self.pt(b[0], b[1]), self.pt(b[2], b[3])
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def px(self, units: float) -> int:
        return max(1, int(round(units * self.unit)))

    def _pattern_image(self, fill: str) -> Image.Image:
        if fill not in self._cache:
            shade = float(fill.split(":", 1)[1]) if ":" in fill else 1.0
            img = self._pattern
            if shade != 1.0:
                img = img.point([min(255, int(round(x * shade))) for x in range(256)] * 3)
            self._cache[fill] = img
        return self._cache[fill]

    def _do(self, fill, fn) -> None:
        if isinstance(fill, str):
            mask = Image.new("L", self.canvas.size, 0)
            fn(ImageDraw.Draw(mask), 255)
            self.canvas.paste(self._pattern_image(fill), (0, 0), mask)
        else:
            fn(self.draw, fill if len(fill) == 4 else _rgba(fill))

    # shapes -------------------------------------------------------------------------
    def poly(self, seq, fill) -> None:
        p = self.pts(seq)
        self._do(fill, lambda d, ink: d.polygon(p, fill=ink))

    def ellipse(self, b, fill, width: float | None = None) -> None:
        bb = self.box(b)
        if width is None:
            self._do(fill, lambda d, ink: d.ellipse(bb, fill=ink))
        else:
            w = self.px(width)
            self._do(fill, lambda d, ink: d.ellipse(bb, outline=ink, width=w))

    def circle(self, u, v, r, fill, width: float | None = None) -> None:
        x, y = self.pt(u, v)
        rr = r * self.unit
        bb = [x - rr, y - rr, x + rr, y + rr]
        if width is None:
            self._do(fill, lambda d, ink: d.ellipse(bb, fill=ink))
        else:
            w = self.px(width)
            self._do(fill, lambda d, ink: d.ellipse(bb, outline=ink, width=w))

    def rrect(self, b, r: float, fill) -> None:
        bb = self.box(b)
        rad = r * self.unit
        self._do(fill, lambda d, ink: d.rounded_rectangle(bb, radius=rad, fill=ink))

    def pie(self, b, a0, a1, fill) -> None:
        bb = self.box(b)
        self._do(fill, lambda d, ink: d.pieslice(bb, a0, a1, fill=ink))

    def line(self, seq, fill, width: float) -> None:
        p, w = self.pts(seq), self.px(width)
        self._do(fill, lambda d, ink: d.line(p, fill=ink, width=w, joint="curve"))

    def arc(self, b, a0, a1, fill, width: float) -> None:
        bb, w = self.box(b), self.px(width)
        self._do(fill, lambda d, ink: d.arc(bb, a0, a1, fill=ink, width=w))

    def erase_ellipse(self, b) -> None:
        self.draw.ellipse(self.box(b), fill=(0, 0, 0, 0))


# leaf silhouettes: each draws the object in unit coordinates ------------------------

def _hat(c: _Ctx, i: _Instance) -> None:
    c.ellipse((0.0, 0.58, 1.0, 0.8), _dark(i.rgb))
    c.pie((0.18, 0.1, 0.82, 1.2), 180, 360, "body")
    band = 0.07 + 0.06 * i.detail
    c.poly([(0.18, 0.65 - band), (0.82, 0.65 - band), (0.82, 0.65), (0.18, 0.65)], i.pattern_rgb)


def _shirt(c: _Ctx, i: _Instance) -> None:
    c.poly([(0.38, 0.05), (0.18, 0.1), (0.0, 0.34), (0.12, 0.44), (0.22, 0.34), (0.22, 0.98),
            (0.78, 0.98), (0.78, 0.34), (0.88, 0.44), (1.0, 0.34), (0.82, 0.1), (0.62, 0.05)],
           "body")
    c.pie((0.38, -0.06, 0.62, 0.16), 0, 180, (255, 255, 255, 0) if i.detail < 0.5 else _dark(i.rgb))
    c.arc((0.38, -0.06, 0.62, 0.16), 0, 180, _dark(i.rgb), 0.025)
    if i.detail >= 0.5:                                   # a pocket
        c.rrect((0.6, 0.3, 0.72, 0.44), 0.01, _dark(i.rgb))


def _shoe(c: _Ctx, i: _Instance) -> None:
    c.poly([(0.04, 0.5), (0.1, 0.3), (0.34, 0.3), (0.46, 0.14), (0.62, 0.12), (0.7, 0.3),
            (0.9, 0.42), (0.98, 0.6), (0.98, 0.72), (0.04, 0.72)], "body")
    c.rrect((0.01, 0.66, 1.0, 0.84), 0.05, (238, 236, 230))
    c.line([(0.03, 0.75), (0.98, 0.75)], _dark(i.rgb), 0.015)
    for k in range(2 + int(i.detail * 3)):                # laces
        u = 0.48 + 0.06 * k
        c.line([(u, 0.2 + 0.05 * k), (u + 0.05, 0.24 + 0.05 * k)], (250, 250, 250), 0.025)


def _mug(c: _Ctx, i: _Instance) -> None:
    c.ellipse((0.6, 0.3, 0.98, 0.74), _dark(i.rgb), width=0.07)
    c.rrect((0.1, 0.16, 0.76, 0.94), 0.05, "body")
    c.ellipse((0.1, 0.1, 0.76, 0.22), _dark(i.rgb) if i.detail < 0.5 else (240, 240, 240))


def _bottle(c: _Ctx, i: _Instance) -> None:
    c.poly([(0.4, 0.1), (0.6, 0.1), (0.6, 0.22), (0.72, 0.38), (0.72, 0.95), (0.68, 0.98),
            (0.32, 0.98), (0.28, 0.95), (0.28, 0.38), (0.4, 0.22)], "body")
    cap = (0.38, 0.02 - 0.04 * i.detail, 0.62, 0.12)
    c.rrect(cap, 0.02, _dark(i.pattern_rgb) if i.pattern != "solid" else (60, 60, 60))


def _teapot(c: _Ctx, i: _Instance) -> None:
    c.ellipse((0.02, 0.4, 0.3, 0.8), _dark(i.rgb), width=0.06)
    c.poly([(0.7, 0.62), (0.93, 0.3 + 0.1 * i.detail), (1.0, 0.33 + 0.1 * i.detail),
            (0.82, 0.8)], "body")
    c.ellipse((0.16, 0.3, 0.84, 0.96), "body")
    c.pie((0.36, 0.18, 0.64, 0.44), 180, 360, _dark(i.rgb))
    c.circle(0.5, 0.17, 0.045, _dark(i.rgb))


def _phone(c: _Ctx, i: _Instance) -> None:
    c.rrect((0.24, 0.03, 0.76, 0.97), 0.07, "body")
    n = 1 + int(i.detail * 3)                              # number of lenses
    c.rrect((0.29, 0.08, 0.29 + 0.13 * min(n, 2) + 0.04, 0.08 + 0.13 * ((n + 1) // 2) + 0.04),
            0.03, _dark(i.rgb))
    for k in range(n):
        u, v = 0.36 + 0.13 * (k % 2), 0.15 + 0.13 * (k // 2)
        c.circle(u, v, 0.05, (20, 20, 24))
        c.circle(u - 0.015, v - 0.015, 0.012, (200, 200, 210))


def _headphones(c: _Ctx, i: _Instance) -> None:
    c.arc((0.12, 0.04, 0.88, 0.9), 180, 360, "body", 0.08)
    c.arc((0.16, 0.1, 0.84, 0.9), 190, 350, _dark(i.rgb), 0.02)
    for u0 in (0.02, 0.72):
        c.rrect((u0, 0.44, u0 + 0.26, 0.88), 0.08, "body")
    pad = (40, 40, 44) if i.detail < 0.5 else _light(i.rgb)
    c.rrect((0.26, 0.5, 0.32, 0.82), 0.02, pad)
    c.rrect((0.68, 0.5, 0.74, 0.82), 0.02, pad)


def _speaker(c: _Ctx, i: _Instance) -> None:
    c.rrect((0.24, 0.02, 0.76, 0.98), 0.05, "body")
    c.circle(0.5, 0.2, 0.09, (30, 30, 34))
    c.circle(0.5, 0.2, 0.035, (90, 90, 96))
    r = 0.15 + 0.05 * i.detail
    c.circle(0.5, 0.6, r, (30, 30, 34))
    c.circle(0.5, 0.6, r * 0.45, (90, 90, 96))
    c.circle(0.5, 0.6, r, _dark(i.rgb), width=0.02)


def _ball(c: _Ctx, i: _Instance) -> None:
    c.ellipse((0.04, 0.04, 0.96, 0.96), "body")
    seam = _dark(i.rgb) if i.detail < 0.5 else (250, 250, 250)
    c.arc((-0.42, 0.06, 0.44, 0.94), -62, 62, seam, 0.025)
    c.arc((0.56, 0.06, 1.42, 0.94), 118, 242, seam, 0.025)
    c.line([(0.05, 0.5), (0.95, 0.5)], seam, 0.025)


def _block(c: _Ctx, i: _Instance) -> None:
    top = [(0.5, 0.04), (0.96, 0.27), (0.5, 0.5), (0.04, 0.27)]
    c.poly(top, "body:1.18")
    c.poly([(0.04, 0.27), (0.5, 0.5), (0.5, 0.97), (0.04, 0.74)], "body")
    c.poly([(0.5, 0.5), (0.96, 0.27), (0.96, 0.74), (0.5, 0.97)], "body:0.72")
    edge = _dark(i.rgb)
    c.line([(0.04, 0.27), (0.5, 0.5), (0.96, 0.27)], edge, 0.015)
    c.line([(0.5, 0.5), (0.5, 0.97)], edge, 0.015)
    if i.detail >= 0.5:                                   # a stud on top
        c.ellipse((0.4, 0.2, 0.6, 0.32), _light(i.rgb))


def _duck(c: _Ctx, i: _Instance) -> None:
    c.poly([(0.02, 0.5), (0.22, 0.58), (0.1, 0.72)], "body")
    c.ellipse((0.04, 0.46, 0.9, 0.96), "body")
    c.ellipse((0.44, 0.06, 0.86, 0.5), "body")
    c.poly([(0.82, 0.26), (1.0, 0.3 + 0.04 * i.detail), (0.82, 0.38)], (245, 140, 20))
    c.circle(0.7, 0.22, 0.035, (20, 20, 20))
    c.arc((0.22, 0.56, 0.62, 0.86), 10, 170, _dark(i.rgb), 0.025)


def _lamp(c: _Ctx, i: _Instance) -> None:
    c.rrect((0.46, 0.42, 0.54, 0.88), 0.02, (90, 90, 94))
    base = _dark(i.rgb) if i.detail < 0.5 else (170, 170, 176)
    c.ellipse((0.24, 0.82, 0.76, 0.98), base)
    c.poly([(0.3, 0.04), (0.7, 0.04), (0.92, 0.46), (0.08, 0.46)], "body")


def _clock(c: _Ctx, i: _Instance) -> None:
    c.ellipse((0.02, 0.02, 0.98, 0.98), "body")
    c.ellipse((0.15, 0.15, 0.85, 0.85), (248, 246, 238))
    for k in range(12):
        a = k * math.pi / 6
        r0 = 0.3 if k % 3 else 0.27
        c.line([(0.5 + r0 * math.sin(a), 0.5 - r0 * math.cos(a)),
                (0.5 + 0.33 * math.sin(a), 0.5 - 0.33 * math.cos(a))], (40, 40, 40), 0.015)
    hour, minute = i.detail * 2 * math.pi, (i.detail * 12 % 1) * 2 * math.pi
    c.line([(0.5, 0.5), (0.5 + 0.18 * math.sin(hour), 0.5 - 0.18 * math.cos(hour))],
           (30, 30, 30), 0.035)
    c.line([(0.5, 0.5), (0.5 + 0.28 * math.sin(minute), 0.5 - 0.28 * math.cos(minute))],
           (30, 30, 30), 0.022)
    c.circle(0.5, 0.5, 0.03, _dark(i.rgb))


def _vase(c: _Ctx, i: _Instance) -> None:
    vs = np.linspace(0.03, 0.98, 24)
    bulge = 0.55 + 0.2 * i.detail
    half = 0.12 + 0.27 * np.exp(-((vs - bulge) / 0.24) ** 2) + 0.06 * np.exp(-((vs - 0.03) / 0.05) ** 2)
    right = [(0.5 + float(h), float(v)) for v, h in zip(vs, half)]
    left = [(0.5 - float(h), float(v)) for v, h in zip(vs[::-1], half[::-1])]
    c.poly(right + left, "body")


def _handbag(c: _Ctx, i: _Instance) -> None:
    c.arc((0.28, 0.02, 0.72, 0.56), 180, 360, _dark(i.rgb), 0.05)
    c.poly([(0.18, 0.3), (0.82, 0.3), (0.96, 0.95), (0.04, 0.95)], "body")
    flap = 0.42 + 0.16 * i.detail
    c.poly([(0.18, 0.3), (0.82, 0.3), (0.78, flap), (0.22, flap)], _dark(i.rgb))
    c.rrect((0.46, flap - 0.04, 0.54, flap + 0.04), 0.01, (212, 175, 55))


def _umbrella(c: _Ctx, i: _Instance) -> None:
    c.line([(0.5, 0.04), (0.5, 0.9)], (70, 70, 74), 0.03)
    c.arc((0.5, 0.82, 0.66, 0.98), 0, 180, (70, 70, 74), 0.03)
    c.pie((0.0, 0.04, 1.0, 0.96), 180, 360, "body")
    n = 3 + int(i.detail * 3)                              # scallops
    for k in range(n):
        u0, u1 = k / n, (k + 1) / n
        c.erase_ellipse((u0, 0.5 - 0.06, u1, 0.5 + 0.06))
    for k in range(1, n):
        c.line([(0.5, 0.06), (k / n, 0.47)], _dark(i.rgb), 0.012)


LEAVES: tuple[_Leaf, ...] = (
    _Leaf("apparel/hats", "hat", _hat, ((0.5, 0.38), (0.34, 0.45), (0.66, 0.45))),
    _Leaf("apparel/shirts", "shirt", _shirt, ((0.5, 0.36), (0.36, 0.3), (0.62, 0.62))),
    _Leaf("apparel/shoes", "sneaker", _shoe, ((0.28, 0.52), (0.8, 0.56), (0.56, 0.38))),
    _Leaf("kitchen/mugs", "mug", _mug, ((0.43, 0.52), (0.3, 0.36), (0.56, 0.76))),
    _Leaf("kitchen/bottles", "bottle", _bottle, ((0.5, 0.62), (0.5, 0.82), (0.5, 0.45))),
    _Leaf("kitchen/teapots", "teapot", _teapot, ((0.5, 0.64), (0.34, 0.7), (0.64, 0.76))),
    _Leaf("electronics/phones", "phone", _phone, ((0.5, 0.6), (0.5, 0.82), (0.62, 0.44))),
    _Leaf("electronics/headphones", "headphones", _headphones,
          ((0.15, 0.66), (0.85, 0.66), (0.5, 0.1))),
    _Leaf("electronics/speakers", "speaker", _speaker, ((0.5, 0.9), (0.5, 0.38), (0.34, 0.08))),
    _Leaf("toys/balls", "ball", _ball, ((0.5, 0.3), (0.5, 0.7), (0.3, 0.38))),
    _Leaf("toys/blocks", "block", _block, ((0.27, 0.62), (0.73, 0.62), (0.5, 0.27))),
    _Leaf("toys/ducks", "duck", _duck, ((0.42, 0.8), (0.66, 0.72), (0.24, 0.66))),
    _Leaf("home/lamps", "lamp", _lamp, ((0.5, 0.26), (0.34, 0.34), (0.66, 0.34))),
    _Leaf("home/clocks", "clock", _clock, ((0.5, 0.66), (0.5, 0.9), (0.72, 0.5))),
    _Leaf("home/vases", "vase", _vase, ((0.5, 0.62), (0.5, 0.42), (0.4, 0.76))),
    _Leaf("accessories/handbags", "handbag", _handbag, ((0.5, 0.76), (0.28, 0.8), (0.72, 0.8))),
    _Leaf("accessories/umbrellas", "umbrella", _umbrella, ((0.5, 0.26), (0.3, 0.36), (0.7, 0.36))),
)
CATEGORIES: tuple[str, ...] = tuple(leaf.category for leaf in LEAVES)


def _pattern_image(inst: _Instance, size: int, box) -> Image.Image:
    """The instance's pattern (RGB) with a soft top-left light, in object coordinates.
    Masks are built in numpy (2-D only); colours are mixed by Pillow, which is much faster."""
    x0, y0, w, h = box
    unit = min(w, h)
    ax = np.arange(size, dtype=np.float32) + np.float32(0.5)
    X = ((ax - np.float32(x0)) / np.float32(unit))[None, :]
    Y = ((ax - np.float32(y0)) / np.float32(unit))[:, None]
    p = np.float32(inst.pattern_scale)
    if inst.pattern == "stripes":
        a = math.radians(inst.pattern_angle)
        t = X * np.float32(math.cos(a)) + Y * np.float32(math.sin(a))
        on = np.mod(t / p, np.float32(1.0)) < 0.5
    elif inst.pattern == "dots":
        row = np.floor(Y / p)
        xs = X + np.mod(row, 2) * (p / 2)
        dx, dy = np.mod(xs, p) - p / 2, np.mod(Y, p) - p / 2
        on = dx * dx + dy * dy < (np.float32(0.3) * p) ** 2
    elif inst.pattern == "checks":
        on = np.mod(np.floor(X / p) + np.floor(Y / p), 2) == 0
    else:
        on = None
    img = Image.new("RGB", (size, size), inst.rgb)
    if on is not None:
        mask = Image.fromarray(np.broadcast_to(on, (size, size)).astype(np.uint8) * np.uint8(255), "L")
        img = Image.composite(Image.new("RGB", (size, size), inst.pattern_rgb), img, mask)
    fx = np.clip(X * np.float32(0.6 * unit / w), 0, 1.2)
    fy = np.clip(Y * np.float32(0.4 * unit / h), 0, 1.2)
    light = np.float32(255) * (np.float32(1.0) - np.float32(0.2) * np.minimum(fx + fy, 1.2))
    light = Image.fromarray(np.rint(light).astype(np.uint8), "L")
    return ImageChops.multiply(img, Image.merge("RGB", (light, light, light)))


def _draw_logo(c: _Ctx, inst: _Instance) -> None:
    u, v = LEAVES[inst.leaf].anchors[inst.anchor]
    cx, cy = c.pt(u, v)
    r = 0.085 * c.unit
    draw = c.draw
    badge = _BADGES[inst.badge]
    if badge == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_rgba(inst.badge_rgb))
    elif badge == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=_rgba(inst.badge_rgb))
    elif badge == "rounded":
        draw.rounded_rectangle([cx - r, cy - r, cx + r, cy + r], radius=r * 0.4,
                               fill=_rgba(inst.badge_rgb))
    ink = _rgba(inst.glyph_rgb)
    g = r * 0.68                                            # glyph half-size
    name = GLYPHS[inst.glyph]
    if name in _FONT:
        cell = 2 * g / 5
        for row, line in enumerate(_FONT[name]):
            for col, ch in enumerate(line):
                if ch == "#":
                    x, y = cx - g + col * cell, cy - g + row * cell
                    e = max(0.0, cell - 0.5)
                    draw.rectangle([x, y, x + e, y + e], fill=ink)
    elif name == "star":
        pts = [(cx + (g if k % 2 == 0 else g * 0.45) * math.sin(k * math.pi / 5),
                cy - (g if k % 2 == 0 else g * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=ink)
    elif name == "triangle":
        draw.polygon([(cx, cy - g), (cx + g, cy + g * 0.8), (cx - g, cy + g * 0.8)], fill=ink)
    elif name == "diamond":
        draw.polygon([(cx, cy - g), (cx + g * 0.7, cy), (cx, cy + g), (cx - g * 0.7, cy)], fill=ink)
    elif name == "plus":
        t = g * 0.35
        draw.rectangle([cx - g, cy - t, cx + g, cy + t], fill=ink)
        draw.rectangle([cx - t, cy - g, cx + t, cy + g], fill=ink)
    elif name == "ring":
        draw.ellipse([cx - g, cy - g, cx + g, cy + g], outline=ink, width=max(1, int(g * 0.4)))
    elif name == "bolt":
        draw.polygon([(cx + 0.2 * g, cy - g), (cx - 0.6 * g, cy + 0.15 * g), (cx - 0.05 * g, cy + 0.15 * g),
                      (cx - 0.2 * g, cy + g), (cx + 0.6 * g, cy - 0.15 * g), (cx + 0.05 * g, cy - 0.15 * g)],
                     fill=ink)


def _dilate(a: Image.Image, r: int) -> Image.Image:
    """Square max filter of radius r on an L image (wraps at the border, which is empty)."""
    for dx, dy in ((1, 0), (0, 1)):
        out = a
        for k in range(1, r + 1):
            out = ImageChops.lighter(out, ImageChops.offset(a, k * dx, k * dy))
            out = ImageChops.lighter(out, ImageChops.offset(a, -k * dx, -k * dy))
        a = out
    return a


def _render_object(inst: _Instance, image_size: int) -> Image.Image:
    """The object alone, centred on a transparent canvas: RGBA, image_size^2.
    Drawn at _SS times the size and box-reduced, which anti-aliases every edge."""
    size = image_size * _SS
    side = 0.74 * size * inst.scale
    w, h = side * math.sqrt(inst.aspect), side / math.sqrt(inst.aspect)
    s = max(w, h) / (0.84 * size)
    if s > 1:
        w, h = w / s, h / s
    box = ((size - w) / 2, (size - h) / 2, w, h)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ctx = _Ctx(canvas, box, _pattern_image(inst, size, box))
    LEAVES[inst.leaf].draw(ctx, inst)
    _draw_logo(ctx, inst)
    # silhouette outline: dilate the alpha, paint the ring in the dark main colour underneath
    ring = _dilate(canvas.getchannel("A"), max(1, size // 160))
    out = Image.new("RGBA", (size, size), _rgba(_mix(inst.rgb, (0, 0, 0), 0.7)))
    out.putalpha(ring)
    out.alpha_composite(canvas)
    bbox = out.getbbox()
    if bbox:                                                # centre the drawn object
        dx = int(round((size - bbox[0] - bbox[2]) / (2 * _SS))) * _SS
        dy = int(round((size - bbox[1] - bbox[3]) / (2 * _SS))) * _SS
        if dx or dy:
            moved = Image.new("RGBA", (size, size), (0, 0, 0, 0))
            moved.paste(out, (dx, dy))
            out = moved
    return out.convert("RGBa").reduce(_SS).convert("RGBA")


def _affine(obj: Image.Image, scale: float, angle: float, shear: float,
            tx: float, ty: float) -> Image.Image:
    """Scale, rotate and shear about the centre, then translate (pixels)."""
    size = obj.size[0]
    c = size / 2
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    fwd = scale * rot @ np.array([[1.0, shear], [0.0, 1.0]])
    inv = np.linalg.inv(fwd)
    ox, oy = c + tx, c + ty
    data = (inv[0, 0], inv[0, 1], c - inv[0, 0] * ox - inv[0, 1] * oy,
            inv[1, 0], inv[1, 1], c - inv[1, 0] * ox - inv[1, 1] * oy)
    return obj.transform((size, size), Image.Transform.AFFINE, data,
                         resample=Image.Resampling.BICUBIC)


def _catalog_image(obj: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
    """White background, object centred; with rng, a near-identical re-shoot (re-listing)."""
    size = obj.size[0]
    if rng is not None:
        obj = _affine(obj, float(rng.uniform(0.94, 1.04)), 0.0, 0.0,
                      float(rng.uniform(-0.02, 0.02) * size), float(rng.uniform(-0.02, 0.02) * size))
    out = Image.new("RGBA", obj.size, (255, 255, 255, 255))
    out.alpha_composite(obj)
    return out.convert("RGB")


def _mask(arr: np.ndarray) -> Image.Image:
    """A float array in [0, 1] as an L image."""
    return Image.fromarray(np.rint(np.clip(arr, 0, 1) * 255).astype(np.uint8), "L")


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A non-white scene: a wall, a gradient, a wall above a table, or fabric."""
    def colour(lo=70, hi=215):
        return tuple(int(x) for x in rng.integers(lo, hi, size=3))

    kind = int(rng.integers(4))
    yy = (np.arange(size, dtype=np.float32) / size)[:, None]
    xx = (np.arange(size, dtype=np.float32) / size)[None, :]
    if kind == 0:                                            # plain coloured wall
        return Image.new("RGB", (size, size), colour())
    if kind == 1:                                            # gradient
        t = np.broadcast_to(yy * 0.7 + xx * 0.3, (size, size))
        return Image.composite(Image.new("RGB", (size, size), colour()),
                               Image.new("RGB", (size, size), colour()), _mask(t))
    if kind == 2:                                            # wall above a wooden table
        wall, table = colour(120, 215), colour(60, 160)
        split = float(rng.uniform(0.55, 0.8))
        grain = 0.5 + 0.5 * np.sin(yy * 160 * float(rng.uniform(0.3, 0.9)) + 3 * np.sin(xx * 6))
        wood = Image.composite(Image.new("RGB", (size, size), table),
                               Image.new("RGB", (size, size), _mix(table, (0, 0, 0), 0.15)),
                               _mask(np.broadcast_to(grain, (size, size))))
        bg = Image.new("RGB", (size, size), wall)
        top = int(round(split * size))
        bg.paste(wood.crop((0, top, size, size)), (0, top))
        return bg
    a = colour(90, 210)                                      # fabric: low-contrast checks
    period = float(rng.uniform(0.04, 0.12))
    on = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    return Image.composite(Image.new("RGB", (size, size), a),
                           Image.new("RGB", (size, size), _mix(a, (0, 0, 0), float(rng.uniform(0.08, 0.2)))),
                           _mask(on.astype(np.float32)))


def _shopper_image(obj: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Another photo of the same instance: new pose, scale, background, light, noise."""
    size = obj.size[0]
    placed = _affine(obj, float(rng.uniform(0.62, 0.95)), float(rng.uniform(-18, 18)),
                     float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1) * size),
                     float(rng.uniform(-0.1, 0.1) * size))
    bg = _background(rng, size)
    # soft drop shadow
    shadow = Image.new("L", (size, size), 0)
    shadow.paste(placed.getchannel("A"),
                 (int(rng.integers(1, 2 + size // 50)), int(rng.integers(1, 2 + size // 40))))
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(0.7, size / 100)))
    shadow = shadow.point([255 - int(0.4 * v) for v in range(256)])
    img = ImageChops.multiply(bg, shadow.convert("RGB")).convert("RGBA")
    img.alpha_composite(placed)
    img = img.convert("RGB")
    # light: contrast, brightness and colour cast in one per-channel table ...
    contrast = float(rng.uniform(0.8, 1.1))
    amp = float(rng.uniform(0, 0.35))
    gain = float(rng.uniform(0.75, 1.12)) * (1 + 0.71 * amp)
    cast = rng.uniform(0.9, 1.1, size=3)
    v = (np.arange(256, dtype=np.float64) - 128) * contrast + 128
    lut = np.clip(np.rint(v[None, :] * (gain * cast)[:, None]), 0, 255).astype(np.uint8)
    img = img.point(lut.ravel().tolist())
    # ... a directional fall-off ...
    d = float(rng.uniform(0, 2 * math.pi))
    ax = np.arange(size, dtype=np.float32) / size - 0.5
    ramp = math.cos(d) * ax[None, :] + math.sin(d) * ax[:, None]
    img = ImageChops.multiply(img, _mask((1 + amp * ramp) / (1 + 0.71 * amp)).convert("RGB"))
    # ... and sensor noise
    sigma = float(rng.uniform(1, 5))
    noise = np.clip(np.rint(rng.normal(128, sigma, size=(size, size))), 0, 255).astype(np.uint8)
    return ImageChops.add(img, Image.fromarray(noise, "L").convert("RGB"), scale=1.0, offset=-128)


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


def _new_instance(rng: np.random.Generator, leaf: int) -> _Instance:
    colour = int(rng.integers(len(PALETTE)))
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=_PATTERN_P))]
    badge_rgb = _other_colour(rng, colour)
    glyph_rgb = (250, 250, 250) if sum(badge_rgb) < 420 else (25, 25, 25)
    return _Instance(
        leaf=leaf, colour=colour, rgb=_jitter(PALETTE[colour][1], rng), pattern=pattern,
        pattern_rgb=_other_colour(rng, colour), pattern_scale=float(rng.uniform(0.1, 0.22)),
        pattern_angle=int(rng.choice([0, 45, 90, 135])), glyph=int(rng.integers(len(GLYPHS))),
        badge=int(rng.integers(len(_BADGES))), badge_rgb=badge_rgb, glyph_rgb=glyph_rgb,
        anchor=int(rng.integers(len(LEAVES[leaf].anchors))), scale=float(rng.uniform(0.84, 1.0)),
        aspect=float(rng.uniform(0.85, 1.18)), detail=float(rng.uniform()), code=_code(rng))


def _variant(rng: np.random.Generator, base: _Instance) -> _Instance:
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
        new = replace(base, badge=int((base.badge + rng.integers(1, len(_BADGES))) % len(_BADGES)))
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


def _plan(instances: int, seed: int) -> tuple[list[_Instance], list[dict]]:
    """Instances and listings (item rows with the instance index and listing number)."""
    rng = np.random.default_rng(seed)
    order = _leaf_order(rng)
    active = order[:max(1, min(len(order), math.ceil(instances / _PER_LEAF)))]
    insts: list[_Instance] = []
    seen: set[_Instance] = set()
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
            colour, pat = PALETTE[inst.colour][0], _PATTERN_WORD[inst.pattern]
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
            cache[k] = _render_object(inst, image_size)
        obj = cache[k]
        rng = np.random.default_rng([seed, k, row["listing"]])
        if row["listing"] == 0 or row.get("same_image"):
            catalog = _catalog_image(obj)
        else:
            catalog = _catalog_image(obj, rng)
        rel = f"{IMAGES_DIR}/{item_id}_0.png"
        _save_png(catalog, tmp / rel)
        image_rows.append((item_id, rel, CATALOG_VIEW))
        for v in range(1, views):
            rel = f"{IMAGES_DIR}/{item_id}_{v}.png"
            _save_png(_shopper_image(obj, rng), tmp / rel)
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
