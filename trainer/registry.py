"""The MLflow model registry as Vitrine uses it: one registered model per dataset (`vitrine-<dataset
name>`, or the `--model-name` a run was given), one version per finished training run, and the
`champion` alias (MLflow 3 aliases; stages are deprecated) on the version that serves:
`models:/vitrine-demo@champion`.

Used by `vitrine model list|show|promote` (serving/cli.py) and the dashboard's Runs page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vitrine import tracking
from vitrine.errors import UserError

CHAMPION = "champion"


@dataclass
class Version:
    name: str
    version: int
    run_id: str | None
    aliases: list[str] = field(default_factory=list)
    created_ms: int = 0
    test_auc: float | None = None
    dataset: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def client():
    from mlflow.tracking import MlflowClient

    uri = tracking.setup()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def names(c: Any = None) -> list[str]:
    """Every registered model's name, sorted."""
    c = c or client()
    return sorted(m.name for m in c.search_registered_models(max_results=1000))


def versions(name: str, c: Any = None, with_runs: bool = True) -> list[Version]:
    """The versions of registered model `name`, newest first; UserError if there is no such model."""
    from mlflow.exceptions import MlflowException

    c = c or client()
    try:
        model = c.get_registered_model(name)
    except MlflowException:
        known = names(c)
        raise UserError(f"no registered model {name!r}; registered: {', '.join(known) or 'none yet (train a model)'}") from None
    # The registered model's alias map, not each version's: a searched version may come without its aliases.
    aliases: dict[int, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(int(version), []).append(alias)
    out = []
    for mv in c.search_model_versions(f"name = '{name}'", max_results=1000):
        v = Version(name, int(mv.version), mv.run_id, sorted(aliases.get(int(mv.version), [])),
                    int(mv.creation_timestamp or 0))
        if with_runs and mv.run_id:
            try:
                run = c.get_run(mv.run_id)
                v.test_auc = run.data.metrics.get("test_auc")
                v.dataset = run.data.tags.get("vitrine.dataset")
            except MlflowException:
                pass  # the run was deleted; the version stays
        out.append(v)
    return sorted(out, key=lambda v: -v.version)


def champion(name: str, c: Any = None) -> int | None:
    """The version holding the champion alias, or None."""
    from mlflow.exceptions import MlflowException

    c = c or client()
    try:
        return int(c.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def promote(name: str, version: int | None = None, alias: str = CHAMPION, c: Any = None) -> Version:
    """Point `alias` (default champion) at `version` of model `name` (default: its newest version)."""
    c = c or client()
    vs = versions(name, c, with_runs=False)
    if not vs:
        raise UserError(f"registered model {name!r} has no versions")
    if version is None:
        chosen = vs[0]
    else:
        chosen = next((v for v in vs if v.version == int(version)), None)
        if chosen is None:
            raise UserError(f"VERSION {version}: model {name!r} has versions {', '.join(str(v.version) for v in vs)}")
    c.set_registered_model_alias(name, alias, str(chosen.version))
    return chosen


def versions_of_run(run_id: str, c: Any = None) -> list[Version]:
    """The registered versions a run's model became (usually one)."""
    c = c or client()
    out = []
    for mv in c.search_model_versions(f"run_id = '{run_id}'"):
        aliases = c.get_registered_model(mv.name).aliases or {}
        out.append(Version(mv.name, int(mv.version), mv.run_id,
                           sorted(a for a, v in aliases.items() if int(v) == int(mv.version)),
                           int(mv.creation_timestamp or 0)))
    return out
