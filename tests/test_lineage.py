"""The lineage is declared once (pailitao/lineage.py): dvc.yaml is generated from it, the Dagster
assets carry its names, groups and dependencies, and `pailitao run` follows its order."""
import importlib

import yaml

from core.config import REPO_ROOT
from pailitao import lineage


def test_dvc_yaml_is_the_one_generated_from_the_lineage():
    assert (REPO_ROOT / "dvc.yaml").read_text() == lineage.dvc_yaml(), \
        "dvc.yaml differs from the lineage: regenerate it with `pailitao lineage --dvc > dvc.yaml`"


def test_dvc_stages_depend_on_the_code_they_run():
    stages = yaml.safe_load(lineage.dvc_yaml())["stages"]
    assert list(stages) == list(lineage.NAMES)
    deps = stages["embedding_model"]["deps"]
    assert "data/processed/semantic_prototypes" in deps
    assert {"pailitao/stages/embedding.py", "training/modules.py", "training/losses.py"} <= set(deps)
    assert any(d.startswith("training/head/") for d in deps)     # an edit to the head re-runs it
    assert not any(d.startswith(("pailitao/stages/reranking", "serving/", "orchestration/")) for d in deps)
    for name, stage in stages.items():
        assert all((REPO_ROOT / d).is_file() for d in stage["deps"] if not d.startswith("data/processed/")), name


def test_every_stage_function_exists_and_deps_come_first():
    seen = set()
    for s in lineage.LINEAGE:
        assert set(s.deps) <= seen, f"{s.name} runs before {set(s.deps) - seen}"
        seen.add(s.name)
        module = importlib.import_module(s.module)
        assert callable(getattr(module, s.name)), s.name


def test_dagster_assets_follow_the_lineage():
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(lineage.NAMES)
    for s in lineage.LINEAGE:
        node = graph.get(__import__("dagster").AssetKey(s.name))
        assert {k.to_user_string() for k in node.parent_keys} == set(s.deps), s.name
        assert node.group_name == s.domain
