# Mask R-CNN RegNetY-4GF FPN 1x from SparK weights (MMDetection 3.x): the R50 SparK config with
# the generic timm backbone (SparKTimm), which loads the spark-det export itself, every tensor checked.
# Not reported by the paper. Weights: --cfg-options model.backbone.checkpoint=encoder-regnety_040.pth
_base_ = "./mask-rcnn_r50_fpn_1x_spark.py"
spark_checkpoint = "encoder-regnety_040.pth"
model = dict(
    backbone=dict(_delete_=True, type="SparKTimm", arch="regnety_040", checkpoint=spark_checkpoint,
                  drop_path_rate=0.05),
    neck=dict(in_channels=[128, 192, 512, 1088]),
)
