# Mask R-CNN ConvNeXt-B FPN 3x from SparK weights: the paper's MMDetection recipe.
# Paper: 51.2 AP_box / 45.1 AP_mask on COCO val (supervised ConvNeXt-B: 47.7 / 43.2).
# AdamW lr 2e-4, betas (0.9, 0.999), wd 0.05 (none on 1-D params), drop path 0.5, layer-wise lr decay
# 0.65 over num_layers 12 (MMDetection's own LearningRateDecayOptimizerConstructor), 36 epochs,
# steps at 27 / 33, DETR-style multi-scale + crop augmentation, AMP, 16 images per batch.
# Weights: tools/convert_weights.py encoder-convnext_base.pth cnx_b_spark_mmdet.pth --to mmdet
_base_ = "mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py"
custom_imports = dict(imports=["spark_det.mmdet", "spark_det.mmdet.weights_only"], allow_failed_imports=False)  # not mmpretrain
spark_checkpoint = "cnx_b_spark_mmdet.pth"
model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(_delete_=True, type="SparKConvNeXt", arch="convnext_base", drop_path_rate=0.5,
                  out_indices=(0, 1, 2, 3), init_cfg=dict(type="Pretrained", checkpoint=spark_checkpoint)),
    neck=dict(in_channels=[128, 256, 512, 1024]),
)
optim_wrapper = dict(
    type="AmpOptimWrapper",
    constructor="LearningRateDecayOptimizerConstructor",
    paramwise_cfg=dict(decay_rate=0.65, decay_type="layer_wise", num_layers=12),
    optimizer=dict(_delete_=True, type="AdamW", lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
)
