"""Training: stage specs, the Ray Train + DeepSpeed worker loop, the launcher."""
