"""Training: the run loop and its state.

- cli.py: `alphadrive-ray train` and `python -m alphadrive_ray.train` (the Ray job entrypoint);
- trainer.py: the Trainer (SFT warm-up, GRPO, evaluation, weight sync) and `train()`;
- checkpoint.py: resumable checkpoints (atomic commit, pruning, the KL reference);
- zero_checkpoint.py: DeepSpeed ZeRO checkpoints merged or re-sharded (elastic resume);
- export.py: `alphadrive-ray export`, a checkpoint to a Hugging Face model;
- schedule.py: learning-rate schedules and the epoch sampler.
"""
