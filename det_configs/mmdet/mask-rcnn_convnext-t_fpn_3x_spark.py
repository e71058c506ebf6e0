# Mask R-CNN ConvNeXt-T FPN 3x from SparK weights: the ConvNeXt-B recipe scaled to ConvNeXt-T
# (9 blocks in stage 3, so num_layers 6; drop path 0.4 and decay 0.95 as MMDetection's ConvNeXt-T
# 3x, which reaches 46.2 / 41.7 from supervised weights). Not reported by the paper.
# Weights: tools/convert_weights.py encoder-convnext_tiny.pth cnx_t_spark_mmdet.pth --to mmdet
_base_ = "./mask-rcnn_convnext-b_fpn_3x_spark.py"
spark_checkpoint = "cnx_t_spark_mmdet.pth"
model = dict(
    backbone=dict(arch="convnext_tiny", drop_path_rate=0.4, init_cfg=dict(checkpoint=spark_checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
optim_wrapper = dict(paramwise_cfg=dict(decay_rate=0.95, num_layers=6), optimizer=dict(lr=1e-4))
