"""`pailitao <stage>` runs one lineage node (what DVC calls); `pailitao run` runs the whole lineage
on any catalog directory; `pailitao demo` materializes the Dagster job into the local instance."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.logging import RichHandler

from data.schema import CatalogError
from pailitao.config import ConfigError, dataset_override, deep_merge, load_params

log = logging.getLogger("pailitao")


def _params(args) -> dict:
    overrides = dataset_override(getattr(args, "dataset", None))
    if getattr(args, "workdir", None):
        overrides = deep_merge(overrides, {"workdir": str(Path(args.workdir).resolve())})
    return load_params(args.profile, overrides, args.params)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_stage(args) -> int:
    from pailitao.lineage import STAGES

    _print(STAGES[args.command](_params(args)).summary())
    return 0


def cmd_validate(args) -> int:
    from pailitao import stages

    outcomes = stages.check_raw_catalog(_params(args))
    for o in outcomes:
        mark = "PASS" if o.passed else ("FAIL" if o.severity == "error" else "WARN")
        print(f"{mark:4}  {o.name:20} {o.description}")
    return 1 if any(not o.passed and o.severity == "error" for o in outcomes) else 0


def cmd_run(args) -> int:
    from pailitao.lineage import run_lineage

    out = Path(args.out).resolve()
    params = load_params(args.profile, deep_merge(dataset_override(args.dataset), {"workdir": str(out)}),
                         args.params)
    summary = run_lineage(params, out)
    _print(summary)
    print(f"\nwrote {out / 'summary.json'}")
    return 0


def cmd_demo(args) -> int:
    from orchestration.launch import run_job

    return run_job(args.profile, args.dataset)


def build_parser() -> argparse.ArgumentParser:
    from pailitao.lineage import STAGES

    p = argparse.ArgumentParser(prog="pailitao", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--params", help="params file (default: the repository's params.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, workdir=True):
        sp.add_argument("--profile", help="params.yaml profile (tiny, demo, full); default: the file's `profile`")
        sp.add_argument("--dataset", help="a manifest directory, `synthetic`, or `openclipart[:ROOT]`")
        if workdir:
            sp.add_argument("--workdir", help="where data/processed lives (default: params workdir)")

    for name, fn in STAGES.items():
        common(sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0]))
    common(sub.add_parser("validate", help="run the validation rules on raw_catalog and print them"))
    run = sub.add_parser("run", help="run the whole lineage on a catalog; writes OUT/summary.json")
    common(run, workdir=False)
    run.add_argument("--out", required=True, help="output directory (its data/ holds every artifact)")
    common(sub.add_parser("demo", help="materialize the Dagster lineage job into the local instance"),
           workdir=False)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, rich_tracebacks=True)])
    for noisy in ("alembic", "mlflow", "great_expectations", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {"validate": cmd_validate, "run": cmd_run, "demo": cmd_demo}
    try:
        return handlers.get(args.command, cmd_stage)(args)
    except (CatalogError, ConfigError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
