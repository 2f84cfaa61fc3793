"""fm_train.convert."""
