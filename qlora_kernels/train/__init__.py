"""A small SFT trainer: data and masking, config, plan, schedule, checkpoints, the loop, evaluation."""

from .checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .data import IGNORE_INDEX, DataError, LengthGroupedBatches, collate, load_examples, read_jsonl
from .evaluate import generate, score, token_budget
from .plan import RunPlan, plan_run
from .schedule import lr_at
from .trainer import TrainingDiverged, TrainingStopped, TrainResult, train

__all__ = [
    "IGNORE_INDEX",
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigError",
    "DataError",
    "LengthGroupedBatches",
    "RunPlan",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingStopped",
    "collate",
    "generate",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_examples",
    "lr_at",
    "plan_run",
    "read_jsonl",
    "save_checkpoint",
    "score",
    "token_budget",
    "train",
]
