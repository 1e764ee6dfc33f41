"""Plots of runs and evaluations (PNG): what `fewstep plot` writes (its command line is in
`fewstep.cli.plot`).

- A run folder (or its `log.jsonl`): every logged statistic against the step -> `training_curves.png`.
- An eval JSON (`fewstep eval`): each score against NFE, one line per (method, sampler) ->
  `<name>_vs_nfe.png`; several eval JSONs given together share one plot.
- Sample grids (images) or scatter plots (vectors) next to them, when the checkpoint is there:
  `<name>-<sampler>-nfe<k>.png`, re-sampled with the evaluation's seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

_SKIP = {"step"}  # x axis, not a curve
_TITLES = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall",
           "sliced_wasserstein": "sliced Wasserstein", "mmd": "MMD^2", "energy_distance": "energy distance"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def read_log(path: str | Path) -> list[dict]:
    """The records of a run's `log.jsonl` (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def _wide_positive(values: list[float]) -> bool:
    return min(values) > 0 and max(values) / min(values) > 50


def plot_log(log: str | Path | list[dict], out: str | Path, title: str = "") -> Path:
    """Every numeric statistic of a run's log against the step, one panel each (log scale
    where a positive statistic spans more than a factor 50)."""
    records = read_log(log) if isinstance(log, (str, Path)) else log
    keys = []
    for r in records:
        keys += [k for k, v in r.items() if k not in _SKIP and k not in keys
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not keys:
        raise ValueError(f"no logged statistics to plot in {log if isinstance(log, (str, Path)) else 'the log'}")
    plt = _pyplot()
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.9 * nrow), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))
               and math.isfinite(float(r[key]))]
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1.2)
            if _wide_positive([v for _, v in pts]):
                ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out)


def read_eval(path: str | Path) -> dict:
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read eval JSON {path}: {e}") from None
    if not isinstance(result, dict) or "rows" not in result or "metrics" not in result:
        raise ValueError(f"{path} is not a `fewstep eval` JSON (no rows/metrics)")
    return result


def plot_eval(results: list[dict], out: str | Path, labels: list[str] | None = None) -> Path:
    """Each metric against NFE (log x axis when NFE spans more than a factor 8), a line per
    (result, method, sampler); the sample count goes in the title."""
    if not results:
        raise ValueError("no eval results to plot")
    labels = labels or [""] * len(results)
    metrics = [m for m in results[0]["metrics"] if all(m in r["metrics"] for r in results)]
    if not metrics:
        raise ValueError("these eval results share no metric (images and vectors mixed?)")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    nfes = [row["nfe"] for r in results for row in r["rows"]]
    for ax, metric in zip(axes[0], metrics):
        for result, label in zip(results, labels):
            groups: dict[tuple[str, str], list[tuple[int, float]]] = {}
            for row in result["rows"]:
                groups.setdefault((row["method"], row["sampler"]), []).append((row["nfe"], row[metric]))
            for (method, sampler), pts in groups.items():
                pts.sort()
                name = " ".join(s for s in (label, method if method != label else "", sampler) if s)
                ax.plot([n for n, _ in pts], [v for _, v in pts], "o-", ms=4, label=name)
        if nfes and max(nfes) / min(nfes) > 8:
            ax.set_xscale("log")
            ticks = sorted(set(nfes))
            ax.set_xticks(ticks if len(ticks) <= 8 else ticks[:: math.ceil(len(ticks) / 8)])
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("NFE")
        ax.set_title(_TITLES.get(metric, metric), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ns = sorted({r["num"] for r in results})
    refs = sorted({f"{r['reference']['name']}" + (f" {r['reference']['split']}" if r['reference'].get('split') else "")
                   for r in results})
    feats = sorted({r["features"]["name"] for r in results if "features" in r})
    fig.suptitle(f"N = {', '.join(map(str, ns))} samples vs {', '.join(refs)}"
                 + (f" ({', '.join(feats)})" if feats else ""), fontsize=10)
    return _save(fig, out)


def sample_grids(checkpoint: str | Path, out_dir: str | Path, schedules=None, *, num: int = 64, seed: int = 0,
                 device: str = "auto", guidance: float = 1.0, prefix: str = "grid", ema: bool = True) -> list[Path]:
    """Sample grids (images) or scatter plots (vectors, beside the data) of a checkpoint, one per
    schedule (default: the `fewstep eval` default rows). Returns the written paths."""
    from fewstep.devices import resolve_device
    from fewstep.apps.evaluate import first_examples, load_reference, training_data
    from fewstep.apps.generate import generate, load_model
    from fewstep.image import save_image_grid, save_scatter

    model = load_model(checkpoint, resolve_device(device), ema)
    plan = schedules or model.sampler.schedules()
    out_dir = Path(out_dir)
    written = []
    data = None
    if model.kind == "vector" and training_data(model).get("name"):  # the data beside the samples
        ds, _ = load_reference(training_data(model)["name"], None)
        data = first_examples(ds, max(num, 2000))
    for schedule in plan:
        n = num if model.kind == "image" else max(num, 2000)
        x, nfe, _ = generate(model, schedule, n, seed=seed, guidance=guidance, progress=False)
        path = out_dir / f"{prefix}-{schedule.sampler}-nfe{nfe}.png"
        if model.kind == "image":
            save_image_grid(x, path)
        else:
            shown = {} if data is None else {"data": data}
            save_scatter({**shown, f"{schedule.sampler}, NFE {nfe}": x}, path,
                         title=f"{model.method_name} step {model.step}")
        written.append(path)
    return written


def _warn_skipped(path: Path, error: Exception) -> None:
    import warnings

    warnings.warn(f"no sample grids for {path}: {error}", stacklevel=3)


def _schedules_of(result: dict):
    from fewstep.apps.generate import Schedule

    return [Schedule(r["sampler"], int(r["steps"]), tuple(r.get("times", ()))) for r in result["rows"]]


def plot_paths(paths: list[str | Path], out_dir: str | Path | None = None, *, samples: bool = True,
               num: int = 64, device: str = "auto",
               on_skip: Callable[[Path, Exception], None] | None = None) -> list[Path]:
    """Everything `fewstep plot` writes for these run folders, logs and eval JSONs. A run folder
    whose checkpoint cannot be sampled still gets its other plots: `on_skip(folder, error)` is
    told (default: a warning)."""
    from fewstep.training.checkpoint import list_checkpoints

    written: list[Path] = []
    evals: list[tuple[Path, dict]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"not found: {path}")
        if path.is_dir():
            dest = Path(out_dir) if out_dir else path
            found = False
            if (path / "log.jsonl").is_file():
                written.append(plot_log(path / "log.jsonl", dest / "training_curves.png", title=path.name))
                found = True
            if (path / "eval.json").is_file():
                evals.append((path / "eval.json", read_eval(path / "eval.json")))
                found = True
            if samples and (list_checkpoints(path / "checkpoints") or list_checkpoints(path)):
                ev = next((r for p, r in evals if p.parent == path), None)
                try:
                    written += sample_grids(path, dest, _schedules_of(ev) if ev else None, num=num,
                                            seed=ev["seed"] if ev else 0, device=device)
                except ValueError as e:  # e.g. an unregistered network: the other plots still count
                    (on_skip or _warn_skipped)(path, e)
                found = True
            if not found:
                raise ValueError(f"{path} holds no log.jsonl, eval.json or checkpoint to plot")
        elif path.suffix == ".jsonl":
            written.append(plot_log(path, (Path(out_dir) if out_dir else path.parent) / f"{path.stem}_curves.png"))
        else:
            result = read_eval(path)
            evals.append((path, result))
            ckpt = Path(result.get("checkpoint", ""))
            if samples and ckpt.is_file():
                dest = Path(out_dir) if out_dir else path.parent
                written += sample_grids(ckpt, dest, _schedules_of(result), num=num, seed=result.get("seed", 0),
                                        device=device, guidance=result.get("guidance", 1.0), prefix=path.stem,
                                        ema=result.get("weights", "ema") == "ema")
    if len(evals) == 1:
        p, r = evals[0]
        written.append(plot_eval([r], (Path(out_dir) if out_dir else p.parent) / f"{p.stem}_vs_nfe.png"))
    elif evals:
        names = [p.parent.name if p.name == "eval.json" else p.stem for p, _ in evals]
        dest = Path(out_dir) if out_dir else evals[0][0].parent
        written.append(plot_eval([r for _, r in evals], dest / "scores_vs_nfe.png", labels=names))
    return written
