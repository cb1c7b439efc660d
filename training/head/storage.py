"""How ShardedPrototypeHead (training/head/sharded.py) stores its rows: low precision with
stochastic rounding, and sharded checkpoints that resume at any world size.

Rows in ``row_dtype`` (fp32, or bf16/fp16 to halve memory) are written back with *stochastic
rounding* from a counter-based hash of (seed, step, row id, column), so updates far below one ulp
are kept in expectation, and the result does not depend on the world size or on the RNG state.

Checkpoints (``ShardedCheckpoint``, mixed into the head): ``save_sharded(dir)`` writes
``rank{r:05d}.pt`` (rows, momentum, graph, step, refresh counter, sampler RNG, margin) per rank plus
``meta.json`` (format ``sharded_prototype_head/1``, strided layout); ``load_sharded(dir)`` reads them
into any world size (memory-mapped, each rank reads only its own rows); ``shard()`` splits a head
built at world size 1 onto the process group. Kept apart from the head: the on-disk format is what
training resumes from, and must only change on purpose.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from training.head.collectives import group_info

_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- stochastic rounding
def _mix32(x: Tensor) -> Tensor:
    """32-bit integer hash on int64 tensors holding values < 2**32 (multipliers < 2**31: no overflow)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B) & _M32
    return x ^ (x >> 16)


def hash_uniform(row_ids: Tensor, dim: int, step: int, seed: int) -> Tensor:
    """[n, dim] uniforms in [0, 1) that depend only on (seed, step, global row id, column)."""
    ids = row_ids.long().view(-1, 1)
    key = _mix32(torch.tensor((seed * 0x9E3779B1 + step) & _M32, device=ids.device))
    r = _mix32(_mix32((ids & _M32) ^ key) ^ (ids >> 32))
    cols = torch.arange(dim, device=ids.device).view(1, -1)
    return (_mix32((r + cols * 0x61C88647) & _M32) >> 8).float() / float(1 << 24)


def stochastic_round(x: Tensor, dtype: torch.dtype, u: Tensor) -> Tensor:
    """Round fp32 ``x`` to ``dtype``, up or down with probabilities making ``E[result] == x``."""
    if dtype == torch.float32:
        return x
    near = x.to(dtype)
    nf = near.float()
    toward = torch.full_like(near, math.inf).masked_fill_(nf > x, -math.inf)
    other = torch.nextafter(near, toward)                     # the representable value across x
    p_other = ((x - nf) / (other.float() - nf)).abs().nan_to_num_(0.0)
    return torch.where(u < p_other, other, near)


# --------------------------------------------------------------------------- re-sharding and checkpoints
class ShardedCheckpoint:
    """``shard``, ``save_sharded`` and ``load_sharded`` of ShardedPrototypeHead (a mixin: they use
    its rows, momentum, graph, counters and sampler RNG)."""

    @torch.no_grad()
    def shard(self, group=None) -> "ShardedCheckpoint":
        """Split a head built at world size 1 (before the process group existed, identically on
        every process: same centroids, same seed) onto ``group``; e.g. in LightningModule.setup()."""
        new_group, rank, world = group_info(group)
        if world == self.world_size and new_group is self.group:
            return self
        if self.world_size != 1:
            raise ValueError("shard() re-shards a world-size-1 head; use save_sharded/load_sharded otherwise")
        if self._num_classes < world:
            raise ValueError(f"{self._num_classes} prototypes cannot be sharded over {world} ranks")
        self.group, self.rank, self.world_size = new_group, rank, world
        self.rows, self.momentum, self.graph = (t[rank::world].clone() for t in (self.rows, self.momentum, self.graph))
        self._pending, self._pending_ema = [], []
        return self

    def save_sharded(self, directory: str | Path) -> None:
        """Write ``rank{r:05d}.pt`` per rank and ``meta.json`` (collective; meta is written last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {"rows": self.rows.cpu(), "momentum": self.momentum.cpu(), "graph": self.graph.cpu(),
                 "step": self.step, "num_refreshes": self.num_refreshes, "knn_k": self.graph.shape[1],
                 "generator": self._generator.get_state(), "margin": self.margin}
        tmp = directory / f".rank{self.rank:05d}.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, directory / f"rank{self.rank:05d}.pt")
        if self.group is not None:
            dist.barrier(group=self.group)
        if self.rank == 0:
            meta = {"format": "sharded_prototype_head/1", "layout": "strided", "num_classes": self._num_classes,
                    "dim": self.dim, "world_size": self.world_size, "row_dtype": str(self.row_dtype),
                    "momentum_dtype": str(self.momentum_dtype), "step": self.step}
            (directory / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
            os.replace(directory / "meta.json.tmp", directory / "meta.json")
        if self.group is not None:
            dist.barrier(group=self.group)

    @torch.no_grad()
    def load_sharded(self, directory: str | Path) -> None:
        """Load a ``save_sharded`` checkpoint written at any world size; each rank memory-maps the
        files and reads only its own rows (row i was saved by rank i % W_saved at i // W_saved)."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{directory} is not a complete sharded checkpoint (no meta.json)")
        meta = json.loads(meta_path.read_text())
        if (meta["num_classes"], meta["dim"]) != (self._num_classes, self.dim):
            raise ValueError(f"checkpoint has U={meta['num_classes']}, D={meta['dim']}; this head "
                             f"U={self._num_classes}, D={self.dim}")
        ws = int(meta["world_size"])
        ids = self.local_ids()
        rows = torch.empty((ids.numel(), self.dim), dtype=self.row_dtype)
        mom = torch.empty((ids.numel(), self.dim), dtype=self.momentum_dtype)
        graph, scalars = None, None
        for s in range(ws):
            here = torch.nonzero(ids % ws == s).view(-1)
            if here.numel() == 0 and scalars is not None:
                continue
            st = torch.load(directory / f"rank{s:05d}.pt", mmap=True, weights_only=True)
            scalars = scalars or st
            if graph is None:
                graph = torch.empty((ids.numel(), st["knn_k"]), dtype=self._graph_dtype)
            src = ids[here] // ws
            rows[here] = st["rows"][src].to(self.row_dtype)
            mom[here] = st["momentum"][src].to(self.momentum_dtype)
            graph[here] = st["graph"][src].to(self._graph_dtype)
        dev = self.rows.device
        self.rows, self.momentum = rows.to(dev), mom.to(dev)
        self.step, self.num_refreshes = int(scalars["step"]), int(scalars["num_refreshes"])
        self.margin = float(scalars["margin"])
        self._generator.set_state(scalars["generator"])
        self._pending, self._pending_ema = [], []
        if graph.shape[1] == (0 if self._all_classes() else self.knn_k):
            self.graph = graph.to(dev)
        else:   # saved with another k: rebuild from the loaded rows
            self.refresh_graph()
            self.num_refreshes = int(scalars["num_refreshes"])
