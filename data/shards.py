"""A catalog that arrives in shards. With dataset.sharded: true, every subdirectory of dataset.root
is one shard: a catalog of its own in dataset.source's form (a manifest directory, or an
openclipart-style tree). raw_catalog, validated_catalog and item_embeddings keep one directory per
shard under <asset>/shards/<name>/ and list the shards they hold in <asset>/meta.json (Catalog.load
reads the union); each is a Dagster partition, so a new or changed shard is ingested, validated
and embedded alone, and a shard that leaves dataset.root leaves the next index version.
An unsharded catalog is the one partition UNSHARDED."""
from __future__ import annotations

import re
from pathlib import Path

from data.schema import CatalogError
from data.sources import tree_fingerprint

SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
UNSHARDED = "all"   # the one partition key of an unsharded catalog


def source_shards(dataset: dict) -> dict[str, Path]:
    """Shard name -> directory, sorted by name: every real subdirectory of dataset.root (hidden
    ones and symlinks are not followed; files beside the shards are ignored)."""
    if dataset["source"] == "synthetic":
        raise CatalogError("dataset.sharded needs a manifest or openclipart source: the synthetic catalog "
                           "is generated whole")
    root = Path(dataset["root"]).expanduser()
    if not root.is_dir():
        raise CatalogError(f"dataset.root {root}: not a directory (a sharded catalog has one subdirectory "
                           "per shard)")
    shards = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.is_symlink() or not p.is_dir():
            continue
        if not SHARD_NAME.fullmatch(p.name):
            raise CatalogError(f"{p}: a shard's directory name may hold only letters, digits, '_', '.' and '-' "
                               "(at most 100, starting with a letter or digit)")
        shards[p.name] = p
    if not shards:
        raise CatalogError(f"{root}: no shard directories (dataset.sharded: true wants one subdirectory per "
                           "shard, each a catalog of its own)")
    return shards


def partition_keys(params: dict) -> list[str]:
    """The Dagster partitions of the catalog assets: the source's shards, or UNSHARDED."""
    ds = params["dataset"]
    return list(source_shards(ds)) if ds["sharded"] else [UNSHARDED]


def shard_fingerprints(params: dict) -> dict[str, str]:
    """Shard -> tree_fingerprint of its source directory (paths, sizes, mtimes: nothing decoded)."""
    return {name: tree_fingerprint(path) for name, path in source_shards(params["dataset"]).items()}


def requested(available: dict[str, Path], shards: list[str] | None, root) -> list[str]:
    """The shards a stage was asked for among the source's `available` ones (source_shards; None:
    all of them); an unknown name is an error naming dataset.root."""
    if shards is None:
        return list(available)
    unknown = [s for s in shards if s not in available]
    if unknown:
        raise CatalogError(f"shard(s) {', '.join(unknown)} not in {root} (shards there: {', '.join(available)})")
    return list(shards)
