"""One command-line convention: `--output`, help on every argument, documented exit codes, one
`error:` line (never a traceback) for a user's mistake, and logs that read well in a file."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_det.cli import COMMANDS, convert, demo, make_data, pretrain, visualize
from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")
PARSERS = {"pretrain": pretrain, "convert": convert, "visualize": visualize, "demo": demo, "make-data": make_data}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_unlabeled_images(tmp_path_factory.mktemp("cli"), 16, seed=0, cfg=SceneConfig(image_size=(64, 64)))


def spark_det(*args, timeout=600):
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("spark-det")
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_argument_has_help_and_the_output_is_called_output(name):
    parser = PARSERS[name].build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{name}: {action.dest} has no help text"
    assert "--output" in parser._option_string_actions, name
    assert "exit codes: 0 ok, 1 bad input file, 2 bad arguments" in parser.format_help()


def test_the_console_script_runs_every_command_it_lists():
    assert spark_det("collect-env").returncode == 0
    for name in COMMANDS:
        if name.startswith("train-"):
            continue  # they need a framework; tested under tests/d2 and tests/mmdet
        proc = spark_det(name, "--help")
        assert proc.returncode == 0 and "usage: spark-det " + name in proc.stdout, proc.stderr
    proc = spark_det("pretrian")
    assert proc.returncode == 2 and "unknown command 'pretrian'" in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("epochs=abc", "epochs must be an integer >= 1, got 'abc'"),
    ("model=resnet_typo", "unknown model 'resnet_typo'"),
    ("input_size=[70,70]", "must be a multiple of 32"),
    ("mask_ratio=1.5", "mask_ratio must be a number in [0, 1)"),
    ("amp=fp8", "amp must be one of none, bf16, fp16"),
    ("batch_size=7", "batch_size 7 must divide by ranks x accum_steps = 1 x 2"),
])
def test_bad_config_values_exit_2_with_one_line_before_anything_is_written(images, tmp_path, override, message):
    out = tmp_path / "run"
    proc = spark_det("pretrain", "--recipe", RECIPE, "--data", images, "--output", out, "accum_steps=2", override)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert not out.exists()


def test_bad_files_exit_1_and_bad_usage_exits_2(tmp_path):
    proc = spark_det("convert", tmp_path / "missing.pth", "--to", "mmdet", "--output", tmp_path / "x.pth")
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    proc = spark_det("convert", empty, "--to", "mmdet", "--output", tmp_path / "x.pth")
    assert proc.returncode == 1 and "cannot read checkpoint" in proc.stderr and "file is empty" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = spark_det("convert", empty, "--to", "onnx", "--output", tmp_path / "x.pth")
    assert proc.returncode == 2 and "invalid choice: 'onnx'" in proc.stderr
    proc = spark_det("convert", empty, tmp_path / "a.pth", "--to", "mmdet", "--output", tmp_path / "b.pth")
    assert proc.returncode == 2 and "give the output once" in proc.stderr


def test_an_unwritable_output_exits_4_with_one_line(images, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    proc = spark_det("pretrain", "--recipe", RECIPE, "--data", images, "--output", blocker / "run")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: cannot write") and "Traceback" not in proc.stderr


def test_logs_are_plain_lines_every_log_every_iterations_when_stdout_is_not_a_terminal(images, tmp_path):
    proc = spark_det("pretrain", "--recipe", RECIPE, "--data", images, "--output", tmp_path / "run", "epochs=2",
                     "batch_size=4", "log_every=3", "input_size=[64,64]", "vis_images=0")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[pretrain] it ")]
    assert [line.split()[2] for line in lines] == ["1/8", "3/8", "6/8", "8/8"]
    assert all(" loss " in line and " lr " in line and " img/s " in line and " eta " in line for line in lines)
