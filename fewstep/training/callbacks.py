"""Callbacks for `fewstep.fit`: what a run shows while it trains.

`SamplePreviews` samples the EMA network every `every` steps and at the end: PNG grids for
images, scatter plots beside the data for vectors, and quick quality numbers with their NFE for
`metrics.json` (exact sample distances for 2-D data, pixel precision/recall on the digits).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fewstep.training.fit import Callback, Run


class SamplePreviews(Callback):
    """Sample grids every `every` steps (0: only at the end) and at the end, with metrics.

    `dataset` (optional): a `fewstep.data.Dataset`, for scatter plots beside the data and the
    metrics; `num`: samples per grid (vectors: at least 2,000); `times`: the multistep times.
    """

    def __init__(self, every: int = 500, num: int = 64, times=None, dataset=None):
        self.every, self.num, self.times, self.dataset = every, num, times, dataset

    def needs_ema(self, run: Run) -> bool:
        return bool(self.every) and run.step % self.every == 0 and run.step < run.total_steps

    def on_step(self, run: Run) -> None:
        if self.needs_ema(run):
            self.write(run, run.out_dir / "samples" / f"step-{run.step:07d}")

    def on_end(self, run: Run) -> dict:
        samples = self.write(run, run.out_dir / "samples" / "final")
        out = {"samples": sorted(str(p.relative_to(run.out_dir)) for p in (run.out_dir / "samples").glob("final*"))}
        metrics = sample_metrics(samples, self.dataset) if self.dataset is not None else {}
        if metrics:
            out["metrics"] = metrics
        return out

    def write(self, run: Run, path: Path) -> dict[str, tuple[torch.Tensor, int]]:
        """One grid (or scatter plot) per preview schedule; returns `{name: (samples, NFE)}`."""
        from fewstep.apps.generate import Model, generate
        from fewstep.image import save_image_grid, save_scatter

        info = run.data_info
        if not info:
            return {}
        model = Model.from_net(run.ema_net, run.method, info["kind"], info["shape"], run.config, run.step,
                               latents=info.get("latents"))
        model._decoder = getattr(self, "_decoder", None)  # the VAE of a latent run, loaded once
        n = self.num if info["kind"] == "image" else max(self.num, 2000)
        samples = {}
        was_training = run.ema_net.training
        run.ema_net.eval()
        for schedule in model.sampler.preview_schedules(self.times):
            x, nfe, _ = generate(model, schedule, n, progress=False)
            name = f"{schedule.steps}-step" if schedule.times else f"{schedule.sampler}-nfe{nfe}"
            samples[name] = (x, nfe)
        run.ema_net.train(was_training)
        self._decoder = model._decoder
        if info["kind"] == "image":
            for name, (x, _) in samples.items():
                save_image_grid(x, path.with_name(f"{path.stem}-{name}.png"))
        else:
            plots = {f"{k} (NFE {nfe})": x for k, (x, nfe) in samples.items()}
            if self.dataset is not None:
                plots = {"data": _reference(self.dataset, n), **plots}
            save_scatter(plots, path.with_suffix(".png"), title=path.stem)
        return samples


def _reference(dataset, n: int) -> torch.Tensor:
    return dataset.all()[0][:n]  # vectors: in memory (toys: a fixed-seed draw)


def sample_metrics(samples: dict[str, tuple[torch.Tensor, int]], dataset) -> dict:
    """Quick quality numbers for `metrics.json`, each with its NFE: exact sample-based distances
    to held-out data for vectors; pixel-space precision/recall and class coverage for the digits.
    (Image FID/KID: `fewstep eval`.)"""
    from fewstep.metrics.digits import digits_score
    from fewstep.metrics.toy import energy_distance, sliced_wasserstein

    out = {}
    for name, (x, nfe) in samples.items():
        if dataset.kind == "vector":
            ref = _reference(dataset, len(x))
            out[name] = {"nfe": nfe, "num": len(x), "sliced_wasserstein": float(sliced_wasserstein(x, ref)),
                         "energy_distance": float(energy_distance(x, ref))}
        elif tuple(x.shape[1:]) == (1, 8, 8) and dataset.name == "digits":  # pixels (decoded, for latents)
            out[name] = {"nfe": nfe, "num": len(x), **digits_score(x)}
    return out


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
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, step)
        self._add_grids(run, step)
        writer.flush()

    def _add_grids(self, run: Run, step: int) -> None:
        import re

        import numpy as np
        from PIL import Image

        for png in sorted((run.out_dir / "samples").glob("*.png")):
            if png.name in self._seen:
                continue
            self._seen.add(png.name)
            with Image.open(png) as im:
                pixels = np.asarray(im.convert("RGB"))
            name = re.sub(r"^(step-\d+|final)-?", "", png.stem) or "preview"  # step-0000500-1-step -> 1-step
            self.writer.add_image(f"samples/{name}", pixels, step, dataformats="HWC")

    def on_end(self, run: Run) -> None:
        self._add_grids(run, run.step)
        if self.writer is not None:
            self.writer.close()
