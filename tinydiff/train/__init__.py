"""Training: one shared loop (loop.py) and one function per stage."""

from .loop import LoopConfig, TrainingDiverged, train_loop

__all__ = ["LoopConfig", "TrainingDiverged", "train_loop"]
