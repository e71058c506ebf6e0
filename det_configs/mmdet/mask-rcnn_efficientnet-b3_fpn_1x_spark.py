# Mask R-CNN EfficientNet-B3 FPN 1x from SparK weights (MMDetection 3.x): the R50 SparK config with
# the generic timm backbone (SparKTimm), which loads the spark-det export itself, every tensor checked.
# Not reported by the paper. Weights: --cfg-options model.backbone.checkpoint=encoder-efficientnet_b3.pth
_base_ = "./mask-rcnn_r50_fpn_1x_spark.py"
spark_checkpoint = "encoder-efficientnet_b3.pth"
model = dict(
    backbone=dict(_delete_=True, type="SparKTimm", arch="efficientnet_b3", checkpoint=spark_checkpoint,
                  drop_path_rate=0.1),
    neck=dict(in_channels=[32, 48, 136, 384]),
)
