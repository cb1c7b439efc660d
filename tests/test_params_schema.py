"""core/params.py: every profile of params.yaml fits the typed schema unchanged, and a typo'd key
or a mistyped value is refused, named by its dotted path. Nothing here trains."""
import inspect

import pytest
import yaml

from core.config import ConfigError, PARAMS_PATH, deep_merge, load_params, set_overrides
from core.params import Params, ParamsError, validate_params

PROFILES = sorted(yaml.safe_load(PARAMS_PATH.read_text())["profiles"])


def types(tree):
    """The tree with every leaf replaced by its type: equal dicts may still differ (1 vs 1.0)."""
    if isinstance(tree, dict):
        return {k: types(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [types(v) for v in tree]
    return type(tree)


def problems(params: dict) -> dict[str, str]:
    with pytest.raises(ParamsError) as info:
        validate_params(params)
    assert isinstance(info.value, ValueError)
    return dict(info.value.problems)


def test_load_params_takes_a_profile_first():
    assert list(inspect.signature(load_params).parameters)[0] == "profile"
    assert {"tiny", "demo", "full"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates_unchanged(profile):
    params = load_params(profile)
    out = validate_params(params)
    assert out == params
    assert types(out) == types(params)         # an int in a float field stays an int
    assert list(out) == list(params)            # same key order
    assert out is not params


def test_every_section_of_params_yaml_is_modelled():
    base = yaml.safe_load(PARAMS_PATH.read_text())["base"]
    assert set(base) <= set(Params.model_fields)


def test_an_unknown_key_in_a_nested_section_names_its_path():
    params = deep_merge(load_params("tiny"), {"train": {"stage3_stpes": 3},
                                              "serving": {"limits": {"max_byts": 1}}})
    found = problems(params)
    assert found["train.stage3_stpes"].startswith("unknown key")
    assert "did you mean 'train.stage3_steps'?" in found["train.stage3_stpes"]
    assert found["serving.limits.max_byts"].startswith("unknown key")
    with pytest.raises(ValueError, match=r"train\.stage3_stpes: unknown key"):
        validate_params(params)


def test_a_mistyped_value_names_its_path():
    params = deep_merge(load_params("tiny"), {"margin": {"margin": "abc"}, "train": {"batch_size": 8.5},
                                              "ann_index": {"ivfpq": {"nbits": "8"}}})
    found = problems(params)
    assert found["margin.margin"] == "expected a number, got 'abc'"
    assert found["train.batch_size"] == "expected an integer, got 8.5"
    assert found["ann_index.ivfpq.nbits"] == "expected an integer, got '8'"
    with pytest.raises(ValueError, match=r"margin\.margin: expected a number, got 'abc'"):
        validate_params(params)


def test_an_enumeration_and_a_bool_are_checked():
    params = deep_merge(load_params("demo"), {"serving": {"rerank": "lists"}, "ab": {"enabled": "yes"},
                                              "queries": {"levels": ["clean", "mid"]}})
    found = problems(params)
    assert found["serving.rerank"].startswith("expected one of 'none', 'point', 'list' or 'gated'")
    assert found["ab.enabled"] == "expected true or false, got 'yes'"
    assert "queries.levels.1" in found


def test_a_missing_key_is_named():
    params = load_params("tiny")
    del params["model"]["base"]["vision"]
    assert problems(params) == {"model.base.vision": "missing key"}


def test_every_problem_is_reported_at_once():
    params = deep_merge(load_params("tiny"), {"dataset": {"limt": 3}, "reranker": {"lr": "fast"}})
    assert set(problems(params)) == {"dataset.limt", "reranker.lr"}


def test_set_overrides_still_pass():
    sets = ["serving.top_k=7", "train.stage3_lr=2e-5", "reranker.fusion=false", "queries.levels=[clean, hard]",
            "margin.margin=1", "dataset.limit=null", "ann_index.ivfpq.nlist=64", "ann_index.use_gpu=false",
            "ab.simulate.click.0=0.5", "dataset.category_separator='>'", "model.base.decoder_layers=null"]
    params = load_params("tiny", sets=sets)
    assert validate_params(params) == params == deep_merge(load_params("tiny"), set_overrides(sets))
    assert type(validate_params(params)["margin"]["margin"]) is int   # a float field takes an int as is


def test_a_set_override_of_the_wrong_type_fails_at_load_naming_its_key():
    with pytest.raises(ConfigError, match=r"serving\.top_k: expected an integer, got 'many'"):
        load_params("tiny", sets=["serving.top_k=many"])


def test_top_level_scalars_added_by_callers_pass_but_not_unknown_sections():
    params = load_params("tiny", {"workdir": "/tmp/w", "not_in_params": 1})
    out = validate_params(params)
    assert out == params and out["profile"] == "tiny" and out["params_dir"] and out["not_in_params"] == 1
    found = problems(deep_merge(params, {"trian": {"lr": 1}}))
    assert found["trian"].startswith("unknown section") and "did you mean 'train'?" in found["trian"]


def test_open_mappings_take_new_names_but_check_their_values():
    params = deep_merge(load_params("tiny"), {"ab": {"variants": {"third": {"model": "stage1_embedder",
                                                                            "weight": 0}}}})
    assert validate_params(params) == params
    found = problems(deep_merge(params, {"ab": {"variants": {"third": {"wieght": 1}}}}))
    assert found == {"ab.variants.third.wieght": "unknown key; did you mean 'ab.variants.third.weight'?"}
