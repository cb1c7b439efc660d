"""Two runs' metrics.json equal, for a refactor that must not change behaviour: every value equal
except latencies (and the gate's reasons that quote them), which follow the machine's load.

    pailitao run --profile tiny --dataset synthetic --out /tmp/before     # on the old commit
    pailitao run --profile tiny --dataset synthetic --out /tmp/after      # on the new one
    .venv/bin/python benchmarks/same_metrics.py /tmp/before/metrics.json /tmp/after/metrics.json

Prints EQUAL and exits 0, or each differing key and exits 1."""
import json
import re
import sys

LATENCY = re.compile(r"latenc|_ms\b|_ms_|seconds|per_second|p50|p95|p99|qps|throughput", re.I)


def leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, path + (str(k),))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, path + (str(i),))
    else:
        yield path, x


def main(before: str, after: str) -> int:
    a, b = (dict(leaves(json.load(open(f)))) for f in (before, after))
    diff, skipped = [], []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if va == vb:
            continue
        latency_reason = (isinstance(va, str) and isinstance(vb, str) and "reasons" in k
                          and va.startswith("latency") and vb.startswith("latency"))
        (skipped if LATENCY.search("/".join(k)) or latency_reason else diff).append(("/".join(k), va, vb))
    print(f"{len(a)} keys before, {len(b)} after; {len(skipped)} latency differences ignored")
    for k, va, vb in diff:
        print("DIFF:", k, repr(va)[:200], "->", repr(vb)[:200])
    print("EQUAL" if not diff else f"{len(diff)} DIFFERENCES")
    return 1 if diff else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:3]))
