"""Online A/B split: stable bucketing of users / sessions over variants, the impression + click
event log, and a traffic simulator that replays query_sets through the app with a position-based
click model (for demos; the comparison itself is the ab_report's job).

Assignment: u = first 8 bytes of sha256(salt + ":" + unit id) as a fraction of 2**64, mapped onto
the cumulative variant weights. Stable across processes and restarts (no state), uniform, and a new
salt re-randomises the whole split.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.judgments import relevance


@dataclass(frozen=True)
class Variant:
    name: str
    model: str          # what retrieval.models.resolve_model takes
    weight: float


def variants_from_params(params: dict) -> list[Variant]:
    """The configured variants (ab.enabled), else one variant `default` serving serving.model."""
    ab = params["ab"]
    if not ab.get("enabled"):
        return [Variant("default", params["serving"]["model"], 1.0)]
    out = [Variant(str(name), str(v["model"]), float(v["weight"])) for name, v in ab["variants"].items()]
    if not out or any(v.weight < 0 for v in out) or sum(v.weight for v in out) <= 0:
        raise ValueError(f"ab.variants need non-negative weights with a positive sum: {ab['variants']}")
    return out


def bucket(unit_id: str, salt: str) -> float:
    """A stable uniform number in [0, 1) for this unit."""
    digest = hashlib.sha256(f"{salt}:{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(unit_id: str, salt: str, variants: list[Variant]) -> Variant:
    u = bucket(unit_id, salt) * sum(v.weight for v in variants)
    acc = 0.0
    for v in variants:
        acc += v.weight
        if u < acc:
            return v
    return [v for v in variants if v.weight > 0][-1]   # u == total only through rounding


# ------------------------------------------------------------------------------------ event log
SCHEMA = """
CREATE TABLE IF NOT EXISTS impressions (
    ts REAL NOT NULL, request_id TEXT NOT NULL, query_id TEXT NOT NULL, unit_id TEXT NOT NULL,
    variant TEXT NOT NULL, model TEXT, index_version TEXT, position INTEGER NOT NULL,
    item_id TEXT NOT NULL, score REAL, latency_ms REAL, latency_json TEXT,
    PRIMARY KEY (request_id, position));
CREATE INDEX IF NOT EXISTS impressions_variant ON impressions (variant, ts);
CREATE TABLE IF NOT EXISTS clicks (
    ts REAL NOT NULL, request_id TEXT NOT NULL, query_id TEXT NOT NULL, unit_id TEXT NOT NULL,
    variant TEXT NOT NULL, position INTEGER NOT NULL, item_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS clicks_request ON clicks (request_id);
"""


class UnknownImpression(LookupError):
    """A click on something the log never showed for that request."""


class EventLog:
    """Impressions (one row per shown item) and clicks in sqlite, WAL mode: readers (analysis)
    never block the server; one connection per log, writes serialised by a lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: durable across app crashes
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def impression(self, *, request_id: str, query_id: str, unit_id: str, variant: str, model: str,
                   index_version: str, results: list[dict], latency_ms: dict) -> None:
        now, lat = time.time(), json.dumps(latency_ms)
        rows = [(now, request_id, query_id, unit_id, variant, model, index_version, i, r["item_id"],
                 r["score"], latency_ms["total"], lat) for i, r in enumerate(results)]
        with self._lock:
            self._db.executemany("INSERT INTO impressions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def click(self, request_id: str, item_id: str) -> dict:
        """Log a click on item_id of an earlier impression; its variant, unit and position come from
        the impression (never from the client). A repeat of a logged click (a double click, a
        client retry) is not written again and says duplicate=True."""
        with self._lock:
            row = self._db.execute("SELECT query_id, unit_id, variant, position FROM impressions "
                                   "WHERE request_id = ? AND item_id = ?", (request_id, item_id)).fetchone()
            if row is None:
                raise UnknownImpression(f"request {request_id!r} showed no item {item_id!r}")
            query_id, unit_id, variant, position = row
            duplicate = self._db.execute("SELECT 1 FROM clicks WHERE request_id = ? AND item_id = ?",
                                         (request_id, item_id)).fetchone() is not None
            if not duplicate:
                self._db.execute("INSERT INTO clicks VALUES (?,?,?,?,?,?,?)",
                                 (time.time(), request_id, query_id, unit_id, variant, position, item_id))
        out = {"request_id": request_id, "item_id": item_id, "variant": variant, "position": position}
        return {**out, "duplicate": True} if duplicate else out

    def read(self, table: str) -> pd.DataFrame:
        """A table for analysis; clicks once per (request_id, item_id), the first, however often a
        log written by older or several servers repeats one."""
        if table not in ("impressions", "clicks"):
            raise ValueError(table)
        with self._lock:
            df = pd.read_sql_query(f"SELECT * FROM {table}", self._db)
        if table == "clicks":
            df = df.drop_duplicates(["request_id", "item_id"]).reset_index(drop=True)   # rowid order: the first
        return df

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ------------------------------------------------------------------------------------ simulator
def simulate(client, queries: pd.DataFrame, query_root: Path, items: pd.DataFrame, cfg: dict) -> dict:
    """Replay queries through /search as cfg['users'] simulated users and click with a
    position-based model: a user examines position p with probability examine_decay**p and
    clicks an examined result with probability click[judgment level] (0 = same instance).

    client: anything with httpx's post() (a TestClient or an httpx.Client at a server).
    Returns counts per variant (requests, impressions, clicks, errors).
    """
    rng = np.random.default_rng(cfg.get("seed", 0))
    cat = items.set_index("item_id")["category"]
    click_p = {int(k): float(v) for k, v in cfg["click"].items()}
    q = queries.sample(frac=1.0, random_state=int(cfg.get("seed", 0))).head(int(cfg["queries"]))
    users = [f"sim-user-{i:05d}" for i in range(int(cfg["users"]))]
    stats: dict[str, dict] = {}
    for row in q.itertuples():
        user = users[int(rng.integers(len(users)))]
        files = {}
        if isinstance(row.image, str) and row.image:
            files["image"] = (Path(row.image).name, (query_root / row.image).read_bytes(), "image/jpeg")
        data = {"query_id": row.query_id}
        if isinstance(row.text, str) and row.text:
            data["text"] = row.text
        r = client.post("/search", data=data, files=files or None, headers={"X-User-Id": user})
        if r.status_code != 200:
            stats.setdefault("errors", {}).setdefault(str(r.status_code), 0)
            stats["errors"][str(r.status_code)] += 1
            continue
        body = r.json()
        s = stats.setdefault(body["variant"], {"requests": 0, "impressions": 0, "clicks": 0, "instance_clicks": 0})
        s["requests"] += 1
        s["impressions"] += len(body["results"])
        if not body["results"]:
            continue
        res = body["results"]
        levels = relevance([row.group_id], [cat.get(row.item_id, "")], [x["group_id"] for x in res],
                           [x["category"] for x in res])[0]
        for pos, (x, level) in enumerate(zip(res, levels)):
            if rng.random() < cfg["examine_decay"] ** pos and rng.random() < click_p.get(int(level), 0.0):
                c = client.post("/click", json={"request_id": body["request_id"], "item_id": x["item_id"]},
                                headers={"X-User-Id": user})
                if c.status_code == 200:
                    s["clicks"] += 1
                    s["instance_clicks"] += int(level == 0)
    return stats
