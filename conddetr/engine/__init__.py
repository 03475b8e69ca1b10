"""Training engine: `run(cfg)` trains or evaluates one experiment in its run folder (auto-resume, DDP, checkpoints)."""

from conddetr.engine.checkpoint import CHECKPOINT_NAME, load_latest_checkpoint, save_checkpoint
from conddetr.engine.loop import NonFiniteLossError, TrainingInterrupted
from conddetr.engine.run import debug_first_step, run

__all__ = [
    "CHECKPOINT_NAME",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "debug_first_step",
    "load_latest_checkpoint",
    "run",
    "save_checkpoint",
]
