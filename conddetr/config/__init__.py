"""Experiment configuration: the typed schema, layered loading and saving, validation, sweep expansion.

The only package in `conddetr` that reads YAML; callers import everything from here.
"""

from conddetr.config.loading import (
    COMMAND_LINE,
    CONFIG_NAME,
    config_from_dict,
    config_to_dict,
    load_config,
    run_dir_of,
    save_config,
)
from conddetr.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LaunchConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PerfConfig,
    PretrainConfig,
    SyntheticConfig,
    TrackingConfig,
)
from conddetr.config.sweep import SWEEP_KEYS, flatten_keys, load_sweep, load_sweep_runs, run_name_for
from conddetr.config.validation import CHOICES

__all__ = [
    "CHOICES", "COMMAND_LINE", "CONFIG_NAME", "SWEEP_KEYS", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "LaunchConfig", "LossConfig", "ModelConfig", "OptimConfig", "PerfConfig", "PretrainConfig", "SyntheticConfig",
    "TrackingConfig", "config_from_dict", "config_to_dict", "flatten_keys", "load_config", "load_sweep",
    "load_sweep_runs", "run_dir_of", "run_name_for", "save_config",
]  # fmt: skip
