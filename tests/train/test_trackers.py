"""W&B (offline) and MLflow (local file store) runs show the same scalars as metrics.jsonl, the
config as parameters and the reconstruction grids; a resumed pretraining run continues the same
tracked run. No network: W&B runs offline, MLflow writes a file store in the run folder."""

import importlib.abc
import json
import sys
from pathlib import Path

import pytest

from spark_det.cli import pretrain as pretrain_cli
from spark_det.errors import EXIT_BAD_INPUT
from spark_det.train.config import load_config
from spark_det.train.trackers import logger_names

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")
# 16 images, batch 8: two iterations per epoch, four in all; a grid after each epoch
TINY = ("epochs=2", "batch_size=8", "warmup_epochs=1", "leak_audit=false", "vis_images=2")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, its settings and caches under tmp_path; MLflow's default (file store in the run folder)."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                       "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data",
                       "WANDB_PROJECT": "spark-det-test", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, str(value))
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def images(unlabeled_images):
    return unlabeled_images(16)


def pretrain(images, out, *args):
    return pretrain_cli.main(["--recipe", RECIPE, "--data", str(images), "--output", str(out), "--device", "cpu",
                              *TINY, *args])


def jsonl_scalars(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {key: {r["global_iter"]: r[key] for r in records} for key in ("loss", "lr", "grad_norm")}


def wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` file. wandb 0.2x dropped its Python
    reader (its Go core reads them); the file is LevelDB's log format (32 KiB blocks of chunks:
    crc32 4 bytes, length 2, type 1: full / first / middle / last) after a 7-byte ``:W&B`` header."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_history(out, run_id):
    """Every history row and the config the offline run(s) with ``run_id`` recorded."""
    rows, config = [], {}
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    for path in files:
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    return rows, config, len(files)


@pytest.mark.slow
def test_wandb_and_mlflow_show_the_jsonl_scalars_and_resume_continues_the_same_runs(images, tmp_path, offline):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    assert pretrain(images, out, "logger=[wandb,mlflow]", "stop_after_iters=3") == 0
    first_ids = json.loads((out / "trackers.json").read_text())
    assert pretrain(images, out, "logger=[wandb,mlflow]", "--resume", "auto") == 0
    ids = json.loads((out / "trackers.json").read_text())
    assert ids == first_ids and set(ids) == {"wandb", "mlflow"}
    expected = jsonl_scalars(out)
    assert sorted(expected["loss"]) == [0, 1, 2, 3]

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("spark-det")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [ids["mlflow"]]  # one run
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "resnet18" and json.loads(run.data.params["input_size"]) == [64, 64]
    for key, values in expected.items():
        history = client.get_metric_history(ids["mlflow"], f"train/{key}")
        assert {m.step: m.value for m in history} == values
        assert len(history) == 4  # each iteration once, across the resume
    grids = [a.path for a in client.list_artifacts(ids["mlflow"], "reconstruction")]
    assert grids == ["reconstruction/reconstruction-epoch001.png", "reconstruction/reconstruction-epoch002.png"]

    rows, config, parts = wandb_history(out, ids["wandb"])
    assert parts == 2  # the first process and the resumed one, both under the same run id
    assert config["model"] == "resnet18" and config["input_size"] == [64, 64]
    for key, values in expected.items():
        logged = {row["_step"]: row[f"train/{key}"] for row in rows if f"train/{key}" in row}
        assert logged == values
    assert sorted(row["_step"] for row in rows if "reconstruction/path" in row) == [1, 3]  # after each epoch


def test_an_unknown_logger_is_one_error_line(images, tmp_path, capsys):
    assert pretrain(images, tmp_path / "run", "logger=neptune") == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: logger: unknown tracker 'neptune'")
    assert not (tmp_path / "run").exists()


class _NotInstalled(importlib.abc.MetaPathFinder):
    """An environment without the named package."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == self.name:
            raise ModuleNotFoundError(f"No module named {fullname!r}")
        return None


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_one_error_line_naming_the_pip_install(images, tmp_path, capsys, monkeypatch,
                                                                              name):
    for module in [m for m in sys.modules if m.split(".")[0] == name]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(name), *sys.meta_path])
    assert pretrain(images, tmp_path / "run", f"logger={name}") == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: logger={name} needs the {name} package: pip install 'spark-det[{name}]'"]
    assert not (tmp_path / "run").exists()


def test_logger_takes_a_name_a_comma_list_or_a_yaml_list():
    cases = {"wandb": ["wandb"], "[wandb,mlflow]": ["wandb", "mlflow"], "mlflow,wandb": ["mlflow", "wandb"],
             "none": [], "null": []}
    for value, names in cases.items():
        assert logger_names(load_config(RECIPE, [f"logger={value}"])["logger"]) == names, value
