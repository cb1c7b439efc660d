"""Deterministic split by instance (group_id): no instance straddles train / val / test."""
from __future__ import annotations

import hashlib

import pandas as pd

from data.schema import SPLITS, CatalogError


def unit_hash(*parts) -> float:
    """A stable pseudo-random number in [0, 1) from its parts (same on every machine and run)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(items: pd.DataFrame, cfg: dict, seed: int) -> pd.DataFrame:
    """item_id, group_id, split. A split given by the catalog (manifest `split` column) wins for its
    whole instance; other instances are hashed into test / val / train by the shares in cfg. When a
    catalog gives train and test but no val, val is carved from its train instances, so thresholds
    can always be chosen on data that is neither trained on nor tested."""
    given = items.dropna(subset=["split"]).groupby("group_id")["split"].agg(set)
    mixed = given[given.map(len) > 1]
    if len(mixed):
        g = mixed.index[0]
        raise CatalogError(f"items.csv: instance (group_id) {g!r} has items in several splits: "
                           f"{sorted(mixed.iloc[0])}")
    bad = {s for v in given for s in v} - set(SPLITS)
    if bad:
        raise CatalogError(f"items.csv: column 'split' has values {sorted(bad)}; allowed: {list(SPLITS)}")
    given = given.map(lambda s: next(iter(s)))
    carve_val = len(given) > 0 and "val" not in set(given)

    def pick(group: str) -> str:
        u = unit_hash("split", seed, group)
        if group in given.index:
            if carve_val and given[group] == "train" and u < cfg["val"]:
                return "val"
            return given[group]
        if u < cfg["test"]:
            return "test"
        return "val" if u < cfg["test"] + cfg["val"] else "train"

    groups = pd.Series(items["group_id"].unique())
    split_of = dict(zip(groups, groups.map(pick)))
    out = items[["item_id", "group_id"]].copy()
    out["split"] = out["group_id"].map(split_of).astype("string")
    return out
