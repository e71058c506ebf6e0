# Mask R-CNN ConvNeXt-S FPN 3x from SparK weights: the ConvNeXt-B recipe with ConvNeXt-S's
# stochastic depth (0.4, as MMDetection's ConvNeXt-S 3x). Not reported by the paper.
# Weights: tools/convert_weights.py encoder-convnext_small.pth cnx_s_spark_mmdet.pth --to mmdet
_base_ = "./mask-rcnn_convnext-b_fpn_3x_spark.py"
spark_checkpoint = "cnx_s_spark_mmdet.pth"
model = dict(
    backbone=dict(arch="convnext_small", drop_path_rate=0.4, init_cfg=dict(checkpoint=spark_checkpoint)),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
