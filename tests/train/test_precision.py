"""Mixed precision as users run it: bf16 / fp16 autocast keep BatchNorm statistics exact and
training on track with fp32."""

import json
from pathlib import Path

import pytest
import torch

from spark_det.cli import pretrain as pretrain_cli
from spark_det.model import SparseEncoder
from spark_det.sparse.masking import random_visible_mask
from spark_det.sparse.reference import GatherScatterBatchNorm

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_batchnorm_statistics_under_autocast_stay_finite_and_close_to_fp32(dtype):
    """Batch 16 at 224 px: the stem BatchNorm sees 16 x 112 x 112 x 0.4 = 80,282 visible positions
    per channel, more than fp16 can count (65504)."""
    torch.manual_seed(0)
    images = torch.randn(16, 3, 224, 224)
    visible = random_visible_mask(16, (7, 7), 0.6, torch.Generator().manual_seed(0))
    encoders = {}
    for precision in ("fp32", "amp"):
        torch.manual_seed(1)
        encoder = SparseEncoder("resnet18").train()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=precision == "amp"):
            encoder(images, visible)
        encoders[precision] = encoder
    norms = {n: m for n, m in encoders["amp"].named_modules() if isinstance(m, GatherScatterBatchNorm)}
    assert "model.bn1" in norms
    reference = dict(encoders["fp32"].named_modules())
    for name, bn in norms.items():
        assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all(), name
        # momentum 0.1 from (0, 1): running stats are 0.1 x the batch statistics; half-precision
        # activations (8 / 11 mantissa bits) bound the agreement, not the accumulation
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
        torch.testing.assert_close(bn.running_var, reference[name].running_var, rtol=tol, atol=tol)
        torch.testing.assert_close(bn.running_mean, reference[name].running_mean, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def images(unlabeled_images):
    return unlabeled_images(16)


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_few_steps_in_half_precision_track_fp32_and_export_a_finite_encoder(images, tmp_path, amp):
    common = ["--recipe", RECIPE, "--data", str(images), "--device", "cpu", "epochs=2", "batch_size=8",
              "warmup_epochs=0", "lr=3e-2", "vis_images=0", "accum_steps=2", "channels_last=true"]
    assert pretrain_cli.main([*common, "--output", str(tmp_path / "fp32")]) == 0
    assert pretrain_cli.main([*common, "--output", str(tmp_path / amp), f"amp={amp}"]) == 0
    fp32, half = _losses(tmp_path / "fp32"), _losses(tmp_path / amp)
    assert len(half) == len(fp32) == 4
    # The first loss is of the same weights: a mean over ~10^4 patch errors whose roundings are
    # independent, so well inside one unit roundoff of bf16 (2^-8) of fp32 whichever kernels the CPU
    # picks (native bf16/fp16 units or conversions through fp32; this CPU: 4e-4). Later losses are of
    # weights LAMB moved from slightly different gradients: on track, not bounded by rounding.
    assert half[0] == pytest.approx(fp32[0], rel=2 ** -8)
    assert half[1:] == pytest.approx(fp32[1:], rel=5e-2)
    exported = torch.load(tmp_path / amp / "encoder-resnet18.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in exported.values() if v.is_floating_point())
