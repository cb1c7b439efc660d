"""Safe image decoding and normalization: bad files are quarantined with a reason, never crash a run.

Every image becomes RGB composited on white with its longest side bounded; the checks on bytes and
header dimensions run before any pixel is decoded, so a decompression bomb is refused cheaply.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

import imagehash
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from data.schema import STATUS_OK, STATUS_QUARANTINED

# Reasons are stable prefixes (the quarantine table and the tests rely on them).
EMPTY, TOO_LARGE_FILE, NOT_IMAGE, CORRUPT = "empty file", "file too large", "not an image", "truncated or corrupt"
TOO_MANY_PIXELS, TOO_SMALL, BAD_ASPECT, MISSING = "too many pixels", "too small", "extreme aspect ratio", "missing file"
NOT_REGULAR, UNREADABLE = "not a regular file", "unreadable file"
# A manifest's image path that does not name a file inside the manifest directory (data/sources.py).
OUTSIDE, ABSOLUTE, URL = "path outside the catalog", "absolute path", "URL, not a file in the catalog"

# We check sizes ourselves (max_pixels from params) before decoding; Pillow's own guard stays on as
# a backstop, and its warning is not silenced for the process (open_checked turns it into a refusal).


class BadImage(ValueError):
    """An image that cannot be used; str(e) starts with one of the reason constants."""


def open_checked(data: bytes, cfg: dict) -> Image.Image:
    """Decode bytes after checking size, header dimensions and aspect; raise BadImage with the reason."""
    if not data:
        raise BadImage(f"{EMPTY} (0 bytes)")
    if len(data) > cfg["max_bytes"]:
        raise BadImage(f"{TOO_LARGE_FILE} ({len(data)} bytes > {cfg['max_bytes']})")
    try:
        # Pillow warns past its own limit (89 M pixels), errors past twice that: here both refuse,
        # with our reason, and nothing is printed. The filter is only for this call (a thread
        # racing it can at worst keep the escalation, which is what this function does anyway).
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{TOO_MANY_PIXELS} ({e})") from None
    except UnidentifiedImageError:
        raise BadImage(f"{NOT_IMAGE} (no known image format)") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, not a crash
        raise BadImage(f"{CORRUPT} ({type(e).__name__}: {e})") from None
    w, h = im.size
    if w * h > cfg["max_pixels"]:
        raise BadImage(f"{TOO_MANY_PIXELS} ({w}x{h} = {w * h} > {cfg['max_pixels']})")
    if min(w, h) < cfg["min_side"]:
        raise BadImage(f"{TOO_SMALL} ({w}x{h}, min side {cfg['min_side']})")
    if max(w, h) / min(w, h) > cfg["max_aspect"]:
        raise BadImage(f"{BAD_ASPECT} ({w}x{h} > {cfg['max_aspect']}:1)")
    try:
        im.load()
        return upright(im)
    except Exception as e:  # noqa: BLE001
        raise BadImage(f"{CORRUPT} ({type(e).__name__}: {e})") from None


def upright(im: Image.Image) -> Image.Image:
    """The image as the camera held it: a phone stores an upright photo sideways with an EXIF
    orientation tag, which a model must not see rotated. `info["orientation"]` keeps the tag."""
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
    im.info["orientation"] = orientation or 1
    return im


def to_rgb_on_white(im: Image.Image, max_side: int | None = None) -> Image.Image:
    """RGB on a white background (transparency flattened), longest side at most max_side."""
    if im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA")  # P, LA, L, CMYK, I;16 ... all go through RGBA
    if im.mode == "RGBA":
        canvas = Image.new("RGB", im.size, (255, 255, 255))
        canvas.paste(im, mask=im.getchannel("A"))
        im = canvas
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return im


def decode_rgb(data: bytes, cfg: dict) -> Image.Image:
    """Checked decode + normalization of untrusted bytes (uploads, queries)."""
    return to_rgb_on_white(open_checked(data, cfg), cfg.get("max_side"))


def quarantined(src: str, reason: str | None) -> dict:
    """The image record of a source image that is not used (normalize_file fills in the rest)."""
    return {"source_path": src, "path": None, "status": STATUS_QUARANTINED, "reason": reason,
            "orig_width": None, "orig_height": None, "width": None, "height": None,
            "sha256": None, "dhash": None, "bytes": None}


def _check_regular(st: os.stat_result, src: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "special file"
        raise BadImage(f"{NOT_REGULAR} ({kind}: {src})")
    if st.st_size > max_bytes:  # refuse before reading it into memory
        raise BadImage(f"{TOO_LARGE_FILE} ({st.st_size} bytes > {max_bytes})")


def read_regular(src: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes. Checked with stat before it is opened (a
    FIFO opened for reading blocks forever, a device never ends) and again on the open descriptor,
    in case the path was swapped in between; O_NONBLOCK keeps even that open from blocking."""
    _check_regular(os.stat(src), src, max_bytes)
    with os.fdopen(os.open(src, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        _check_regular(os.fstat(f.fileno()), src, max_bytes)
        return f.read(max_bytes + 1)  # a file still growing: open_checked refuses the excess


def normalize_file(src: str, out_dir: str, cfg: dict, reuse_dir: str | None = None) -> dict:
    """Check and normalize one source image into out_dir/images/<sha[:2]>/<sha>.png.

    Returns the image record (status, reason, sizes, sha256, dhash, relative path). When reuse_dir
    (a previous version of the catalog) already holds the normalized file, it is hard-linked instead
    of decoded again, which makes a repeated ingest fast.
    """
    rec = quarantined(src, None)
    try:
        data = read_regular(src, cfg["max_bytes"])
    except FileNotFoundError:
        rec["reason"] = f"{MISSING} ({src})"
        return rec
    except OSError as e:  # permissions, a symlink loop: this file's problem, not the run's
        rec["reason"] = f"{UNREADABLE} ({src}: {type(e).__name__})"
        return rec
    except BadImage as e:
        rec["reason"] = str(e)
        return rec
    sha = hashlib.sha256(data).hexdigest()
    rec.update(sha256=sha, bytes=len(data))
    try:
        im = open_checked(data, cfg)
        rec.update(orig_width=im.size[0], orig_height=im.size[1])
        # "_u": turned upright; a catalog normalized before that (reuse_dir) is not reused sideways
        rel = f"images/{sha[:2]}/{sha}_{cfg['max_side']}{'_u' if im.info['orientation'] != 1 else ''}.png"
        dst = Path(out_dir) / rel
        prev = Path(reuse_dir) / rel if reuse_dir else None
        dst.parent.mkdir(parents=True, exist_ok=True)
        if prev is not None and prev.is_file():
            with contextlib.suppress(FileExistsError):  # a byte twin in another worker got there first
                os.link(prev, dst)
            norm = Image.open(dst)
            norm.load()
        else:
            norm = to_rgb_on_white(im, cfg["max_side"])
            if not dst.exists():  # byte-identical twins share one file
                tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
                norm.save(tmp, format="PNG", compress_level=3)
                os.replace(tmp, dst)
    except BadImage as e:
        rec["reason"] = str(e)
        return rec
    rec.update(path=rel, status=STATUS_OK, width=norm.size[0], height=norm.size[1],
               dhash=str(imagehash.dhash(norm.convert("L"))))
    return rec
