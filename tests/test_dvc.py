"""`dvc repro` in a fresh git + DVC repository holding this project's pipeline, on the tiny profile."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import REPO_ROOT
from pailitao import lineage


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


STAGES = lineage.NAMES   # the lineage, in order (dvc.yaml is generated from it: tests/test_lineage.py)
DATA = STAGES[:STAGES.index("query_sets") + 1]


def _repo(tmp_path) -> tuple[Path, dict]:
    """A fresh git + DVC repository with this project's pipeline, code and params (profile tiny)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["profile"] = "tiny"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for pkg in lineage.OWN_PACKAGES:  # the code deps dvc.yaml hashes
        shutil.copytree(REPO_ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("raw", "processed", "__pycache__"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "DVC_NO_ANALYTICS": "1"}
    _run(["git", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    return repo, env


def _reproduced(repo: Path, env: dict, stages: tuple[str, ...], target: str | None = None) -> None:
    _run([sys.executable, "-m", "dvc", "repro", *([target] if target else [])], repo, env)
    for stage in stages:
        assert (repo / "data/processed" / stage / "meta.json").is_file(), stage
    assert (repo / "dvc.lock").is_file()
    status = _run([sys.executable, "-m", "dvc", "status", *([target] if target else [])], repo, env)
    assert "up to date" in status.lower() or "changed" not in status


def test_dvc_reads_every_stage_and_repro_runs_the_data_stages(tmp_path):
    """The default run: DVC parses the whole pipeline and reproduces its data prefix (the whole
    lineage under DVC is the slow test below; the lineage itself runs in test_orchestration)."""
    repo, env = _repo(tmp_path)
    listed = _run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], repo, env).split()
    assert sorted(listed) == sorted(STAGES)
    _reproduced(repo, env, DATA, target=DATA[-1])
    assert not (repo / "data/processed/base_model").exists()   # only what the target needs ran


@pytest.mark.slow
def test_dvc_repro_runs_the_lineage_on_the_tiny_profile(tmp_path):
    repo, env = _repo(tmp_path)
    _reproduced(repo, env, STAGES)
