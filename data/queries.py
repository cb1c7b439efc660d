"""Query sets for val and test: shopper-like photos made by environmental noise on images of
held-out instances, at named levels (clean / mild / hard), with noisy text on a share of them
(modality "image"); with queries.text_queries, also a shopper's words for each instance, alone
(level and modality "text") and with a noisy photo (level and modality "image_text").
A manifest's own queries are used as given (level "given", modality from what they carry)."""
from __future__ import annotations

import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data.judgments import qrels
from data.noise import _STOP, noise_image, noise_text
from data.schema import CATALOG_VIEW, STATUS_OK, Catalog
from data.splits import unit_hash
from core.console import progress

GIVEN = "given"
IMAGE, TEXT, IMAGE_TEXT = "image", "text", "image_text"   # modalities; TEXT, IMAGE_TEXT are levels too
WORD_LEVELS = (TEXT, IMAGE_TEXT)
WORD_COLUMNS = ("keywords", "description")   # catalog columns a shopper's words come from, first wins
WORD_DROP = 0.3    # chance a title word is left out of its paraphrase
MAX_WORDS = 6      # a shopper types a few words, not a description
N_BACKGROUNDS = 3  # other catalog images a query may be pasted among (clutter)


def noise_seed(*parts) -> int:
    return int(unit_hash(*parts) * 2**31)


def render_query(task: dict) -> str:
    """One noisy query image: task = src, backgrounds (files), level, cfg (noise params), seed,
    dst, format, quality. Written to a temp name, then renamed."""
    img = Image.open(task["src"]).convert("RGB")
    bgs = [Image.open(p).convert("RGB") for p in task["backgrounds"]]
    out = noise_image(img, task["level"], task["cfg"], task["seed"], backgrounds=bgs)
    dst = Path(task["dst"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    out.save(tmp, format=task["format"], quality=task["quality"])
    tmp.replace(dst)
    return str(dst)


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def shopper_words(title: str, cfg: dict, seed: int, catalog_words: str | None = None,
                  level: str = "hard") -> str:
    """What a shopper types for a product, never its exact title (case and spacing aside): up to
    MAX_WORDS words of the catalog's keywords / description when it has them, else the title
    paraphrased: words dropped and reordered, then noise_text at `level` (cfg = params["noise"][level])."""
    rng = np.random.default_rng([int(seed) & 0xFFFF_FFFF, 1])   # a stream apart from noise_text's
    if isinstance(catalog_words, str) and catalog_words.strip():
        words = [w for w in re.split(r"[\s,;|]+", catalog_words) if w and w.lower() not in _STOP]
        if len(words) > MAX_WORDS:
            words = [words[i] for i in np.sort(rng.choice(len(words), MAX_WORDS, replace=False))]
        if words and _norm(" ".join(words)) != _norm(title):
            return " ".join(words)
    words = str(title).split() or [str(title)]
    kept = [w for w in words if rng.random() >= WORD_DROP] or [words[int(rng.integers(len(words)))]]
    if len(kept) > 1 and rng.random() < 0.5:
        kept = [kept[i] for i in rng.permutation(len(kept))]
    text = noise_text(" ".join(kept), level, cfg, seed)
    if _norm(text) == _norm(title):   # nothing dropped, moved or misspelt: a doubled letter is the least
        i = max(range(len(kept)), key=lambda j: len(kept[j]))
        kept[i] += kept[i][-1:]
        text = " ".join(kept)
    return text


def image_queries(queries: pd.DataFrame) -> pd.DataFrame:
    """The query set without the shopper-words sets (levels text / image_text): for consumers that
    need a photo or whose numbers must stay comparable with query sets made before those existed."""
    return queries[~queries["level"].isin(WORD_LEVELS)]


def plan_queries(catalog: Catalog, splits: pd.DataFrame, qcfg: dict, noise: dict,
                 seed: int) -> tuple[pd.DataFrame, list[dict]]:
    """The query table and the rendering tasks (one per noisy image), all decided by the seed.
    Noisy-image rows come first, numbered as before text queries existed; with queries.text_queries,
    each held-out instance (and k) then gets one shopper-words query alone and the same words with
    its photo at queries.text_image_level (the very image of that level's row when it has one).
    `qcfg`, `noise`: params["queries"], params["noise"]; `seed`: params["seed"]."""
    with_words = qcfg.get("text_queries", False)
    photo_level, words_level = qcfg.get("text_image_level", "mild"), qcfg.get("text_words_level", "hard")
    items = catalog.items.drop(columns=["split"]).merge(splits[["item_id", "split"]], on="item_id")
    word_cols = [c for c in WORD_COLUMNS if c in items.columns]
    imgs = catalog.ok_images.merge(items[["item_id", "group_id", "title", "split", *word_cols]], on="item_id")
    train_catalog = imgs[(imgs["split"] == "train") & (imgs["view"] == CATALOG_VIEW)]["path"].tolist()
    rows, word_rows, tasks = [], [], []
    ext = "jpg" if qcfg["image_format"].upper() == "JPEG" else qcfg["image_format"].lower()

    def noisy_image(src, split: str, group: str, k: int, level: str, qid: str, folder: str) -> tuple[str, int]:
        s = noise_seed("noise", seed, group, k, level)
        rng = np.random.default_rng(s)
        bgs = [train_catalog[i] for i in rng.choice(len(train_catalog), N_BACKGROUNDS)] if train_catalog else []
        rel = f"images/{split}/{folder}/{qid}.{ext}"
        tasks.append({"src": str(catalog.image_file(src["path"])), "level": level,
                      "backgrounds": [str(catalog.image_file(p)) for p in bgs],
                      "cfg": noise[level], "seed": s, "dst": rel,
                      "format": qcfg["image_format"], "quality": qcfg["image_quality"]})
        return rel, s

    for split in ("val", "test"):
        held = imgs[imgs["split"] == split].sort_values(["group_id", "image_id"])
        for group, g in held.groupby("group_id", sort=True):
            # a shopper-side view of the instance when the catalog has one, else a catalog image
            pool = g[g["view"] != CATALOG_VIEW] if (g["view"] != CATALOG_VIEW).any() else g
            with_text = unit_hash("text", seed, group) < qcfg["text_share"]
            for k in range(qcfg["per_instance"]):
                src = pool.iloc[int(unit_hash("img", seed, group, k) * len(pool))]
                photos = {}
                for level in qcfg["levels"]:
                    qid = f"{split}-{level}-{len(rows):06d}"
                    rel, s = photos[level] = noisy_image(src, split, group, k, level, qid, level)
                    text = noise_text(src["title"], level, noise[level], s) if with_text else None
                    rows.append({"query_id": qid, "split": split, "level": level, "image": rel,
                                 "text": text, "item_id": src["item_id"], "group_id": group,
                                 "source_image_id": src["image_id"], "seed": s, "modality": IMAGE})
                if not with_words:
                    continue
                ws = noise_seed("words", seed, group, k)
                own = next((src[c] for c in word_cols if isinstance(src[c], str) and src[c].strip()), None)
                words = shopper_words(src["title"], noise[words_level], ws, own, words_level)
                same = {"split": split, "text": words, "item_id": src["item_id"], "group_id": group}
                word_rows.append({"query_id": f"{split}-{TEXT}-{len(word_rows):06d}", "level": TEXT,
                                  "image": None, **same, "source_image_id": None, "seed": ws, "modality": TEXT})
                qid = f"{split}-{IMAGE_TEXT}-{len(word_rows):06d}"
                rel, s = photos.get(photo_level) or noisy_image(src, split, group, k, photo_level, qid, IMAGE_TEXT)
                word_rows.append({"query_id": qid, "level": IMAGE_TEXT, "image": rel, **same,
                                  "source_image_id": src["image_id"], "seed": s, "modality": IMAGE_TEXT})
    return pd.DataFrame(rows + word_rows), tasks


def render_queries(tasks: list[dict], out_dir: Path, workers: int = 1) -> None:
    """Render tasks (dst relative to out_dir) with a progress bar, in worker processes when many."""
    tasks = [{**t, "dst": str(Path(out_dir) / t["dst"])} for t in tasks]
    bar = dict(desc="query images", total=len(tasks), unit="img", mininterval=2.0)
    if workers <= 1 or len(tasks) < 64:
        list(progress(map(render_query, tasks), **bar))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(progress(pool.map(render_query, tasks, chunksize=16), **bar))


def given_queries(catalog: Catalog, splits: pd.DataFrame) -> pd.DataFrame:
    """A manifest's own queries.csv, used as given; a query whose image failed is dropped."""
    q = catalog.queries
    q = q[q["status"] == STATUS_OK].merge(splits[["item_id", "group_id", "split"]], on="item_id")
    has_image, has_text = (q[c].fillna("").astype(str).str.len() > 0 for c in ("image", "text"))
    modality = np.where(has_image & has_text, IMAGE_TEXT, np.where(has_image, IMAGE, TEXT))
    q = q.assign(level=GIVEN, source_image_id=None, seed=None, modality=modality)
    return q[["query_id", "split", "level", "image", "text", "item_id", "group_id", "source_image_id", "seed",
              "modality"]]


def build_query_sets(catalog: Catalog, splits: pd.DataFrame, qcfg: dict, noise: dict, seed: int,
                     out_dir: Path, workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render the query images under out_dir and return (queries, qrels). `qcfg`, `noise`, `seed`:
    params["queries"], params["noise"], params["seed"] (unused for a manifest's own queries)."""
    if catalog.queries is not None and len(catalog.queries):
        queries = given_queries(catalog, splits)
        for rel in queries["image"].dropna():  # given query images travel with the query set
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.hardlink_to(catalog.image_file(rel))
    else:
        queries, tasks = plan_queries(catalog, splits, qcfg, noise, seed)
        render_queries(tasks, out_dir, workers)
    rel = qrels(queries, catalog.items)
    counts = rel.groupby(["query_id", "level"]).size().unstack(fill_value=0)
    queries = queries.merge(counts.rename(columns={0: "n_instance", 1: "n_concept"}),
                            left_on="query_id", right_index=True, how="left")
    for col in ("n_instance", "n_concept"):
        if col not in queries:
            queries[col] = 0
        queries[col] = queries[col].fillna(0).astype(int)
    queries["n_concept"] += queries["n_instance"]  # C-HR counts levels 0 and 1 together
    return queries.astype({"query_id": "string", "text": "string"}), rel
