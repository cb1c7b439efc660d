"""Image operations of the environmental noise: what `noise_image` (data/noise.py) applies to a clean
catalog image once it has decided which operations fire.

Clutter (the object cut out of its white background and pasted, with a contact shadow, among other
catalog images or on a procedural table/floor/fabric texture), occlusion (a hand or dropout boxes),
seller overlays (sticker text, watermark, price tag), defocus, and the seeded albumentations
pipelines (geometric, occlusion boxes, blur, light, jpeg). Every function draws from the generator or
seed it is given, never from global random state.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data.images import to_rgb_on_white

# albumentations (~2.5 s) is imported on first use, so importing this module is cheap

WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------- pixels
def _blend(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-pixel alpha blend of uint8 images (cv2: several times faster than float numpy)."""
    a = np.ascontiguousarray(alpha, dtype=np.float32)
    top = np.ascontiguousarray(np.broadcast_to(top, base.shape), dtype=np.uint8)
    return cv2.blendLinear(top, np.ascontiguousarray(base), a, 1.0 - a)


def _min_channel(arr: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(arr[..., 0], arr[..., 1]), arr[..., 2])  # arr.min(axis=2) is ~10x slower


def _odd(x: float) -> int:
    return max(3, int(x) | 1)


# -------------------------------------------------------------------------------------------- clutter
def procedural_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A table/floor/fabric-like texture of `size` (w, h): value noise, stripes, gradient or wood.
    Built at <= 128 px and upscaled (textures are smooth; this keeps it ~1 ms), then fine grain is added."""
    w, h = size
    f = min(1.0, 128 / max(w, h))
    sw, sh = max(1, round(w * f)), max(1, round(h * f))
    xx = np.arange(sw, dtype=np.float32)[None, :] / max(sw, sh)
    yy = np.arange(sh, dtype=np.float32)[:, None] / max(sw, sh)
    theta = rng.uniform(0, np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    c1 = rng.uniform(40, 235, 3)
    c2 = np.clip(c1 + rng.normal(0, 60, 3), 0, 255)
    kind = rng.integers(4)
    if kind == 0:    # blotchy value noise (concrete, carpet)
        n = int(rng.integers(3, 12))
        t = cv2.resize(rng.random((n, n)).astype(np.float32), (sw, sh), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes (fabric, tiles), soft-edged
        t = 0.5 + 0.5 * np.tanh(3 * np.sin(2 * np.pi * rng.uniform(3, 14) * along))
    elif kind == 2:  # lighting gradient
        t = along - along.min()
        t /= max(float(t.max()), 1e-6)
    else:            # wood grain: rings along one direction, warped by low-frequency noise
        c1 = np.array([rng.uniform(120, 200), rng.uniform(70, 120), rng.uniform(30, 70)])
        c2 = c1 * rng.uniform(0.55, 0.8)
        warp = cv2.resize(rng.random((4, 4)).astype(np.float32), (sw, sh), interpolation=cv2.INTER_CUBIC)
        across = -xx * np.sin(theta) + yy * np.cos(theta)
        t = (0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(6, 16) * across + 1.5 * warp))) ** 3
    t = np.broadcast_to(np.clip(t, 0, 1), (sh, sw))[..., None]
    small = (c1 * (1 - t) + c2 * t).astype(np.float32)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, 3)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 4  # fine grain, so flat areas are not flat
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _foreground_alpha(arr: np.ndarray) -> np.ndarray:
    """Object alpha of a clip-art image on white: only near-white connected to the border is background
    (white inside the outline, e.g. a white mug, stays object); anti-aliased fringes get partial alpha."""
    minc = _min_channel(arr)
    cand = (minc >= 235).astype(np.uint8)
    _, labels = cv2.connectedComponents(cand, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    lut = np.zeros(labels.max() + 1, bool)
    lut[border[border > 0]] = True
    bg = lut[labels]
    soft = np.clip((255.0 - minc) / 20.0, 0, 1).astype(np.float32)
    return np.where(bg, soft, 1.0).astype(np.float32)


def _crop_to(src: np.ndarray, cw: int, ch: int, rng: np.random.Generator) -> np.ndarray:
    """Random aspect-preserving crop of 50-100% of src, resized to (cw, ch)."""
    sh, sw = src.shape[:2]
    ar = cw / ch
    mw, mh = (sh * ar, sh) if sw / sh > ar else (sw, sw / ar)
    c = rng.uniform(0.5, 1.0)
    w, h = max(1, int(mw * c)), max(1, int(mh * c))
    x, y = int(rng.integers(0, sw - w + 1)), int(rng.integers(0, sh - h + 1))
    return cv2.resize(src[y:y + h, x:x + w], (cw, ch), interpolation=cv2.INTER_LINEAR)


def _scene(w: int, h: int, rng: np.random.Generator, backgrounds: Sequence[Image.Image]) -> np.ndarray:
    if not backgrounds:
        return np.asarray(procedural_background((w, h), rng))
    # 1-4 other catalog images, cropped and tiled: real distractor products around the query object
    sx, sy = int(w * rng.uniform(0.3, 0.7)), int(h * rng.uniform(0.3, 0.7))
    cells = [[(0, 0, w, h)],
             [(0, 0, sx, h), (sx, 0, w, h)],
             [(0, 0, w, sy), (0, sy, w, h)],
             [(0, 0, sx, sy), (sx, 0, w, sy), (0, sy, sx, h), (sx, sy, w, h)]][rng.integers(4)]
    scene = np.empty((h, w, 3), np.uint8)
    for x0, y0, x1, y1 in cells:
        src = np.asarray(to_rgb_on_white(backgrounds[int(rng.integers(len(backgrounds)))]))
        scene[y0:y1, x0:x1] = _crop_to(src, max(1, x1 - x0), max(1, y1 - y0), rng)[: y1 - y0, : x1 - x0]
    if rng.random() < 0.5:  # the distractors' white paper becomes a table surface
        white = cv2.GaussianBlur((_min_channel(scene) >= 235).astype(np.float32), (0, 0), 1.0)
        scene = _blend(scene, np.asarray(procedural_background((w, h), rng)), white)
    return scene


def clutter(arr: np.ndarray, s: float, rng: np.random.Generator,
             backgrounds: Sequence[Image.Image]) -> np.ndarray:
    h, w = arr.shape[:2]
    scene = _scene(w, h, rng, backgrounds)
    alpha = _foreground_alpha(arr)
    ys, xs = np.nonzero(alpha > 0.5)
    if len(ys) == 0:
        return scene
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ow, oh = x1 - x0, y1 - y0
    scale = rng.uniform(0.8 - 0.4 * s, 0.8) * min(w / ow, h / oh)  # object spans 40-80% of the frame
    nw, nh = min(w, max(1, round(ow * scale))), min(h, max(1, round(oh * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    obj = cv2.resize(arr[y0:y1, x0:x1], (nw, nh), interpolation=interp)
    a = cv2.resize(alpha[y0:y1, x0:x1], (nw, nh), interpolation=interp)
    x, y = int(rng.integers(0, w - nw + 1)), int(rng.integers(0, h - nh + 1))
    full_a = np.zeros((h, w), np.float32)
    full_a[y:y + nh, x:x + nw] = a
    top = scene.copy()
    top[y:y + nh, x:x + nw] = obj
    # a soft contact shadow, so the object sits on the surface instead of floating over it
    d = max(w, h) * 0.02
    shift = np.float32([[1, 0, rng.uniform(-d, d)], [0, 1, rng.uniform(0.5 * d, 1.5 * d)]])
    q = 0.25  # blurred at quarter resolution: it is a smooth blob anyway
    small = cv2.resize(cv2.warpAffine(full_a, shift, (w, h)), (max(1, round(w * q)), max(1, round(h * q))),
                       interpolation=cv2.INTER_AREA)
    shadow = cv2.resize(cv2.GaussianBlur(small, (0, 0), (2 * d + 0.5) * q), (w, h))
    scene = _blend(scene, np.zeros(3, np.uint8), 0.35 * shadow)
    return _blend(scene, top, full_a)


# ------------------------------------------------------------------------------ occlusion and overlay
_SKIN = np.array([(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66),
                  (141, 85, 36), (232, 190, 172)], np.float32)


def _hand(arr: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """A skin-toned hand (palm, four fingers, thumb) reaching in from a random edge."""
    h, w = arr.shape[:2]
    edge = int(rng.integers(4))              # drawn with the wrist at the bottom, then rotated to `edge`
    cw, ch = (w, h) if edge % 2 == 0 else (h, w)
    side = int(max(w, h) * rng.uniform(0.35, 0.35 + 0.25 * s))
    box = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(box)
    d.ellipse([0.18 * side, 0.5 * side, 0.82 * side, 1.3 * side], fill=255)          # palm
    for i, top in enumerate(rng.uniform(0.05, 0.25, 4)):                            # fingers
        x = (0.2 + 0.155 * i) * side
        d.rounded_rectangle([x, top * side, x + 0.13 * side, 0.8 * side], radius=0.065 * side, fill=255)
    d.polygon([(0.2 * side, 0.95 * side), (0.02 * side, 0.55 * side), (0.1 * side, 0.5 * side),
               (0.32 * side, 0.8 * side)], fill=255)                                 # thumb
    box = box.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR, center=(side / 2, side))
    canvas = Image.new("L", (cw, ch), 0)
    x = int(rng.integers(-side // 3, max(1, cw - 2 * side // 3)))
    canvas.paste(box, (x, ch - int(side * rng.uniform(0.6, 0.95))))   # 60-95% of the hand is in view
    m = np.rot90(np.asarray(canvas, np.float32) / 255.0, edge)
    m = cv2.GaussianBlur(np.ascontiguousarray(m), (0, 0), 0.8)
    shade = cv2.GaussianBlur(m, (0, 0), side * 0.06)       # darker toward the outline: some volume
    skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.85, 1.05)
    colour = skin[None, None, :] * (0.7 + 0.3 * shade[..., None])
    return _blend(arr, np.clip(colour, 0, 255), m)


def occlusion(arr: np.ndarray, s: float, rng: np.random.Generator, seed: int) -> np.ndarray:
    if rng.random() < 0.5:
        return _hand(arr, s, rng)
    return albu(arr, "occlusion", s, seed)  # random-coloured boxes: stickers, price labels, fingers


# ASCII only: Pillow's bundled font (Aileron) has no glyph for the yuan sign, so prices read $ / RMB
_PHRASES = ("SALE -50%", "@shop_2024", "$99", "HOT", "NEW", "Free Shipping", "-30%", "Best Seller",
            "RMB 128.00", "LIMITED", "@best.deals", "2 for 1")


_INK = ((230, 20, 30), (255, 210, 0), (255, 255, 255), (20, 20, 20), (255, 90, 0))


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # bundled font (Pillow >= 10.1): no font files needed


def overlay(arr: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Seller overlays: sticker text, a tiled diagonal watermark, a price-tag box."""
    h, w = arr.shape[:2]
    img = Image.fromarray(arr).convert("RGBA")
    kinds = [k for k in ("text", "watermark", "tag") if rng.random() < 0.3 + 0.4 * s] or \
            [("text", "watermark", "tag")[rng.integers(3)]]
    for kind in kinds:
        layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        phrase = _PHRASES[rng.integers(len(_PHRASES))]
        alpha = int(255 * rng.uniform(0.5, 0.6 + 0.4 * s))
        colour = _INK[rng.integers(len(_INK))]
        if kind == "text":
            font = _font(max(8, int(h * rng.uniform(0.06, 0.08 + 0.06 * s))))
            x0, y0, x1, y1 = d.textbbox((0, 0), phrase, font=font)
            pos = (int(rng.integers(0, max(1, w - x1))), int(rng.integers(0, max(1, h - y1))))
            outline = (0, 0, 0, alpha) if sum(colour) > 380 else (255, 255, 255, alpha)
            d.text(pos, phrase, font=font, fill=colour + (alpha,), stroke_width=max(1, font.size // 12),
                   stroke_fill=outline)
        elif kind == "watermark":  # faint, repeated, rotated: drawn on a diagonal-sized layer, then cropped
            diag = int(np.hypot(w, h)) + 2
            big = Image.new("RGBA", (diag, diag), (0, 0, 0, 0))
            font = _font(max(8, int(h * rng.uniform(0.05, 0.08))))
            tw, th = d.textbbox((0, 0), phrase, font=font)[2:]
            tile = Image.new("RGBA", (tw + 2 * th, int(th * 2.5)), (0, 0, 0, 0))
            faint = colour + (int(alpha * (0.3 + 0.3 * s)),)
            ImageDraw.Draw(tile).text((0, 0), phrase, font=font, fill=faint)
            for row, y in enumerate(range(0, diag, tile.height)):  # rendered once, pasted on a brick grid
                for x in range(-(row % 2) * tile.width // 2, diag, tile.width):
                    big.paste(tile, (x, y))
            # rotate about the centre and crop to the frame in one cv2 warp (PIL's rotate: ~8 ms)
            m = cv2.getRotationMatrix2D((diag / 2, diag / 2), rng.uniform(20, 50) * rng.choice([-1, 1]), 1.0)
            m[:, 2] -= ((diag - w) / 2, (diag - h) / 2)
            layer = Image.fromarray(cv2.warpAffine(np.asarray(big), m, (w, h)), "RGBA")
        else:  # price tag in a corner
            font = _font(max(8, int(h * rng.uniform(0.07, 0.1 + 0.05 * s))))
            price = ("$" if rng.random() < 0.5 else "RMB ") + str(rng.integers(5, 500)) + \
                (".00" if rng.random() < 0.3 else "")
            tw, th = d.textbbox((0, 0), price, font=font)[2:]
            pad = max(2, th // 3)
            bw, bh = tw + 2 * pad, th + 2 * pad
            x = int(rng.choice([pad, max(pad, w - bw - pad)]))
            y = int(rng.choice([pad, max(pad, h - bh - pad)]))
            fill = (230, 20, 30) if colour in ((255, 255, 255), (255, 210, 0)) else colour
            d.rounded_rectangle([x, y, x + bw, y + bh], radius=pad, fill=fill + (max(alpha, 200),))
            d.text((x + pad, y + pad // 2), price, font=font, fill=(255, 255, 255, 255))
        img = Image.alpha_composite(img, layer)
    return np.asarray(img.convert("RGB"))


# ------------------------------------------------------------------------- albumentations pipelines
@lru_cache(maxsize=1)
def _albumentations():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would otherwise query PyPI
    import albumentations
    return albumentations


def _pipeline(op: str, s: float, k: float, cluttered: bool) -> list:
    """The albumentations transforms of one op; s = strength, k = image size / 384 (blur is in pixels)."""
    A = _albumentations()
    if op == "geometric":  # reflect a cluttered scene so the scene continues; a catalog photo stays on white
        border = dict(border_mode=cv2.BORDER_REFLECT_101) if cluttered else \
            dict(border_mode=cv2.BORDER_CONSTANT, fill=WHITE)
        return [A.Perspective(scale=(0.01, 0.02 + 0.08 * s), p=1.0, **border),
                A.Affine(scale=(1 - 0.25 * s, 1 + 0.15 * s), translate_percent=(-0.08 * s, 0.08 * s),
                         rotate=(-25 * s, 25 * s), shear=(-6 * s, 6 * s), p=1.0, **border)]
    if op == "occlusion":
        hole = (0.08, 0.12 + 0.18 * s)
        return [A.CoarseDropout(num_holes_range=(1, 1 + round(3 * s)), hole_height_range=hole,
                                hole_width_range=hole, fill="random_uniform", p=1.0)]
    if op == "blur":  # defocus is `defocus` below
        return [A.OneOf([
            A.GaussianBlur(blur_limit=0, sigma_limit=(0.5 * k + 0.1, (0.6 + 2.4 * s) * k + 0.2)),
            A.MotionBlur(blur_limit=(3, _odd(3 + 12 * s * k)), allow_shifted=False),
        ], p=1.0)]
    if op == "light":  # low light, colour cast, lower contrast, then sensor noise
        shift = 5 + 25 * s
        return [A.RandomBrightnessContrast(brightness_limit=(-0.05 - 0.3 * s, 0.05),
                                           contrast_limit=(-0.05 - 0.35 * s, 0.05), p=1.0),
                A.RandomGamma(gamma_limit=(90, 100 + 60 * s), p=0.5),
                A.OneOf([A.RGBShift(r_shift_limit=shift, g_shift_limit=shift, b_shift_limit=shift),
                         A.PlanckianJitter(mode="blackbody",
                                           temperature_limit=(int(6500 - 3500 * s), int(6500 + 6000 * s)))],
                        p=0.7),
                # luminance or (slightly blotchy, like demosaiced) colour noise; ISONoise costs ~12 ms
                A.OneOf([A.GaussNoise(std_range=(0.01, 0.02 + 0.08 * s), per_channel=False),
                         A.GaussNoise(std_range=(0.01, 0.02 + 0.06 * s), noise_scale_factor=0.5)],
                        p=0.5 + 0.4 * s)]
    if op == "jpeg":  # quality down to ~10 at strength 1
        lo = max(1, round(90 - 80 * s))
        return [A.ImageCompression(quality_range=(lo, max(lo, round(95 - 55 * s))), p=1.0)]
    raise KeyError(op)


@lru_cache(maxsize=256)
def _compose(op: str, s: float, k: float, cluttered: bool):
    # building a Compose validates every argument (pydantic); cache it and reseed per call instead
    return _albumentations().Compose(_pipeline(op, s, k, cluttered))


def defocus(arr: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Out-of-focus lens: convolution with a (slightly soft) disk."""
    r = max(1, round(rng.uniform(1, 1 + 4 * s) * max(arr.shape[:2]) / 384))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = cv2.GaussianBlur((xx**2 + yy**2 <= r * r + r).astype(np.float32), (3, 3), 0.5)
    return cv2.filter2D(arr, -1, disk / disk.sum(), borderType=cv2.BORDER_REFLECT_101)


def albu(arr: np.ndarray, op: str, s: float, seed: int, cluttered: bool = False) -> np.ndarray:
    # only blur depends on the size and only geometric on clutter: keep the cache keys few
    k = round(max(arr.shape[:2]) / 384, 1) if op == "blur" else 1.0
    t = _compose(op, round(s, 3), k, cluttered and op == "geometric")
    t.set_random_seed(seed)  # same seed -> same draws, whatever ran before in this process
    return t(image=np.ascontiguousarray(arr))["image"]
