"""Procedural catalog, part 2: rendering an instance into pixels.

The logo glyphs and badges, the body pattern (solid / stripes / dots / checks with a soft light),
the object render (silhouette + logo + outline, supersampled), and the two kinds of photo made
from it: the white-background catalog image and the shopper view (pose, scale, background, light,
sensor noise). Shapes and the instance record come from data/synthetic_shapes.py.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageFilter

from data.synthetic_shapes import LEAVES, Ctx, Instance, mix, rgba

_SS = 2                        # supersampling factor: draw at 2x, box-reduce to the asked size

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
BADGES = ("none", "circle", "square", "rounded")


def _pattern_image(inst: Instance, size: int, box) -> Image.Image:
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


def _draw_logo(c: Ctx, inst: Instance) -> None:
    u, v = LEAVES[inst.leaf].anchors[inst.anchor]
    cx, cy = c.pt(u, v)
    r = 0.085 * c.unit
    draw = c.draw
    badge = BADGES[inst.badge]
    if badge == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgba(inst.badge_rgb))
    elif badge == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgba(inst.badge_rgb))
    elif badge == "rounded":
        draw.rounded_rectangle([cx - r, cy - r, cx + r, cy + r], radius=r * 0.4,
                               fill=rgba(inst.badge_rgb))
    ink = rgba(inst.glyph_rgb)
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


def render_object(inst: Instance, image_size: int) -> Image.Image:
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
    ctx = Ctx(canvas, box, _pattern_image(inst, size, box))
    LEAVES[inst.leaf].draw(ctx, inst)
    _draw_logo(ctx, inst)
    # silhouette outline: dilate the alpha, paint the ring in the dark main colour underneath
    ring = _dilate(canvas.getchannel("A"), max(1, size // 160))
    out = Image.new("RGBA", (size, size), rgba(mix(inst.rgb, (0, 0, 0), 0.7)))
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


def catalog_image(obj: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
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
                               Image.new("RGB", (size, size), mix(table, (0, 0, 0), 0.15)),
                               _mask(np.broadcast_to(grain, (size, size))))
        bg = Image.new("RGB", (size, size), wall)
        top = int(round(split * size))
        bg.paste(wood.crop((0, top, size, size)), (0, top))
        return bg
    a = colour(90, 210)                                      # fabric: low-contrast checks
    period = float(rng.uniform(0.04, 0.12))
    on = (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
    return Image.composite(Image.new("RGB", (size, size), a),
                           Image.new("RGB", (size, size), mix(a, (0, 0, 0), float(rng.uniform(0.08, 0.2)))),
                           _mask(on.astype(np.float32)))


def shopper_image(obj: Image.Image, rng: np.random.Generator) -> Image.Image:
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
