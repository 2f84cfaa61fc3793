"""fm_train.checkpoint."""
