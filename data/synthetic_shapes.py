"""Procedural catalog, part 1: the vocabulary and the per-leaf silhouettes.

The colour palette and pattern words, the `Instance` record (everything that makes one product
look the way it does), the drawing context `Ctx` that maps object units onto the canvas and paints
the instance's pattern through a shape, one drawer per leaf concept (`_hat`, `_shirt`, ...), and
`LEAVES`, the fixed tree of leaf concepts with their drawers and logo anchors.
Rendering lives in data/synthetic_render.py, the catalog plan and the files in data/synthetic.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- vocabulary

PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (205, 40, 45)), ("orange", (240, 130, 30)), ("yellow", (240, 205, 40)),
    ("green", (60, 150, 65)), ("teal", (30, 150, 150)), ("blue", (40, 90, 200)),
    ("navy", (30, 45, 100)), ("purple", (120, 60, 160)), ("pink", (235, 120, 170)),
    ("brown", (120, 75, 40)), ("black", (35, 35, 38)), ("grey", (135, 135, 140)),
    ("beige", (220, 200, 160)),
)
PATTERNS = ("solid", "stripes", "dots", "checks")
PATTERN_WORD = {"solid": "plain", "stripes": "striped", "dots": "dotted", "checks": "checked"}


@dataclass(frozen=True)
class _Leaf:
    category: str
    noun: str
    draw: object                      # callable(ctx, inst)
    anchors: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Instance:
    leaf: int
    colour: int                       # PALETTE index
    rgb: tuple[int, int, int]         # jittered main colour
    pattern: str
    pattern_rgb: tuple[int, int, int]
    pattern_scale: float              # period of the pattern, in object units
    pattern_angle: int                # stripes: degrees
    glyph: int                        # GLYPHS index
    badge: int                        # BADGES index
    badge_rgb: tuple[int, int, int]
    glyph_rgb: tuple[int, int, int]
    anchor: int                       # index into the leaf's anchors
    scale: float
    aspect: float                     # width/height tweak
    detail: float                     # leaf-specific free parameter in [0, 1)
    code: str                         # model code in the title, e.g. "k7"

    def title(self) -> str:
        return (f"{PALETTE[self.colour][0]} {PATTERN_WORD[self.pattern]} "
                f"{LEAVES[self.leaf].noun} {self.code}")


# ----------------------------------------------------------------------------- drawing

def mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _dark(rgb) -> tuple[int, int, int]:
    return mix(rgb, (0, 0, 0), 0.55)


def _light(rgb) -> tuple[int, int, int]:
    return mix(rgb, (255, 255, 255), 0.55)


def rgba(rgb) -> tuple[int, int, int, int]:
    return (*rgb, 255)


class Ctx:
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
            fn(self.draw, fill if len(fill) == 4 else rgba(fill))

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

def _hat(c: Ctx, i: Instance) -> None:
    c.ellipse((0.0, 0.58, 1.0, 0.8), _dark(i.rgb))
    c.pie((0.18, 0.1, 0.82, 1.2), 180, 360, "body")
    band = 0.07 + 0.06 * i.detail
    c.poly([(0.18, 0.65 - band), (0.82, 0.65 - band), (0.82, 0.65), (0.18, 0.65)], i.pattern_rgb)


def _shirt(c: Ctx, i: Instance) -> None:
    c.poly([(0.38, 0.05), (0.18, 0.1), (0.0, 0.34), (0.12, 0.44), (0.22, 0.34), (0.22, 0.98),
            (0.78, 0.98), (0.78, 0.34), (0.88, 0.44), (1.0, 0.34), (0.82, 0.1), (0.62, 0.05)],
           "body")
    c.pie((0.38, -0.06, 0.62, 0.16), 0, 180, (255, 255, 255, 0) if i.detail < 0.5 else _dark(i.rgb))
    c.arc((0.38, -0.06, 0.62, 0.16), 0, 180, _dark(i.rgb), 0.025)
    if i.detail >= 0.5:                                   # a pocket
        c.rrect((0.6, 0.3, 0.72, 0.44), 0.01, _dark(i.rgb))


def _shoe(c: Ctx, i: Instance) -> None:
    c.poly([(0.04, 0.5), (0.1, 0.3), (0.34, 0.3), (0.46, 0.14), (0.62, 0.12), (0.7, 0.3),
            (0.9, 0.42), (0.98, 0.6), (0.98, 0.72), (0.04, 0.72)], "body")
    c.rrect((0.01, 0.66, 1.0, 0.84), 0.05, (238, 236, 230))
    c.line([(0.03, 0.75), (0.98, 0.75)], _dark(i.rgb), 0.015)
    for k in range(2 + int(i.detail * 3)):                # laces
        u = 0.48 + 0.06 * k
        c.line([(u, 0.2 + 0.05 * k), (u + 0.05, 0.24 + 0.05 * k)], (250, 250, 250), 0.025)


def _mug(c: Ctx, i: Instance) -> None:
    c.ellipse((0.6, 0.3, 0.98, 0.74), _dark(i.rgb), width=0.07)
    c.rrect((0.1, 0.16, 0.76, 0.94), 0.05, "body")
    c.ellipse((0.1, 0.1, 0.76, 0.22), _dark(i.rgb) if i.detail < 0.5 else (240, 240, 240))


def _bottle(c: Ctx, i: Instance) -> None:
    c.poly([(0.4, 0.1), (0.6, 0.1), (0.6, 0.22), (0.72, 0.38), (0.72, 0.95), (0.68, 0.98),
            (0.32, 0.98), (0.28, 0.95), (0.28, 0.38), (0.4, 0.22)], "body")
    cap = (0.38, 0.02 - 0.04 * i.detail, 0.62, 0.12)
    c.rrect(cap, 0.02, _dark(i.pattern_rgb) if i.pattern != "solid" else (60, 60, 60))


def _teapot(c: Ctx, i: Instance) -> None:
    c.ellipse((0.02, 0.4, 0.3, 0.8), _dark(i.rgb), width=0.06)
    c.poly([(0.7, 0.62), (0.93, 0.3 + 0.1 * i.detail), (1.0, 0.33 + 0.1 * i.detail),
            (0.82, 0.8)], "body")
    c.ellipse((0.16, 0.3, 0.84, 0.96), "body")
    c.pie((0.36, 0.18, 0.64, 0.44), 180, 360, _dark(i.rgb))
    c.circle(0.5, 0.17, 0.045, _dark(i.rgb))


def _phone(c: Ctx, i: Instance) -> None:
    c.rrect((0.24, 0.03, 0.76, 0.97), 0.07, "body")
    n = 1 + int(i.detail * 3)                              # number of lenses
    c.rrect((0.29, 0.08, 0.29 + 0.13 * min(n, 2) + 0.04, 0.08 + 0.13 * ((n + 1) // 2) + 0.04),
            0.03, _dark(i.rgb))
    for k in range(n):
        u, v = 0.36 + 0.13 * (k % 2), 0.15 + 0.13 * (k // 2)
        c.circle(u, v, 0.05, (20, 20, 24))
        c.circle(u - 0.015, v - 0.015, 0.012, (200, 200, 210))


def _headphones(c: Ctx, i: Instance) -> None:
    c.arc((0.12, 0.04, 0.88, 0.9), 180, 360, "body", 0.08)
    c.arc((0.16, 0.1, 0.84, 0.9), 190, 350, _dark(i.rgb), 0.02)
    for u0 in (0.02, 0.72):
        c.rrect((u0, 0.44, u0 + 0.26, 0.88), 0.08, "body")
    pad = (40, 40, 44) if i.detail < 0.5 else _light(i.rgb)
    c.rrect((0.26, 0.5, 0.32, 0.82), 0.02, pad)
    c.rrect((0.68, 0.5, 0.74, 0.82), 0.02, pad)


def _speaker(c: Ctx, i: Instance) -> None:
    c.rrect((0.24, 0.02, 0.76, 0.98), 0.05, "body")
    c.circle(0.5, 0.2, 0.09, (30, 30, 34))
    c.circle(0.5, 0.2, 0.035, (90, 90, 96))
    r = 0.15 + 0.05 * i.detail
    c.circle(0.5, 0.6, r, (30, 30, 34))
    c.circle(0.5, 0.6, r * 0.45, (90, 90, 96))
    c.circle(0.5, 0.6, r, _dark(i.rgb), width=0.02)


def _ball(c: Ctx, i: Instance) -> None:
    c.ellipse((0.04, 0.04, 0.96, 0.96), "body")
    seam = _dark(i.rgb) if i.detail < 0.5 else (250, 250, 250)
    c.arc((-0.42, 0.06, 0.44, 0.94), -62, 62, seam, 0.025)
    c.arc((0.56, 0.06, 1.42, 0.94), 118, 242, seam, 0.025)
    c.line([(0.05, 0.5), (0.95, 0.5)], seam, 0.025)


def _block(c: Ctx, i: Instance) -> None:
    top = [(0.5, 0.04), (0.96, 0.27), (0.5, 0.5), (0.04, 0.27)]
    c.poly(top, "body:1.18")
    c.poly([(0.04, 0.27), (0.5, 0.5), (0.5, 0.97), (0.04, 0.74)], "body")
    c.poly([(0.5, 0.5), (0.96, 0.27), (0.96, 0.74), (0.5, 0.97)], "body:0.72")
    edge = _dark(i.rgb)
    c.line([(0.04, 0.27), (0.5, 0.5), (0.96, 0.27)], edge, 0.015)
    c.line([(0.5, 0.5), (0.5, 0.97)], edge, 0.015)
    if i.detail >= 0.5:                                   # a stud on top
        c.ellipse((0.4, 0.2, 0.6, 0.32), _light(i.rgb))


def _duck(c: Ctx, i: Instance) -> None:
    c.poly([(0.02, 0.5), (0.22, 0.58), (0.1, 0.72)], "body")
    c.ellipse((0.04, 0.46, 0.9, 0.96), "body")
    c.ellipse((0.44, 0.06, 0.86, 0.5), "body")
    c.poly([(0.82, 0.26), (1.0, 0.3 + 0.04 * i.detail), (0.82, 0.38)], (245, 140, 20))
    c.circle(0.7, 0.22, 0.035, (20, 20, 20))
    c.arc((0.22, 0.56, 0.62, 0.86), 10, 170, _dark(i.rgb), 0.025)


def _lamp(c: Ctx, i: Instance) -> None:
    c.rrect((0.46, 0.42, 0.54, 0.88), 0.02, (90, 90, 94))
    base = _dark(i.rgb) if i.detail < 0.5 else (170, 170, 176)
    c.ellipse((0.24, 0.82, 0.76, 0.98), base)
    c.poly([(0.3, 0.04), (0.7, 0.04), (0.92, 0.46), (0.08, 0.46)], "body")


def _clock(c: Ctx, i: Instance) -> None:
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


def _vase(c: Ctx, i: Instance) -> None:
    vs = np.linspace(0.03, 0.98, 24)
    bulge = 0.55 + 0.2 * i.detail
    half = 0.12 + 0.27 * np.exp(-((vs - bulge) / 0.24) ** 2) + 0.06 * np.exp(-((vs - 0.03) / 0.05) ** 2)
    right = [(0.5 + float(h), float(v)) for v, h in zip(vs, half)]
    left = [(0.5 - float(h), float(v)) for v, h in zip(vs[::-1], half[::-1])]
    c.poly(right + left, "body")


def _handbag(c: Ctx, i: Instance) -> None:
    c.arc((0.28, 0.02, 0.72, 0.56), 180, 360, _dark(i.rgb), 0.05)
    c.poly([(0.18, 0.3), (0.82, 0.3), (0.96, 0.95), (0.04, 0.95)], "body")
    flap = 0.42 + 0.16 * i.detail
    c.poly([(0.18, 0.3), (0.82, 0.3), (0.78, flap), (0.22, flap)], _dark(i.rgb))
    c.rrect((0.46, flap - 0.04, 0.54, flap + 0.04), 0.01, (212, 175, 55))


def _umbrella(c: Ctx, i: Instance) -> None:
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
