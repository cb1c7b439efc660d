"""Images as phones store them: an upright photo saved sideways with an EXIF orientation tag is
turned upright at ingest and at query time; Pillow's bomb warning is not silenced process-wide."""
import io
import subprocess
import sys
import warnings

from PIL import ExifTags, Image

from data.images import decode_rgb, normalize_file
from core.config import REPO_ROOT
from retrieval.query import QueryLimits, decode_query_image

CFG = {"max_bytes": 1 << 20, "max_pixels": 10_000_000, "min_side": 8, "max_aspect": 10.0, "max_side": 256}


def sideways_jpeg(orientation: int = 6) -> bytes:
    """A 120 x 60 landscape image whose tag says: rotate 90 degrees to view (a portrait photo)."""
    im = Image.new("RGB", (120, 60), (255, 255, 255))
    im.paste((200, 0, 0), (0, 0, 30, 60))   # red strip on the left of the stored pixels
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_query_and_decode_turn_an_exif_rotated_photo_upright():
    for im in (decode_rgb(sideways_jpeg(), CFG), decode_query_image(sideways_jpeg(), QueryLimits())):
        assert im.size == (60, 120)
        # orientation 6 (rotate 90 clockwise to view): the stored left strip is now on top
        assert im.getpixel((30, 5))[0] > 150 and im.getpixel((30, 5))[1] < 80
        assert im.getpixel((30, 115)) == (255, 255, 255) or min(im.getpixel((30, 115))) > 240
    plain = decode_rgb(sideways_jpeg(orientation=1), CFG)
    assert plain.size == (120, 60)


def test_ingest_stores_the_upright_image_under_its_own_name(tmp_path):
    src = tmp_path / "phone.jpg"
    src.write_bytes(sideways_jpeg())
    rec = normalize_file(str(src), str(tmp_path / "out"), CFG)
    assert rec["status"] == "ok" and (rec["width"], rec["height"]) == (60, 120)
    assert rec["path"].endswith("_u.png")   # never confused with a sideways copy from an older ingest
    with Image.open(tmp_path / "out" / rec["path"]) as stored:
        assert stored.size == (60, 120)


def test_the_bomb_warning_is_not_silenced_for_the_process():
    # a fresh interpreter: pytest resets the filters around each test, which would hide it here
    code = ("import warnings, data.images; from PIL import Image; "
            "print(any(f[0] == 'ignore' and f[2] is Image.DecompressionBombWarning for f in warnings.filters))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_image_past_pillow_s_limit_is_refused_with_our_reason_and_nothing_printed(capfd):
    import pytest

    from data.images import TOO_MANY_PIXELS, BadImage, open_checked

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")   # 100 M pixels: Pillow warns, does not raise
    with warnings.catch_warnings():
        warnings.simplefilter("default")   # as in a plain process, where the warning would print
        with pytest.raises(BadImage, match=TOO_MANY_PIXELS):
            open_checked(buf.getvalue(), {**CFG, "max_pixels": 10**9})
    assert "DecompressionBombWarning" not in capfd.readouterr().err
