"""`pailitao <stage>` runs one lineage node (what DVC calls); `pailitao run` runs the whole lineage
on any catalog directory; `pailitao demo` materializes the Dagster job into the local instance."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from data.schema import CatalogError
from core import console
from core.config import ConfigError, Paths, dataset_override, deep_merge, load_params

BAD_INPUT = (CatalogError, ConfigError, FileNotFoundError)   # exit 2; any other failure exits 1


def _params(args) -> dict:
    overrides = dataset_override(getattr(args, "dataset", None))
    if getattr(args, "workdir", None):
        overrides = deep_merge(overrides, {"workdir": str(Path(args.workdir).resolve())})
    return load_params(args.profile, overrides, args.params, sets=args.set)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def digest(summary: dict, first: int = 5) -> str:
    """One line per stage of a run's summary with its first few numbers (summary.json has them all)."""
    return "\n".join(f"{name:22} {console.numbers(stage, first)}" for name, stage in summary["stages"].items())


def _failed_stage(e: BaseException) -> str | None:
    """The stage `pailitao run` was in when e was raised: run_lineage's loop variable."""
    for frame, _ in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_name == "run_lineage":
            return frame.f_locals.get("name")
    return None


def _logged(label: str, params: dict, work) -> int:
    """work() with its log kept in <workdir>/data/processed/.logs/<label>-<time>-<pid>.log; a failure
    ends in one line on stderr: what failed, why, and where the full log (traceback included) is."""
    path = console.log_path(Paths.from_params(params).processed / ".logs", label)
    try:
        with console.logged_to(path):
            return work()
    except Exception as e:
        stage = _failed_stage(e)
        what = label if stage in (None, label) else f"{label} (stage {stage})"
        print(f"pailitao {what} failed: {console.one_line(e)} (full log: {path})", file=sys.stderr)
        return 2 if isinstance(e, BAD_INPUT) else 1


def cmd_stage(args) -> int:
    params = _params(args)   # a bad --set fails at once, before the stages' heavy imports

    def work() -> int:
        from pailitao.lineage import stage_function

        shards = {"shards": args.shards.split(",")} if getattr(args, "shards", None) else {}
        _print(stage_function(args.command)(params, **shards).summary())
        return 0

    return _logged(args.command, params, work)


def cmd_params(args) -> int:
    import yaml

    print(yaml.safe_dump(_params(args), sort_keys=False), end="")
    return 0


def cmd_validate(args) -> int:
    from pailitao.stages.data import check_raw_catalog

    outcomes = check_raw_catalog(_params(args))
    for o in outcomes:
        mark = "PASS" if o.passed else ("FAIL" if o.severity == "error" else "WARN")
        print(f"{mark:4}  {o.name:20} {o.description}")
    return 1 if any(not o.passed and o.severity == "error" for o in outcomes) else 0


def cmd_run(args) -> int:
    from pailitao.lineage import run_lineage

    out = Path(args.out).resolve()
    params = load_params(args.profile, deep_merge(dataset_override(args.dataset), {"workdir": str(out)}),
                         args.params, sets=args.set)

    def work() -> int:
        summary = run_lineage(params, out)
        print(digest(summary))
        d = summary["stages"]["ab_report"]
        print(f"\nwrote {out / 'summary.json'}, {out / 'metrics.json'} and {out / 'report.html'}")
        print(f"champion decision: {d['decision']} ({d['reasons']})")
        return 0

    return _logged("run", params, work)


def cmd_search(args) -> int:
    from retrieval.query import NotReady, QueryError
    from retrieval.pipeline import build_searcher

    params = _params(args)
    image = Path(args.image).read_bytes() if args.image else None
    searcher = build_searcher(params, args.model)
    try:
        _print(searcher.search(image, args.text, args.k).to_dict())
    except (QueryError, NotReady) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(args) -> int:
    from serving.app import serve

    serve(_params(args), args.host, args.port)
    return 0


def cmd_ab(args) -> int:
    from serving import ab

    params = deep_merge(_params(args), {"ab": {"enabled": True}})
    if args.ab_command == "build":
        from pailitao.stages.retrieval import build_variant_indexes

        _print(build_variant_indexes(params, ab.variants_from_params(params), args.force))
        return 0
    import pandas as pd
    from fastapi.testclient import TestClient

    from data.queries import image_queries
    from data.schema import Catalog
    from core.config import Paths
    from serving.app import create_app

    cfg = deep_merge(params["ab"]["simulate"], {k: v for k, v in vars(args).items()
                                                 if k in ("queries", "users", "seed") and v is not None})
    paths = Paths.from_params(params)
    q = image_queries(pd.read_parquet(paths.asset("query_sets") / "queries.parquet"))   # same sample as before text queries
    q = q[q["split"] == cfg["split"]]
    items = Catalog.load(paths.asset("validated_catalog")).items
    with TestClient(create_app(params)) as client:   # in-process: no port, same code path as HTTP
        stats = ab.simulate(client, q, paths.asset("query_sets"), items, cfg)
    _print({"event_log": str(paths.workdir / params["ab"]["event_log"]), "variants": stats})
    return 0


def cmd_lineage(args) -> int:
    from pailitao.lineage import LINEAGE, dvc_yaml

    if args.dvc:
        print(dvc_yaml(), end="")
        return 0
    for s in LINEAGE:
        print(f"{s.name:22} {s.domain:11} <- {', '.join(s.deps) or '(catalog source)'}")
    return 0


def cmd_demo(args) -> int:
    _params(args)   # a bad profile or --set key fails here, before Dagster is even imported
    from orchestration.launch import run_job

    return run_job(args.profile, args.dataset, args.set)


def build_parser() -> argparse.ArgumentParser:
    from pailitao.lineage import BY_NAME, stage_help   # parsed from source: --help must not wait for torch

    p = argparse.ArgumentParser(prog="pailitao", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="warnings and errors only, no progress bars (as PAILITAO_QUIET=1)")
    p.add_argument("--params", help="params file (default: the repository's params.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, workdir=True):
        sp.add_argument("--profile", help="params.yaml profile (tiny, demo, full); default: the file's `profile`")
        sp.add_argument("--dataset", help="a manifest directory, `synthetic`, or `openclipart[:ROOT]`")
        if workdir:
            sp.add_argument("--workdir", help="where data/processed lives (default: params workdir)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one parameter, value read as YAML (repeatable): --set serving.top_k=5")

    for name, text in stage_help().items():
        sp = sub.add_parser(name, help=text)
        common(sp)
        if BY_NAME[name].partitioned:
            sp.add_argument("--shards", metavar="NAME[,NAME]",
                            help="a sharded catalog (dataset.sharded): only these shards (default: all)")
    common(sub.add_parser("validate", help="run the validation rules on raw_catalog and print them"))
    common(sub.add_parser("params", help="print the effective parameters (profile, --dataset, --set applied) as YAML"))
    run = sub.add_parser("run", help="run the whole lineage on a catalog; writes OUT/summary.json, metrics.json, report.html")
    common(run, workdir=False)
    run.add_argument("--out", required=True, help="output directory (its data/ holds every artifact)")
    lin = sub.add_parser("lineage", help="print the stages in run order with their upstream stages")
    lin.add_argument("--dvc", action="store_true", help="print dvc.yaml, generated from the lineage")
    common(sub.add_parser("demo", help="materialize the Dagster lineage job into the local instance"),
           workdir=False)
    search = sub.add_parser("search", help="search the published index with an image and/or text; prints JSON")
    common(search)
    search.add_argument("image", nargs="?", help="a query photo (omit for a text-only search)")
    search.add_argument("--text", help="query words")
    search.add_argument("--k", type=int, default=10, help="results (default 10)")
    search.add_argument("--model", help="served model (default params serving.model)")
    serve = sub.add_parser("serve", help="the search service and page (FastAPI + uvicorn)")
    common(serve)
    serve.add_argument("--host", help="bind address (default params serving.host: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default params serving.port: 8000)")
    ab = sub.add_parser("ab", help="online A/B: build the variants' indexes, simulate traffic")
    ab_sub = ab.add_subparsers(dest="ab_command", required=True)
    build = ab_sub.add_parser("build", help="item_embeddings + ann_index for each variant lacking its own")
    common(build)
    build.add_argument("--force", action="store_true", help="rebuild existing variant indexes")
    sim = ab_sub.add_parser("simulate", help="replay query_sets through the app with a position-based click model")
    common(sim)
    for name in ("queries", "users", "seed"):
        sim.add_argument(f"--{name}", type=int, help=f"default params ab.simulate.{name}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(quiet=args.quiet, verbose=args.verbose)   # the log on stderr; stdout: the command's JSON
    handlers = {"params": cmd_params, "validate": cmd_validate, "run": cmd_run, "demo": cmd_demo,
                "search": cmd_search, "serve": cmd_serve, "ab": cmd_ab, "lineage": cmd_lineage}
    try:
        return handlers.get(args.command, cmd_stage)(args)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)   # one line (no log record of it as well)
        return 2


if __name__ == "__main__":
    sys.exit(main())
