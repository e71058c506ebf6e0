"""Preparing a SparK model for DDP never replaces a sparse layer; only dense BatchNorms become synchronised."""

import pytest
import torch.nn as nn

from spark_det.model import create_spark
from spark_det.sparse.layers import SparseLayer
from spark_det.train.sync_batchnorm import DenseSyncBatchNorm2d, StillSparseError, assert_still_sparse, sync_batchnorms


def _sparse_layers(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, SparseLayer)}


@pytest.mark.parametrize("arch", ["resnet18", "regnety_002", "convnext_atto"])
@pytest.mark.parametrize("cuda_branch", [True, False], ids=["torch-SyncBatchNorm", "cpu-sync"])
def test_ddp_preparation_keeps_every_sparse_layer_and_syncs_the_dense_ones(arch, cuda_branch):
    spark = create_spark(arch, decoder_width=64)
    before = _sparse_layers(spark)
    dense_bns = [n for n, m in spark.named_modules() if type(m) is nn.BatchNorm2d and n.startswith("decoder.")]
    assert before and dense_bns
    sync_batchnorms(spark, use_torch_sync=cuda_branch)
    assert _sparse_layers(spark) == before
    synced = nn.SyncBatchNorm if cuda_branch else DenseSyncBatchNorm2d
    modules = dict(spark.named_modules())
    assert all(type(modules[n]) is synced for n in dense_bns)
    synchronised = [m for m in spark.modules() if hasattr(m, "sparse_sync")]
    assert synchronised and all(m.sparse_sync is True for m in synchronised)


def test_the_check_fails_loudly_when_a_sparse_layer_was_replaced():
    spark = create_spark("resnet18", decoder_width=64)
    before = _sparse_layers(spark)
    spark.encoder.model.bn1 = nn.SyncBatchNorm.convert_sync_batchnorm(spark.encoder.model.bn1)  # what torch's
    with pytest.raises(StillSparseError, match="encoder.model.bn1"):                            # converter did
        assert_still_sparse(spark, before)
