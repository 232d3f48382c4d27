"""Training: `TrainConfig` and `FinetuneConfig` (YAML keys = flags, `config.py`), the one training loop
(`trainer.pretrain`, `trainer.train`) and fine-tuning jobs on it (`finetune.finetune`); both return a `Run`."""
