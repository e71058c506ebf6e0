"""compile=true: the training step through torch.compile, its graphs counted and its losses
compared with eager ones.

Graphs and recompilations are decided by dynamo (tracing and guards) before any backend sees a
graph, so most tests use the ``aot_eager`` backend: dynamo and AOTAutograd exactly as with
inductor, then the traced ATen operations run as they are (so the losses equal eager ones up to
AOTAutograd's decompositions), with no C++ build. Inductor's C++ compilation of even the tiny
test model takes minutes on this 2-core machine; one slow test runs it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from ports import free_port
from torch._dynamo.utils import counters

from spark_det.cli import pretrain as pretrain_cli
from spark_det.demo.synthetic import SceneConfig, write_unlabeled_images
from spark_det.errors import EXIT_BAD_INPUT
from spark_det.io import load_file
from spark_det.model import create_spark
from spark_det.model.encoder import SparseEncoder
from spark_det.model.spark import SparK
from spark_det.train import Pretrainer, load_config
from spark_det.train.compiled import MIN_TORCH

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")

pytestmark = pytest.mark.skipif(torch.__version__ < MIN_TORCH,
                                reason=f"compile=true needs torch >= {MIN_TORCH} (refused with a ConfigError)")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    return write_unlabeled_images(root, 32, seed=0, cfg=SceneConfig(image_size=(80, 80)))


def run(data, out, *overrides, extra=()):
    return pretrain_cli.main(["--recipe", RECIPE, "--data", str(data), "--output", str(out), "--device", "cpu",
                              *extra, *overrides])


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _tiny_batch(model):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return images, model.random_mask(images, torch.Generator().manual_seed(2)), model.visible_per_image(images)


def _assert_close_gradients(eager, compiled, rtol, atol_of_max):
    """``atol`` relative to the largest gradient of the model (as tests/sparse/test_fast_path.py):
    a near-zero gradient (layer4's shortcut BatchNorm weight, ~1e-8) carries a relative rounding
    error of 1e-3 in float32 whatever computes it."""
    scale = max(p.grad.abs().max().item() for p in eager.parameters() if p.grad is not None)
    for (key, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol_of_max * scale, msg=key)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_resnet_and_convnext_compile_whole_without_a_graph_break(name):
    """Row indices of static shape, the mask holder traced, no .item(): one graph per step."""
    torch.manual_seed(0)
    model = create_spark(name, decoder_width=64)
    images, visible, per_image = _tiny_batch(model)
    explained = torch._dynamo.explain(model)(images, visible, per_image=per_image)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_modules_that_pool_in_their_own_code_run_eagerly_between_compiled_graphs():
    """ECA pools over positions in its own forward (VisibleReductions, PositionMode): it runs
    eagerly, the model around it compiled, and the loss and gradients are eager's."""
    def build():  # a ResNet with one ECA block per stage
        dense = timm.create_model("resnet18", num_classes=0, global_pool="", layers=[1, 1, 1, 1],
                                  block_args=dict(attn_layer="eca"))
        return SparK(SparseEncoder(dense), decoder_width=64)

    torch.manual_seed(0)
    model, twin = build(), build()
    twin.load_state_dict(model.state_dict())
    images, visible, per_image = _tiny_batch(model)
    torch._dynamo.reset()
    counters.clear()
    eager_loss = model(images, visible, per_image=per_image)
    compiled_loss = torch.compile(twin, backend="aot_eager")(images, visible, per_image=per_image)
    assert counters["stats"]["unique_graphs"] > 1
    assert counters["graph_break"] and all("disable" in reason for reason in counters["graph_break"])
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    eager_loss.backward()
    compiled_loss.backward()
    _assert_close_gradients(model, twin, rtol=1e-5, atol_of_max=1e-6)


@pytest.mark.slow
def test_a_compiled_run_compiles_once_across_epochs_resume_and_grids_and_matches_eager(images, tmp_path):
    """Two epochs of 4 steps, stopped after 3 and resumed: an epoch boundary, a resume, a
    reconstruction grid (the eager module in eval mode) and a leak audit at every checkpoint,
    and still the one graph of the first step. Checkpoints keep the eager module's keys."""
    common = ("epochs=2", "batch_size=8", "warmup_epochs=1")
    # A resumed run is a new process, with dynamo's caches empty: reset them as it would find them
    # (in one process, the new run's new model would add a graph for itself).
    for extra, overrides in (((), ("stop_after_iters=3",)), (("--resume", "auto"), ())):
        torch._dynamo.reset()
        counters.clear()
        assert run(images, tmp_path / "compiled", *common, "compile=aot_eager", *overrides, extra=extra) == 0
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert counters["frames"]["total"] == 1, dict(counters["frames"])
    assert (tmp_path / "compiled" / "reconstruction-epoch002.png").is_file()
    audits = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    assert sum("leak_audit_s" in m for m in audits) == 3  # after iterations 3 (stop), 4 and 8 (epoch ends)

    assert run(images, tmp_path / "eager", *common) == 0
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    compiled, eager = (load_file(tmp_path / d / "checkpoint-last.pth")["model"] for d in ("compiled", "eager"))
    assert list(compiled) == list(eager)


def test_the_compiled_wrapper_is_kept_apart_from_the_module_checkpoints_and_audits_use(images, tmp_path):
    cfg = load_config(RECIPE, ["compile=aot_eager", "batch_size=8"])
    trainer = Pretrainer(cfg, images, tmp_path / "run", device="cpu")
    try:
        assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
        assert trainer.model._orig_mod is trainer.spark
        assert not any(key.startswith("_orig_mod") for key in trainer.spark.state_dict())
    finally:
        trainer.close()


@pytest.mark.parametrize("value", ["no_such_backend", 1])
def test_a_bad_compile_setting_is_one_error_line(images, tmp_path, capsys, value):
    assert run(images, tmp_path / "run", f"compile={value}") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "error:" in err and "compile" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_gloo_processes_with_bf16_accumulation_and_channels_last_compiled_match_eager(images, tmp_path):
    """DDP (its optimizer splits the graph at gradient buckets), the sparse BatchNorms' all-reduce
    traced, autocast bf16, 2 accumulation steps (no_sync), channels_last: no recompilation (torch's
    own log of recompilations stays empty) and eager's losses."""
    common = ["--recipe", RECIPE, "--data", str(images), "--device", "cpu", "epochs=1", "batch_size=8",
              "warmup_epochs=1", "accum_steps=2", "amp=bf16", "channels_last=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_LOGS": "recompiles"}
    for name, extra in (("compiled", ["compile=aot_eager"]), ("eager", [])):
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:  # a file, not a pipe: nobody drains a pipe while torchrun runs
            code = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--master_port", str(free_port()),
                                   "tools/pretrain.py", *common, *extra, "--output", str(tmp_path / name)],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode
        assert code == 0, log.read_text()[-3000:]
        assert "Recompiling" not in log.read_text()
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)


@pytest.mark.slow
def test_inductor_gives_eager_losses_and_gradients_to_float_rounding():
    """The default backend itself (C++ kernels on CPU): fused kernels sum in another order, so
    float32 rounding differs; a relative 1e-4 bounds that, far below what a wrong result moves."""
    torch.manual_seed(0)
    model = create_spark("resnet18", decoder_width=32)
    twin = create_spark("resnet18", decoder_width=32)
    twin.load_state_dict(model.state_dict())
    images, visible, per_image = _tiny_batch(model)
    compiled = torch.compile(twin)
    for _ in range(2):  # the second step runs the compiled code without compiling again
        eager_loss = model(images, visible, per_image=per_image)
        compiled_loss = compiled(images, visible, per_image=per_image)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=0)
        eager_loss.backward()
        compiled_loss.backward()
    _assert_close_gradients(model, twin, rtol=1e-3, atol_of_max=1e-5)
