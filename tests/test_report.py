"""The A/B report must be one self-contained, escaped HTML file that survives missing images."""
from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from evaluation.report import GalleryQuery, ReportData, figure_png, plot_calibration, render_report

VARIANTS = ("baseline", "champion", "challenger")
PNG_IMG = re.compile(r'<img[^>]*src="data:image/png;base64,([^"]+)"')
JPEG_IMG = re.compile(r'<img[^>]*src="data:image/jpeg;base64,')


def _png(path, color, size=(140, 100), mode="RGBA"):
    im = Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else "white")
    im.paste(color, (20, 20, size[0] - 20, size[1] - 20))
    im.save(path)
    return str(path)


@pytest.fixture
def full_data(tmp_path) -> tuple[ReportData, int]:
    """ReportData with every section; also returns how many gallery thumbnails are real files."""
    rng = np.random.default_rng(0)
    imgs = [_png(tmp_path / f"p{i}.png", tuple(int(c) for c in rng.integers(0, 255, 3)))
            for i in range(8)]
    missing = str(tmp_path / "does_not_exist.png")
    gallery = []
    for qi in range(3):
        variants = {v: [{"image": missing if (qi, vi, r) == (1, 2, 3) else imgs[(qi + vi + r) % 8],
                         "title": f'item {r} "<b>&"', "level": r % 4, "score": float(1 - r / 10)}
                        for r in range(5)] for vi, v in enumerate(VARIANTS)}
        gallery.append(GalleryQuery(f"q{qi}", imgs[qi], f"red bag {qi}", ("clean", "mild", "hard")[qi], variants))
    n_thumbs = 3 * (1 + 5 * len(VARIANTS)) - 1  # one result image is missing
    table = pd.DataFrame({"delta I-HR@1": [1.234567, -0.5], "ci_low": [0.1, -1.2], "ci_high": [2.3, 0.2]},
                         index=["challenger vs champion", "champion vs baseline"])
    online = pd.DataFrame({"ctr": [0.031, 0.034], "ci_low": [0.029, 0.032], "ci_high": [0.033, 0.036]},
                          index=["champion", "challenger"])
    data = ReportData(
        title="Pailitao-VL <script>alert(1)</script> report",
        subtitle="profile=tiny · data=abc123 · commit deadbeef",
        decision={"promoted": True, "model": "pailitao-vl", "alias": "champion",
                  "reasons": ["I-HR@1 +1.2 pts, CI excludes 0", "p95 latency within budget"]},
        more_decisions=[{"promoted": False, "model": "reranker_model", "status": "not served (gated)",
                         "reasons": ["latency p95 +120 ms exceeds the budget"]}],
        sections=[("Paired comparison", "Bootstrap over queries, 95% CI.", table)],
        recall_curves={v: {k: float(50 + 10 * np.log2(k) + rng.normal()) for k in (1, 5, 10, 20)} for v in VARIANTS},
        by_noise={v: {"hard": 40.0 + i, "clean": 70.0 + i, "mild": 60.0 + i} for i, v in enumerate(VARIANTS)},
        latency_ms={v: rng.lognormal(2 + i / 4, 0.5, 200) for i, v in enumerate(VARIANTS)},
        calibration={"reranker": (rng.uniform(size=300), rng.integers(0, 2, 300))},
        online=online, gallery=gallery, notes=["synthetic data <i>only</i>"])
    return data, n_thumbs


def test_full_report(tmp_path, full_data):
    data, n_thumbs = full_data
    out = render_report(data, tmp_path / "out" / "report.html")
    assert out.exists()
    text = out.read_text(encoding="utf-8")
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and not any(r.startswith(("http://", "https://", "//")) for r in refs)
    assert "http://" not in text and "https://" not in text
    pngs = PNG_IMG.findall(text)
    assert len(pngs) == 4                      # recall, noise, latency, calibration
    assert len(JPEG_IMG.findall(text)) == n_thumbs
    assert len(re.findall(r'<span class="t[^"]* ph"', text)) == 1   # grey placeholder, no crash
    assert "PROMOTED to champion" in text and "kept as challenger" not in text
    assert "reranker_model: not served (gated)" in text and "+120 ms exceeds" in text   # the rerank gate
    for reason in data.decision["reasons"]:
        assert reason in text
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "&lt;i&gt;only&lt;/i&gt;" in text
    assert 'title="item 0 &quot;&lt;b&gt;&amp;&quot;"' in text   # tooltips escaped too
    assert 'class="t l0"' in text and 'class="t l1"' in text
    assert "p50/p95/p99" in text
    with Image.open(io.BytesIO(base64.b64decode(pngs[0]))) as im:
        im.load()
        assert im.format == "PNG" and im.width > 100
    assert "challenger vs champion" in text and "Online A/B" in text


def test_rerender_replaces_atomically(tmp_path, full_data):
    data, _ = full_data
    path = tmp_path / "r.html"
    path.write_text("old")
    before = set(tmp_path.iterdir())
    data.decision = {"promoted": False, "model": "m2", "alias": "challenger", "reasons": ["CI crosses 0"]}
    data.more_decisions = []
    assert render_report(data, path) == path
    text = path.read_text(encoding="utf-8")
    assert "kept as challenger" in text and "PROMOTED" not in text and "CI crosses 0" in text
    assert set(tmp_path.iterdir()) == before   # no temp files left behind


def test_latency_plot_leaves_out_an_arm_that_adds_no_time():
    from evaluation.report import plot_latency

    fig = plot_latency({"rerank none": np.zeros(5), "rerank list": np.array([180.0, 200.0, 260.0])})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == 1 and labels[0].startswith("rerank list (p50=200.0")


def test_tables_leave_out_a_plain_row_index(tmp_path):
    data = ReportData(title="t", sections=[("s", "x", pd.DataFrame({"metric": ["I-HR@1"], "diff": [1.5]}))])
    text = render_report(data, tmp_path / "t.html").read_text(encoding="utf-8")
    assert "<td>I-HR@1</td>" in text and "<th>0</th>" not in text and 'class="scroll"' in text


def test_empty_sections_skipped(tmp_path):
    data = ReportData(title="empty", latency_ms={"a": np.array([])},
                      calibration={"c": (np.array([]), np.array([]))}, online=pd.DataFrame())
    text = render_report(data, tmp_path / "e.html").read_text(encoding="utf-8")
    assert "<img" not in text and "banner" not in text.split("</style>")[1]
    assert "Gallery" not in text and "Online A/B" not in text and "Offline metrics" not in text
    text_only = ReportData(title="t", gallery=[GalleryQuery("q", None, "text only", "clean",
                                                            {"v": [{"image": None, "title": "x", "level": 2}]})])
    text = render_report(text_only, tmp_path / "t.html").read_text(encoding="utf-8")
    assert "text only" in text and len(re.findall(r'<span class="t[^"]* ph"', text)) == 2 and "<img" not in text


def test_figure_png_and_reliability():
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    uri = figure_png(fig)
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.format == "PNG"
    # the diagram plots the calibration module's bins and labels each line with its ECE
    fig = plot_calibration({"m": ([0.05, 0.05, 0.95, 0.95, 1.0], [0, 0, 1, 1, 1])})
    line = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("m ")][0]
    assert line.get_label() == f"m (ECE={(2 * 0.05 + 2 * 0.05) / 5:.3f})"
    assert line.get_ydata().tolist() == [0.0, 1.0] and line.get_xdata()[0] == pytest.approx(0.05)
