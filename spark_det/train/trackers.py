"""Experiment trackers beside ``metrics.jsonl`` and TensorBoard: Weights & Biases and MLflow.

``logger=wandb``, ``logger=mlflow`` or ``logger=[wandb,mlflow]`` (a recipe key or an override)
sends the same scalars as TensorBoard (``train/loss``, ``train/lr``, ... at the global
iteration), the reconstruction grids, and the resolved config as the run's parameters. Only the
main rank logs. The tracker's run id is kept in the run folder (``trackers.json``): a resumed
run continues the same tracked run.

- W&B: ``wandb.init(dir=<output>, id=..., resume="allow")``; the project is ``$WANDB_PROJECT``
  (default ``spark-det``), ``WANDB_MODE=offline`` keeps everything on disk (``wandb sync`` later).
- MLflow: :class:`mlflow.tracking.MlflowClient` on ``$MLFLOW_TRACKING_URI``, else a file store in
  ``<output>/mlruns`` (``MLFLOW_ALLOW_FILE_STORE=true`` is set for it unless already set); the
  experiment is ``$MLFLOW_EXPERIMENT_NAME`` (default ``spark-det``).
  The client is used directly, so the process's global ``mlflow`` state is left alone.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ConfigError, first_line
from ..io import write_atomic

TRACKERS = {"wandb": "wandb", "mlflow": "mlflow"}  # logger name -> the spark-det extra that installs it
RUN_IDS = "trackers.json"
DEFAULT_PROJECT = "spark-det"


def logger_names(value: Union[None, str, list]) -> list[str]:
    """The ``logger`` config value as a list of tracker names (``None`` or ``none``: no tracker);
    raises :class:`ConfigError` for an unknown name."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"logger must be a tracker name or a list of them ({', '.join(TRACKERS)}), got {value!r}")
    names = [n.strip() for name in names for n in name.split(",") if n.strip() and n.strip() != "none"]
    unknown = sorted(set(names) - set(TRACKERS))
    if unknown:
        raise ConfigError(f"logger: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} "
                          "(metrics.jsonl and TensorBoard are always written)")
    return list(dict.fromkeys(names))


def require_trackers(names: list[str]) -> None:
    """Refuse, before anything is written, a tracker whose package is not installed."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"logger={name} needs the {name} package: "
                              f"pip install 'spark-det[{TRACKERS[name]}]'") from exc


class WandbTracker:
    """A W&B run in ``folder`` (its files under ``folder/wandb``)."""

    def __init__(self, folder: Path, config: dict[str, Any], run_id: Optional[str]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), dir=str(folder),
                              id=run_id, resume="allow", config=config,
                              name=folder.name, allow_val_change=True)
        self.run_id = self.run.id

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run through a client of its own (no global ``mlflow.start_run`` state)."""

    def __init__(self, folder: Path, config: dict[str, Any], run_id: Optional[str]) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (folder / "mlruns").resolve().as_uri()
            # MLflow >= 3.7 refuses its file store without this opt-in; the database store it
            # recommends needs SQLAlchemy and alembic, which mlflow-skinny does not install
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=folder.name).info.run_id
            # parameters are written once: MLflow refuses to change a logged value, and a resume
            # may change bookkeeping keys (the W&B config, which may change, carries them too)
            self._log_params(run_id, config)
        self.run_id = run_id

    def _log_params(self, run_id: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(key, json.dumps(value) if not isinstance(value, str) else value)
                  for key, value in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(run_id, params=params[start:start + 100])

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in scalars.items()])

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers together; empty (every call a no-op) when ``names`` is empty.

    Args:
        names: tracker names (:func:`logger_names`).
        folder: the run folder (holds ``trackers.json`` and the trackers' local files).
        config: the resolved config, logged as the run's parameters.
        resume: continue the tracked runs named in ``trackers.json`` (a resumed pretraining run).
    """

    def __init__(self, names: list[str], folder: Path, config: dict[str, Any], resume: bool) -> None:
        self.folder = Path(folder)
        ids = self._saved_ids() if resume else {}
        self.trackers = {}
        try:
            for name in names:
                try:
                    self.trackers[name] = _CLASSES[name](self.folder, config, ids.get(name))
                except Exception as exc:  # noqa: BLE001 - e.g. W&B online without a login: one line, not a traceback
                    raise ConfigError(f"logger={name}: cannot start the tracked run: {type(exc).__name__}: "
                                      f"{first_line(exc)}") from exc
        except BaseException:
            self.close()
            raise
        if self.trackers:
            ids.update({name: tracker.run_id for name, tracker in self.trackers.items()})
            text = json.dumps(ids, indent=1)
            write_atomic(self.folder / RUN_IDS, lambda f: f.write(text.encode()))

    def _saved_ids(self) -> dict[str, str]:
        try:
            ids = json.loads((self.folder / RUN_IDS).read_text())
        except (OSError, ValueError):
            return {}
        return ids if isinstance(ids, dict) else {}

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers.values():
            tracker.log_scalars(scalars, step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        for tracker in self.trackers.values():
            tracker.log_image(name, path, step)

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.close()
        self.trackers = {}
