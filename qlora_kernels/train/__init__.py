"""A small SFT trainer: data and masking, config, schedule, checkpoints, the loop, evaluation."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import IGNORE_INDEX, DataError, LengthGroupedBatches, collate, load_examples, read_jsonl
from .evaluate import generate, score, token_budget
from .schedule import lr_at
from .trainer import TrainingDiverged, TrainResult, train

__all__ = [
    "IGNORE_INDEX",
    "ConfigError",
    "DataError",
    "LengthGroupedBatches",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "collate",
    "generate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_examples",
    "lr_at",
    "read_jsonl",
    "save_checkpoint",
    "score",
    "token_budget",
    "train",
]
