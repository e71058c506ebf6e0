"""One command-line convention: `--output`, help on every argument, documented exit codes, one
`error:` line (never a traceback) for a user's mistake, and logs that read well in a file."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_det.cli import COMMANDS, convert, demo, make_data, pretrain, visualize

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")
PARSERS = {"pretrain": pretrain, "convert": convert, "visualize": visualize, "demo": demo, "make-data": make_data}


@pytest.fixture(scope="module")
def images(unlabeled_images):
    return unlabeled_images(16)


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


def test_the_exit_codes_of_the_code_its_help_and_the_reliability_page_are_the_same_list():
    import re

    from spark_det import errors
    from spark_det.cli.common import EXIT_CODES_HELP

    in_code = {value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    in_help = {int(code) for code in re.findall(r"(?:: |, )(\d+) ", EXIT_CODES_HELP)}
    page = (ROOT / "docs" / "reliability.md").read_text()
    in_docs = {int(code) for code in re.findall(r"^\| (\d+) \|", page, flags=re.M)}
    in_docstring = {int(code) for code in re.findall(r"^\| (\d+) +\|", errors.__doc__, flags=re.M)}
    assert in_code == in_help == in_docs == in_docstring, (in_code, in_help, in_docs, in_docstring)
    raised = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and hasattr(cls, "exit_code")}
    assert raised <= in_code


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


def one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run") / "run"
    assert pretrain.main(["--recipe", RECIPE, "--data", str(images), "--output", str(out), "--device", "cpu",
                          "model=test_resnet", "input_size=[64,64]", "decoder_width=32", "batch_size=4",
                          "vis_images=0", "stop_after_iters=1"]) == 0
    return out / "checkpoint-last.pth"


@pytest.mark.parametrize("count", [0, -2])
def test_visualize_refuses_fewer_than_one_image_in_one_line(checkpoint, images, tmp_path, count):
    proc = spark_det("visualize", checkpoint, images, "--num-images", count, "--output", tmp_path / "grid.png")
    assert proc.returncode == 2
    assert f"--num-images must be at least 1, got {count}" in one_error_line(proc)
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_pretrain_on_cuda_without_a_gpu_is_one_line_before_anything_is_written(images, tmp_path):
    proc = spark_det("pretrain", "--recipe", RECIPE, "--data", images, "--output", tmp_path / "run", "--device", "cuda")
    assert proc.returncode == 2
    assert "--device cuda: torch sees no CUDA GPU here" in one_error_line(proc) and "--device cpu" in proc.stderr
    assert not (tmp_path / "run").exists()


def without(modules, *args):
    """The command as a user runs it where ``modules`` are not installed (Python's own way to make
    an import fail: None in sys.modules), everything else unchanged."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(modules)!r})); from spark_det.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_demo_and_make_data_without_their_extra_name_what_to_install_in_one_line(tmp_path):
    proc = without(["pycocotools"], "make-data", "--output", tmp_path / "data", "--num-train", 2, "--num-val", 1)
    assert proc.returncode == 7
    assert "pycocotools" in one_error_line(proc) and "pip install 'spark-det[demo]'" in proc.stderr
    assert not (tmp_path / "data").exists()
    proc = without(["pycocotools", "detectron2", "mmdet"], "demo", "--output", tmp_path / "demo")
    assert proc.returncode == 7
    line = one_error_line(proc)
    assert "pip install 'spark-det[demo]'" in line and "Detectron2" in line and "spark-det[mmdet]" in line
    assert not (tmp_path / "demo").exists()
    proc = without(["detectron2"], "train-det2", "--help")
    assert proc.returncode == 7 and "Detectron2" in one_error_line(proc)


@pytest.mark.parametrize("framework", ["mmdet", "detectron2"])
@pytest.mark.parametrize("case", ["missing", "not_json", "no_categories"])
def test_training_on_a_bad_coco_json_is_one_line_with_exit_1(tmp_path, framework, case):
    from frameworks import require

    require(framework)
    annotations = tmp_path / "train.json"
    if case == "not_json":
        annotations.write_text('{"images": [')
    elif case == "no_categories":
        annotations.write_text('{"images": [], "annotations": []}')
    (tmp_path / "images").mkdir()
    if framework == "mmdet":
        proc = spark_det("train-mmdet", ROOT / "det_configs/mmdet/mask-rcnn_r18_fpn_cpu_demo.py", "--output",
                         tmp_path / "work", "--coco-train", annotations, tmp_path / "images")
    else:
        config = ROOT / "det_configs/detectron2/mask_rcnn_R_18_FPN_cpu_demo.yaml"
        proc = spark_det("train-det2", "--config-file", config, "--output", tmp_path / "work", "--register-coco",
                         "mine", annotations, tmp_path / "images", "DATASETS.TRAIN", '("mine",)', "DATASETS.TEST", "()")
    assert proc.returncode == 1, proc.stderr[-2000:]
    expected = {"missing": "does not exist", "not_json": "is not valid JSON",
                "no_categories": "has no usable 'categories'"}[case]
    assert expected in one_error_line(proc) and str(annotations) in proc.stderr
    assert not (tmp_path / "work").exists()
