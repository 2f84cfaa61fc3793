"""fm_train.engine."""
