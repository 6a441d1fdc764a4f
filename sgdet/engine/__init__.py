"""The one training engine of the suite, shared by classification, transfer and detection.

``trainer`` (the Trainer: loop with a loss-dict ``run_step``, evaluation, runs), ``compression``
(its Algorithm-1 run), ``checkpointing`` (run state and exact resume), ``data`` (skipping
collate, shard and resumable samplers), ``distributed`` (torchrun/DDP helpers), ``launch``
(detectron2-style multi-process launcher), ``reporting`` (metrics, TensorBoard, results rows,
logging), ``rng``, ``cli`` (shared command-line helpers and the run session) and ``validation``
(config value checks). ``import sgdet`` does not load this package."""
from .distributed import DistContext
from .trainer import Trainer

__all__ = ["Trainer", "DistContext"]
