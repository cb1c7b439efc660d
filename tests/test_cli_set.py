"""`--set key.path=value` on every verb (YAML-typed, unknown keys refused with a suggestion before
any work) and `pailitao params`, which prints the effective parameters. Nothing here trains."""
import sys
import types

import pytest
import yaml

from pailitao.cli import build_parser, main
from core.config import ConfigError, deep_merge, load_params, set_overrides
from pailitao.lineage import stage_help

TYPED = ["serving.top_k=7", "train.stage3_lr=2e-5", "reranker.fusion=false", "queries.levels=[clean, hard]"]


def params_output(capsys, *argv: str) -> dict:
    assert main(["params", "--profile", "tiny", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_params_prints_the_profile_plus_the_overrides_as_yaml(capsys):
    sets = [a for s in TYPED for a in ("--set", s)]
    printed = params_output(capsys, *sets)
    assert printed == load_params("tiny", sets=TYPED)
    assert printed == deep_merge(load_params("tiny"), set_overrides(TYPED))
    assert params_output(capsys) == load_params("tiny")


def test_set_values_are_typed_as_yaml(capsys):
    p = params_output(capsys, *[a for s in TYPED for a in ("--set", s)])
    assert p["serving"]["top_k"] == 7 and type(p["serving"]["top_k"]) is int
    assert p["train"]["stage3_lr"] == 2e-5 and isinstance(p["train"]["stage3_lr"], float)
    assert p["reranker"]["fusion"] is False
    assert p["queries"]["levels"] == ["clean", "hard"]


def test_set_reaches_a_numeric_key_of_a_mapping():
    click = load_params("tiny", sets=["ab.simulate.click.0=0.5"])["ab"]["simulate"]["click"]
    assert click == {0: 0.5, 1: 0.3, 2: 0.1, 3: 0.02}


def test_unknown_key_is_refused_with_the_closest_valid_one(capsys):
    assert main(["params", "--profile", "tiny", "--set", "serving.top_kk=3"]) == 2
    err = capsys.readouterr().err
    assert "serving.top_kk" in err and "did you mean 'serving.top_k'?" in err
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_params("tiny", sets=["trian.lr=1"])
    with pytest.raises(ConfigError, match="'serving' is a section"):
        load_params("tiny", sets=["serving=3"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_params("tiny", sets=["serving.top_k"])


def test_plain_overrides_may_still_add_keys():
    """Callers (tests, Dagster, `run --out`) add keys such as workdir through overrides: unchecked."""
    assert load_params("tiny", {"not_in_params": 1})["not_in_params"] == 1


def test_a_stage_verb_refuses_an_unknown_key_before_any_work(tmp_path, capsys):
    work = tmp_path / "work"
    assert main(["raw_catalog", "--profile", "tiny", "--workdir", str(work), "--set", "ingest.max_sid=9"]) == 2
    assert "did you mean 'ingest.max_side'?" in capsys.readouterr().err
    assert not work.exists()


VERBS = [[name] for name in stage_help()] + [
    ["validate"], ["params"], ["run", "--out", "o"], ["demo"], ["search", "q.png"], ["serve"],
    ["ab", "build"], ["ab", "simulate"]]


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_every_verb_accepts_repeated_set(verb):
    args = build_parser().parse_args([*verb, "--set", "serving.top_k=3", "--set", "seed=1"])
    assert args.set == ["serving.top_k=3", "seed=1"]


@pytest.fixture
def fake_launch(monkeypatch):
    """orchestration.launch stand-in: records run_job's arguments, starts no Dagster run."""
    calls = []
    module = types.ModuleType("orchestration.launch")
    module.run_job = lambda profile, dataset, sets=None: calls.append((profile, dataset, sets)) or 0
    monkeypatch.setitem(sys.modules, "orchestration.launch", module)
    return calls


def test_demo_checks_set_then_hands_it_to_the_dagster_run(fake_launch):
    assert main(["demo", "--profile", "tiny", "--set", "serving.top_kk=3"]) == 2
    assert fake_launch == []
    assert main(["demo", "--profile", "tiny", "--set", "serving.top_k=3"]) == 0
    assert fake_launch == [("tiny", None, ["serving.top_k=3"])]


def test_dagster_run_config_carries_set_to_the_pipeline_resource(monkeypatch):
    from orchestration import launch
    from orchestration.resources import PipelineConfig

    seen = {}

    class Job:
        def execute_in_process(self, run_config, tags, **kwargs):
            seen.update(run_config, tags=tags)
    monkeypatch.setitem(sys.modules, "orchestration.definitions",
                        types.SimpleNamespace(lineage=lambda: Job()))
    from dagster import DagsterInstance

    launch.execute(profile="tiny", dagster_instance=DagsterInstance.ephemeral(), in_process=True,
                   sets=["serving.top_k=3"])
    # the unsharded catalog's one partition, which the run covers
    assert seen["tags"] == {"dagster/asset_partition_range_start": "all", "dagster/asset_partition_range_end": "all"}
    config = seen["resources"]["pipeline"]["config"]
    assert config["sets"] == ["serving.top_k=3"]
    assert PipelineConfig(**config).params()["serving"]["top_k"] == 3


def test_a_bare_separator_is_kept_not_read_as_a_yaml_block_indicator():
    from core.config import set_overrides

    assert set_overrides(["dataset.category_separator=>"]) == {"dataset": {"category_separator": ">"}}
    assert set_overrides(["dataset.category_separator=|"]) == {"dataset": {"category_separator": "|"}}
