"""The GPU code paths, run on CUDA: fast == reference, leak-free execution, BatchNorm statistics in
half precision, DDP with NCCL and torch's SyncBatchNorm, and pretraining runs (eager and compiled).

Every test here carries the ``cuda`` marker and skips without a GPU (``pytest -m cuda`` selects them;
``benchmarks/gpu_check.py`` runs them first). ``SPARK_DET_CUDA_TESTS_DEVICE=cpu`` runs the same tests
on the CPU at smaller sizes: how CI keeps them from rotting (tests/test_gpu_check.py), not a GPU test.

fp32 comparisons turn TF32 off: cuDNN convolutions default to it (10 mantissa bits), and the two
sparse paths run different convolutions (the fast path's 1x1 convolutions are matrix products on rows).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fast_path_checks import assert_same_features_loss_gradients_and_running_stats
from PIL import Image

from spark_det.model import SparseEncoder, create_spark
from spark_det.model.leak_probe import randomise_like_training, same_on_common_part
from spark_det.sparse.convert import first_layer_fed_masked_values
from spark_det.sparse.masking import random_visible_mask, upsample_mask
from spark_det.sparse.reference import GatherScatterBatchNorm

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device(os.environ.get("SPARK_DET_CUDA_TESTS_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
# one model per row-block kind on the GPU; the CPU run keeps to the smallest of each
FAST_PATH_MODELS = ["resnet50", "seresnet50", "convnext_tiny", "convnextv2_atto"] if ON_GPU \
    else ["resnet18", "convnext_atto"]


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32 here (see the module docstring); restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(dtype):
    return torch.autocast(DEVICE.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _pair(name: str, dtype: torch.dtype, size: int, batch: int = 4):
    torch.manual_seed(0)
    reference = create_spark(name, sparse_impl="reference", decoder_width=64, drop_path_rate=0.0)
    fast = create_spark(name, sparse_impl="fast", decoder_width=64, drop_path_rate=0.0)
    fast.load_state_dict(reference.state_dict())
    reference, fast = reference.to(DEVICE, dtype), fast.to(DEVICE, dtype)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    visible = reference.random_mask(images.cpu(), torch.Generator().manual_seed(2)).to(DEVICE)
    return reference, fast, images, visible


@pytest.mark.parametrize("name", FAST_PATH_MODELS)
def test_fast_path_equals_the_reference_in_float64_features_loss_gradients_running_stats(name):
    """As tests/sparse/test_fast_path.py on the CPU: in float64 the two paths agree to ~1e-12, so
    a tight tolerance separates a real difference (CUDA's int32 row indices, gathers, scatters)
    from rounding."""
    reference, fast, images, visible = _pair(name, torch.float64, 64)
    assert_same_features_loss_gradients_and_running_stats(reference, fast, images, visible)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["resnet50", "convnext_small"] if ON_GPU else ["resnet18"])
def test_fast_path_loss_matches_the_reference_in_fp32_and_under_bf16_autocast(name, amp):
    """fp32 to 1e-5 relative (as on the CPU). bf16 keeps 8 mantissa bits (a relative step of 3.9e-3)
    and the paths round in different places; the loss is a mean over ~10^4 patch errors, so its
    rounding averages out far below 1e-2, while a wrong mask or statistic moves it by more."""
    reference, fast, images, visible = _pair(name, torch.float32, 128 if ON_GPU else 64, batch=8 if ON_GPU else 2)
    with torch.no_grad(), autocast(amp):
        losses = [model(images, visible).float().item() for model in (reference, fast)]
    assert all(np.isfinite(losses))
    assert abs(losses[1] - losses[0]) <= (1e-5 if amp is None else 1e-2) * abs(losses[0]), losses


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny"] if ON_GPU else ["resnet18"])
def test_sparse_execution_on_the_device_leaks_nothing_into_masked_positions(name, amp):
    """What SparseEncoder.verify() checks on the CPU, on the device (float64, and under bf16 autocast):
    every sparse layer is fed exact zeros at masked positions, the features are zero there, and extra
    masked patches change no feature (a statistic over masked positions would change it by tens of
    percent; bf16 rounding, which may differ between the two widths' convolutions, by under 5%)."""
    encoder = SparseEncoder(name, verify=False)
    probe = copy.deepcopy(encoder).to(DEVICE, torch.float64 if amp is None else torch.float32).train()
    generator = torch.Generator().manual_seed(0)
    randomise_like_training(probe, generator)  # fresh weights would map masked zeros to zeros, hiding a leak
    r = probe.downsample_ratio
    images = torch.randn(2, 3, 2 * r, 2 * r, generator=generator).to(DEVICE, next(probe.parameters()).dtype)
    visible = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool).view(2, 1, 2, 2).to(DEVICE)
    with torch.no_grad(), autocast(amp):
        assert first_layer_fed_masked_values(probe.model, lambda: probe(images, visible)) is None
        once, twice = ([f.double() for f in probe(F.pad(images, (0, t * 2 * r)), F.pad(visible, (0, t * 2)))]
                       for t in (1, 2))
    for level, (a, b) in enumerate(zip(once, twice)):
        assert a.device.type == DEVICE.type
        if amp is None:
            assert same_on_common_part(a, b), f"scale {level} counts masked positions"
        else:
            common = b[..., : a.shape[-1]]
            assert (a - common).abs().max() <= 5e-2 * a.abs().max(), f"scale {level} counts masked positions"
        masked = ~upsample_mask(F.pad(visible, (0, 2)), a.shape[-2:])
        assert a.masked_select(masked).abs().max() == 0, f"scale {level} is not empty at masked positions"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_batchnorm_statistics_under_cuda_autocast_stay_finite_and_close_to_fp32(dtype):
    """As tests/train/test_precision.py on the CPU, on the device: batch 16 at 224 px gives the stem
    BatchNorm 80,282 visible positions per channel, more than fp16 can count (65504)."""
    batch = 16 if ON_GPU else 2
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224).to(DEVICE)
    visible = random_visible_mask(batch, (7, 7), 0.6, torch.Generator().manual_seed(0)).to(DEVICE)
    encoders = {}
    for precision in ("fp32", "amp"):
        torch.manual_seed(1)
        encoder = SparseEncoder("resnet18").to(DEVICE).train()
        with torch.no_grad(), autocast(dtype if precision == "amp" else None):
            encoder(images, visible)
        encoders[precision] = encoder
    norms = {n: m for n, m in encoders["amp"].named_modules() if isinstance(m, GatherScatterBatchNorm)}
    assert "model.bn1" in norms
    reference = dict(encoders["fp32"].named_modules())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # the CPU test's: bounded by half-precision activations
    for name, bn in norms.items():
        assert bn.running_var.device.type == DEVICE.type
        assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all(), name
        torch.testing.assert_close(bn.running_var, reference[name].running_var, rtol=tol, atol=tol)
        torch.testing.assert_close(bn.running_mean, reference[name].running_mean, rtol=tol, atol=tol)


def _batches(count: int, batch: int, size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(batch, 3, size, size, generator=generator),
             "key": [(0, i * batch + j) for j in range(batch)], "skipped": []} for i in range(count)]


def _twenty_steps(model, spark, batch: int, size: int) -> list[float]:
    from spark_det.train.engine import train_one_epoch
    from spark_det.train.optim import build_optimizer
    from spark_det.train.schedule import Schedule

    optimizer = build_optimizer(spark, "lamb", 1e-3, 0.04, (0.9, 0.95))
    torch.manual_seed(0)  # the same drop-path draws in both runs
    losses: list[float] = []
    train_one_epoch(model, spark, _batches(20, batch, size), optimizer, Schedule(20, 2, 1e-3, 0.04, 0.2), 0, 20, 0,
                    DEVICE, seed=0, channels_last=True,
                    on_iteration=lambda it, metrics: losses.append(metrics["loss"]))
    return losses


def test_twenty_ddp_steps_with_nccl_and_sync_batchnorm_on_one_gpu_match_plain_steps(tmp_path):
    """A one-process NCCL group (gloo on the CPU): the Pretrainer's DDP preparation (sparse norms
    all-reduce their statistics through NCCL, the decoder's BatchNorms become torch's SyncBatchNorm),
    20 fp32 steps of the engine, against the same steps without DDP. With one rank every all-reduce
    is the identity, so only CUDA's non-deterministic atomics separate the runs (the CPU test of 2
    processes against 1 allows 1e-4 for a different summation order)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from spark_det.train.sync_batchnorm import sync_batchnorms

    name, size, batch = ("resnet50", 128, 16) if ON_GPU else ("test_resnet", 64, 4)
    torch.manual_seed(0)
    plain = create_spark(name, decoder_width=64).to(DEVICE, memory_format=torch.channels_last)  # as the Pretrainer
    spark = copy.deepcopy(plain)
    expected = _twenty_steps(plain, plain, batch, size)
    dist.init_process_group("nccl" if ON_GPU else "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        sync_batchnorms(spark, use_torch_sync=ON_GPU)
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in spark.modules()) == ON_GPU
        ddp = DistributedDataParallel(spark, device_ids=[DEVICE.index or 0] if ON_GPU else None)
        got = _twenty_steps(ddp, spark, batch, size)
    finally:
        dist.destroy_process_group()
    assert len(got) == len(expected) == 20 and all(np.isfinite(got))
    assert got == pytest.approx(expected, rel=1e-4)


def _smooth_images(folder: Path, count: int, size: int) -> Path:
    """Smooth random colour fields (upsampled noise) as JPEGs: learnable, and no dependency beyond PIL."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        low = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        Image.fromarray(low).resize((size, size), Image.BICUBIC).save(folder / f"{i:03d}.jpg", quality=95)
    return folder


def _compile_supported() -> bool:
    from spark_det.train.config import DEFAULTS

    return "compile" in DEFAULTS


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_twenty_step_pretraining_on_the_device_in_bf16_eager_and_compiled(tmp_path, compiled):
    """The Pretrainer end to end on the device (data workers, channels_last, bf16 autocast, LAMB),
    20 iterations; with the recipe's ``compile=true`` where this version has that key."""
    from spark_det.train import Pretrainer, load_config

    if compiled and not _compile_supported():
        pytest.skip("this version's recipes have no 'compile' key (spark_det/train/config.py)")
    if compiled and not ON_GPU:
        assert load_config(ROOT / "pretrain" / "resnet18_smoke.yaml", ["compile=true"])["compile"] is True
        pytest.skip("compiling on the CPU takes minutes: tests/train covers it there")
    model, size, batch = ("resnet50", 128, 32) if ON_GPU else ("test_resnet", 64, 4)
    data = _smooth_images(tmp_path / "images", 20 * batch, size)
    overrides = [f"model={model}", f"input_size=[{size},{size}]", f"batch_size={batch}", "epochs=1", "amp=bf16",
                 "channels_last=true", "decoder_width=128", "vis_images=0", "num_workers=2", "warmup_epochs=0"]
    if compiled:
        overrides.append("compile=true")
    cfg = load_config(ROOT / "pretrain" / "resnet18_smoke.yaml", overrides)
    result = Pretrainer(cfg, data, tmp_path / "run", device=DEVICE.type, log=lambda _: None).run()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and all(np.isfinite(m["loss"]) for m in metrics)
    assert ("max_memory_mb" in metrics[-1]) == ON_GPU
    assert Path(result.encoder).is_file()
