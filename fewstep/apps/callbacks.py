"""Callbacks for `fewstep.fit` that sample or plot: preview grids with quick metrics
(`SamplePreviews`) and the loss curves (`LossCurves`). The loop itself knows only the `Callback`
protocol (`fewstep.training.callbacks`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fewstep.training.callbacks import Callback, Run


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


class LossCurves(Callback):
    """At the end, `<run>/loss.png`: the curves of `log.jsonl`."""

    def on_end(self, run: Run) -> None:
        from fewstep.apps.plot import plot_log, read_log

        log = run.out_dir / "log.jsonl"
        records = read_log(log) if log.exists() else []
        if records:
            name = getattr(run.method, "name", "") or type(run.method).__name__
            plot_log(records, run.out_dir / "loss.png", title=f"{name} training")
