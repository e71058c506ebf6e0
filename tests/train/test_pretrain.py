"""tools/pretrain.py end to end on CPU: learning, outputs, resume, DDP, bad inputs, weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from ports import free_port

from spark_det.cli import pretrain as pretrain_cli
from spark_det.data.decode import load_rgb
from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images
from spark_det.errors import CheckpointError
from spark_det.io import load_file, save_atomic
from spark_det.model import create_spark
from spark_det.train.checkpoint import load_init_weights

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    return write_unlabeled_images(root, 32, seed=0, cfg=SceneConfig(image_size=(80, 80)))


def run(data, out, *overrides, extra=()):
    code = pretrain_cli.main(["--recipe", RECIPE, "--data", str(data), "--output", str(out), "--device", "cpu",
                              *extra, *overrides])
    return code


def pretrain_processes(nproc: int, *args) -> subprocess.CompletedProcess:
    """tools/pretrain.py as one plain process or as ``nproc`` torchrun (gloo) processes; must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_port", str(free_port())]
    proc = subprocess.run([sys.executable, *launcher, "tools/pretrain.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_learns_and_leaves_every_artifact(images, tmp_path):
    out = tmp_path / "run"
    assert run(images, out, "epochs=6", "batch_size=8", "warmup_epochs=1", "lr=3e-2") == 0
    values = losses(out)
    assert len(values) == 24
    assert np.mean(values[-6:]) < 0.9 * np.mean(values[:3]), values
    for name in ("checkpoint-last.pth", "encoder-resnet18.pth", "config.yaml", "reconstruction-epoch006.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    with Image.open(out / "reconstruction-epoch006.png") as grid:
        assert grid.size[0] > 3 * 64 and grid.size[1] > 4 * 64  # 3 columns, 4 rows
    dense = timm.create_model("resnet18", num_classes=0)
    dense.load_state_dict(torch.load(out / "encoder-resnet18.pth", weights_only=True), strict=True)
    ckpt = load_file(out / "checkpoint-last.pth")
    assert ckpt["epoch"] == 6 and ckpt["iter"] == 0 and "decoder.proj.weight" in ckpt["model"]


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(images, tmp_path):
    common = ("epochs=2", "batch_size=8", "warmup_epochs=1")  # 4 iterations per epoch
    assert run(images, tmp_path / "straight", *common) == 0
    assert run(images, tmp_path / "broken", *common, "stop_after_iters=3") == 0  # stops mid-epoch 0
    assert len(losses(tmp_path / "broken")) == 3
    assert run(images, tmp_path / "broken", *common, extra=("--resume", "auto")) == 0
    assert losses(tmp_path / "broken") == losses(tmp_path / "straight")  # made alike (this process): bit-exact


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(images, tmp_path):
    common = ["--recipe", RECIPE, "--data", str(images), "--device", "cpu", "epochs=1", "batch_size=8",
              "warmup_epochs=1", "lr=2e-3"]
    pretrain_processes(1, *common, "--output", tmp_path / "one")
    ddp = pretrain_processes(2, *common, "--output", tmp_path / "two")
    assert "2 process(es)" in ddp.stdout
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def _odd_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "ok.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (72, 96))).astype(np.uint16)).save(folder / "deep16.png")
    (folder / "nested").mkdir()
    Image.fromarray(rgb).save(folder / "nested" / "deeper.webp")
    (folder / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    full = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 3])


def test_odd_and_broken_images_are_converted_or_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "odd"
    _odd_images(data)
    for name in ("gray.png", "rgba.png", "palette.png", "cmyk.jpg", "deep16.png", "nested/deeper.webp"):
        img = load_rgb(data / name)
        assert img.mode == "RGB" and img.size == (96, 72)
    assert np.asarray(load_rgb(data / "deep16.png")).max() > 200  # 16-bit scaled, not saturated or black
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert run(data, out, "epochs=2", "batch_size=9", "warmup_epochs=0", "input_size=[64,64]") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records] == [2, 2]  # corrupt.jpg and truncated.jpg, met in each epoch
    assert records[-1]["skipped_total"] == 2  # ... but they are two files
    assert "2 unreadable image file(s) skipped" in capsys.readouterr().out


def test_empty_or_missing_data_fails_fast_with_a_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    for data in (tmp_path / "empty", tmp_path / "missing"):
        proc = subprocess.run([sys.executable, "tools/pretrain.py", "--recipe", RECIPE, "--data", str(data),
                               "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert proc.returncode == 2
        assert "no images found" in proc.stderr or "does not exist" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_unknown_recipe_keys_are_rejected(images, tmp_path, capsys):
    assert run(images, tmp_path / "x", "epoch=3") == 2
    assert "unknown config keys ['epoch']" in capsys.readouterr().err


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(images, tmp_path, capsys):
    out = tmp_path / "nan"
    code = run(images, out, "epochs=3", "batch_size=8", "warmup_epochs=0", "lr=1e30", "clip_grad=0",
               "save_every_iters=1")
    assert code == 3
    assert "loss is" in capsys.readouterr().err
    ckpt = load_file(out / "checkpoint-last.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model", "moco"])
def test_init_weights_accepts_released_layouts(images, tmp_path, wrap):
    source = timm.create_model("resnet18").state_dict()  # includes the classifier, like released files
    wrapped = {
        "plain": source,
        "module": {"module": source},
        "state_dict": {"state_dict": source, "epoch": 3},
        "model": {"model": source},
        "moco": {"state_dict": {f"module.encoder_q.{k}": v for k, v in source.items()}},
    }[wrap]
    path = save_atomic(wrapped, tmp_path / "released.pth")
    out = tmp_path / "cont"
    assert run(images, out, "epochs=1", "batch_size=32", "lr=0.0", "warmup_epochs=0",
               extra=("--init-weights", str(path))) == 0
    exported = torch.load(out / "encoder-resnet18.pth", weights_only=True)
    torch.testing.assert_close(exported["layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])


def test_init_weights_rejects_truncated_and_mismatched_files(images, tmp_path, capsys):
    good = save_atomic(timm.create_model("resnet34", num_classes=0).state_dict(), tmp_path / "r34.pth")
    assert run(images, tmp_path / "o", extra=("--init-weights", str(good))) == 1  # a bad input file
    assert "does not match encoder resnet18" in capsys.readouterr().err
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    assert run(images, tmp_path / "o", extra=("--init-weights", str(truncated))) == 1
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any output was written
    spark = create_spark("resnet18")
    with pytest.raises(CheckpointError, match="does not match encoder resnet18"):  # the library raises
        load_init_weights(spark, good)


def test_visualize_renders_a_grid_from_a_full_checkpoint_and_refuses_an_encoder(images, tmp_path, capsys):
    from spark_det.cli import visualize

    out = tmp_path / "run"
    assert run(images, out, "epochs=1", "batch_size=16", "warmup_epochs=0") == 0
    grid = tmp_path / "grid.png"
    assert visualize.main([str(out / "checkpoint-last.pth"), str(images), "--out", str(grid), "--num-images", "3"]) == 0
    with Image.open(grid) as img:
        assert img.size[0] > 3 * 64 and img.size[1] > 3 * 64  # 3 columns x 3 rows of 64 px
    assert visualize.main([str(out / "encoder-resnet18.pth"), str(images), "--out", str(grid)]) == 1
    assert "not a full spark-det checkpoint" in capsys.readouterr().err


def test_pretraining_runs_from_python_without_the_command_line(images, tmp_path):
    from spark_det.train import Pretrainer, load_config

    cfg = load_config(RECIPE, ["epochs=1", "batch_size=16", "warmup_epochs=0"])
    result = Pretrainer(cfg, data=images, output=tmp_path / "py", device="cpu", log=lambda _: None).run()
    assert result.encoder == tmp_path / "py" / "encoder-resnet18.pth" and result.encoder.is_file()
    assert (result.epoch, result.iteration, result.stopped_early) == (1, 2, False)
    assert result.last_loss == pytest.approx(losses(tmp_path / "py")[-1])
    timm.create_model("resnet18", num_classes=0).load_state_dict(torch.load(result.encoder, weights_only=True))


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_process_with_the_same_micro_batches(images, tmp_path):
    """Rank r's micro-batch m holds global positions [m B/A, (m+1) B/A) of the batch (ranks take
    strided samples), and BatchNorm statistics are all-reduced: so 2 ranks x 2 accumulation steps
    compute what 1 rank x 2 steps computes, up to the order of fp32 sums. (1 rank x 1 step differs:
    its BatchNorm sees the whole batch at once.)

    What that order can change, and so what is asserted: LAMB, like Adam, normalises each element's
    update, so an element whose gradient is at rounding level (layer4's shortcut BatchNorm weight:
    |grad| ~1e-8) takes a step whose size and sign rounding decides: no per-element bound below the
    step itself is guaranteed, on any CPU or torch (this CPU: 6.7% of the lr on torch 2.14, 50% on
    2.4). What holds is the whole: the weights' mean difference is a small part of the mean update
    (0.8% here), where other samples or masks in a micro-batch move the weights by hundreds of times
    the update; the bound, 10%, sits between the two, far from both. Losses: rel 1e-4."""
    common = ["--recipe", RECIPE, "--data", str(images), "--device", "cpu", "epochs=1", "batch_size=8",
              "warmup_epochs=1", "lr=2e-3", "accum_steps=2"]
    pretrain_processes(1, *common, "--output", tmp_path / "one")
    pretrain_processes(1, *common, "lr=0.0", "--output", tmp_path / "untrained")
    pretrain_processes(2, *common, "--output", tmp_path / "two")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    one, two, start = (torch.load(tmp_path / d / "encoder-resnet18.pth", weights_only=True)
                       for d in ("one", "two", "untrained"))
    keys = [k for k, v in one.items() if v.is_floating_point() and "running_" not in k]
    difference = torch.cat([(two[k] - one[k]).flatten() for k in keys]).abs()
    update = torch.cat([(one[k] - start[k]).flatten() for k in keys]).abs()
    assert update.mean() > 0
    assert difference.mean() < 0.1 * update.mean(), (difference.mean(), update.mean())
    for k in one:
        if "running_" in k:  # the synchronised BatchNorm statistics (of slightly different weights)
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4 * one[k].abs().max().item(), msg=k)
