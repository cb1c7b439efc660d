"""Stage 3's choices and the paper's ablation (issue #15), every arm trained from the same start (one
lineage's stage1_embedder and semantic_prototypes) with that lineage's params plus the arm's
overrides, and measured on the same queries, whole catalog as gallery: I-HR@1 with intervals,
C-HR@1, R@10 per query group, the paired bootstrap of each arm against the control, and what the
head's rows did (their last logged cosine to their members and own-row-nearest share).

    .venv/bin/python benchmarks/bench_id_head.py --profile demo --workdir DIR [--split val|test]
        [--arms control,sgd_0.5,sgd_0.05,ema,frozen,...] [--per-level N] [--set margin.knn_k=64 ...]
        [--pairs ema:random_negatives ...]

Choose on --split val (what params.yaml keeps), report the ablation on --split test. Each arm trains
in OUT/<arm>/ (its upstream assets linked from the lineage, its own MLflow store), so the lineage is
left as it was; an arm already trained there is measured again, not retrained.
Prints markdown and writes benchmarks/results/id_head_<profile>_<split>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import mlflow
import pandas as pd
import torch
from bench_pretrained import arm_rows, paired_tests, per_query

from evaluation.retrieval import cached_gallery, encode_queries, lineage_queries, rank_items
from pailitao.stages import embedding as model_stages
from core.config import Paths, deep_merge, load_params, set_overrides
from retrieval.models import model_fingerprint
from training.backbone import MLLMEmbedder

# arm -> (stage, overrides of the lineage's params)
ARMS = {
    "control": ("baseline_embedder", {}),
    "sgd_0.5": ("embedding_model", {"margin": {"row_update": "sgd", "head_lr": 0.5}}),     # the rows before #15
    "sgd_0.05": ("embedding_model", {"margin": {"row_update": "sgd", "head_lr": 0.05}}),
    "ema": ("embedding_model", {"margin": {"row_update": "ema"}}),
    "frozen": ("embedding_model", {"margin": {"row_update": "frozen"}}),
    "infonce": ("embedding_model", {"margin": {"info_nce_weight": 0.5}}),
    "margin_0.35_s32": ("embedding_model", {"margin": {"margin": 0.35, "temperature": 1 / 32, "margin_warmup": 0.2}}),
    # the paper's ablation on the params' rows (ema): random negatives (Partial FC), KNN-sparse
    # negatives without and with the graph refresh (= "ema")
    "random_negatives": ("embedding_model", {"margin": {"sampler": "random", "row_update": "ema"}}),
    "knn_static": ("embedding_model", {"margin": {"knn_refresh_steps": 0, "row_update": "ema"}}),
    # several noisy query views of each prototype in a batch (its catalog image once)
    "views_2": ("embedding_model", {"margin": {"views_per_prototype": 2, "row_update": "ema"}}),
    "views_4": ("embedding_model", {"margin": {"views_per_prototype": 4, "row_update": "ema"}}),
}
UPSTREAM = ("validated_catalog", "splits", "query_sets", "base_model", "stage1_embedder", "semantic_prototypes",
            ".cache", ".features")


def train_arm(name: str, lineage: Paths, params: dict, out: Path) -> tuple[Path, dict]:
    """The arm's checkpoint (trained on first call) and the last values of its row diagnostics."""
    stage, overrides = ARMS[name]
    work = out / name
    arm_paths = Paths(work)
    arm_paths.processed.mkdir(parents=True, exist_ok=True)
    for asset in UPSTREAM:   # the lineage's inputs, shared (the caches are keyed by content)
        link = arm_paths.asset(asset)
        if not link.exists() and lineage.asset(asset).exists():
            link.symlink_to(lineage.asset(asset).resolve())
    arm_params = deep_merge(params, {**overrides, "workdir": str(work),
                                     "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}})
    os.environ["MLFLOW_TRACKING_URI"] = arm_params["mlflow"]["tracking_uri"]
    model = arm_paths.asset(stage) / "model"
    if not model.is_dir():
        getattr(model_stages, stage)(arm_params)
    runs = mlflow.search_runs(experiment_names=[arm_params["mlflow"]["experiment"]],
                              filter_string=f"tags.`pailitao.stage` = '{stage}'", order_by=["start_time DESC"])
    diag = {}
    if len(runs):
        client = mlflow.MlflowClient()
        for key in ("row_member_cos", "own_row_top1", "loss"):
            hist = client.get_metric_history(runs.iloc[0]["run_id"], f"train/{key}")
            if hist:
                diag[key] = hist[-1].value
    return model, diag


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--workdir", required=True, help="the lineage whose stage 1 and prototypes every arm starts from")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--per-level", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], help="key.path=value for every arm (YAML-typed)")
    ap.add_argument("--scratch", default="benchmarks/results/id_head_arms")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--pairs", nargs="*", default=[], metavar="ARM:OTHER",
                    help="paired tests beside each arm minus the control, e.g. ema:random_negatives")
    args = ap.parse_args()
    names = args.arms.split(",")
    pairs = [(a, "control") for a in names if a != "control" and "control" in names]
    pairs += [tuple(p.split(":")) for p in args.pairs]
    if any(len(p) != 2 or not set(p) <= set(names) for p in pairs):   # checked before hours of training
        ap.error(f"--pairs: each is ARM:OTHER, both among --arms {names}; got {args.pairs}")
    params = load_params(args.profile, deep_merge({"workdir": args.workdir}, set_overrides(args.set)))
    lineage = Paths.from_params(params)
    catalog, root, q = lineage_queries(params, args.split, args.per_level)
    dim = params["model"]["served_dim"]
    arms, diags = {}, {}
    for name in names:
        model, diags[name] = train_arm(name, lineage, params, Path(args.scratch).resolve())
        torch.manual_seed(0)
        emb = MLLMEmbedder.from_pretrained(model)
        g, g_emb = cached_gallery(lineage.gallery_cache, model_fingerprint(model), lambda: emb, catalog, dim)
        arms[name] = per_query(rank_items(encode_queries(emb, q, root, dim), g, g_emb), q, catalog)
    rows = arm_rows(arms)
    tests = paired_tests(arms, pairs)
    t = params["train"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; profile {params['profile']}, split {args.split}, "
          f"{len(q)} queries; stage 3: {t['stage3_steps']} steps x {t['batch_size']}, lr {t['stage3_lr']}; "
          f"margin params {params['margin']}\n")
    table = pd.DataFrame(rows)
    print(table[table["group"] == "all"].to_markdown(index=False, floatfmt=".2f"))
    print("\nPer group, I-HR@1:\n")
    print(table.pivot(index="arm", columns="group", values="I-HR@1").loc[list(arms)].to_markdown(floatfmt=".1f"))
    print("\nRows at the end of training (train/ metrics, last step):\n")
    print(pd.DataFrame(diags).T.to_markdown(floatfmt=".3f"))
    if tests:
        print("\nPaired bootstrap, I-HR@1 (arm minus the other, same queries):\n")
        print(pd.DataFrame(tests).to_markdown(index=False, floatfmt=".2f"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"id_head_{params['profile']}_{args.split}.json"), "w") as f:
        json.dump({"table": rows, "tests": tests, "rows": diags, "queries": len(q), "split": args.split,
                   "arms": {a: ARMS[a][1] for a in arms}}, f, indent=2, default=float)


if __name__ == "__main__":
    main()
