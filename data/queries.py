"""Query sets for val and test: shopper-like photos made by environmental noise on images of
held-out instances, at named levels (clean / mild / hard), with noisy text on a share of them.
A manifest's own queries are used as given (level "given")."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from data.judgments import qrels
from data.noise import noise_image, noise_text
from data.schema import CATALOG_VIEW, STATUS_OK, Catalog
from data.splits import unit_hash

GIVEN = "given"
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


def plan_queries(catalog: Catalog, splits: pd.DataFrame, params: dict) -> tuple[pd.DataFrame, list[dict]]:
    """The query table and the rendering tasks (one per noisy image), all decided by the seed."""
    qcfg, seed = params["queries"], params["seed"]
    items = catalog.items.drop(columns=["split"]).merge(splits[["item_id", "split"]], on="item_id")
    imgs = catalog.ok_images.merge(items[["item_id", "group_id", "title", "split"]], on="item_id")
    train_catalog = imgs[(imgs["split"] == "train") & (imgs["view"] == CATALOG_VIEW)]["path"].tolist()
    rows, tasks = [], []
    ext = "jpg" if qcfg["image_format"].upper() == "JPEG" else qcfg["image_format"].lower()
    for split in ("val", "test"):
        held = imgs[imgs["split"] == split].sort_values(["group_id", "image_id"])
        for group, g in held.groupby("group_id", sort=True):
            # a shopper-side view of the instance when the catalog has one, else a catalog image
            pool = g[g["view"] != CATALOG_VIEW] if (g["view"] != CATALOG_VIEW).any() else g
            with_text = unit_hash("text", seed, group) < qcfg["text_share"]
            for k in range(qcfg["per_instance"]):
                src = pool.iloc[int(unit_hash("img", seed, group, k) * len(pool))]
                for level in qcfg["levels"]:
                    qid = f"{split}-{level}-{len(rows):06d}"
                    s = noise_seed("noise", seed, group, k, level)
                    rng = np.random.default_rng(s)
                    bgs = ([train_catalog[i] for i in rng.choice(len(train_catalog), N_BACKGROUNDS)]
                           if train_catalog else [])
                    rel = f"images/{split}/{level}/{qid}.{ext}"
                    text = noise_text(src["title"], level, params["noise"][level], s) if with_text else None
                    rows.append({"query_id": qid, "split": split, "level": level, "image": rel,
                                 "text": text, "item_id": src["item_id"], "group_id": group,
                                 "source_image_id": src["image_id"], "seed": s})
                    tasks.append({"src": str(catalog.image_file(src["path"])), "level": level,
                                  "backgrounds": [str(catalog.image_file(p)) for p in bgs],
                                  "cfg": params["noise"][level], "seed": s, "dst": rel,
                                  "format": qcfg["image_format"], "quality": qcfg["image_quality"]})
    return pd.DataFrame(rows), tasks


def render_queries(tasks: list[dict], out_dir: Path, workers: int = 1) -> None:
    """Render tasks (dst relative to out_dir) with a progress bar, in worker processes when many."""
    tasks = [{**t, "dst": str(Path(out_dir) / t["dst"])} for t in tasks]
    bar = dict(total=len(tasks), desc="query images", unit="img", mininterval=2.0, disable=None)
    if workers <= 1 or len(tasks) < 64:
        list(tqdm(map(render_query, tasks), **bar))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(tqdm(pool.map(render_query, tasks, chunksize=16), **bar))


def given_queries(catalog: Catalog, splits: pd.DataFrame) -> pd.DataFrame:
    """A manifest's own queries.csv, used as given; a query whose image failed is dropped."""
    q = catalog.queries
    q = q[q["status"] == STATUS_OK].merge(splits[["item_id", "group_id", "split"]], on="item_id")
    q = q.assign(level=GIVEN, source_image_id=None, seed=None)
    return q[["query_id", "split", "level", "image", "text", "item_id", "group_id", "source_image_id", "seed"]]


def build_query_sets(catalog: Catalog, splits: pd.DataFrame, params: dict, out_dir: Path,
                     workers: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render the query images under out_dir and return (queries, qrels)."""
    if catalog.queries is not None and len(catalog.queries):
        queries = given_queries(catalog, splits)
        for rel in queries["image"].dropna():  # given query images travel with the query set
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.hardlink_to(catalog.image_file(rel))
    else:
        queries, tasks = plan_queries(catalog, splits, params)
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
