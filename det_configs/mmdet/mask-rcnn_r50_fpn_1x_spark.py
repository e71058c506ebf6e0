# Mask R-CNN R50-FPN 1x from SparK weights (MMDetection 3.x). Reference: MMDetection's supervised
# R50 1x gives 38.2 AP_box / 34.7 AP_mask; the paper reports SparK R50 only with Detectron2.
# Weights: tools/convert_weights.py encoder-resnet50.pth r50_spark_mmdet.pth --to mmdet
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["spark_det.mmdet", "spark_det.mmdet.weights_only"], allow_failed_imports=False)
spark_checkpoint = "r50_spark_mmdet.pth"
norm_cfg = dict(type="SyncBN", requires_grad=True)
model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(frozen_stages=-1, norm_cfg=norm_cfg, norm_eval=False, style="pytorch",
                  init_cfg=dict(type="Pretrained", checkpoint=spark_checkpoint)),
    neck=dict(norm_cfg=norm_cfg),
)
