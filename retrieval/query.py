"""A query's input, checked: the errors bad input raises (each carrying the HTTP status it maps
to and a stable code) and the bounded image decoder the service, the CLI and the registered
pyfuncs share."""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from data import images as imgs


# ------------------------------------------------------------------------------------------ errors
class QueryError(ValueError):
    """Bad query input; `status` is the HTTP status it maps to, `code` a stable machine name."""

    status, code = 400, "bad_request"


class EmptyQuery(QueryError):
    status, code = 422, "empty_query"


class UnsupportedImage(QueryError):
    status, code = 415, "unsupported_image"


class CorruptImage(QueryError):
    status, code = 400, "corrupt_image"


class UnusableImage(QueryError):
    status, code = 400, "unusable_image"


class TooLarge(QueryError):
    status, code = 413, "too_large"


class UnknownItem(QueryError):
    status, code = 404, "unknown_item"


class NotReady(RuntimeError):
    """No index is loaded yet (nothing published, or only indexes built by another model)."""


# ------------------------------------------------------------------------------------------ decode
@dataclass(frozen=True)
class QueryLimits:
    max_bytes: int = 10 * 2**20
    max_pixels: int = 25_000_000
    min_side: int = 12
    max_aspect: float = 20.0
    max_side: int = 384                 # normalized like the catalog: RGB on white, longest side
    formats: tuple = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    max_text_chars: int = 500

    @classmethod
    def from_params(cls, params: dict) -> "QueryLimits":
        cfg = dict(params["serving"]["limits"])
        cfg["max_side"] = cfg.get("max_side") or params["ingest"]["max_side"]
        cfg["formats"] = tuple(f.upper() for f in cfg.get("formats", cls.formats))
        return cls(**cfg)


# data/images.py reasons -> the error a client gets
_REASONS = {imgs.EMPTY: EmptyQuery, imgs.TOO_LARGE_FILE: TooLarge, imgs.NOT_IMAGE: UnsupportedImage,
            imgs.CORRUPT: CorruptImage, imgs.TOO_MANY_PIXELS: TooLarge, imgs.TOO_SMALL: UnusableImage,
            imgs.BAD_ASPECT: UnusableImage}


def sniff_format(data: bytes) -> str | None:
    """The format named by the header (no pixels decoded); None when Pillow knows none."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:  # noqa: BLE001 - unknown or broken header: open_checked names the reason
        return None


def decode_query_image(data: bytes, limits: QueryLimits) -> Image.Image:
    """Untrusted bytes -> RGB on white, longest side limits.max_side. Sizes and the format are
    checked from the header before any pixel is decoded (decompression bombs cost nothing)."""
    if len(data) > limits.max_bytes:
        raise TooLarge(f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    fmt = sniff_format(data)
    if fmt is not None and fmt not in limits.formats:
        raise UnsupportedImage(f"unsupported image format {fmt}; accepted: {', '.join(limits.formats)}")
    cfg = {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "min_side": limits.min_side,
           "max_aspect": limits.max_aspect}
    try:
        im = imgs.open_checked(data, cfg)
    except imgs.BadImage as e:
        reason = str(e)
        cls = next((c for r, c in _REASONS.items() if reason.startswith(r)), CorruptImage)
        raise cls(f"image rejected: {reason}") from None
    try:
        return imgs.to_rgb_on_white(im, limits.max_side)
    except Exception as e:  # noqa: BLE001 - e.g. a palette image whose pixels fail to convert
        raise CorruptImage(f"image rejected: {imgs.CORRUPT} ({type(e).__name__}: {e})") from None
