"""trainer: the 3D CT vision encoder, its losses, streaming data, DeepSpeed training and evaluation."""
