"""Ingest + validation of a whole catalog (default: the real openclipart tree), cold and warm.

    .venv/bin/python benchmarks/bench_ingest.py [--profile demo] [--dataset DIR]

Cold = empty workdir (every image decoded and normalized); warm = the same again (normalized
images reused by hard link). Prints a markdown table for BENCHMARKS.md. Peak memory is the
resident set of the main process and of the largest decoding worker (workers run side by side).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time

from pailitao.stages import data as stages
from core.config import dataset_override, deep_merge, load_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--dataset", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as work:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
        params = load_params(args.profile, deep_merge(dataset_override(args.dataset), {"workdir": work}))
        rows = []
        for phase in ("cold", "warm"):
            t0 = time.perf_counter()
            res = stages.raw_catalog(params)
            t1 = time.perf_counter()
            outcomes = stages.check_raw_catalog(params)
            t2 = time.perf_counter()
            rows.append((phase, res.metrics["images"], res.metrics["quarantined"], t1 - t0, t2 - t1, t2 - t0,
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                         resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                         sum(not o.passed for o in outcomes if o.severity == "error")))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, workers={params['ingest']['workers']}, "
          f"max_side={params['ingest']['max_side']}, source={params['dataset']['source']}\n")
    print("| run | images | quarantined | ingest s | validation s | total s | peak RSS main MiB | peak RSS worker MiB | failed error checks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.0f} | {r[7]:.0f} | {r[8]} |")


if __name__ == "__main__":
    main()
