"""Typed run configuration: schema, presets, YAML loading with overrides, cross-field rules."""

from fm_train.config.loader import ConfigError, build_config, dump_config, load_config, parse_override
from fm_train.config.presets import MODEL_PRESETS
from fm_train.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    ConvertConfig,
    DataConfig,
    DataSource,
    FmConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "ClusterConfig", "ConfigError", "ConvertConfig", "DataConfig", "DataSource",
    "FmConfig", "LoggingConfig", "MODEL_PRESETS", "ModelConfig", "MoEConfig", "OptimConfig", "ParallelConfig",
    "RunConfig", "TrainConfig", "build_config", "dump_config", "load_config", "parse_override",
]
