"""Champion / challenger promotion of the embedder in the MLflow registry.

The treatment (the ID-prototype embedder) gets the alias `champion` only when the offline A/B shows
a significant win on the gate metric (paired bootstrap CI above 0) and its query latency does not
regress beyond the budget; otherwise it gets `challenger`. Exactly one registered embedder holds
`champion`: promoting the treatment removes the alias from the control; when nothing holds it
yet, the control (the incumbent) becomes champion. The service resolves `serving.model: champion`
through the same aliases (retrieval/models.resolve_model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd

from retrieval.registry import EMBEDDER_NAMES, FINGERPRINT_TAG

CONTROL, TREATMENT = "baseline_embedder", "embedding_model"
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    promoted: bool
    model: str                      # the treatment's stage
    alias: str                      # the treatment's alias after the decision
    reasons: list[str] = field(default_factory=list)
    champion: str | None = None     # the stage holding champion after the decision
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def decide(comparison: pd.DataFrame, latency_control: dict, latency_treatment: dict, cfg: dict,
           model: str = TREATMENT, budget_key: str = "latency_budget_ms") -> Decision:
    """The gate. comparison: evaluation.compare.compare(control, treatment) rows by metric (values in
    percent); latency_*: evaluation.metrics.latency_summary of per-query milliseconds;
    cfg: params["promotion"] (metric, latency_stat, and the budget under budget_key); model: the
    treatment's stage (the embedder, or reranker_model for the rerank gate)."""
    metric, stat, budget = cfg["metric"], cfg["latency_stat"], float(cfg[budget_key])
    if metric not in comparison.index:
        raise ValueError(f"promotion.metric {metric!r} is not among the compared metrics {list(comparison.index)}")
    row = comparison.loc[metric]
    reasons, ok = [], True
    ci = f"{row['diff']:+.2f} points (95% CI {row['ci_low']:+.2f} .. {row['ci_high']:+.2f}, p={row['p_value']:.3g}, n={int(row['n'])})"
    if bool(row["better"]):
        reasons.append(f"{metric}: significant win, {ci}")
    else:
        ok = False
        kind = "significant loss" if bool(row["worse"]) else "no significant difference"
        reasons.append(f"{metric}: {kind}, {ci}")
    lc, lt = float(latency_control[stat]), float(latency_treatment[stat])
    if lt - lc > budget:
        ok = False
        reasons.append(f"latency {stat} {lt:.1f} ms vs control {lc:.1f} ms: +{lt - lc:.1f} ms exceeds the budget of {budget:g} ms")
    else:
        reasons.append(f"latency {stat} {lt:.1f} ms vs control {lc:.1f} ms: within the budget of {budget:g} ms")
    return Decision(ok, model, CHAMPION if ok else CHALLENGER, reasons)


def _latest(client, name: str, fingerprint: str | None = None) -> str | None:
    """The newest version of `name`; with a fingerprint, the newest registered from that checkpoint
    (another catalog's run registering under the same name meanwhile is not this lineage's model).
    Versions registered before the fingerprint tag existed match any fingerprint."""
    versions = client.search_model_versions(f"name='{name}'")
    if fingerprint:
        versions = [v for v in versions if v.tags.get(FINGERPRINT_TAG, fingerprint) == fingerprint]
    return str(max(int(v.version) for v in versions)) if versions else None


def _holder(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def apply(decision: Decision, tracking_uri: str, fingerprints: dict[str, str] | None = None) -> Decision:
    """Move the registry aliases as decided, on the versions registered from this lineage's arms
    (`fingerprints`: stage -> checkpoint fingerprint; without it, the latest of each); fills
    decision.champion and decision.versions."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    t_name, c_name = EMBEDDER_NAMES[TREATMENT], EMBEDDER_NAMES[CONTROL]
    fps = fingerprints or {}
    t_ver, c_ver = _latest(client, t_name, fps.get(TREATMENT)), _latest(client, c_name, fps.get(CONTROL))
    if t_ver is None:
        raise RuntimeError(f"no registered version of {t_name}: run embedding_model first")
    if decision.promoted:
        client.set_registered_model_alias(t_name, CHAMPION, t_ver)
        if _holder(client, c_name, CHAMPION):
            client.delete_registered_model_alias(c_name, CHAMPION)
        if _holder(client, t_name, CHALLENGER) == t_ver:
            client.delete_registered_model_alias(t_name, CHALLENGER)
    else:
        client.set_registered_model_alias(t_name, CHALLENGER, t_ver)
        if not _holder(client, t_name, CHAMPION) and not _holder(client, c_name, CHAMPION) and c_ver:
            client.set_registered_model_alias(c_name, CHAMPION, c_ver)
            decision.reasons.append(f"no champion yet: the control {c_name} v{c_ver} (the incumbent) is champion")
    decision.champion = TREATMENT if _holder(client, t_name, CHAMPION) else CONTROL if _holder(client, c_name, CHAMPION) else None
    decision.versions = {TREATMENT: t_ver, CONTROL: c_ver,
                         "champion": f"{EMBEDDER_NAMES.get(decision.champion, '?')}@champion"}
    return decision
