"""params.yaml: the one place hyperparameters live. Everything reads it through load_params."""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.params import ParamsError, validate_params

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_PATH = Path(os.environ.get("PAILITAO_PARAMS", REPO_ROOT / "params.yaml"))
PROFILES = ("tiny", "demo", "full")


class ConfigError(ValueError):
    """A bad profile, override or params file, named in the message."""


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_overrides(items: list[str]) -> dict:
    """`section.key=value` strings as a nested overrides dict, each value parsed as YAML (YAML 1.1
    reads 2e-5 as a string: such a string that is a number becomes a float). A numeric key part is
    an int, as YAML reads the mapping it names (`ab.simulate.click.0`)."""
    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not all(key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. serving.top_k=5")
        *path, leaf = (int(k) if k.isdigit() else k for k in key.split("."))
        node = out
        for k in path:
            node = node.setdefault(k, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e.problem})") from None
        if node[leaf] in (None, "") and value.strip() in (">", "|"):
            node[leaf] = value.strip()   # a bare > or | is a separator, not YAML's block-scalar indicator
        if isinstance(node[leaf], str):
            try:
                node[leaf] = float(node[leaf])
            except ValueError:
                pass
    return out


def param_paths(tree: dict, prefix: str = "") -> list[str]:
    """Every dotted key path of a params tree, sections included: serving, serving.top_k, ..."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += param_paths(value, path + ".")
    return out


def _override_errors(base: dict, overrides: dict, prefix: str, known: list[str]) -> list[str]:
    errors = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in base:
            near = difflib.get_close_matches(path, known, n=1)
            errors.append(f"unknown parameter {path!r}"
                          + (f"; did you mean {near[0]!r}?" if near else " (no such key in params.yaml)"))
        elif isinstance(base[key], dict) and base[key] and not isinstance(value, dict):
            errors.append(f"{path!r} is a section, not a value; set one of its keys, e.g. "
                          f"{path}.{next(iter(base[key]))}=...")
        elif isinstance(value, dict) and isinstance(base[key], dict):
            errors += _override_errors(base[key], value, path + ".", known)
    return errors


def check_overrides(params_base: dict, overrides: dict) -> None:
    """--set may only change parameters params.yaml has: a typo would otherwise add a key nobody
    reads, and the run would quietly use the default. Raises ConfigError naming every unknown key
    with the closest valid one."""
    errors = _override_errors(params_base, overrides, "", param_paths(params_base))
    if errors:
        raise ConfigError("--set: " + "; ".join(errors))


def load_params(profile: str | None = None, overrides: dict | None = None,
                path: str | Path | None = None, sets: list[str] | None = None) -> dict[str, Any]:
    """base deep-merged with the profile (the file's `profile` key when none is given), then
    overrides, then `sets` (`key.path=value` strings from --set; unlike overrides, which callers
    may use to add keys such as workdir, each must name a parameter of base or the profile);
    validated against core/params.py's typed sections (ConfigError naming each bad key)."""
    path = Path(path or PARAMS_PATH)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    profile = profile or os.environ.get("PAILITAO_PROFILE") or raw.get("profile") or "demo"
    profiles = raw.get("profiles", {})
    if profile not in profiles:
        raise ConfigError(f"unknown profile {profile!r} in {path}; choose one of {sorted(profiles)}")
    params = deep_merge(raw.get("base", {}), profiles[profile] or {})
    user_sets = set_overrides(sets or [])
    check_overrides(params, user_sets)
    params = deep_merge(deep_merge(params, overrides or {}), user_sets)
    params["profile"] = profile
    params["params_dir"] = str(path.resolve().parent)  # relative paths in the file start here
    try:
        return validate_params(params)   # once, here: a typo fails now, naming its key, not mid-training
    except ParamsError as e:
        raise ConfigError(f"{path} (profile {profile}): {e}") from None


def dataset_override(dataset: str | None) -> dict:
    """`--dataset DIR` (a manifest directory, or a directory of them: a sharded catalog), `synthetic`
    or `openclipart[:ROOT]` as a params override."""
    if not dataset:
        return {}
    if dataset == "synthetic":
        return {"dataset": {"source": "synthetic"}}
    if dataset.startswith("openclipart"):
        root = dataset.partition(":")[2]
        return {"dataset": {"source": "openclipart", **({"root": root} if root else {})}}
    root = Path(dataset).resolve()
    # a directory of manifest directories (and no items table of its own) is a sharded catalog
    sharded = root.is_dir() and not any((root / f"items.{e}").is_file() for e in ("csv", "parquet")) and any(
        (d / f"items.{e}").is_file() for d in root.iterdir() if d.is_dir() and not d.is_symlink()
        for e in ("csv", "parquet"))
    return {"dataset": {"source": "manifest", "root": str(root), "sharded": sharded}}


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (params sections, file listings)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolve(params: dict, path: str | Path) -> Path:
    """A path from params.yaml: relative ones are taken from the directory of that file."""
    path = Path(path)
    return path if path.is_absolute() else (Path(params.get("params_dir", REPO_ROOT)) / path).resolve()


@dataclass(frozen=True)
class Paths:
    """Where each lineage node writes; one directory per asset under <workdir>/data/processed."""

    workdir: Path

    @classmethod
    def from_params(cls, params: dict) -> "Paths":
        return cls(resolve(params, params.get("workdir", ".")))

    @property
    def raw(self) -> Path:
        return self.workdir / "data" / "raw"

    @property
    def processed(self) -> Path:
        return self.workdir / "data" / "processed"

    @property
    def gallery_cache(self) -> Path:
        """Catalog embeddings per (checkpoint, dim, catalog version); see evaluation.retrieval.cached_gallery."""
        return self.processed / ".cache"

    @property
    def feature_cache(self) -> Path:
        """Frozen vision-tower features by pixel content (training/vlm.py FeatureCache)."""
        return self.processed / ".features"

    def asset(self, name: str) -> Path:
        return self.processed / name
