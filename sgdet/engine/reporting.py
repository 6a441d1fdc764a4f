"""Engine stage: what a run reports. Rank 0's ``metrics.jsonl`` (one JSON object per event),
TensorBoard scalars (``tb/``), ``results.md`` rows in the paper's format, the Epochs column's
notation, the run id on every metrics line and results row (a ``run`` key; a last ``Run``
column), and the logging set-up (stderr and ``OUTPUT_DIR/log.txt`` on rank 0, errors only on
the other ranks) for every pipeline's logger."""
from __future__ import annotations

import json
import logging
import os
import sys

from sgdet.checkpoint import plain
from sgdet.counting import format_count

from .distributed import DistContext
from .runlock import new_run_id

METRICS = "metrics.jsonl"
RESULTS = "results.md"
RESULTS_HEADER = ("| Model | Params | FLOPs | Top-1 (%) | Top-5 (%) | Epochs |\n"
                  "|---|---|---|---|---|---|\n")


def epochs_string(base: str | None, steps: int = 0, local: int = 0, global_: int | None = None) -> str:
    """The paper's Epochs column: ``90`` (baseline), ``90+90`` (G), ``90+6*20+90`` (LG),
    ``90+6*20`` (L)."""
    parts = [] if base is None else [str(base)]
    if steps and local:
        parts.append(f"{steps}*{local}")
    if global_:
        parts.append(str(global_))
    return "+".join(parts) if parts else "0"


class Reporter:
    """Rank 0's outputs: metrics.jsonl, TensorBoard scalars, results.md. Every other rank gets a
    disabled Reporter that writes nothing. ``run_id`` (the session's, or a new one) tags every
    metrics line and results row; a resumed run sets it back to the checkpoint's."""

    def __init__(self, output_dir: str, enabled: bool, run_id: str | None = None) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self.run_id = run_id or new_run_id()
        self._writer = None
        self._purge_step: int | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def offsets(self) -> dict:
        return {name: (os.path.getsize(self.path(name)) if os.path.exists(self.path(name)) else 0)
                for name in (METRICS, RESULTS)}

    def rewind(self, offsets: dict, tick: int) -> None:
        """Drop what was written after the checkpoint being resumed (it will be written again)."""
        if not self.enabled:
            return
        for name, size in (offsets or {}).items():
            p = self.path(name)
            if os.path.exists(p) and os.path.getsize(p) > size:
                with open(p, "r+b") as handle:
                    handle.truncate(size)
        self._purge_step = tick

    def metrics(self, record: dict) -> None:
        if not self.enabled:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.path(METRICS), "a") as handle:
            handle.write(json.dumps(plain({"run": self.run_id, **record}), sort_keys=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def scalars(self, tick: int, values: dict) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self.path("tb"), purge_step=self._purge_step)
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), tick)
        self._writer.flush()

    def results_row(self, row: dict) -> str:
        line = (f"| {row['model']} | {format_count(row['params'])} | {format_count(row['flops'])} | "
                f"{row['top1']:.2f} | {row['top5']:.2f} | {row['epochs']} |\n")
        return self.results_line(line, RESULTS_HEADER)

    def results_line(self, line: str, header: str) -> str:
        """Append ``line`` to results.md (``header`` first when the file is new), with this run's
        id in a last ``Run`` column."""
        title, rule = header.rstrip("\n").split("\n")
        header = f"{title} Run |\n{rule}---|\n"
        line = f"{line.rstrip()} {self.run_id} |\n"
        if self.enabled:
            new = not os.path.exists(self.path(RESULTS)) or os.path.getsize(self.path(RESULTS)) == 0
            with open(self.path(RESULTS), "a") as handle:
                handle.write((header if new else "") + line)
                handle.flush()
                os.fsync(handle.fileno())
        return line

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_HANDLER_TAG = "_sgdet_engine"
LOGGERS = ("sgdet", "classification", "transfer")    # the pipelines' loggers (and their children)


def teardown_logging() -> None:
    """Remove the handlers setup_logging added (in-process callers, tests)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if getattr(h, _HANDLER_TAG, False):
                logger.removeHandler(h)
                h.close()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def setup_logging(ctx: DistContext, output_dir: str | None = None, stream=None) -> None:
    """Rank 0 logs INFO to ``stream`` (stderr) and OUTPUT_DIR/log.txt; other ranks only errors."""
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S")
    teardown_logging()                 # a second setup (sweep runs, tests) replaces the first
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.propagate = False
        if not ctx.is_main:
            logger.setLevel(logging.ERROR)
        else:
            logger.setLevel(logging.INFO)
        handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
        if ctx.is_main and output_dir:
            os.makedirs(output_dir, exist_ok=True)
            handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt")))
        for h in handlers:
            setattr(h, _HANDLER_TAG, True)
            h.setFormatter(fmt)
            logger.addHandler(h)
