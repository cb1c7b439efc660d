"""Training views of the catalog (train split only) and the batch samplers.

Item side = a catalog image + its title. Query side = another view of the same instance (another
image of the item or of its group) or, when there is none, a noisy copy of a catalog image made by
the foundation's noise generator, plus the title with text noise on half of the samples."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.noise import noise_image, noise_text
from data.schema import CATALOG_VIEW, Catalog
from data.splits import unit_hash


@dataclass
class TrainItems:
    """One row per train item that has a catalog image; paths are absolute."""

    table: pd.DataFrame     # item_id, group_id, title, category, image (catalog), views (list of other images)

    @classmethod
    def from_catalog(cls, catalog: Catalog, splits: pd.DataFrame, split: str = "train") -> "TrainItems":
        keep = set(splits.loc[splits["split"] == split, "item_id"])
        items = catalog.items[catalog.items["item_id"].isin(keep)]
        imgs = catalog.ok_images.merge(items[["item_id", "group_id"]], on="item_id")
        imgs = imgs.assign(file=imgs["path"].map(lambda p: str(catalog.image_file(p))))
        first = imgs[imgs["view"] == CATALOG_VIEW].sort_values("image_id").drop_duplicates("item_id")
        by_group = imgs.groupby("group_id")["file"].agg(list)
        t = items.merge(first[["item_id", "file"]].rename(columns={"file": "image"}), on="item_id")
        t["views"] = [[f for f in by_group[g] if f != img] for g, img in zip(t["group_id"], t["image"])]
        return cls(t.sort_values("item_id").reset_index(drop=True))

    def __len__(self) -> int:
        return len(self.table)


class PairDataset(torch.utils.data.Dataset):
    """(item side, query side, label) per train item; the query view is drawn per epoch and index,
    deterministically from the seed (indices are virtual: epoch * len + i). `labels` maps item_id -> class (instance or prototype)."""

    def __init__(self, items: TrainItems, labels: dict[str, int], train: dict, noise: dict, seed: int):
        """train, noise, seed: params["train"], params["noise"], params["seed"]."""
        self.t = items.table[items.table["item_id"].isin(labels)].reset_index(drop=True)
        self.labels = torch.tensor([labels[i] for i in self.t["item_id"]])
        self.level = train["noisy_view_level"]
        self.text_only = float(train.get("text_only_share", 0.0))
        self.noise = noise[self.level]
        self.seed = seed
        self.pool = self.t["image"].tolist()   # clutter backgrounds: other train catalog images

    def __len__(self) -> int:
        return len(self.t)

    def query_view(self, i: int, epoch: int = 0) -> tuple[Image.Image, str | None]:
        row = self.t.iloc[i]
        s = int(unit_hash("view", self.seed, epoch, i) * 2**31)
        rng = np.random.default_rng(s)
        if row["views"] and rng.random() < 0.5:
            img = Image.open(row["views"][rng.integers(len(row["views"]))]).convert("RGB")
        else:
            img = Image.open(row["image"]).convert("RGB")
        bgs = [Image.open(self.pool[j]).convert("RGB") for j in rng.integers(len(self.pool), size=2)]
        img = noise_image(img, self.level, self.noise, s, backgrounds=bgs)
        text = noise_text(row["title"], self.level, self.noise, s) if rng.random() < 0.5 else None
        if text is not None and self.text_only and rng.random() < self.text_only:
            img = None   # a shopper who types instead of photographing: text-only queries train too
        return img, text

    def __getitem__(self, v: int) -> dict:
        # samplers hand out virtual indices epoch * len + i, so the query view changes every epoch
        i, epoch = v % len(self), v // len(self)
        row = self.t.iloc[i]
        q_img, q_text = self.query_view(i, epoch)
        return {"item_image": Image.open(row["image"]).convert("RGB"), "item_text": row["title"],
                "query_image": q_img, "query_text": q_text, "label": self.labels[i], "index": i}


def collate(samples: list[dict]) -> dict:
    """Lists of PIL images / texts (the embedder prepares them) and a label tensor."""
    out = {k: [s[k] for s in samples] for k in samples[0] if k not in ("label", "index")}
    out["label"] = torch.stack([torch.as_tensor(s["label"]) for s in samples])
    out["index"] = torch.tensor([s["index"] for s in samples])
    return out


class RandomBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches with at most one sample per class (so in-batch negatives are true ones)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int = 0):
        self.labels, self.bs, self.seed, self.epoch = labels.numpy(), batch_size, seed, 0
        if len(np.unique(self.labels)) < 2:
            raise ValueError(f"training needs at least 2 classes, got {len(np.unique(self.labels))} "
                             "(too few train instances, or curation merged them all)")

    def _batches(self, rng: np.random.Generator) -> list[list[int]]:
        order = rng.permutation(len(self.labels))
        batches, cur, seen = [], [], set()
        for i in order:
            if self.labels[i] in seen:
                continue
            cur.append(int(i))
            seen.add(self.labels[i])
            if len(cur) == self.bs:
                batches.append(cur)
                cur, seen = [], set()
        return batches or [cur]   # fewer classes than a batch: one smaller batch, never an empty epoch

    def __iter__(self):
        self.epoch += 1
        batches = self._batches(np.random.default_rng([self.seed, self.epoch]))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            # the same number of batches on every rank, at least one (tiny sets are repeated)
            batches = [batches[(rank + world * j) % len(batches)] for j in range(max(1, len(batches) // world))]
        offset = (self.epoch - 1) * len(self.labels)
        yield from ([offset + i for i in b] for b in batches)

    def __len__(self) -> int:
        return max(1, len(np.unique(self.labels)) // self.bs)


class SimilarPrototypeBatchSampler(RandomBatchSampler):
    """Batches of look-alike prototypes (PAPER, stage 3), so the margin has to separate them: each
    batch starts from a prototype no batch of this epoch held yet and is filled with its nearest
    prototypes, held before or not, so the last batch of an epoch is as similar as the first (a
    greedy fill from the unused ones ran out of neighbours within an epoch). With views > 1 each
    class comes `views` times (several noisy queries of one product in one batch, all pulled to
    the same row: the pooling a prototype gives over many listings). An epoch is len(self)
    batches, identical on every rank (each takes every world-th). `neighbours` [U, k] comes from the
    prototype KNN graph; `set_neighbours` swaps in a refreshed graph from the next batch on."""

    def __init__(self, labels: torch.Tensor, batch_size: int, neighbours: np.ndarray, seed: int = 0,
                 views: int = 1):
        super().__init__(labels, batch_size, seed)
        self.neighbours, self.views = neighbours, max(1, int(views))
        self.by_class: dict[int, list[int]] = {}
        for i, c in enumerate(self.labels):
            self.by_class.setdefault(int(c), []).append(i)
        self.classes = np.array(sorted(self.by_class))

    def set_neighbours(self, neighbours: np.ndarray) -> None:
        self.neighbours = neighbours

    def _batch(self, anchor: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        """(sample, view) pairs: batch_size / views classes, each `views` times (view r is drawn as
        another noisy query of the same sample; the catalog side is the same image)."""
        want = max(1, self.bs // self.views)
        chosen = [anchor] + [int(n) for n in self.neighbours[anchor] if int(n) != anchor and int(n) in self.by_class]
        chosen = list(dict.fromkeys(chosen))[:want]
        if len(chosen) < want:   # a short neighbour list: random other classes fill the batch
            rest = np.setdiff1d(self.classes, chosen)
            chosen += [int(c) for c in rng.permutation(rest)[: want - len(chosen)]]
        picks = [int(rng.choice(self.by_class[c])) for c in chosen]
        return [(i, r) for i in picks for r in range(self.views)]

    def __iter__(self):
        self.epoch += 1
        rng = np.random.default_rng([self.seed, self.epoch])
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        n = len(self.labels)
        order, held = iter(rng.permutation(self.classes)), set()
        for b in range(max(1, len(self) // world) * world):
            anchor = next((int(c) for c in order if int(c) not in held), None)
            if anchor is None:   # every prototype held once: anchors start over
                order, held = iter(rng.permutation(self.classes)), set()
                anchor = int(next(order))
            batch = self._batch(anchor, rng)
            held.update(int(self.labels[i]) for i, _ in batch)
            if b % world == rank:   # virtual index: view r of this epoch is "epoch" (epoch-1)*views + r
                yield [((self.epoch - 1) * self.views + r) * n + i for i, r in batch]
