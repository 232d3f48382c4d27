"""Training: `TrainConfig` (YAML keys = flags) and the one training loop (`trainer.pretrain`)."""
