"""Parallelism applied to the pure model from outside: tensor-parallel plan, pipeline stages, DeepSpeed JSON."""
