"""The leak audit during a run: on the loaded weights, and before every checkpoint is written.

The construction probe checks a model's structure with random weights once; a run then trains
(and may load) weights that the probe never saw. The audit runs the same probe on a float64 copy
of the live encoder, says so in the log and in ``metrics.jsonl``, and a finding stops the run with
exit code 8 before the leaking weights are written as a checkpoint.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images
from spark_det.errors import EXIT_LEAKS, LeakError
from spark_det.train import Pretrainer, load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pretrain" / "resnet18_smoke.yaml"
COMMON = ["epochs=1", "batch_size=8", "warmup_epochs=0", "input_size=[64,64]", "vis_images=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unlabeled")
    return write_unlabeled_images(folder, 24, seed=0, cfg=SceneConfig(image_size=(72, 72)))


class CountsMaskedPositions(nn.Module):
    """A block that gates its output with a dense mean over positions: it counts the masked zeros."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x)
        return out * torch.sigmoid(out.mean((2, 3), keepdim=True))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_checkpoint_is_audited_and_the_log_and_metrics_say_so(images, tmp_path, capsys):
    out = tmp_path / "run"
    Pretrainer(load_config(RECIPE, COMMON + ["save_every_iters=2"]), images, out, device="cpu").run()
    rows = records(out)  # 3 iterations: checkpoints after 2 and at the epoch's end (3)
    assert [("leak_audit_s" in r) for r in rows] == [False, True, True]
    assert capsys.readouterr().out.count("leak audit of the weights after iteration") == 2


def test_loaded_weights_are_audited_before_training(images, tmp_path, capsys):
    out = tmp_path / "run"
    Pretrainer(load_config(RECIPE, COMMON + ["stop_after_iters=1"]), images, out, device="cpu").run()
    capsys.readouterr()
    Pretrainer(load_config(RECIPE, COMMON), images, out, device="cpu", resume="auto").close()
    assert "leak audit of the loaded weights: passed" in capsys.readouterr().out


def test_a_run_whose_encoder_starts_to_leak_stops_with_exit_8_and_keeps_no_leaking_checkpoint(images, tmp_path):
    out = tmp_path / "run"
    Pretrainer(load_config(RECIPE, COMMON + ["stop_after_iters=1"]), images, out, device="cpu").run()
    before = (out / "checkpoint-last.pth").read_bytes()
    run = Pretrainer(load_config(RECIPE, COMMON + ["save_every_iters=1"]), images, out, device="cpu", resume="auto")
    layers = run.spark.encoder.model.layer2
    layers[0] = CountsMaskedPositions(layers[0])  # e.g. a user's block swapped in after loading
    with pytest.raises(LeakError, match=r"layer 'layer2\.0' \(CountsMaskedPositions\)") as caught:
        run.run()
    assert caught.value.exit_code == EXIT_LEAKS == 8
    assert (out / "checkpoint-last.pth").read_bytes() == before  # nothing after the leak was kept
    assert len(records(out)) == 1  # the leaking step is not logged as a good one either


def test_the_audit_can_be_turned_off(images, tmp_path):
    out = tmp_path / "run"
    Pretrainer(load_config(RECIPE, COMMON + ["leak_audit=false"]), images, out, device="cpu").run()
    assert not any("leak_audit_s" in r for r in records(out))
