"""Environmental noise: turn clean catalog images (clip-art on white) into shopper-like query photos.

The levels are named in params.yaml (`noise:`): each operation runs with its probability from the
level's config and `strength` in [0, 1] scales its magnitude; `clean` has an empty config, so it is
the identity. Everything is a pure function of (inputs, seed): one numpy Generator per call, and the
albumentations pipelines are seeded from it (never the global `random` / `np.random` state).

The random draws that decide *whether* an operation runs are taken for every operation, in a fixed
order, before anything else. So the same seed makes the same decisions at every level, and since the
hard probabilities are >= the mild ones, a hard query applies a superset of its mild twin's operations.

This module holds the levels, the decisions, the two entry points `noise_image` and `noise_text`, and
the text rules (number, abbreviations, typos); the image operations that `noise_image` applies
(clutter, occlusion, overlay, defocus, the albumentations pipelines) are in data/noise_image_ops.py.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image

from data.images import to_rgb_on_white
from data.noise_image_ops import albu, clutter, defocus, occlusion, overlay

# inflect (~2 s) is imported on first use (albumentations too, in data/noise_image_ops.py), so importing
# this module is cheap

LEVELS = ("clean", "mild", "hard")
IMAGE_OPS = ("clutter", "geometric", "occlusion", "overlay", "blur", "light", "jpeg")  # in this order
TEXT_OPS = ("text_number", "text_abbrev", "text_typo")


# --------------------------------------------------------------------------------------------- shared
def _check(level: str, cfg: dict | None) -> tuple[dict, float]:
    if level not in LEVELS:
        raise ValueError(f"unknown noise level {level!r}; valid levels: {', '.join(LEVELS)}")
    cfg = dict(cfg or {})
    for key, value in cfg.items():
        if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
            raise ValueError(f"noise.{level}.{key} = {value!r} must lie in [0, 1]")
    return cfg, float(cfg.get("strength", 0.0))


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)  # negative seeds are fine too


def _decide(rng: np.random.Generator, cfg: dict, ops: Sequence[str]) -> list[tuple[str, int]]:
    """(op, sub-seed) for the ops that fire; all draws happen whatever fires, so decisions are stable."""
    draws, seeds = rng.random(len(ops)), rng.integers(0, 2**31 - 1, len(ops))
    return [(op, int(sd)) for op, u, sd in zip(ops, draws, seeds) if u < float(cfg.get(op, 0) or 0)]


# --------------------------------------------------------------------------------------------- images
def noise_image(img: Image.Image, level: str, cfg: dict, seed: int,
                backgrounds: Sequence[Image.Image] = ()) -> Image.Image:
    """A noisy RGB query photo of `img`, the same size as `img`.

    cfg is params["noise"][level]: probabilities for clutter, geometric, occlusion, overlay, blur,
    light, jpeg (missing = 0) and `strength` in [0, 1]. `backgrounds` are other catalog images (PIL,
    any mode) used as distractor clutter; without them clutter is a procedural texture.
    Not thread-safe (the cached albumentations pipelines are reseeded per call); use processes.
    """
    cfg, s = _check(level, cfg)
    out = np.asarray(to_rgb_on_white(img)).copy()
    cluttered = False
    for op, sub in _decide(_rng(seed), cfg, IMAGE_OPS):
        r = np.random.default_rng(sub)
        if op == "clutter":
            out, cluttered = clutter(out, s, r, backgrounds), True
        elif op == "occlusion":
            out = occlusion(out, s, r, sub)
        elif op == "overlay":
            out = overlay(out, s, r)
        elif op == "blur" and r.random() < 1 / 3:
            out = defocus(out, s, r)
        else:
            out = albu(out, op, s, sub, cluttered)
    return Image.fromarray(np.ascontiguousarray(out, dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------- text
_ABBREV = {"with": "w/", "without": "w/o", "and": "&", "black": "blk", "white": "wht", "small": "sm",
           "large": "lg", "medium": "med", "package": "pkg", "christmas": "xmas", "number": "no.",
           "pieces": "pcs", "piece": "pc", "quantity": "qty", "light": "lt", "dark": "dk", "for": "4",
           "assorted": "asst", "accessories": "acc", "inch": "in", "extra": "xtra", "blue": "blu"}
_STOP = {"a", "an", "the", "of", "for", "and", "with", "in", "on", "to", "or", "by", "at", "from", "&"}
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS = {c: "".join(_ROWS[rr][cc] for rr, cc in
                          ((i, j - 1), (i, j + 1), (i - 1, j), (i - 1, j + 1), (i + 1, j - 1), (i + 1, j))
                          if 0 <= rr < 3 and 0 <= cc < len(_ROWS[rr]))
               for i, row in enumerate(_ROWS) for j, c in enumerate(row)}


@lru_cache(maxsize=4096)
def _latin_char(c: str) -> bool:
    return "LATIN" in unicodedata.name(c, "")


def _latin(word: str) -> bool:
    """Whether a word is written in Latin script (every letter, at least one): the English rules
    (plurals, abbreviations, vowel dropping) apply to such words only, never to CJK, Cyrillic,
    Arabic, ... words, whose typos are script-neutral (swaps, drops, doubles)."""
    letters = [c for c in word if c.isalpha()]
    return bool(letters) and all(_latin_char(c) for c in letters)


@lru_cache(maxsize=1)
def _inflect():
    import inflect
    return inflect.engine()


def _like(new: str, old: str) -> str:
    """new, cased like old."""
    if old.isupper() and len(old) > 1:
        return new.upper()
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _number(words: list[str], s: float, rng: np.random.Generator) -> None:
    """Swap singular/plural of the head noun (titles end with it) and, at high strength, of another word.
    English rules: Latin-script words only."""
    cand = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 3 and w.lower() not in _STOP
            and _latin(w)]
    if not cand:
        return
    for i in [cand[-1]] + [i for i in cand[:-1] if rng.random() < 0.3 * s]:
        lo = words[i].lower()
        # inflect "singularizes" bus -> bu, cactus -> cactu: only pluralize those
        eng = _inflect()
        new = (not lo.endswith(("ss", "us", "is")) and eng.singular_noun(lo)) or eng.plural_noun(lo)
        if new:
            words[i] = _like(new, words[i])


def _abbrev(words: list[str], s: float, rng: np.random.Generator) -> None:
    """Dictionary abbreviations, else drop the vowels of or truncate a long word (Latin-script words
    only: "pkg", "lt." make no sense on other scripts)."""
    hits = [i for i, w in enumerate(words) if w.lower() in _ABBREV]
    chosen = [i for i in hits if rng.random() < 0.5 + 0.5 * s] or hits[:1]
    for i in chosen:
        words[i] = _ABBREV[words[i].lower()]
    long = [i for i, w in enumerate(words) if i not in chosen and w.isalpha() and len(w) >= 6 and _latin(w)]
    picked = [i for i in long if rng.random() < 0.3 * s]
    if not chosen and not picked and long:
        picked = [long[rng.integers(len(long))]]
    for i in picked:
        w = words[i]
        words[i] = w[0] + re.sub("[aeiouAEIOU]", "", w[1:]) if rng.random() < 0.5 \
            else w[:int(rng.integers(3, 6))] + "."


def _typo(words: list[str], s: float, rng: np.random.Generator) -> None:
    """Swap adjacent letters, drop one, double one or hit a keyboard neighbour, in 1+ words."""
    elig = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 3]
    if not elig:
        return
    n = 1 + int(rng.binomial(len(elig) - 1, 0.2 * s))
    for i in rng.choice(elig, size=n, replace=False):
        w = words[i]
        pos = [j for j, c in enumerate(w) if c.isalpha()]
        j = int(rng.choice(pos))
        kind = rng.integers(4)
        if kind == 0 and j + 1 < len(w) and w[j] != w[j + 1]:
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif kind == 1:
            w = w[:j] + w[j + 1:]
        elif kind == 2:
            w = w[:j] + w[j] + w[j:]
        else:  # keyboard neighbour (also the fallback when a swap would be a no-op)
            near = _NEIGHBOURS.get(w[j].lower(), "")
            if near:
                c = near[rng.integers(len(near))]
                w = w[:j] + (c.upper() if w[j].isupper() else c) + w[j + 1:]
            else:
                w = w[:j] + w[j + 1:]
        words[int(i)] = w


def noise_text(text: str, level: str, cfg: dict, seed: int) -> str:
    """Shopper-typed query text: number swaps, abbreviations and typos, each with its probability per
    text (text_number, text_abbrev, text_typo in cfg); strength scales how many words are touched.
    Each rule touches only words of a script it fits: plurals and abbreviations are English rules
    (Latin-script words), typos (swap, drop, double a letter; a QWERTY neighbour for Latin letters)
    apply to any script. Whitespace between words is kept; clean (empty cfg) returns the text
    unchanged."""
    cfg, s = _check(level, cfg)
    if not text:
        return ""
    fired = _decide(_rng(seed), cfg, TEXT_OPS)
    if not fired:
        return text
    parts = re.split(r"(\s+)", text)  # words at even positions, separators at odd ones
    words = parts[0::2]
    for op, sub in fired:
        {"text_number": _number, "text_abbrev": _abbrev, "text_typo": _typo}[op](
            words, s, np.random.default_rng(sub))
    parts[0::2] = words
    return "".join(parts)
