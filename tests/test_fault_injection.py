"""Faults a long run meets, injected: corrupt files (a flipped byte, a truncated file), a full disk
in the middle of a write, kill -9 at a random point. For the ANN index versions (retrieval/index_store.py:
a corrupt version is refused and the previous one keeps serving; the served index never tears) and
the training checkpoints (training/modules.py: a corrupt last.ckpt is refused at resume; a failed
save keeps the previous one; a resumed run ends with the weights of an uninterrupted one).

Only library writes are faked (faiss.write_index / torch.save raising ENOSPC after a partial write);
the other "full disk" is real: RLIMIT_FSIZE makes the write fail midway as a full disk does."""
from __future__ import annotations

import contextlib
import errno
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from core.config import REPO_ROOT, load_params
from retrieval import index as ix, index_store
from tests.test_training import LossRecorder, _dataset, tiny  # noqa: F401 - tiny: the module fixture
from training.data import RandomBatchSampler
from training.modules import check_checkpoint, fit

HOST = socket.gethostname()


# ------------------------------------------------------------------ helpers
def flip_byte(path: Path, at: float = 0.6) -> None:
    """One byte in the data, the size unchanged (a size check cannot see it)."""
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * at))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past nbytes of a file fail (EFBIG) as on a full disk, partial bytes on disk: RLIMIT_FSIZE,
    soft limit only (the hard one stays, so it can be raised back), SIGXFSZ ignored (it would kill us)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def disk_full(monkeypatch, module, name: str, how: str) -> None:
    """module.name (a library write taking (obj, file)) fails the way a full disk makes it: "enospc"
    writes some bytes and raises OSError(ENOSPC); "fsize" is the real write under file_size_limit."""
    real = getattr(module, name)

    def write(obj, f, *args, **kw):
        if how == "fsize":
            with file_size_limit(1_000):
                return real(obj, f, *args, **kw)
        with contextlib.ExitStack() as stack:
            out = f if hasattr(f, "write") else stack.enter_context(open(f, "wb"))
            out.write(b"\0" * 4096)   # what fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, name, write)


def _child(code: str, *args) -> subprocess.Popen:
    """`code` in a child process, once it printed "ready"."""
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"the child did not get ready: {line}{proc.communicate()[1][-3000:]}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()   # SIGKILL: no handler, no finally
    proc.wait()


# ------------------------------------------------------------------ index: helpers
def vectors(n: int = 2_000, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.array([f"item{i}" for i in range(n)])


def flat(n: int = 2_000, seed: int = 0):
    e, i = vectors(n, seed=seed)
    return ix.build_index(e, None, {"kind": "flat", "use_gpu": False}), i


def temps(root: Path) -> list[str]:
    return sorted(p.name for p in [*(root / "versions").glob(".tmp-*"), *root.glob(".CURRENT.*")])


def searcher(root: Path, tmp_path: Path):
    """The service's Searcher over root (no embedder: refresh() is what is tested)."""
    from retrieval.models import ModelInfo
    from retrieval.pipeline import Searcher

    emb = tmp_path / "item_embeddings"
    emb.mkdir()
    pd.DataFrame({"image_id": [f"item{i}" for i in range(2_000)], "item_id": [f"item{i}" for i in range(2_000)]}
                 ).to_parquet(emb / "items.parquet")
    return Searcher(None, ModelInfo("m", "test", str(tmp_path), "fp"), root, emb, dim=16, use_gpu=False)


# ------------------------------------------------------------------ 1. corrupt files are refused
@pytest.mark.parametrize("name", ["index.faiss", "ids.npy"])
def test_a_corrupt_index_version_is_refused_and_the_previous_one_keeps_serving(name, tmp_path):
    root = tmp_path / "index"
    index, ids = flat()
    good = index_store.publish(root, index, ids, {"model_version": "fp"}).name
    service, reader = searcher(root, tmp_path), index_store.IndexReader(root, use_gpu=False)
    assert service.refresh() and reader.get().meta["version"] == good
    bad = index_store.publish(root, index, ids, {"model_version": "fp"})
    flip_byte(bad / name)   # faiss and np.load read it without complaint: only the checksum sees it
    message = rf"{bad / name} is corrupt: sha256 [0-9a-f]{{16}}\.\.\., meta.json says"
    with pytest.raises(ValueError, match=message):
        index_store.load_current(root)
    with pytest.raises(ValueError, match=message):
        index_store.set_current(root, bad.name)
    with pytest.raises(ValueError, match=message):
        reader.get()
    (bad / name).rename(tmp_path / name)   # the reload poll does not read (and hash) it again until CURRENT
    with pytest.raises(ValueError, match=message):   # changes: with the file gone, the same refusal
        reader.get()
    (tmp_path / name).rename(bad / name)
    assert not service.refresh() and service.snapshot().version == good and "sha256" in service.last_error
    assert service.snapshot().loaded.search(vectors()[0][:1], 1)[1][0, 0] == "item0"   # still answers
    fixed = index_store.publish(root, index, ids, {"model_version": "fp"}).name   # the next good version goes live
    assert service.refresh() and service.snapshot().version == fixed == reader.get().meta["version"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_last_ckpt_is_refused_at_resume_naming_it(damage, tmp_path):
    train(tmp_path, 3)   # last.ckpt at step 3
    last = tmp_path / "ckpt" / "last.ckpt"
    if damage == "truncate":   # a copy cut short, a disk that lost the tail
        os.truncate(last, os.path.getsize(last) // 2)
    else:                      # torch.load loads this one without a word
        flip_byte(last)
    before = last.read_bytes()
    with pytest.raises(RuntimeError, match=rf"cannot resume: checkpoint {last} is corrupt \(.+\); delete it to"):
        train(tmp_path, 6)
    assert last.read_bytes() == before   # refused, not deleted: deleting is the user's call
    last.unlink()
    assert weights_equal(train(tmp_path, 6), straight("sampler", 6))   # what the message said to do works


# ------------------------------------------------------------------ 2. a full disk mid-write
@pytest.mark.parametrize("how", ["enospc", "fsize"])
def test_a_full_disk_during_publish_leaves_current_and_the_served_index_as_they_were(how, tmp_path, monkeypatch):
    root = tmp_path / "index"
    index, ids = flat(20_000)   # 1.3 MB: past the 1 kB file size limit
    good = index_store.publish(root, index, ids).name
    reader = index_store.IndexReader(root, use_gpu=False)
    served = reader.get()
    with monkeypatch.context() as m:
        disk_full(m, faiss, "write_index", how)
        with pytest.raises(OSError, match=rf"index version \S+ not published under {root}, CURRENT unchanged: "
                                          rf".*({'No space left on device' if how == 'enospc' else 'File too large'})"):
            index_store.publish(root, index, ids)
    assert index_store.current_version(root) == good and index_store.versions(root) == [good] and temps(root) == []
    assert reader.get() is served and index_store.load_current(root).meta["version"] == good
    assert index_store.publish(root, index, ids).name in index_store.versions(root)   # room again: next publish works


@pytest.mark.parametrize("how", ["enospc", "fsize"])
def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_last_ckpt(how, tmp_path, monkeypatch):
    train(tmp_path, 3)
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    with monkeypatch.context() as m:
        disk_full(m, torch, "save", how)
        with pytest.raises(OSError, match=rf"checkpoint {last} not written, the previous one is kept: "
                                          rf".*{'No space left on device' if how == 'enospc' else 'unexpected pos'}"):
            train(tmp_path, 6)   # the step-6 save fails
    assert last.read_bytes() == before and [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    check_checkpoint(last)
    assert weights_equal(train(tmp_path, 6), straight("sampler", 6))   # resumed from step 3


# ------------------------------------------------------------------ 3a. training: crash / kill -9, resume
class Net(L.LightningModule):
    """Small, but with what a resume has to restore: Adam's moments, dropout (the global RNG), a
    shuffled order (the sampler's state), several epochs of 8 batches, checkpoints mid-epoch."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(32, 1))

    def training_step(self, batch, i):
        x, y = batch
        return (self.net(x).squeeze(1) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Virtual(torch.utils.data.Dataset):
    """64 samples; RandomBatchSampler hands out virtual indices epoch * 64 + i."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randn(64, generator=g)

    def __len__(self):
        return 64

    def __getitem__(self, v):
        return self.x[v % 64], self.y[v % 64]


def make_loader(kind: str):
    ds = Virtual()
    if kind == "sampler":   # the project's sampler (training.modules.make_loader's)
        return torch.utils.data.DataLoader(ds, batch_sampler=RandomBatchSampler(torch.arange(64), 8, seed=0))
    return torch.utils.data.DataLoader(ds, batch_size=8,   # torch's, seeded through its own generator
                                       sampler=torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0)))


class Crash(L.Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at:
            raise RuntimeError("crashed")   # what a kill leaves: the checkpoints written so far


def train(work, steps: int, kind: str = "sampler", callbacks=()) -> dict:
    torch.manual_seed(0)
    module = Net()
    fit(module, make_loader(kind), load_params("tiny")["train"], Path(work), steps, callbacks=list(callbacks))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


_straight: dict = {}


def straight(kind: str, steps: int) -> dict:
    """The uninterrupted run's final weights (once per kind and length)."""
    if (kind, steps) not in _straight:
        import tempfile
        with tempfile.TemporaryDirectory() as work:
            _straight[kind, steps] = train(work, steps, kind)
    return _straight[kind, steps]


def weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STEPS = 30   # 8 batches an epoch, a checkpoint every 3 steps (tiny's val_check_steps)


@pytest.mark.parametrize("kind", ["sampler", "generator"])
@pytest.mark.parametrize("crash", [5, 17, 25])   # checkpoints at 3 (mid epoch 0), 15 (mid epoch 1), 24 (epoch 2's end)
def test_a_resumed_training_ends_with_the_weights_of_an_uninterrupted_one(kind, crash, tmp_path):
    with pytest.raises(RuntimeError, match="crashed"):
        train(tmp_path, STEPS, kind, [Crash(crash)])
    resumed = train(tmp_path, STEPS, kind)
    assert weights_equal(resumed, straight(kind, STEPS))


@pytest.mark.slow
def test_the_tiny_stage1_training_resumed_ends_with_the_weights_of_an_uninterrupted_one(tiny, tmp_path):
    """The real module, loader (RandomBatchSampler: 1 batch an epoch on tiny) and hard-negative
    mining: before ExactResume the resumed run's sampler started over at epoch 1 (all weights off by ~1e-3)."""
    from training.backbone import MLLMEmbedder
    from training.modules import CONTRASTIVE, EmbeddingModule, HardNegativeMiner, make_loader as loader_of

    items, ds = _dataset(tiny)

    def run(work, callbacks=()):
        L.seed_everything(0)
        module = EmbeddingModule(MLLMEmbedder.from_params(tiny["model"], items.table["title"].tolist()), tiny["model"],
                                 tiny["train"], tiny["margin"], CONTRASTIVE, total_steps=12, dataset=ds)
        fit(module, loader_of(ds, tiny["train"], tiny["margin"], tiny["seed"]), tiny["train"], work, 12,
            callbacks=[HardNegativeMiner(3, 1), *callbacks])
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "k", [LossRecorder(fail_at=5)])   # last.ckpt at step 3
    assert weights_equal(run(tmp_path / "k"), run(tmp_path / "straight"))


class Slow(L.Callback):
    """Steps at ~STEP_S, and "ready" once the first checkpoint is on disk: a kill after it lands
    anywhere in the remaining steps (a save included)."""

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 3:
            print("ready", flush=True)

    def on_train_batch_end(self, *args):
        time.sleep(STEP_S)


STEP_S = 0.04
TRAIN_CHILD = f"""import sys
from tests.test_fault_injection import Slow, train
train(sys.argv[1], {STEPS}, "sampler", [Slow()])
"""
SAVE_HANGS = """import sys, time, torch
real = torch.save
def save(obj, f):
    real(obj, f)   # all its bytes written, not yet renamed over last.ckpt
    if obj["global_step"] == 6:
        print("ready", flush=True)
        time.sleep(120)
torch.save = save
from tests.test_fault_injection import train
train(sys.argv[1], 30)
"""


def test_a_training_killed_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    proc = _child(SAVE_HANGS, tmp_path)
    _kill(proc)
    temp, _ = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert temp.startswith(".last.ckpt.tmp-") and temp.endswith(f"-{proc.pid}@{HOST}")
    last = tmp_path / "ckpt" / "last.ckpt"
    check_checkpoint(last)
    assert torch.load(last, weights_only=False)["global_step"] == 3   # the step-6 save never took its place
    assert weights_equal(train(tmp_path, STEPS), straight("sampler", STEPS))
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]   # the dead writer's temp is gone


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_a_training_killed_at_a_random_point_resumes_to_the_uninterrupted_weights(seed, tmp_path):
    proc = _child(TRAIN_CHILD, tmp_path)
    time.sleep(random.Random(seed).uniform(0, (STEPS - 3) * STEP_S))
    _kill(proc)
    last = tmp_path / "ckpt" / "last.ckpt"
    check_checkpoint(last)
    step = torch.load(last, weights_only=False)["global_step"]
    assert weights_equal(train(tmp_path, STEPS), straight("sampler", STEPS)), f"killed after step {step}"


# ------------------------------------------------------------------ 3b. index: kill -9 while publishing
PUBLISH_LOOP = """import sys
import numpy as np
from retrieval import index as ix, index_store
x = np.random.default_rng(0).standard_normal((50_000, 32), dtype=np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
index, ids = ix.build_index(x, None, {"kind": "flat", "use_gpu": False}), np.arange(50_000)
index_store.publish(sys.argv[1], index, ids, keep=3)
print("ready", flush=True)
while True:
    index_store.publish(sys.argv[1], index, ids, keep=3)
"""
WRITE_HANGS = """import sys, time, faiss
real = faiss.write_index
def write(index, path):
    real(index, path)
    print("ready", flush=True)
    time.sleep(120)   # killed here: a whole index.faiss in its temp dir, never renamed into place
faiss.write_index = write
import numpy as np
from retrieval import index as ix, index_store
x = np.eye(16, dtype=np.float32)
index_store.publish(sys.argv[1], ix.build_index(x, None, {"kind": "flat", "use_gpu": False}), np.arange(16))
"""


def test_a_publisher_killed_mid_write_leaves_current_served_and_its_temp_is_removed_next_time(tmp_path):
    root = tmp_path / "index"
    good = index_store.publish(root, *flat()).name
    proc = _child(WRITE_HANGS, root)
    _kill(proc)
    [left] = temps(root)
    assert left.endswith(f"-{proc.pid}@{HOST}") and index_store.load_current(root).meta["version"] == good
    (root / "versions" / ".tmp-legacy").mkdir()   # no writer in its name, young: may be in use, kept
    new = index_store.publish(root, *flat()).name
    assert temps(root) == [".tmp-legacy"] and index_store.current_version(root) == new


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_index_publisher_killed_at_a_random_point_never_tears_the_served_index(seed, tmp_path):
    root = tmp_path / "index"
    proc = _child(PUBLISH_LOOP, root)
    reader, seen, errors, stop = index_store.IndexReader(root, use_gpu=False), set(), [], threading.Event()

    def serve():   # the service's reload poll, as fast as it goes
        while not stop.is_set():
            try:
                loaded = reader.get()
                assert loaded.index.ntotal == len(loaded.ids) == 50_000
                seen.add(loaded.meta["version"])
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))

    poll = threading.Thread(target=serve)
    poll.start()
    try:
        time.sleep(random.Random(seed).uniform(0.5, 2.0))
        _kill(proc)
        time.sleep(0.2)
    finally:
        stop.set()
        poll.join()
    assert errors == [] and len(seen) >= 2
    for v in index_store.versions(root):   # under a final name only ever a whole, checksum-valid version
        index_store.load_version(root, v)
    current = index_store.load_current(root).meta["version"]
    new = index_store.publish(root, *flat()).name   # the next publish works and clears what the dead one left
    assert index_store.current_version(root) == new and temps(root) == [] and current in index_store.versions(root)


def test_head_shards_a_saved_checkpoint_names_survive_failed_saves(tmp_path, monkeypatch):
    """Two checkpoint saves fail in a row (a full disk): the head shard directory the last good
    last.ckpt names is still there; once a save succeeds, only the older directories go."""
    from training.modules import AtomicCheckpointIO

    root = tmp_path / "ckpt"
    heads = [root / f"head-step{s:08d}" for s in (3, 6, 9, 12)]
    for h in heads:
        h.mkdir(parents=True)
    cio = AtomicCheckpointIO()
    cio.save_checkpoint({"head_dir": str(heads[0]), "w": torch.zeros(2)}, root / "last.ckpt")
    real_save = torch.save

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    for h in heads[1:3]:   # the saves of steps 6 and 9 fail: last.ckpt still names step 3
        with pytest.raises(OSError, match="not written"):
            cio.save_checkpoint({"head_dir": str(h)}, root / "last.ckpt")
    assert torch.load(root / "last.ckpt")["head_dir"] == str(heads[0]) and heads[0].is_dir()
    monkeypatch.setattr(torch, "save", real_save)
    cio.save_checkpoint({"head_dir": str(heads[3])}, root / "last.ckpt")
    assert [h.is_dir() for h in heads] == [False, False, False, True]
