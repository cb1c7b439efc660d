"""Lightning training for the embedding: contrastive (stage 1 and the control) and ID recognition
(stage 3: backbone + prototype head end to end), with hard-negative mining, checkpoints, resume."""
from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import random
import shutil
import warnings
import zipfile
from pathlib import Path

import faiss
import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from transformers import get_cosine_schedule_with_warmup

from core.console import progress
from core.io import atomic_path
from training.backbone import MLLMEmbedder
from training.finetune import param_groups
from training.data import PairDataset, RandomBatchSampler, SimilarPrototypeBatchSampler, collate
from training.losses import info_nce_mrl
from training.head import ShardedPrototypeHead

log = logging.getLogger(__name__)
CONTRASTIVE, ID = "contrastive", "id"


class EmbeddingModule(L.LightningModule):
    def __init__(self, embedder: MLLMEmbedder, model: dict, train: dict, margin: dict, mode: str,
                 total_steps: int, head: ShardedPrototypeHead | None = None, dataset: PairDataset | None = None,
                 lr: float | None = None):
        """model, train, margin: params["model"], params["train"], params["margin"]."""
        super().__init__()
        if mode not in (CONTRASTIVE, ID):
            raise ValueError(f"unknown training mode {mode!r}: use {CONTRASTIVE!r} or {ID!r}")
        if mode == ID and head is None:
            raise ValueError("ID training needs a ShardedPrototypeHead")
        self.embedder, self.head, self.mode = embedder, head, mode
        self.m, self.t, self.margin_cfg = model, train, margin
        self.total_steps, self.dataset = total_steps, dataset
        self.lr = float(lr if lr is not None else self.t["lr"])   # backbone base lr of this stage
        self.hard: np.ndarray | None = None   # [N, H] dataset indices of mined hard negatives
        self._graph_seen = head.num_refreshes if head is not None else 0   # the graph the sampler has
        self.embedder.train()   # from_pretrained hands back an eval-mode model

    def setup(self, stage: str) -> None:
        if self.head is not None:   # built at world size 1 before fit; each rank keeps its rows
            self.head.shard()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the head's rows are not parameters: every rank writes its shard next to the checkpoint
        if self.head is not None:
            root = Path(self.trainer.default_root_dir) / "ckpt"
            head_dir = root / f"head-step{self.trainer.global_step:08d}"
            self.head.save_sharded(head_dir)
            checkpoint["head_dir"] = str(head_dir)   # older ones go once this checkpoint is saved

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.head is not None and checkpoint.get("head_dir"):
            self.head.load_sharded(checkpoint["head_dir"])

    def embed(self, images, texts) -> torch.Tensor:
        return self.embedder(self.embedder.prepare(images, texts))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["label"]
        if self.mode == ID:   # several views of a sample: its catalog side is embedded once
            keep, pair = first_occurrences(batch["index"].tolist())
            item = self.embed([batch["item_image"][n] for n in keep], [batch["item_text"][n] for n in keep])
        else:
            item = self.embed(batch["item_image"], batch["item_text"])
        query = self.embed(batch["query_image"], batch["query_text"])
        if self.mode == ID:
            # margin warm-up: a full margin on a backbone that never saw it collapses the embedding
            ramp = self.margin_cfg["margin_warmup"] * self.total_steps
            self.head.margin = self.margin_cfg["margin"] * min(1.0, self.global_step / ramp if ramp else 1.0)
            self.log("train/margin", self.head.margin)
            loss, info = self.head(torch.cat([item, query]), torch.cat([labels[keep], labels]))
            for key in ("classes_scored", "row_member_cos", "own_row_top1"):
                self.log(f"train/{key}", float(info[key]))
            nce_weight = float(self.margin_cfg.get("info_nce_weight", 0.0))
            if nce_weight > 0:   # query <-> item pairs keep pulling together beside the prototype rows
                nce, _ = info_nce_mrl(query, item[pair], self.m["mrl_dims"], self.m["mrl_weights"],
                                      self.m["mrl_temperatures"], labels=labels)
                self.log("train/info_nce", nce.detach())
                loss = loss + nce_weight * nce
            self.follow_graph()
        else:
            hard = self.hard_negatives(batch["index"])
            loss, per_dim = info_nce_mrl(query, item, self.m["mrl_dims"], self.m["mrl_weights"],
                                         self.m["mrl_temperatures"], hard_negatives=hard, labels=labels)
            for d, v in per_dim.items():
                self.log(f"train/loss_d{d}", v)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def follow_graph(self) -> None:
        """After the head rebuilt its KNN graph, the similar-batch sampler gets the new neighbours
        (collective: every rank's head refreshes at the same step)."""
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None) if self._trainer else None
        if self.head.num_refreshes != self._graph_seen and hasattr(sampler, "set_neighbours"):
            sampler.set_neighbours(self.head.neighbours(self.t["batch_size"]))
        self._graph_seen = self.head.num_refreshes

    def hard_negatives(self, index: torch.Tensor) -> torch.Tensor | None:
        if self.hard is None or self.dataset is None:
            return None
        idx = self.hard[index.cpu().numpy()]                        # [B, H]
        rows = self.dataset.t.iloc[idx.ravel()]
        from PIL import Image
        emb = self.embed([Image.open(p).convert("RGB") for p in rows["image"]], rows["title"].tolist())
        return emb.view(idx.shape[0], idx.shape[1], -1)

    def configure_optimizers(self):
        # the prototype rows are not parameters: ShardedPrototypeHead.sparse_sgd_step updates them
        # only what model.finetune left trainable (adapters, projector, readout; a frozen tower never)
        groups = param_groups(self.embedder.model, self.lr, self.m.get("finetune"))
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.t["weight_decay"])
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(self.t["warmup"] * self.total_steps),
                                                self.total_steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        if self.head is not None:
            # the rows follow the backbone's schedule (warm-up, cosine) at their own base lr
            scale = optimizer.param_groups[0]["lr"] / self.lr
            moved = self.head.sparse_sgd_step(self.margin_cfg["head_lr"] * scale, self.margin_cfg["head_momentum"])
            self.log("train/rows_updated", float(moved))


def first_occurrences(index: list[int]) -> tuple[list[int], list[int]]:
    """(positions of each distinct sample's first occurrence, for every position the rank of its
    sample among those): views of one sample share a catalog-side embedding."""
    first: dict[int, int] = {}
    for n, i in enumerate(index):
        first.setdefault(i, n)
    rank = {i: k for k, i in enumerate(first)}
    return list(first.values()), [rank[i] for i in index]


class HardNegativeMiner(L.Callback):
    """Every N steps: embed every train item (item side) with the current model and keep, per item,
    its nearest items of other classes as hard negatives for InfoNCE."""

    def __init__(self, every: int, k: int, batch_size: int = 64):
        self.every, self.k, self.bs = every, k, batch_size

    def on_train_batch_start(self, trainer, module: EmbeddingModule, batch, batch_idx):
        if self.k <= 0 or module.dataset is None or trainer.global_step % self.every:
            return
        ds = module.dataset
        from PIL import Image
        was_training = module.embedder.training
        emb = module.embedder.encode([Image.open(p).convert("RGB") for p in ds.t["image"]],
                                     ds.t["title"].tolist(), batch_size=self.bs, dim=module.m["served_dim"])
        module.embedder.train(was_training)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        _, nn = index.search(emb, min(len(ds), self.k + 16))
        labels = ds.labels.numpy()
        hard = np.empty((len(ds), self.k), dtype=np.int64)
        for i in range(len(ds)):
            other = [j for j in nn[i] if j >= 0 and labels[j] != labels[i]][: self.k]
            other += [int((i + 1 + r) % len(ds)) for r in range(self.k - len(other))]  # tiny sets
            hard[i] = other
        module.hard = hard
        log.info("mined %d hard negatives per item at step %d", self.k, trainer.global_step)


def make_loader(dataset: PairDataset, train: dict, margin: dict, seed: int, neighbours: np.ndarray | None = None):
    """train, margin, seed: params["train"], params["margin"], params["seed"]."""
    if neighbours is not None and margin["similar_batch"]:
        sampler = SimilarPrototypeBatchSampler(dataset.labels, train["batch_size"], neighbours, seed,
                                               views=margin.get("views_per_prototype", 1))
    else:
        sampler = RandomBatchSampler(dataset.labels, train["batch_size"], seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=train["num_workers"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a sibling temp, fsynced, renamed over the old one: a kill or a full
    disk mid-write leaves the previous last.ckpt whole. Lightning's own _atomic_save stages the bytes
    in the system temp dir and shutil.moves them: across file systems that move is a copy a kill can
    cut short, and a killed writer's full-size temp stays in /tmp. atomic_path removes the temps
    of dead writers at the next save."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:   # torch says "unexpected pos ..." for a full disk
            raise OSError(f"checkpoint {path} not written, the previous one is kept: {e}") from e
        prune_head_dirs(checkpoint.get("head_dir"))


def prune_head_dirs(kept: str | None) -> None:
    """Once a checkpoint naming head shard directory `kept` is on disk, the older head-step*
    directories beside it are unreferenced. Pruned here, after the save, not when the shards are
    written: after failed saves the last checkpoint on disk still names an older directory."""
    if not kept:
        return
    kept = Path(kept)
    for old in kept.parent.glob("head-step*"):
        if old.name < kept.name:
            shutil.rmtree(old, ignore_errors=True)


def check_checkpoint(path: Path) -> None:
    """RuntimeError naming `path` when it is not a whole checkpoint. torch.save writes a zip with a
    CRC-32 per record: testzip reads and checks them all (torch.load itself loads a flipped bit in a
    tensor without a word, and fails on a truncated file only deep inside trainer.fit)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        why = bad and f"CRC mismatch in {bad}"
    except Exception as e:   # noqa: BLE001 - whatever fails to read it is the reason it is refused
        why = f"{type(e).__name__}: {e}"
    if why:
        # refused, not replaced by a fresh start: a silent restart would drop the steps it holds
        # (hours, on a real run) and report success; deleting it is the user's call, and one command
        raise RuntimeError(f"cannot resume: checkpoint {path} is corrupt ({why}); delete it to train from step 0")


class _Replay(torch.utils.data.Sampler):
    """A batch sampler that, once, fast-forwards its inner one: through `epochs` whole epochs (its
    seeded RNG or epoch counter advances as in the run that saved), then past `done` batches of the
    next. Batches are indices here: skipping them loads no data. Attributes read through to the
    inner sampler (EmbeddingModule.follow_graph calls set_neighbours on it)."""

    def __init__(self, inner):
        self.inner, self.replay = inner, None

    def __getattr__(self, name):
        if name == "inner":   # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        if self.replay is None:
            yield from self.inner
            return
        (epochs, done), self.replay = self.replay, None
        n = len(self.inner)   # an epoch is len() batches: Lightning takes no more, so neither may this
        for _ in range(epochs):   # (torch's RandomSampler draws again when exhausted)
            for _ in itertools.islice(self.inner, n):
                pass
        yield from itertools.islice(self.inner, done, n)


def _rng_state() -> dict:
    kind, keys, *rest = np.random.get_state()   # its key array as a tensor: Lightning loads weights_only
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *rest),
            "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if state["cuda"] and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(L.Callback):
    """What Lightning leaves out of a checkpoint, so a resumed run trains as the uninterrupted one:
    the global RNG states (dropout) and where the data stood. Lightning restarts a plain DataLoader
    mid-epoch from its first batch and a sampler from its first epoch: the resumed run would train
    on other batches. Needs a batch sampler whose order follows from its seed and how often it was
    iterated (RandomBatchSampler; torch's samplers given their own generator); a DataLoader
    `generator` or num_workers > 0 with a dataset that draws from torch's RNG is not replayed."""

    def __init__(self, sampler: _Replay | None):
        self.sampler, self.rng, self.batches = sampler, None, 0

    def on_train_epoch_start(self, trainer, module) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.batches += 1   # before ModelCheckpoint's save: Lightning runs checkpoint callbacks last

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        checkpoint["exact_resume"] = {"epoch": trainer.current_epoch, "batches": self.batches,
                                      "rng": _rng_state()}

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        state = checkpoint.get("exact_resume")
        if state is None or self.sampler is None:
            return
        epochs, done = state["epoch"], state["batches"]
        if done >= len(self.sampler):   # saved at an epoch's last batch: the next epoch starts
            epochs, done = epochs + 1, 0
        self.sampler.replay, self.batches = (epochs, done), done
        if done:
            self.rng = state["rng"]   # at on_train_start, after the DataLoader's iter() (no draw mid-epoch)
        else:
            _set_rng_state(state["rng"])   # before it: its draw at an epoch's start is part of the stream

    def on_train_start(self, trainer, module) -> None:
        if self.rng is not None:
            _set_rng_state(self.rng)
            self.rng = None


def _resumable(loader) -> tuple[object, _Replay | None]:
    """A shallow copy of a DataLoader with its batch sampler wrapped in _Replay."""
    if not isinstance(loader, torch.utils.data.DataLoader) or loader.batch_sampler is None:
        return loader, None
    replay = _Replay(loader.batch_sampler)
    loader = copy.copy(loader)
    # DataLoader forbids this after __init__ so batch_size & co. stay consistent: _Replay yields the same batches
    object.__setattr__(loader, "batch_sampler", replay)
    return loader, replay


def last_checkpoint(work_dir: Path) -> Path | None:
    """work_dir/ckpt/last.ckpt, left by a run killed midway: fit continues from it."""
    last = Path(work_dir) / "ckpt" / "last.ckpt"
    return last if last.is_file() else None


def run_id_file(work_dir: Path) -> Path:
    """work_dir/mlflow_run_id: the MLflow run the checkpoints beside it belong to, which a resumed
    training continues (tracking.start_run(run_id_file=...)). Without a checkpoint the training
    starts over at step 0, so in a new run: an id left from before is dropped."""
    path = Path(work_dir) / "mlflow_run_id"
    if last_checkpoint(work_dir) is None:
        path.unlink(missing_ok=True)
    return path


class StepBar(L.Callback):
    """A Lightning callback: one bar over the fit's max_steps (an ETA for the whole run; a resumed
    run starts where it stands), the module's prog_bar metrics as its postfix; on global rank zero only."""
    def __init__(self, desc: str = "train"):
        self.desc, self.bar = desc, None

    def on_train_start(self, trainer, pl_module):
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.bar = progress(None, self.desc, total=total, initial=trainer.global_step, unit="step",
                            disable=None if trainer.is_global_zero else True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is None:
            return
        shown = trainer.progress_bar_metrics   # what the module logs with prog_bar=True
        if shown:
            self.bar.set_postfix({k.rsplit("/", 1)[-1]: f"{float(v):.4g}" for k, v in shown.items()},
                                 refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, pl_module):
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def launch_rank(train: dict) -> int:
    """This process's global rank as its launcher set it, known before a Trainer exists (a stage
    decides from it whether it records and writes): torchrun's RANK; Lightning's own launcher
    (NODE_RANK x devices per node + LOCAL_RANK); SLURM's SLURM_PROCID for an `srun` batch job
    (not an interactive allocation, where Lightning spawns its own workers); else 0."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "LOCAL_RANK" in env or "NODE_RANK" in env:
        per_node = max(train["devices"], 1) if isinstance(train["devices"], int) else 1
        return int(env.get("NODE_RANK", 0)) * per_node + int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(env["SLURM_PROCID"])
    return 0


TOPOLOGY = ("devices", "num_nodes", "strategy", "num_workers")   # how a run is spread, not what it learns


def resumable_key(train: dict) -> dict:
    """The train section without its topology: a killed run resumes on another world size."""
    return {k: v for k, v in train.items() if k not in TOPOLOGY}


def fit(module: EmbeddingModule, loader, train: dict, work_dir: Path, max_steps: int,
        logger=None, callbacks: list | None = None) -> L.Trainer:
    """Train for max_steps; checkpoints in work_dir/ckpt, resumed from last.ckpt when present
    (a run killed midway continues when the asset is materialized again, on the same batches and
    RNG stream as without the kill: ExactResume). A corrupt last.ckpt is refused (check_checkpoint).
    train: params["train"] (devices, num_nodes, strategy, precision, val_check_steps)."""
    t = train
    ckpt_dir = Path(work_dir) / "ckpt"
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                               every_n_train_steps=max(1, t["val_check_steps"]))
    precision = t["precision"]
    if precision == "auto":   # bf16 on a GPU, full precision on a CPU
        precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    from core import console

    last = last_checkpoint(work_dir)
    if last:
        check_checkpoint(last)
    loader, replay = _resumable(loader)
    console.quiet_libraries()   # Lightning is imported by now: its tips and warnings, its own handler
    if replay is not None:   # "... your dataloader is not resumable": ExactResume makes it so, unseen by Lightning
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    trainer = L.Trainer(max_steps=max_steps, accelerator="auto", devices=t["devices"], num_nodes=t["num_nodes"],
                        strategy=t["strategy"], precision=precision, logger=logger or False,
                        callbacks=[ckpt, ExactResume(replay), StepBar("train"), *(callbacks or [])],
                        plugins=[AtomicCheckpointIO()],
                        default_root_dir=str(work_dir), enable_progress_bar=False,   # one bar over max_steps
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
                        max_epochs=-1, use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if last else None)
    return trainer
