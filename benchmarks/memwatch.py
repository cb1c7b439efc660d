"""Run a command and sample the memory of its whole process tree every second (psutil): the peak
of the summed PSS (shared pages counted once: what the tree really holds), of the summed RSS and of
the largest single process (all that `/usr/bin/time` reports). `make demo` runs each lineage step in
its own process, so one process's peak says little.

    .venv/bin/python benchmarks/memwatch.py --csv mem.csv -- make demo

Writes one CSV row per sample (seconds, rss_sum_gb, pss_sum_gb, rss_max_gb, processes) and prints
the peaks; exits with the command's exit code.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil

GB = 2**30


def sample(root: psutil.Process, with_pss: bool) -> tuple[float, float, float, int]:
    procs = [root] + root.children(recursive=True)
    rss, pss = [], []
    for p in procs:
        try:
            m = p.memory_full_info() if with_pss else p.memory_info()   # PSS reads smaps: slower
        except psutil.Error:
            continue
        rss.append(m.rss)
        pss.append(getattr(m, "pss", 0))
    return sum(rss) / GB, (sum(pss) / GB if with_pss else float("nan")), max(rss, default=0) / GB, len(procs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default="memwatch.csv")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between samples (PSS every other one)")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --")
    proc = subprocess.Popen(cmd)
    root, t0, peak, i = psutil.Process(proc.pid), time.time(), [0.0, 0.0, 0.0], 0
    with open(args.csv, "w") as out:
        out.write("seconds,rss_sum_gb,pss_sum_gb,rss_max_gb,processes\n")
        while proc.poll() is None:
            try:
                row = sample(root, with_pss=i % 2 == 0)
            except psutil.Error:
                break
            peak = [max(p, v) if v == v else p for p, v in zip(peak, row[:3])]   # v == v: not nan
            out.write(f"{time.time() - t0:.0f},{row[0]:.3f},{row[1]:.3f},{row[2]:.3f},{row[3]}\n")
            out.flush()
            i += 1
            time.sleep(args.every)
    rc = proc.wait()
    print(f"peak memory of the tree: PSS {peak[1]:.2f} GB, summed RSS {peak[0]:.2f} GB, "
          f"largest process {peak[2]:.2f} GB; {time.time() - t0:.0f} s; exit {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
