"""Embedding training on the tiny profile: the lineage stages, loss goes down, resume after a
kill, the registry round trip, and a two-process DDP run on CPU (gloo)."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from data.schema import Catalog
from pailitao.lineage import domain_stages
from pailitao.stages import data as stages, embedding as model_stages
from core.config import Paths, deep_merge, load_params
from retrieval.registry import EMBEDDER_NAMES
from training.backbone import MLLMEmbedder
from training.data import PairDataset, TrainItems
from training.modules import CONTRASTIVE, EmbeddingModule, fit, make_loader


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Data stages + stage 1 + prototypes on the tiny profile, once for this module."""
    root = tmp_path_factory.mktemp("tiny")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    params = load_params("tiny", {"workdir": str(root / "work")})
    for fn in domain_stages("data").values():
        fn(params)
    model_stages.base_model(params)
    model_stages.stage1_embedder(params)
    model_stages.semantic_prototypes(params)
    yield params
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _dataset(params):
    paths = Paths.from_params(params)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    items = TrainItems.from_catalog(catalog, pd.read_parquet(paths.asset("splits") / "splits.parquet"))
    groups = {g: i for i, g in enumerate(sorted(items.table["group_id"].unique()))}
    labels = dict(zip(items.table["item_id"], items.table["group_id"].map(groups)))
    return items, PairDataset(items, labels, params["train"], params["noise"], params["seed"])


class LossRecorder(L.Callback):
    def __init__(self, fail_at: int | None = None):
        self.losses, self.steps, self.fail_at = [], [], fail_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        if self.fail_at is not None and trainer.global_step == self.fail_at:
            raise RuntimeError("killed")  # a crash midway: the periodic checkpoint stays behind

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_tiny_contrastive_training_loss_goes_down(tiny, tmp_path):
    params = deep_merge(tiny, {"train": {"lr": 3e-4, "warmup": 0.0, "hard_negatives": 0}})
    items, ds = _dataset(params)
    L.seed_everything(0)
    module = EmbeddingModule(MLLMEmbedder.from_params(params["model"], items.table["title"].tolist()),
                             params["model"], params["train"], params["margin"], CONTRASTIVE, total_steps=40,
                             dataset=ds)
    rec = LossRecorder()
    fit(module, make_loader(ds, params["train"], params["margin"], params["seed"]), params["train"], tmp_path, 40,
        callbacks=[rec])
    assert np.mean(rec.losses[-8:]) < 0.8 * np.mean(rec.losses[:8]), rec.losses


def test_killed_run_resumes_from_its_checkpoint(tiny, tmp_path):
    items, ds = _dataset(tiny)
    make = lambda: EmbeddingModule(MLLMEmbedder.from_params(tiny["model"], items.table["title"].tolist()),
                                   tiny["model"], tiny["train"], tiny["margin"], CONTRASTIVE, total_steps=6,
                                   dataset=ds)
    killed = LossRecorder(fail_at=4)
    loader = lambda: make_loader(ds, tiny["train"], tiny["margin"], tiny["seed"])
    with pytest.raises(RuntimeError, match="killed"):
        fit(make(), loader(), tiny["train"], tmp_path, 6, callbacks=[killed])
    assert (tmp_path / "ckpt/last.ckpt").is_file()
    resumed = LossRecorder()
    trainer = fit(make(), loader(), tiny["train"], tmp_path, 6, callbacks=[resumed])
    assert resumed.steps[0] == tiny["train"]["val_check_steps"]  # continued from the step-3 checkpoint
    assert trainer.global_step == 6


def _id_module(params, steps):
    from training.modules import ID
    from training.prototypes import prototype_labels
    from training.head import ShardedPrototypeHead

    paths = Paths.from_params(params)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    items = TrainItems.from_catalog(catalog, pd.read_parquet(paths.asset("splits") / "splits.parquet"))
    root = paths.asset("semantic_prototypes")
    labels = prototype_labels(pd.read_parquet(root / "assignment.parquet"), pd.read_parquet(root / "prototypes.parquet"))
    m = params["model"]
    head = ShardedPrototypeHead(np.load(root / "centroids.npy"), m["mrl_dims"], m["mrl_weights"], 0.2, 0.05,
                                knn_fraction=0.3, refresh_steps=2)
    ds = PairDataset(items, labels, params["train"], params["noise"], params["seed"])
    module = EmbeddingModule(MLLMEmbedder.from_pretrained(paths.asset("stage1_embedder") / "model"),
                             params["model"], params["train"], params["margin"], ID, total_steps=steps, head=head,
                             dataset=ds)
    return module, make_loader(ds, params["train"], params["margin"], params["seed"], head.neighbours(4))


def test_info_nce_and_margin_terms_both_move_the_stage3_loss(tiny):
    """Stage 3's loss is margin loss over the prototype rows + info_nce_weight x InfoNCE(query, item):
    on one planted batch, switching either term changes the loss."""
    def loss_with(margin: dict) -> tuple[float, dict]:
        module, loader = _id_module(deep_merge(tiny, {"margin": margin}), 3)
        batch = next(iter(loader))
        torch.manual_seed(0)
        module.eval()   # no dropout: the same embeddings for every variant
        with torch.enable_grad():
            return float(module.training_step(batch, 0)), module.head.margin

    base, _ = loss_with({"margin": 0.2, "info_nce_weight": 0.0})
    no_margin, m = loss_with({"margin": 0.0, "info_nce_weight": 0.0})
    with_nce, _ = loss_with({"margin": 0.2, "info_nce_weight": 1.0})
    assert m == 0.0 and no_margin < base   # the margin makes the target harder
    assert with_nce > base + 1e-3          # InfoNCE adds a positive term


def test_stage3_trains_with_several_views_per_prototype(tiny, tmp_path):
    """Two noisy query views per prototype in a batch, the catalog side embedded once per sample."""
    params = deep_merge(tiny, {"margin": {"views_per_prototype": 2}})
    module, loader = _id_module(params, 2)
    batch = next(iter(loader))
    assert len(batch["label"]) == params["train"]["batch_size"]
    assert len(set(batch["index"].tolist())) == params["train"]["batch_size"] // 2
    fit(module, loader, params["train"], tmp_path / "run", 2)
    assert module.trainer.global_step == 2 and torch.isfinite(module.trainer.callback_metrics["train/loss"])


def test_similar_batch_sampler_follows_the_refreshed_graph(tiny, tmp_path):
    """margin.knn_refresh_steps rebuilds the head's KNN graph; the batch sampler gets the new
    neighbours at the same step (the tiny profile refreshes every 2 steps)."""
    module, loader = _id_module(tiny, 4)
    first = loader.batch_sampler.neighbours
    fit(module, loader, tiny["train"], tmp_path / "run", 4)
    assert module.head.num_refreshes > 1 and loader.batch_sampler.neighbours is not first


class RowsAt(L.Callback):
    """The head's rows (and step) as they are when training step `step` starts."""

    def __init__(self, step: int | None = None):
        self.step, self.rows = step, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.rows is None and (self.step is None or trainer.global_step == self.step):
            self.rows, self.head_step = module.head.rows.clone(), module.head.step


def test_killed_id_run_resumes_its_prototype_rows(tiny, tmp_path):
    """The head's rows live outside the parameters: a resumed run starts from the saved shard, the
    rows the uninterrupted run had at that step, not from the centroids."""
    steps, ckpt_step = 5, tiny["train"]["val_check_steps"]
    straight = RowsAt(ckpt_step)
    fit(*_id_module(tiny, steps), tiny["train"], tmp_path / "straight", steps, callbacks=[straight])
    with pytest.raises(RuntimeError, match="killed"):
        fit(*_id_module(tiny, steps), tiny["train"], tmp_path / "k", steps, callbacks=[LossRecorder(fail_at=4)])
    module, loader = _id_module(tiny, steps)
    initial = module.head.rows.clone()
    resumed = RowsAt()
    trainer = fit(module, loader, tiny["train"], tmp_path / "k", steps, callbacks=[resumed])
    assert trainer.global_step == steps and resumed.head_step == straight.head_step == ckpt_step
    assert torch.equal(resumed.rows, straight.rows) and not torch.equal(resumed.rows, initial)
    assert module.head.step == steps


def test_id_model_and_control_train_with_the_same_budget_and_register(tiny):
    treat = model_stages.embedding_model(tiny)
    control = model_stages.baseline_embedder(tiny)
    assert treat.metrics["samples"] == control.metrics["samples"]
    assert treat.metrics["steps"] == control.metrics["steps"] == tiny["train"]["stage3_steps"]
    assert treat.info["mode"] == "id" and control.info["mode"] == "contrastive"
    for res in (treat, control):
        assert "val_all_I_HR_at_1" in res.metrics and (res.path / "model/model.safetensors").is_file()
    client = mlflow.MlflowClient()
    for stage in ("embedding_model", "baseline_embedder"):
        assert client.get_latest_versions(EMBEDDER_NAMES[stage])
    # the registered pyfunc embeds like the checkpoint it was made from
    pyfunc = mlflow.pyfunc.load_model(f"models:/{EMBEDDER_NAMES['embedding_model']}/latest")
    img = next((treat.path.parent / "validated_catalog/images").rglob("*.png"))
    got = pyfunc.predict(pd.DataFrame({"image": [img.read_bytes()], "text": ["a thing"]}))   # bytes, never a path
    want = MLLMEmbedder.from_pretrained(treat.path / "model").encode([Image.open(img).convert("RGB")], ["a thing"],
                                                                     dim=tiny["model"]["served_dim"])
    np.testing.assert_allclose(got, want, atol=1e-5)


DDP_SCRIPT = textwrap.dedent("""
    import json
    import sys
    import pandas as pd
    from data.schema import Catalog
    from core.config import Paths, deep_merge, load_params
    from training.backbone import MLLMEmbedder
    from training.data import PairDataset, TrainItems
    from training.head import ShardedPrototypeHead
    from training.modules import ID, EmbeddingModule, fit, make_loader
    from training.prototypes import prototype_labels
    import numpy as np

    work, out = sys.argv[1], sys.argv[2]
    world = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {"devices": 2}   # devices, num_nodes
    params = load_params("tiny", {"workdir": work, "train": {"strategy": "ddp", "batch_size": 4,
                                                             "val_check_steps": 2, **world}})
    paths = Paths.from_params(params)
    catalog = Catalog.load(paths.asset("validated_catalog"))
    items = TrainItems.from_catalog(catalog, pd.read_parquet(paths.asset("splits") / "splits.parquet"))
    protos = pd.read_parquet(paths.asset("semantic_prototypes") / "prototypes.parquet")
    labels = prototype_labels(pd.read_parquet(paths.asset("semantic_prototypes") / "assignment.parquet"), protos)
    m = params["model"]
    head = ShardedPrototypeHead(np.load(paths.asset("semantic_prototypes") / "centroids.npy"), m["mrl_dims"],
                                m["mrl_weights"], 0.2, 0.05, knn_fraction=0.5, refresh_steps=2)
    ds = PairDataset(items, labels, params["train"], params["noise"], params["seed"])
    module = EmbeddingModule(MLLMEmbedder.from_pretrained(paths.asset("stage1_embedder") / "model"),
                             params["model"], params["train"], params["margin"], ID, total_steps=3, head=head,
                             dataset=ds)
    loader = make_loader(ds, params["train"], params["margin"], params["seed"], head.neighbours(4))
    trainer = fit(module, loader, params["train"], out, 3)
    print(f"RANK {trainer.global_rank} WORLD {trainer.world_size} STEPS {trainer.global_step} "
          f"ROWS {head.rows.shape[0]} OF {head.num_classes}")
""")


def test_two_process_ddp_on_cpu_completes_a_few_steps(tiny, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    # its own process group, so a hang kills both ranks (Lightning starts rank 1 as a child)
    proc = subprocess.Popen([sys.executable, str(script), tiny["workdir"], str(tmp_path / "ddp")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(tmp_path), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    assert "WORLD 2 STEPS 3" in out, out[-2000:] + err[-2000:]
    # the prototype rows were sharded: rank 0 keeps ceil(U / 2) of them, and wrote its shard
    u = len(np.load(Path(tiny["workdir"]) / "data/processed/semantic_prototypes/centroids.npy"))
    assert f"ROWS {(u + 1) // 2} OF {u}" in out, out[-2000:]
    assert sorted(p.name for p in (tmp_path / "ddp/ckpt").glob("head-step*/rank*.pt")) == ["rank00000.pt", "rank00001.pt"]


def test_two_nodes_launched_by_torchrun_train_one_sharded_head(tiny, tmp_path):
    """Multi-node DDP as a cluster launches it: two torchrun "nodes" (one process each, on this
    host, rendezvous on 127.0.0.1) with train.num_nodes 2; the head's rows shard across both."""
    import json

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    world = json.dumps({"devices": 1, "num_nodes": 2})
    (rc0, out0, err0), (rc1, out1, err1) = _two_torchrun_nodes(
        [str(script), tiny["workdir"], str(tmp_path / "ddp"), world], tmp_path)
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    u = len(np.load(Path(tiny["workdir"]) / "data/processed/semantic_prototypes/centroids.npy"))
    assert f"RANK 0 WORLD 2 STEPS 3 ROWS {(u + 1) // 2} OF {u}" in out0, out0[-2000:] + err0[-2000:]
    assert f"RANK 1 WORLD 2 STEPS 3 ROWS {u // 2} OF {u}" in out1, out1[-2000:] + err1[-2000:]
    assert sorted(p.name for p in (tmp_path / "ddp/ckpt").glob("head-step*/rank*.pt")) == ["rank00000.pt", "rank00001.pt"]


def test_a_training_stage_under_two_torchrun_nodes_writes_and_records_once(tiny, tmp_path):
    """`pailitao stage1_embedder` as a cluster runs it (README "Past one machine"): every node
    trains its share of the DDP world; only rank 0 opens the MLflow run, writes the checkpoint and
    registers it."""
    import shutil

    import mlflow

    work = tmp_path / "work"
    shutil.copytree(Path(tiny["workdir"]) / "data/processed", work / "data/processed",
                    ignore=shutil.ignore_patterns("stage1_embedder", "embedding_model", "baseline_embedder", ".work"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (rc0, out0, err0), (rc1, out1, err1) = _two_torchrun_nodes(
        ["-m", "pailitao.cli", "stage1_embedder", "--profile", "tiny", "--workdir", str(work),
         "--set", "train.strategy=ddp", "--set", "train.num_nodes=2", "--set", "train.stage1_steps=4"],
        tmp_path, {**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    assert '"steps": 4' in out0 and "ddp worker" in out1, out0[-1500:] + out1[-1500:]
    assert (work / "data/processed/stage1_embedder/model").is_dir()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`pailitao.stage` = 'stage1_embedder'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def _two_torchrun_nodes(args: list[str], cwd: Path, env: dict | None = None) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of `torchrun --nnodes=2 --nproc-per-node=1 ... ARGS` launched
    twice, node ranks 0 and 1, rendezvous on 127.0.0.1: two "nodes" of one DDP world on this host."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).parent / "torchrun"
    procs = [subprocess.Popen([str(torchrun), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={r}",
                               "--master-addr=127.0.0.1", f"--master-port={port}", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(cwd),
                              env=env, start_new_session=True) for r in (0, 1)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            results.append((proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
