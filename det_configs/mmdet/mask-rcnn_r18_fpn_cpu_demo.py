# The CPU demo (make demo): ResNet-18 FPN at 96 px, 64-channel FPN, small heads and head budgets, GroupNorm
# in FPN and mask head (batch 2). Not a paper recipe.
# The demo freezes the backbone (model.backbone.frozen_stages=4, norm_eval=True); its longer benchmark does not.
# Set the weights with --cfg-options model.backbone.init_cfg.checkpoint=PATH (or init_cfg=None).
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["spark_det.mmdet", "spark_det.mmdet.weights_only"], allow_failed_imports=False)
norm_cfg = dict(type="BN", requires_grad=True)
# GroupNorm in FPN and mask head, not the paper's SyncBN: with 2 images per batch BatchNorm's statistics
# (and the running ones the evaluation uses) are noise; GN (Wu & He, 2018) is the small-batch norm.
head_norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)
model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(depth=18, frozen_stages=-1, norm_cfg=norm_cfg, norm_eval=False, style="pytorch",
                  init_cfg=dict(type="Pretrained", checkpoint="r18_spark_mmdet.pth")),
    # 64-channel FPN and heads (256 in the paper): FPN, RPN and heads cost 0.6x of 128 channels on CPU.
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=64, norm_cfg=head_norm_cfg),
    rpn_head=dict(in_channels=64, feat_channels=64, anchor_generator=dict(scales=[2])),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=64), bbox_head=dict(in_channels=64, fc_out_channels=256),
                  mask_roi_extractor=dict(out_channels=64),
                  # 4 x 256 convs in the paper; 2 x 64 is a third of the CPU step less
                  mask_head=dict(in_channels=64, num_convs=2, conv_out_channels=64, norm_cfg=head_norm_cfg)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=256, max_per_img=64), rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(rpn=dict(nms_pre=256, max_per_img=64), rcnn=dict(max_per_img=50)),
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomChoiceResize", scales=[(144, 80), (144, 96), (144, 112)], keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(144, 96), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(pipeline=train_pipeline, filter_cfg=dict(filter_empty_gt=True, min_size=4)))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(_delete_=True, type="OptimWrapper",
                     optimizer=dict(type="AdamW", lr=0.002, betas=(0.9, 0.999), weight_decay=0.05),
                     paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=100, val_interval=100)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=10),
    dict(type="MultiStepLR", by_epoch=False, milestones=[67, 89], gamma=0.25),
]
default_hooks = dict(checkpoint=dict(type="CheckpointHook", interval=50, by_epoch=False, max_keep_ckpts=1),
                     logger=dict(type="LoggerHook", interval=10))
log_processor = dict(by_epoch=False)
