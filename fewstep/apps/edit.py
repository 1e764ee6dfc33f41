"""Editing a checkpoint's images, task by task: what `fewstep edit` runs, on top of the editing
algorithms of `fewstep.core.editing` (which take a consistency function, not a checkpoint).

    model = load_model("runs/digits")
    x = edit_inputs(model, num=8)                                   # test images of the training data
    shown, edited = edit_images(model, "inpaint", x, edit_times(4))  # what the model saw, what it made

Tasks: inpaint, colorize, superres (super-resolution), sdedit (from coarse strokes of the
inputs), denoise, and interpolate (between two noises: no inputs, `interpolation_frames`).

Latent models (`data.vae`) edit through the VAE where the task allows it: `sdedit` encodes the
strokes, edits in latents and decodes; `interpolate` decodes its frames. The other tasks constrain
pixels (a hole, a luminance, a low-resolution image, pixel noise of known std), and a VAE's latents
do not expose pixels linearly, so they are refused for latent models.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TASKS = ("inpaint", "colorize", "superres", "sdedit", "denoise", "interpolate")
ONE_STEP_TASKS = ("denoise", "interpolate")  # one evaluation per image, whatever the times
LATENT_TASKS = ("sdedit", "interpolate")  # the tasks a latent model can do through its VAE


def edit_times(steps: int, first: float = math.pi / 2, low: float = 0.2) -> list[float]:
    """`first`, then `steps - 1` times evenly from min(1.1, first) down to `low`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [first]
    top = min(1.1, first * 0.75) if first < math.pi / 2 else 1.1
    low = min(low, top / 2)  # a small `first` (SDEdit's t0) still gets decreasing times
    return [first] + [float(t) for t in torch.linspace(top, low, steps - 1)]


def task_nfe(task: str, times) -> int:
    """Network evaluations per edited image."""
    return 1 if task in ONE_STEP_TASKS else len(times)


def check_editable(model) -> None:
    """Editing needs a consistency model of images (a `fewstep.apps.generate.Model`)."""
    if model.sampler.consistency_fn() is None:
        raise ValueError(f"editing needs a consistency model; {model.checkpoint} is a {model.method_name!r} model")
    if model.kind != "image":
        raise ValueError("editing works on image models")


def edit_inputs(model, spec: str | None = None, num: int = 8, seed: int = 0) -> torch.Tensor:
    """`num` images picked at random (seeded) from dataset `spec` (default: the checkpoint's
    training data, test split where there is one), resized like the training data, on the
    model's device."""
    from fewstep.data import unpack_batch
    from fewstep.apps.evaluate import load_reference, reference_name, training_data

    data = training_data(model)
    ds, _ = load_reference(reference_name(model, spec), None, resolution=data.get("resolution"),
                           channels=data.get("channels"))
    if ds.kind != "image" or tuple(ds.shape) != tuple(model.output_shape):
        raise ValueError(f"editing needs images shaped like the model's {tuple(model.output_shape)}; "
                         f"the input holds {ds.kind}s {tuple(ds.shape)}")
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num]
    x, _ = unpack_batch(ds.__getitems__(pick.tolist()))  # only the picked images are read
    return x.to(model.device)


def _labels(model, batch: int, label: int | None) -> torch.Tensor | None:
    """Class-conditional models: `label`, else the null label (unconditional)."""
    if not model.num_classes:
        return None
    if label is not None and not 0 <= label < model.num_classes:
        raise ValueError(f"label must be in [0, {model.num_classes}), got {label}")
    return torch.full((batch,), model.num_classes if label is None else label, device=model.device)


def edit_images(model, task: str, x: torch.Tensor, times, *, mask: str = "center", fraction: float = 0.25,
                factor: int = 2, sigma: float = 0.3, label: int | None = None,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit images `x` with a consistency checkpoint's `model` at `times`; returns `(shown,
    edited)`: what the model was given (masked with the hole black / grey / low-res upsampled /
    noisy / strokes) and the result. Options: `mask` and `fraction` (inpaint), `factor`
    (superres), `sigma` (denoise: the noise std added), `label` (class-conditional models)."""
    from fewstep.core import editing

    check_editable(model)
    if task not in TASKS or task == "interpolate":
        raise ValueError(f"task must be one of {', '.join(t for t in TASKS if t != 'interpolate')} "
                         f"(interpolate: interpolation_frames), got {task!r}")
    if model.latents and task not in LATENT_TASKS:
        raise ValueError(f"a latent model edits with {' and '.join(LATENT_TASKS)} only: {task} constrains pixels, "
                         f"which the VAE's latents do not expose linearly")
    fn = model.sampler.consistency_fn(_labels(model, x.shape[0], label))
    sd = model.sigma_d
    gen = torch.Generator(device=model.device).manual_seed(seed)
    if task == "inpaint":
        hole = editing.inpaint_mask(x.shape, mask, fraction, seed).to(x)
        return x * (1 - hole) - hole, editing.inpaint(fn, x, hole, times, sd, gen)
    if task == "colorize":
        if model.shape[0] != 3:
            raise ValueError("colorization needs an RGB model (data.channels=3)")
        grey = (editing.luminance(x) / editing.colour_matrix(x.dtype)[0].sum()).expand_as(x)  # equal luminance
        return grey, editing.colorize(fn, x, times, sd, gen)
    if task == "superres":
        if factor < 2 or model.shape[-1] % factor:
            raise ValueError(f"the super-resolution factor must be >= 2 and divide the image size "
                             f"{model.shape[-1]}, got {factor}")
        low = F.avg_pool2d(x, factor)
        return F.interpolate(low, scale_factor=factor, mode="nearest"), editing.super_resolve(fn, low, factor, times,
                                                                                                sd, gen)
    if task == "denoise":
        noisy = x + sigma * torch.randn(x.shape, device=x.device, generator=gen)
        return noisy, editing.denoise(fn, noisy, sigma, sd)
    # sdedit: coarse strokes of the input (4x4 blocks, 3 grey levels)
    block = max(1, x.shape[-1] // 4)
    strokes = F.interpolate(F.avg_pool2d(x, block), scale_factor=block, mode="nearest")
    strokes = (strokes * 1.5).round().clamp(-1, 1)
    return strokes, model.decode(editing.sdedit(fn, model.encode(strokes), times, sd, gen))


def interpolation_frames(model, num: int, frames: int, *, label: int | None = None, seed: int = 0) -> torch.Tensor:
    """One-step samples along the spherical interpolation between two seeded noises, for `num`
    pairs: returns (frames, num, *shape)."""
    from fewstep.core import editing

    check_editable(model)
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    shape = (num, *model.shape)
    z0 = torch.randn(shape, device=model.device, generator=gen)
    z1 = torch.randn(shape, device=model.device, generator=gen)
    fn = model.sampler.consistency_fn(_labels(model, num, label))
    out = editing.interpolate(fn, z0, z1, torch.linspace(0, 1, frames).tolist(), model.sigma_d)
    return model.decode(out.flatten(0, 1)).unflatten(0, (frames, num)) if model.latents else out
