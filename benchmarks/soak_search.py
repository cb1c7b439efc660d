"""Soak test of the search service: steady POST /search traffic for a long while, with new index
versions published underneath it, watching for errors, latency drift and memory growth.

    .venv/bin/python benchmarks/soak_search.py [--profile demo] [--workdir /tmp/clone4] [--duration 600]
                                               [--clients 4] [--publish-every 60] [--publish stage|index]

Starts the real service as its own process (`pailitao serve --profile P --workdir W --port PORT`,
with ab.event_log off so the soak writes no impressions into the workdir), waits for GET /healthz,
then runs `--clients` threads, each sending POST /search in a loop for `--duration` seconds. The
queries are the workdir's query set (data/processed/query_sets/queries.parquet, test split, shuffled):
photos, text-only and photo+text queries as the set mixes them. Every `--publish-every` seconds a
new index version is published the way the lineage does it:
  stage  `pailitao ann_index --profile P --workdir W` in a subprocess: rebuilds the faiss index from
         the existing item_embeddings (no model is trained or run), recall-checks it, publishes it
         as a new version (retrieval.index_store.publish: versions/<new>/ + CURRENT swapped) and logs its
         MLflow run, as `dvc repro` / Dagster would;
  index  the same build + publish (retrieval.index_store.build_and_publish and the asset's meta.json), in
         this process, without the MLflow run.
The service's reloader polls CURRENT (serving.reload_seconds) and swaps the new version in.

Recorded: requests, errors by status (every non-200, and connection errors by exception name),
client round-trip p50 / p95 / p99 overall and per minute, the service process's RSS (psutil, the
process and any children) every `--rss-every` seconds (start = when /healthz first said ok, end, max)
and the index versions GET /healthz reported (polled every 2 s), with each publish's time from its
start until /healthz served it.
MLFLOW_TRACKING_URI defaults to sqlite:///<workdir>/mlflow/mlflow.db when that file exists (where
`pailitao serve` looks up the champion embedder and ann_index logs its run).
`--warmup` requests go first and are not counted, so RSS start is after the first forward passes
(RSS at /healthz is kept as rss_mb.ready). The service's log goes to $TMPDIR/soak_<profile>-<pid>.server.log.
Writes benchmarks/results/soak_<profile>.json and prints a markdown table and a one-line verdict;
exits 1 when the verdict fails (any error, a failed publish or one never served, RSS end/start over
--max-rss-growth, or a service that did not shut down gracefully), 2 when the service does not start
(one line says why). Ctrl-C (or SIGTERM) stops early: the service is stopped and the partial results
written. One script though over 500 lines: a benchmark is read and run as one file.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_ann.py: spinning OpenMP threads on a shared box

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_search import free_port  # noqa: E402  (benchmarks/ is on sys.path: this script's directory)

MB = 2**20
PAILITAO = Path(sys.executable).with_name("pailitao")


class StartFailed(RuntimeError):
    """The service did not come up; the message is the one line that says why."""


# ---------------------------------------------------------------- inputs
def load_queries(params: dict, limit: int, seed: int = 0) -> list[dict]:
    """Up to `limit` test-split queries of the workdir's query set, shuffled: image bytes and/or text."""
    from core.config import Paths

    root = Paths.from_params(params).asset("query_sets")
    q = pd.read_parquet(root / "queries.parquet")
    q = q[q["split"] == "test"] if (q["split"] == "test").any() else q
    q = q.sample(frac=1.0, random_state=seed).head(limit)
    out = []
    for r in q.itertuples():
        image = (root / r.image).read_bytes() if isinstance(r.image, str) and r.image else None
        text = r.text if isinstance(r.text, str) and r.text else None
        if image or text:
            out.append({"image": image, "text": text, "modality": "image_text" if image and text else
                        ("image" if image else "text"), "name": Path(r.image).name if image else "q.jpg"})
    if not out:
        raise SystemExit(f"no usable queries in {root / 'queries.parquet'}")
    return out


def post_search(client, q: dict):
    """One POST /search as the search page sends it: the photo as a file and/or the text, k=10."""
    files = {"image": (q["name"], q["image"], "application/octet-stream")} if q["image"] else None
    return client.post("/search", files=files, data={"k": "10", **({"text": q["text"]} if q["text"] else {})})


# ---------------------------------------------------------------- the service
class Service:
    """`pailitao serve` in its own session (Ctrl-C reaches this script, which then stops it)."""

    def __init__(self, args, port: int, env: dict, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        cmd = [str(PAILITAO), "serve", "--profile", args.profile, "--workdir", args.workdir, "--port", str(port),
               "--host", "127.0.0.1"]
        for kv in (["ab.event_log=null"] if not args.keep_event_log else []) + args.set:
            cmd += ["--set", kv]
        self.cmd = cmd
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def why(self) -> str:
        """The last meaningful line of the service's log (its error, or the traceback's last line)."""
        try:
            lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        for ln in reversed(lines):
            if not ln.startswith(("INFO", "Traceback", "File ", "^")):
                return ln[:400]
        return lines[-1][:400] if lines else "nothing logged"

    def wait_healthy(self, timeout: float) -> dict:
        import httpx

        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartFailed(f"the service exited with {self.proc.returncode}: {self.why()} "
                                  f"(log: {self.log_path})")
            try:
                r = httpx.get(self.url + "/healthz", timeout=5)
                if r.status_code == 200:
                    return r.json()
                body = r.json()
                errs = [f"{n}: {v.get('error')}" for n, v in body.get("variants", {}).items() if v.get("error")]
                last = f"/healthz {r.status_code} {'; '.join(errs) or body.get('status')}"
            except (httpx.HTTPError, ValueError) as e:
                last = f"{type(e).__name__}"
            time.sleep(0.5)
        raise StartFailed(f"the service was not healthy within {timeout:.0f} s (last: {last}; log: {self.log_path})")

    def rss(self) -> float | None:
        """RSS of the service process and its children, MB (None once it is gone)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return None
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / MB

    def stopped_cleanly(self) -> bool:
        """uvicorn re-raises the SIGTERM after its graceful shutdown (exit -15): its log says it finished."""
        try:
            return self.proc.returncode == 0 or "Finished server process" in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to its process group (uvicorn shuts down gracefully), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode


# ---------------------------------------------------------------- publishing
def publish_stage(args, env: dict) -> str:
    """`pailitao ann_index`: the lineage node itself; returns the version it published."""
    cmd = [str(PAILITAO), "--quiet", "ann_index", "--profile", args.profile, "--workdir", args.workdir] + \
        [x for kv in args.set for x in ("--set", kv)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pailitao ann_index exited {r.returncode}: {tail}")
    info = json.loads(r.stdout)   # StageResult.summary(): path, mlflow_run_id, metrics and info, flat
    if not info.get("recall_ok", True):
        raise RuntimeError(f"version {info.get('version')} failed its recall check: not made current")
    return str(info["version"])


def publish_index(params: dict) -> str:
    """The same build + publish as the ann_index stage, without its MLflow run."""
    from core.config import Paths
    from core.io import read_json, write_json
    from retrieval import index_store

    paths = Paths.from_params(params)
    src_dir, out = paths.asset("item_embeddings"), paths.asset("ann_index")
    src = read_json(src_dir / "meta.json")
    emb = np.load(src_dir / "embeddings.npy")
    ids = pd.read_parquet(src_dir / "items.parquet", columns=["image_id"])["image_id"].astype(str).to_numpy()
    meta = index_store.build_and_publish(out, emb, ids, params["ann_index"], model_version=src["model_version"])
    write_json({**meta, "embeddings_fingerprint": src["fingerprint"], "model": src["model"]}, out / "meta.json")
    if not meta["recall_ok"]:
        raise RuntimeError(f"version {meta['version']} failed its recall check: not made current")
    return str(meta["version"])


# ---------------------------------------------------------------- the soak
class Soak:
    def __init__(self, args, service: Service, queries: list[dict], params: dict, env: dict):
        self.args, self.service, self.queries, self.params, self.env = args, service, queries, params, env
        self.stop = threading.Event()          # clients and publisher
        self.stop_watch = threading.Event()    # the watcher, once the last publish is in
        self.lock = threading.Lock()
        self.rows: list[tuple] = []            # (t_start since t0, ms, status or exception name, modality)
        self.rss: list[tuple[float, float]] = []
        self.versions: dict[str, float] = {}   # version -> seconds since t0 first reported by /healthz
        self.health_errors: Counter = Counter()
        self.publishes: list[dict] = []
        self.t0 = time.monotonic()
        self.rss_ready: float | None = None   # RSS when /healthz first said ok, before the warm-up
        self.duration = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def client(self, i: int) -> None:
        import httpx

        n = len(self.queries)
        j = (i * 7919) % n
        with httpx.Client(base_url=self.service.url, timeout=self.args.request_timeout) as c:
            while not self.stop.is_set():
                q = self.queries[j % n]
                j += 1
                t = self.elapsed()
                try:
                    status = post_search(c, q).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                    self.stop.wait(0.2)   # a dead server must not turn into a busy loop
                ms = (self.elapsed() - t) * 1e3
                with self.lock:
                    self.rows.append((t, ms, status, q["modality"]))

    def watch(self) -> None:
        """RSS every --rss-every seconds, the served index version every 2 s."""
        import httpx

        next_rss = 0.0
        with httpx.Client(base_url=self.service.url, timeout=10) as c:
            while True:
                t = self.elapsed()
                if t >= next_rss:
                    mb = self.service.rss()
                    if mb is not None:
                        self.rss.append((round(t, 1), round(mb, 1)))
                    next_rss += self.args.rss_every
                try:
                    body = c.get("/healthz").json()
                    for v in body.get("variants", {}).values():
                        if v.get("index_version"):
                            self.versions.setdefault(v["index_version"], round(self.elapsed(), 1))
                        if v.get("error"):
                            self.health_errors[str(v["error"])[:200]] += 1
                except (httpx.HTTPError, ValueError) as e:
                    self.health_errors[f"/healthz: {type(e).__name__}"] += 1
                if self.stop_watch.wait(2.0):
                    return

    def publisher(self) -> None:
        """One publish every --publish-every seconds of the soak's clock (fixed rate); one that runs
        over its slot starts the next at once."""
        next_at = self.args.publish_every
        while not self.stop.wait(max(0.0, next_at - self.elapsed())):
            t = self.elapsed()
            next_at = max(next_at + self.args.publish_every, t)
            rec = {"at_s": round(t, 1)}
            try:
                version = (publish_stage(self.args, self.env) if self.args.publish == "stage"
                           else publish_index(self.params))
                done = self.elapsed()
                rec.update(version=version, seconds=round(done - t, 1), done_s=round(done, 1))
                print(f"[{done:6.0f} s] published {version} ({rec['seconds']} s)", flush=True)
                while version not in self.versions and self.elapsed() - done < 60:
                    time.sleep(0.5)   # even after the soak's end: the watcher runs until this returns
                if version in self.versions:   # the stage's MLflow logging comes after its CURRENT swap
                    rec["served_s_after_start"] = round(self.versions[version] - t, 1)
            except Exception as e:  # noqa: BLE001 - recorded; the soak goes on
                rec["error"] = f"{type(e).__name__}: {e}"[:400]
                print(f"[{self.elapsed():6.0f} s] publish failed: {rec['error']}", flush=True)
            self.publishes.append(rec)

    def warm_up(self) -> None:
        """--warmup requests (every modality), not counted: the first forward passes allocate."""
        import httpx

        if self.args.warmup <= 0:
            return
        t0, bad = time.monotonic(), Counter()
        with httpx.Client(base_url=self.service.url, timeout=self.args.request_timeout) as c:
            for i in range(self.args.warmup):
                q = self.queries[i % len(self.queries)]
                try:
                    status = post_search(c, q).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                if status != 200:
                    bad[status] += 1
        print(f"warm-up: {self.args.warmup} requests in {time.monotonic() - t0:.0f} s"
              + (f", non-200: {dict(bad)}" if bad else ""), flush=True)

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(self.args.clients)]
        watcher = threading.Thread(target=self.watch, daemon=True)
        pub = threading.Thread(target=self.publisher, daemon=True) if self.args.publish_every > 0 else None
        self.t0 = time.monotonic()
        for t in threads + [watcher] + ([pub] if pub else []):
            t.start()
        try:
            next_report = 60.0
            while self.elapsed() < self.args.duration:
                time.sleep(min(1.0, max(0.05, self.args.duration - self.elapsed())))
                if self.elapsed() >= next_report:
                    with self.lock:
                        n, bad = len(self.rows), sum(1 for r in self.rows if r[2] != 200)
                    rss = self.rss[-1][1] if self.rss else float("nan")
                    print(f"[{self.elapsed():6.0f} s] {n} requests, {bad} errors, RSS {rss:.0f} MB, "
                          f"{len(self.versions)} versions seen", flush=True)
                    next_report += 60.0
        finally:
            self.duration = self.elapsed()
            self.stop.set()
            for t in threads:
                t.join(timeout=self.args.request_timeout + 5)
            if pub and pub.is_alive():
                pub.join(timeout=2)
                if pub.is_alive():
                    print("waiting for the publish in flight", flush=True)
                    pub.join(timeout=660)
            self.stop_watch.set()
            watcher.join(timeout=15)
            mb = self.service.rss()   # the end sample, after the last request
            if mb is not None:
                self.rss.append((round(self.elapsed(), 1), round(mb, 1)))


# ---------------------------------------------------------------- results
def pct(ms: np.ndarray) -> dict:
    if not len(ms):
        return {"p50": None, "p95": None, "p99": None}
    return {p: round(float(np.percentile(ms, q)), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))}


def summarize(soak: Soak, args) -> dict:
    df = pd.DataFrame(soak.rows, columns=["t", "ms", "status", "modality"])
    df["ok"] = df["status"].map(lambda s: s == 200)
    errors = {str(k): int(v) for k, v in Counter(df.loc[~df["ok"], "status"]).most_common()}
    per_minute = []
    for minute, g in df.groupby((df["t"] // 60).astype(int)):
        per_minute.append({"minute": int(minute) + 1, "requests": len(g), "errors": int((~g["ok"]).sum()),
                           **pct(g.loc[g["ok"], "ms"].to_numpy())})
    by_modality = {m: {"requests": len(g), "errors": int((~g["ok"]).sum()), **pct(g.loc[g["ok"], "ms"].to_numpy())}
                   for m, g in df.groupby("modality")}
    rss = [mb for _, mb in soak.rss]
    ok_pubs = [p for p in soak.publishes if "version" in p]
    unserved = [p["version"] for p in ok_pubs   # one published in the last 15 s may just have missed the end
                if "served_s_after_start" not in p and p["done_s"] < soak.duration - 15]
    return {"requests": len(df), "ok": int(df["ok"].sum()), "errors": int((~df["ok"]).sum()),
            "errors_by_status": errors, "qps": round(float(df["ok"].sum()) / max(soak.duration, 1e-9), 2),
            "latency_ms": pct(df.loc[df["ok"], "ms"].to_numpy()), "per_minute": per_minute,
            "by_modality": by_modality,
            "rss_mb": {"ready": round(soak.rss_ready, 1) if soak.rss_ready else None,
                       "start": rss[0] if rss else None, "end": rss[-1] if rss else None,
                       "max": max(rss) if rss else None,
                       "end_over_start": round(rss[-1] / rss[0], 3) if rss else None,
                       # a leak keeps growing; warm-up growth levels off within the first half
                       "end_over_half": round(rss[-1] / next(mb for t, mb in soak.rss if t >= soak.duration / 2), 3)
                       if rss else None,
                       "samples": soak.rss},
            "publishes": len(ok_pubs), "publish_failures": len(soak.publishes) - len(ok_pubs),
            "publish_log": soak.publishes, "unserved_versions": unserved,
            "versions_seen": len(soak.versions), "versions": soak.versions,
            "healthz_errors": dict(soak.health_errors), "duration_s": round(soak.duration, 1)}


def verdict(r: dict, max_growth: float, clean_stop: bool, interrupted: bool) -> tuple[bool, str]:
    growth = r["rss_mb"]["end_over_start"]
    problems = [] if clean_stop else ["the service did not stop cleanly"]
    if interrupted:
        problems.append(f"interrupted after {r['duration_s']:.0f} s")
    if r["errors"]:
        problems.append(f"{r['errors']} errors ({', '.join(f'{k}: {v}' for k, v in r['errors_by_status'].items())})")
    if r["publish_failures"]:
        problems.append(f"{r['publish_failures']} publishes failed")
    if r["unserved_versions"]:
        problems.append(f"{len(r['unserved_versions'])} published versions never served")
    if growth is None or growth > max_growth:
        problems.append(f"RSS end/start {growth} > {max_growth}")
    ok = not problems and r["ok"] > 0
    head = "PASS" if ok else "FAIL"
    detail = "; ".join(problems) if problems else f"no error in {r['requests']} requests"
    return ok, (f"verdict: {head}: {detail}; {r['publishes']} publishes, {r['versions_seen']} versions seen; "
                f"RSS end/start {growth} ({r['rss_mb']['start']} -> {r['rss_mb']['end']} MB, max {r['rss_mb']['max']}; "
                f"end / mid-run {r['rss_mb']['end_over_half']})")


def markdown(r: dict, args) -> str:
    lat, rss = r["latency_ms"], r["rss_mb"]
    lines = ["| duration s | clients | requests | errors | QPS | p50 ms | p95 ms | p99 ms | RSS start / end / max MB "
             "| publishes | versions seen |", "|" + "---|" * 11,
             f"| {r['duration_s']:.0f} | {args.clients} | {r['requests']} | {r['errors']} | {r['qps']} | {lat['p50']} "
             f"| {lat['p95']} | {lat['p99']} | {rss['start']:.0f} / {rss['end']:.0f} / {rss['max']:.0f} "
             f"| {r['publishes']} | {r['versions_seen']} |", "",
             "| minute | requests | errors | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {m['minute']} | {m['requests']} | {m['errors']} | {m['p50']} | {m['p95']} | {m['p99']} |"
              for m in r["per_minute"]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--workdir", default="/tmp/clone4", help="a lineage workdir with a published ann_index")
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--publish-every", type=float, default=60, help="seconds between index publishes (0 = none)")
    ap.add_argument("--publish", default="stage", choices=("stage", "index"),
                    help="stage: `pailitao ann_index` subprocess (with its MLflow run); index: build + publish here")
    ap.add_argument("--port", type=int, default=0, help="the service's port (0: a free one)")
    ap.add_argument("--rss-every", type=float, default=10, help="seconds between RSS samples")
    ap.add_argument("--request-timeout", type=float, default=60, help="client timeout per request, seconds")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds to wait for /healthz")
    ap.add_argument("--max-rss-growth", type=float, default=1.25, help="verdict fails above this RSS end/start")
    ap.add_argument("--warmup", type=int, default=10, help="requests sent before the clock starts, not counted")
    ap.add_argument("--queries", type=int, default=500, help="distinct queries cycled through")
    ap.add_argument("--keep-event-log", action="store_true",
                    help="leave ab.event_log on (impressions written into the workdir); default off")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="a parameter override passed to the service and the publish (repeatable)")
    ap.add_argument("--out", help="default benchmarks/results/soak_<profile>.json")
    args = ap.parse_args()
    args.workdir = str(Path(args.workdir).resolve())
    out = Path(args.out or REPO / f"benchmarks/results/soak_{args.profile}.json")

    from core.config import Paths, load_params
    env = dict(os.environ)
    db = Path(args.workdir) / "mlflow" / "mlflow.db"
    if "MLFLOW_TRACKING_URI" not in env and db.is_file():
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI",) if k in env})
    params = load_params(args.profile, {"workdir": args.workdir}, sets=args.set)
    index_dir = Paths.from_params(params).asset("ann_index")
    if not (index_dir / "CURRENT").is_file():
        print(f"soak: no published index under {index_dir} (run `pailitao ann_index` first)", file=sys.stderr)
        return 2
    queries = load_queries(params, args.queries)
    mix = Counter(q["modality"] for q in queries)
    port = args.port or free_port()
    log_path = Path(tempfile.gettempdir()) / f"soak_{args.profile}-{os.getpid()}.server.log"   # kept after the run

    def on_term(_signum, _frame):   # SIGTERM behaves like Ctrl-C: stop the service, write what we have
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # even where a shell started us with SIGINT ignored
    print(f"soak: {args.profile} on {args.workdir}, {args.clients} clients, {args.duration:.0f} s, publish "
          f"({args.publish}) every {args.publish_every:.0f} s; queries {dict(mix)}; "
          f"MLFLOW_TRACKING_URI={env.get('MLFLOW_TRACKING_URI', '(params)')}", flush=True)
    service, soak, interrupted, rc_server, clean = None, None, False, None, False
    try:
        t_start = time.monotonic()
        service = Service(args, port, env, log_path)
        health = service.wait_healthy(args.start_timeout)
        start_s = time.monotonic() - t_start
        first = {n: v.get("index_version") for n, v in health.get("variants", {}).items()}
        print(f"service up on :{port} in {start_s:.0f} s (pid {service.proc.pid}), serving {first}", flush=True)
        soak = Soak(args, service, queries, params, env)
        soak.rss_ready = service.rss()
        try:
            soak.warm_up()
            soak.run()
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: stopping", flush=True)
    except StartFailed as e:
        print(f"soak: the service failed to start: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the soak began: stopping", file=sys.stderr)
        return 130
    finally:
        if service is not None:
            running = service.proc.poll() is None
            rc_server = service.stop()
            clean = service.stopped_cleanly()
            if running:
                print(f"service stopped {'cleanly' if clean else 'NOT cleanly'} (exit {rc_server})", flush=True)

    if not soak.rows:
        print("no request was made: nothing to report", file=sys.stderr)
        return 130 if interrupted else 1
    r = summarize(soak, args)
    ok, line = verdict(r, args.max_rss_growth, clean, interrupted)
    md = markdown(r, args)
    print(md)
    print(line)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "profile": args.profile, "workdir": args.workdir,
              "clients": args.clients, "duration_target_s": args.duration, "publish_every_s": args.publish_every,
              "publish": args.publish, "service_cmd": service.cmd, "service_start_s": round(start_s, 1),
              "service_exit": rc_server, "service_stopped_cleanly": clean,
              "service_log": str(log_path), "interrupted": interrupted, "query_mix": dict(mix),
              "serving": {k: params["serving"][k] for k in ("concurrency", "queue", "timeout_s", "reload_seconds",
                                                             "torch_threads")},
              "results": r, "verdict": line, "passed": ok, "markdown": md}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out} (service log {log_path})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
