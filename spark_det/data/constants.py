"""The normalisation constants of pretraining's input (ImageNet's channel statistics), kept apart
so that the model, the visualisation and the exports can name them without importing the data
pipeline."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
