"""Render the offline/online A/B report as ONE self-contained HTML file.

Reviewers decide model promotion from this page, often offline or as an attachment, so nothing may
be fetched from the network: CSS is inline and every plot / thumbnail is a base64 data URI. The
renderer takes plain data (numbers, DataFrames, file paths) so it can be tested without models.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from PIL import Image, ImageOps

from data.images import to_rgb_on_white
from retrieval.calibration import expected_calibration_error, reliability

THUMB_PX = 96
NOISE_ORDER = ("clean", "mild", "hard")
PERCENTILES = (50, 95, 99)
CALIB_BINS = 10

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:2px} .sub{color:#666;margin-top:0}
.banner{padding:12px 16px;border-radius:6px;margin:16px 0;border:1px solid}
.banner.ok{background:#e6f4ea;border-color:#34a853} .banner.hold{background:#fff4e0;border-color:#f0a020}
.banner b{font-size:1.15em} .explain{color:#444;max-width:900px}
table.tbl{border-collapse:collapse;margin:8px 0 16px} .tbl th,.tbl td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}
.tbl th{background:#f4f4f4} .scroll{overflow-x:auto;max-width:100%} figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}
figcaption{color:#555;font-size:.9em;max-width:520px}
.grow{display:flex;gap:18px;align-items:flex-start;border-bottom:1px solid #eee;padding:10px 0}
.q{width:140px;font-size:.85em;word-break:break-word} .v{font-size:.8em} .v>div{display:flex;gap:4px}
.t{width:96px;height:96px;object-fit:contain;border:3px solid #bbb;background:#fff;box-sizing:border-box}
.ph{display:inline-block;background:#ccc} .l0{border-color:#2e9e44} .l1{border-color:#f08c00}
"""


@dataclass
class GalleryQuery:
    query_id: str
    query_image: str | None          # file path (or None for a text-only query)
    query_text: str | None
    noise_level: str                 # clean / mild / hard
    variants: dict[str, list[dict]]  # variant -> top-5 [{"image", "title", "level" 0..3, "score"}]


@dataclass
class ReportData:
    title: str
    subtitle: str = ""
    decision: dict | None = None     # {"promoted", "model", "alias", "reasons"[, "status"]}
    more_decisions: list[dict] = field(default_factory=list)   # further gates (the reranker's), same keys
    sections: list[tuple[str, str, pd.DataFrame]] = field(default_factory=list)
    recall_curves: dict[str, dict[int, float]] = field(default_factory=dict)
    by_noise: dict[str, dict[str, float]] = field(default_factory=dict)
    latency_ms: dict[str, np.ndarray] = field(default_factory=dict)
    calibration: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    online: pd.DataFrame | None = None
    gallery: list[GalleryQuery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def figure_png(fig) -> str:
    """PNG data URI of a figure; the figure is closed so long report runs do not leak memory."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        import matplotlib.pyplot as plt  # no-op for unmanaged Figures, frees pyplot-managed ones
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(path) -> str | None:
    """JPEG data URI (<= 96 px, transparency flattened on white), or None if unreadable/missing:
    a broken catalog path must cost one grey box, not the whole report."""
    if not path:
        return None
    try:
        with Image.open(path) as im:
            buf = io.BytesIO()
            to_rgb_on_white(ImageOps.exif_transpose(im), THUMB_PX).save(buf, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fig(w=6.0, h=3.6):
    fig = Figure(figsize=(w, h))
    return fig, fig.add_subplot()


def plot_recall(curves: dict[str, dict[int, float]]) -> Figure:
    fig, ax = _fig()
    for name, pts in curves.items():
        ks = sorted(pts)
        ax.plot(ks, [pts[k] for k in ks], marker="o", label=name)
    ks = sorted({k for pts in curves.values() for k in pts})
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="K", ylabel="hit rate @K (%)")
    ax.grid(alpha=.3)
    ax.legend()
    return fig


def plot_noise(by_noise: dict[str, dict[str, float]]) -> Figure:
    seen = {lvl for d in by_noise.values() for lvl in d}
    levels = [lvl for lvl in NOISE_ORDER if lvl in seen] + sorted(seen - set(NOISE_ORDER))
    fig, ax = _fig()
    width = 0.8 / len(by_noise)
    x = np.arange(len(levels))
    for i, (name, d) in enumerate(by_noise.items()):
        ax.bar(x + (i - (len(by_noise) - 1) / 2) * width, [d.get(lvl, np.nan) for lvl in levels],
               width, label=name)
    ax.set_xticks(x, levels)
    ax.set(ylabel="I-HR@1 (%)", xlabel="query noise level")
    ax.grid(axis="y", alpha=.3)
    ax.legend()
    return fig


def plot_latency(latency: dict[str, np.ndarray]) -> Figure:
    """ECDF on a log axis: tails matter for serving, and histograms hide them."""
    fig, ax = _fig()
    for name, v in latency.items():
        v = np.sort(np.asarray(v, dtype=float).ravel())
        if not v.size or v[-1] <= 0:   # an arm that adds no time (rerank none) has no place on a log axis
            continue
        v = np.maximum(v, 1e-3)
        p = np.percentile(v, PERCENTILES)
        label = f"{name} (" + ", ".join(f"p{q}={x:.1f}" for q, x in zip(PERCENTILES, p)) + " ms)"
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(  # label 2x and 5x: readable without crowding
        lambda x, _: f"{x:g}" if round(x / 10 ** np.floor(np.log10(x))) in (2, 5) else ""))
    ax.set(xlabel="latency per query (ms, log)", ylabel="fraction of queries")
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_calibration(calib: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    fig, ax = _fig(4.6, 4.2)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect")
    for name, (p, y) in calib.items():
        rel, ece = reliability(p, y, CALIB_BINS), expected_calibration_error(p, y, CALIB_BINS)
        ax.plot(rel["mean_prob"], rel["frac_pos"], marker="o", label=f"{name} (ECE={ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="observed frequency")
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    return fig


def _banner(d: dict) -> str:
    ok = bool(d.get("promoted"))
    status = d.get("status") or ("PROMOTED to champion" if ok else "kept as challenger")
    reasons = "".join(f"<li>{esc(r)}</li>" for r in d.get("reasons") or [])
    return (f'<div class="banner {"ok" if ok else "hold"}"><b>{esc(d.get("model", "model"))}: {status}</b>'
            f'{f"<ul>{reasons}</ul>" if reasons else ""}</div>')


def _table(df: pd.DataFrame) -> str:
    plain = isinstance(df.index, pd.RangeIndex)   # 0, 1, 2 ... says nothing: leave it out
    return ('<div class="scroll">' + df.to_html(classes="tbl", escape=True, border=0, na_rep="–", index=not plain,
                                               float_format="{:.4g}".format) + "</div>")


def _thumb(path, tip: str, level=None, encode=thumbnail) -> str:
    cls = "t" + {0: " l0", 1: " l1"}.get(level, "")
    uri = encode(path)
    if uri is None:
        return f'<span class="{cls} ph" title="{esc(tip)} (image missing)"></span>'
    return f'<img class="{cls}" src="{uri}" alt="{esc(tip)}" title="{esc(tip)}">'


def _gallery(queries: list[GalleryQuery]) -> str:
    encode = functools.cache(thumbnail)   # each image once, however many variants show it
    rows = []
    for q in queries:
        cells = [f'<div class="q">{_thumb(q.query_image, q.query_text or q.query_id, encode=encode)}<br>'
                 f'<b>{esc(q.query_id)}</b> [{esc(q.noise_level)}]<br>{esc(q.query_text)}</div>']
        for name, results in q.variants.items():
            thumbs = "".join(_thumb(r.get("image"), r.get("title", ""), r.get("level"), encode)
                             for r in results[:5])
            cells.append(f'<div class="v"><b>{esc(name)}</b><div>{thumbs}</div></div>')
        rows.append(f'<div class="grow">{"".join(cells)}</div>')
    return "".join(rows)


def render_html(data: ReportData) -> str:
    out = [f"<h1>{esc(data.title)}</h1>"]
    if data.subtitle:
        out.append(f'<p class="sub">{esc(data.subtitle)}</p>')
    for d in ([data.decision] if data.decision else []) + data.more_decisions:
        out.append(_banner(d))
    for heading, text, df in data.sections:
        out.append(f'<h2>{esc(heading)}</h2><p class="explain">{esc(text)}</p>{_table(df)}')
    plots = [  # (data, plotter, alt, caption): only non-empty data gets a figure
        (data.recall_curves, plot_recall, "Recall@K curves",
         "Hit rate at K per variant (percent); higher is better."),
        (data.by_noise, plot_noise, "Robustness by query noise level",
         "Instance hit rate @1 per noise level; a small clean-to-hard drop means robust queries."),
        ({k: v for k, v in data.latency_ms.items() if np.size(v)}, plot_latency,
         "Latency distribution", "Empirical CDF of per-query latency, log scale; p50/p95/p99 in legend."),
        ({k: v for k, v in data.calibration.items() if np.size(v[0])}, plot_calibration,
         "Calibration reliability diagram",
         f"{CALIB_BINS} equal-width bins; points on the diagonal mean the probability can be thresholded."),
    ]
    figs = [f'<figure><img src="{figure_png(fn(d))}" alt="{esc(alt)}"><figcaption>{esc(cap)}</figcaption>'
            f"</figure>" for d, fn, alt, cap in plots if d]
    if figs:
        out.append("<h2>Offline metrics</h2>" + "".join(figs))
    if data.online is not None and not data.online.empty:
        out.append("<h2>Online A/B</h2>" + _table(data.online))
    if data.gallery:
        out.append("<h2>Gallery</h2><p class=\"explain\">Top-5 per variant; green = same instance, "
                   "orange = level 1, grey = other; hover for titles.</p>" + _gallery(data.gallery))
    if data.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in data.notes) + "</ul>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(data.title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(out)}</body></html>\n")


def render_report(data: ReportData, path) -> Path:
    """Write the report atomically (temp file + os.replace) so a reader never sees half a page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(data)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the report from other reviewers
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
