"""Callbacks: what `fewstep.fit` lets other code do while a run trains, and the loggers that need
nothing but the records (TensorBoard, Weights & Biases). Callbacks that sample or plot live in
`fewstep.apps.callbacks` (the loop knows no sampler and no plotting).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Run:
    """What callbacks see of a run in progress."""

    out_dir: Path
    net: torch.nn.Module
    ema_net: torch.nn.Module
    method: object
    data_info: dict  # kind, shape, num_classes
    total_steps: int
    step: int = 0
    config: dict = field(default_factory=dict)


class Callback:
    """Hooks of `fit`, called on the main process only. Override what you need."""

    def on_log(self, run: Run, record: dict) -> None:
        """After each JSONL record (every `log_every` steps)."""

    def on_step(self, run: Run) -> None:
        """After each optimizer step (`run.step` counts the steps done)."""

    def on_end(self, run: Run) -> dict | None:
        """At the end; a returned dict is merged into `metrics.json`."""

    def needs_ema(self, run: Run) -> bool:
        """Called on EVERY process before `on_step`: whether `run.ema_net` will be used at this
        step (under fsdp its full weights are then gathered, a collective)."""
        return False


def _scalars(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _new_grids(run: Run, seen: set[str]):
    """The preview PNGs written since the last call, as (name, HxWx3 uint8 array)."""
    import numpy as np
    from PIL import Image

    for png in sorted((run.out_dir / "samples").glob("*.png")):
        if png.name in seen:
            continue
        seen.add(png.name)
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("RGB"))
        yield re.sub(r"^(step-\d+|final)-?", "", png.stem) or "preview", pixels  # step-0000500-1-step -> 1-step


class TensorBoard(Callback):
    """Logs every JSONL record's numbers as TensorBoard scalars, and the preview grids as images,
    to `<run>/tensorboard` (`train.tensorboard`; needs the `tensorboard` extra)."""

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.tensorboard needs TensorBoard: pip install 'fewstep[tensorboard]'") from None
        self._writer_cls = SummaryWriter
        self.writer = None
        self._seen: set[str] = set()

    def _open(self, run: Run):
        if self.writer is None:
            self.writer = self._writer_cls(str(run.out_dir / "tensorboard"))
        return self.writer

    def on_log(self, run: Run, record: dict) -> None:
        writer = self._open(run)
        step = int(record.get("step", run.step))
        for key, value in _scalars(record).items():
            writer.add_scalar(key, value, step)
        self._add_grids(run, step)
        writer.flush()

    def _add_grids(self, run: Run, step: int) -> None:
        for name, pixels in _new_grids(run, self._seen):
            self.writer.add_image(f"samples/{name}", pixels, step, dataformats="HWC")

    def on_end(self, run: Run) -> None:
        if self.writer is not None:
            self._add_grids(run, run.step)
            self.writer.close()


class WandB(Callback):
    """Logs what `TensorBoard` logs (every record's numbers, the preview grids) and the run's config
    to Weights & Biases (`train.wandb`; needs the `wandb` extra). A resumed run continues the same
    W&B run (its id is kept in `<run>/wandb-id`). Files go to `$WANDB_DIR`, else the run folder;
    `WANDB_MODE=offline` logs without a network."""

    def __init__(self, project: str | None = None):
        try:
            import wandb
        except ImportError:
            raise ImportError("train.wandb needs Weights & Biases: pip install 'fewstep[wandb]'") from None
        self._wandb, self.project, self.run = wandb, project or "fewstep", None
        self._seen: set[str] = set()

    def _open(self, run: Run):
        if self.run is None:
            id_file = run.out_dir / "wandb-id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.run = self._wandb.init(project=self.project, name=run.out_dir.name, id=run_id, resume="allow",
                                        config=run.config, dir=os.environ.get("WANDB_DIR", str(run.out_dir)))
        return self.run

    def on_log(self, run: Run, record: dict) -> None:
        step = int(record.get("step", run.step))
        self._open(run).log({**_scalars(record), **self._grids(run)}, step=step)

    def _grids(self, run: Run) -> dict:
        return {f"samples/{name}": self._wandb.Image(pixels) for name, pixels in _new_grids(run, self._seen)}

    def on_end(self, run: Run) -> None:
        if self.run is not None:
            grids = self._grids(run)
            if grids:
                self.run.log(grids, step=run.step)
            self.run.finish()
