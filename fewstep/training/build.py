"""From a config to the objects `fit` takes: `build(cfg)` makes the network, method (with its
teacher), data, optimizer and the loop's options; `train(cfg, out_dir)` is `fit(*build(cfg), ...)`.
This is what `fewstep train` runs; Python users can call `fit` on objects of their own instead.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fewstep.config import Config, ConfigError
from fewstep.devices import resolve_device
from fewstep.training.distributed import main_process
from fewstep.training.optimizers import new_optimizer
from fewstep.training.registries import build_method, validate_against_registries, validate_network


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    return new_optimizer(cfg.name, params, cfg.lr, cfg.betas, cfg.weight_decay, cfg.eps)


def learning_rate(cfg, step: int, total_steps: int) -> float:
    """Linear warmup, then constant, cosine or linear decay to 0 at `total_steps`, or EDM2's
    inverse square-root decay."""
    lr = cfg.lr
    if cfg.warmup_steps > 0:
        lr *= min(1.0, (step + 1) / cfg.warmup_steps)
    progress = min(1.0, max(0, step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        lr *= 1 - progress
    elif cfg.schedule == "inv_sqrt":
        lr /= math.sqrt(max(step / cfg.decay_start, 1.0))
    return lr


def load_data(cfg: Config):
    """The run's dataset (`data.name` and its options), mirrored when `data.xflip`; with `data.vae`,
    its latents (encoded once into fewstep's cache, `latent_cache_dir()`)."""
    from fewstep.data import XFlip, load_dataset
    from fewstep.interop.diffusers.latents import LatentDataset

    dataset = load_dataset(cfg.data.name, resolution=cfg.data.resolution, channels=cfg.data.channels,
                           **cfg.data.options)
    if cfg.data.vae and not isinstance(dataset, LatentDataset):
        dataset = _encoded(cfg, dataset)
    if cfg.data.latent_mean is not None:
        if not isinstance(dataset, LatentDataset):
            raise ConfigError("data.latent_mean/latent_std normalize latents: give data.vae or a latents file")
        dataset.normalize(cfg.data.latent_mean, cfg.data.latent_std)
    return XFlip(dataset) if cfg.data.xflip else dataset


def latent_cache_dir() -> Path:
    """Where `data.vae` runs keep their encoded datasets ($FEWSTEP_CACHE, default ~/.cache/fewstep)."""
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep")) / "latents"


def _encoded(cfg: Config, dataset):
    """`dataset` encoded with `data.vae`: from the cache, or encoded now (keyed by data and VAE)."""
    import hashlib
    import json

    from fewstep.interop.diffusers.latents import LatentDataset, encode_dataset
    from fewstep.interop.diffusers.pretrained import resolve_pretrained

    vae_dir = resolve_pretrained(cfg.data.vae)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in vae_dir.rglob("*.safetensors"))
    source = {"name": cfg.data.name, "resolution": cfg.data.resolution, "channels": cfg.data.channels,
              "options": cfg.data.options}
    where = [str(Path(p).resolve()) if Path(p).exists() else p for p in (cfg.data.name, cfg.data.vae)]
    key = hashlib.sha256(json.dumps([source, where, weights], sort_keys=True, default=str).encode())
    path = latent_cache_dir() / f"{key.hexdigest()[:20]}.safetensors"
    if not path.exists():
        if main_process():
            print(f"encoding {len(dataset)} images of {cfg.data.name!r} with the VAE {cfg.data.vae} -> {path}")
        encode_dataset(dataset, cfg.data.vae, path, source=source, progress=cfg.train.progress)
    return LatentDataset(path, name=cfg.data.name)  # a prompt dataset's captions are in its record


def default_workers(dataset) -> int:
    """Worker processes: none for data already in memory (nothing to overlap), else up to 4."""
    from fewstep.data import GaussianDataset, TensorDataset, ToyDataset

    inner = getattr(dataset, "dataset", dataset)  # through XFlip
    if isinstance(inner, (TensorDataset, ToyDataset, GaussianDataset)):
        return 0
    return min(4, os.cpu_count() or 1)


def _latent_method(cfg: Config, dataset) -> dict:
    """The `method` section for `dataset`: on latent data, the measured sigma_d becomes the
    method's unless the config sets one."""
    latents = getattr(dataset, "latents", None)
    if not latents:
        return cfg.method
    measured = float(latents["sigma_d"])
    method = {"sigma_d": round(measured, 6), **cfg.method}
    if main_process():
        print(f"latents {tuple(dataset.shape)} of {tuple(latents['pixel_shape'])} images (VAE {latents['vae']}): "
              f"sigma_d = {measured:.4f} measured; method.sigma_d = {method['sigma_d']}")
    return method


def _local_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def load_teacher(path: str, method, dataset, device: torch.device, scheduler: str | None = None):
    """The diffusion teacher of `train.teacher`, checked against the run, handed to `method`."""
    from fewstep.interop.diffusers.pretrained import PretrainedError, is_diffusers_folder, is_hub_id
    from fewstep.training.restore import restore, restore_diffusers

    try:
        if is_diffusers_folder(path) or is_hub_id(path):  # a diffusers model, converted to TrigFlow exactly
            teacher = restore_diffusers(path, device, method.sigma_d, scheduler)
        else:
            teacher = restore(path, device)
    except PretrainedError as e:
        raise ConfigError(str(e)) from None
    if teacher.sampler.consistency_fn() is not None:  # a teacher has a PF-ODE, not a consistency function
        raise ConfigError(f"the teacher must be a diffusion model (method 'flow' or 'edm'); "
                          f"{teacher.checkpoint} was trained with {teacher.method_name!r}")
    if tuple(teacher.shape) != tuple(dataset.shape):
        raise ConfigError(f"the teacher was trained on data of shape {tuple(teacher.shape)}, "
                          f"this run's data has shape {tuple(dataset.shape)}")
    if abs(teacher.sigma_d - method.sigma_d) > 1e-12:
        raise ConfigError(f"teacher sigma_d {teacher.sigma_d} != this method's sigma_d {method.sigma_d}")
    try:
        method.set_teacher(teacher.net, teacher.method.parameterization)
    except ValueError as e:
        raise ConfigError(f"{e} ({teacher.checkpoint})") from None
    return teacher


# Network arguments a student built from its teacher may set for itself: regularization, not architecture
# (ECT and sCM fine-tune with more dropout than the teacher was trained with).
STUDENT_OPTIONS = ("dropout", "dropout_res")
# a diffusers student's own choices over its teacher's model (load_teacher fits a new time input to the source's)
DIFFUSERS_STUDENT_OPTIONS = ("time_input", "time_frequencies", "adaptive_weight")


def _arguments_of(arch: str | None) -> set:
    from fewstep.networks import NETWORKS, constructor_arguments

    return set(constructor_arguments(NETWORKS[arch])) if arch in NETWORKS else {*STUDENT_OPTIONS, "guidance_input"}


def _prompts(cfg: Config, dataset, method, teacher, device) -> Config:
    """Text-to-image: a prompt dataset's captions encoded once (cached) by the text encoder of
    `data.text_encoder`, or of a diffusers teacher pipeline, and handed to the method. Returns the
    config with `data.text_encoder` resolved (sampling encodes new prompts with it)."""
    from fewstep.interop.diffusers.pretrained import PretrainedError
    from fewstep.interop.diffusers.text import cached_prompt_table
    from fewstep.networks.contract import network_info

    prompts = getattr(dataset, "prompts", None)
    takes_text = teacher is not None and network_info(teacher.net).text_input
    if not prompts:
        if takes_text:
            raise ConfigError(f"the teacher {cfg.train.teacher} is text-to-image: train on a prompt dataset (an image "
                              f"folder with a metadata.jsonl of file_name and text)")
        return cfg
    if teacher is not None and not takes_text:
        raise ConfigError(f"{cfg.data.name} is a prompt dataset (metadata.jsonl) but the teacher takes no text")
    if not hasattr(method, "set_prompts"):
        raise ConfigError(f"method {method.name!r} does not train on prompts; text-to-image distillation is "
                          f"method 'scd' with a text-to-image teacher")
    spec = cfg.data.text_encoder or (cfg.train.teacher if takes_text else None)
    if spec is None:
        raise ConfigError("a prompt dataset needs a text encoder: set data.text_encoder to a text-to-image "
                          "pipeline (folder or Hub id)")
    try:
        table, _ = cached_prompt_table(spec, prompts, device, progress=main_process() and cfg.train.progress)
    except PretrainedError as e:
        raise ConfigError(str(e)) from None
    method.set_prompts(table.to(device))
    return replace(cfg, data=replace(cfg.data, text_encoder=str(spec)))


def _student_network(cfg: Config, teacher, method):
    """Diffusion fine-tuning (docs/math.md#stabilizers): the teacher's architecture, plus the student's own
    guidance input when asked for, and the `STUDENT_OPTIONS` the config's network section sets."""
    from fewstep.networks import build_registered, network_spec

    spec = network_spec(teacher.net)
    if spec["name"] == "diffusers":  # the teacher's own network, read in the student's formulation
        if cfg.network.get("guidance_input"):
            raise ConfigError("network.guidance_input is for fewstep's own networks, not a diffusers student")
        spec["kwargs"]["formulation"] = method.parameterization
        if cfg.network.get("prediction"):  # the student reads the teacher's model in another parameterization
            spec["kwargs"]["prediction"] = cfg.network["prediction"]
        for key in DIFFUSERS_STUDENT_OPTIONS:
            if cfg.network.get(key) is not None:
                spec["kwargs"][key] = cfg.network[key]
        return build_registered(spec)
    if cfg.network.get("guidance_input"):
        spec["kwargs"]["guidance_input"] = True
    from fewstep.networks import constructor_arguments, network_class

    takes = constructor_arguments(network_class(spec["name"]))
    spec["kwargs"].update({k: v for k, v in getattr(method, "network_options", {}).items() if k in takes})
    own = {k: cfg.network[k] for k in STUDENT_OPTIONS if k in cfg.network}
    if any(k not in takes for k in own):
        raise ConfigError(f"network.{next(k for k in own if k not in takes)} is not an argument of the teacher's "
                          f"network {spec['name']!r}")
    spec["kwargs"].update(own)
    return build_registered(spec)


def _convert(net, teacher, method, dataset, device, steps: int, lr: float, batch_size: int, seed: int) -> None:
    """The conversion stage (`train.convert_steps`): the student regressed onto its teacher's velocity."""
    from fewstep.methods.scd import make_teacher_velocity
    from fewstep.networks.contract import network_info
    from fewstep.networks.convert import match_teacher

    if getattr(method, "parameterization", "trigflow") != "trigflow":
        raise ConfigError("train.convert_steps is for TrigFlow students (sCD, sCT, ECT, MeanFlow); "
                          f"method {type(method).__name__} trains an EDM-formulation student")
    prompts = getattr(method, "prompts", None)
    conditional = bool(network_info(net).num_classes) or prompts is not None
    if prompts is None:
        velocity, cond = make_teacher_velocity(teacher.net, teacher.method.parameterization, method.sigma_d), None
    else:  # text-to-image: labels are prompt indices; the target is sCD's guided velocity
        velocity = lambda x_t, t, labels: method.text_teacher_velocity(x_t, t, prompts.cond(labels))  # noqa: E731
        cond = prompts.cond

    def sample_x0():
        x0, labels = dataset.sample(batch_size, device)
        return x0, labels if conditional else None

    net.to(device).train()
    schedule = getattr(teacher.net, "schedule", None)  # a diffusers teacher: errors in its own output's units
    gain = None if schedule is None else (lambda t: schedule.output_gain(t.double()).to(t.dtype))
    done = match_teacher(net, velocity, sample_x0, method.sigma_d, steps, lr=lr, seed=seed, gain=gain, cond=cond)
    if main_process():
        print(f"conversion stage: {steps} steps, student velocity error relative to the teacher "
              f"{done['convert_error_before']:.4f} -> {done['convert_error_after']:.4f}")


@dataclass
class Built:
    """What `build` makes; `fit(*built, out_dir, **built.options)` trains it."""

    net: torch.nn.Module
    method: object
    data: object  # a fewstep.data.Dataset
    options: dict = field(default_factory=dict)
    teacher: object | None = None  # the teacher, a `fewstep.training.restore.Restored`
    config: Config | None = None  # the config as built: network and method sections resolved (recorded in checkpoints)

    def __iter__(self):
        return iter((self.net, self.method, self.data))


def build(cfg: Config, out_dir: str | Path | None = None) -> Built:
    """Config -> network, method (teacher included), data, optimizer and `fit` options. `out_dir`:
    a run folder that already holds checkpoints skips the student's initialization from its teacher.
    `cfg` is not changed: the resolved config (network and method as trained) is `Built.config`."""
    from fewstep.training.callbacks import TensorBoard, WandB
    from fewstep.training.checkpoint import list_checkpoints
    from fewstep.networks import LORA_KEYS, build_network, lora_network, network_spec
    from fewstep.networks.convert import student_from_teacher

    cfg = validate_against_registries(cfg.validate())
    tc = cfg.train
    device = _local_device(resolve_device(tc.device))
    torch.manual_seed(tc.seed)  # the same initial weights on every process
    dataset = load_data(cfg)
    cfg = replace(cfg, method=_latent_method(cfg, dataset))
    method = build_method(cfg.method)
    teacher = load_teacher(tc.teacher, method, dataset, device, tc.teacher_scheduler) if tc.teacher else None
    cfg = _prompts(cfg, dataset, method, teacher, device)
    resuming = out_dir is not None and tc.resume and bool(list_checkpoints(Path(out_dir) / "checkpoints"))
    init = None
    if tc.init_from:  # fine-tuning: the network and weights of another run (e.g. flow, then sCT)
        from fewstep.training.restore import restore

        init = restore(tc.init_from, device)
        if tuple(init.shape) != tuple(dataset.shape):
            raise ConfigError(f"train.init_from was trained on data of shape {tuple(init.shape)}, this run's data "
                              f"has shape {tuple(dataset.shape)}")
    source = init or (teacher if tc.init_from_teacher else None)
    lora = {k: cfg.network[k] for k in LORA_KEYS if cfg.network.get(k) is not None}
    if lora and source is None:
        raise ConfigError("network.lora_rank trains a LoRA adapter on a teacher's frozen weights: give train.teacher "
                          "(with train.init_from_teacher) or train.init_from")
    if source is not None:
        if source.config.get("network"):  # the run records the architecture it really trains
            recorded = {k: v for k, v in source.config["network"].items() if k not in LORA_KEYS}
            accepted = _arguments_of(recorded.get("arch"))
            own = {k: cfg.network[k] for k in STUDENT_OPTIONS if k in cfg.network}
            own["guidance_input"] = bool(cfg.network.get("guidance_input"))
            own.update({k: cfg.network[k] for k in DIFFUSERS_STUDENT_OPTIONS if cfg.network.get(k) is not None})
            # a preset's zero dropout is no request to a network without one (a diffusers student)
            own = {k: v for k, v in own.items() if v or k in accepted}
            cfg = replace(cfg, network=validate_network({**recorded, **lora, **own}))
        net = _student_network(cfg, source, method)
        what = f"the {source.method_name} run {tc.init_from}" if init else f"the {source.method_name} teacher"
        if not resuming and network_spec(net)["name"] == "diffusers":
            try:  # the same model behind the same exact conversion, or with a smooth time input fitted
                done = net.load_teacher(source.net)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if main_process():
                print(f"student initialized from the diffusers model {tc.init_from or tc.teacher} "
                      f"({type(net.model).__name__}, {type(net.schedule).__name__} "
                      f"{net.schedule.kind}/{net.schedule.prediction})" + (f": {done}" if done else ""))
        elif not resuming:
            done = student_from_teacher(net, source.net, source.method.parameterization, method.sigma_d,
                                        student_formulation=method.parameterization)
            if main_process():
                print(f"network initialized from {what}" + (f": {done}" if done else ""))
        if tc.convert_steps and not resuming:
            _convert(net, teacher, method, dataset, device, tc.convert_steps, tc.convert_lr or cfg.optim.lr,
                     tc.batch_size, tc.seed)
        if lora:  # LCM-LoRA: the initialized student frozen under a trainable adapter
            try:
                net = lora_network(net, lora["lora_rank"], lora.get("lora_alpha"), lora.get("lora_targets"))
            except (ImportError, ValueError) as e:
                raise ConfigError(str(e)) from None
            if main_process():
                trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
                print(f"LoRA student: rank {net.rank}, alpha {net.alpha:g}, {trained} of "
                      f"{sum(p.numel() for p in net.parameters())} parameters train")
    else:
        try:
            needs = getattr(method, "network_options", {})  # e.g. MeanFlow: a second time input r
            if needs and any(cfg.network.get(k) != v for k, v in needs.items()):
                cfg = replace(cfg, network=validate_network({**cfg.network, **needs}))
            net = build_network(cfg.network, dataset.kind, dataset.shape, dataset.num_classes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    workers = default_workers(dataset) if cfg.data.workers is None else cfg.data.workers
    try:
        loggers = ([TensorBoard()] if tc.tensorboard else []) + ([WandB(tc.wandb_project)] if tc.wandb else [])
    except ImportError as e:  # an optional extra that is not installed: one line
        raise ConfigError(str(e)) from None
    options = dict(
        steps=tc.steps, optimizer=make_optimizer(cfg.optim, [p for p in net.parameters() if p.requires_grad]),
        lr_schedule=functools.partial(learning_rate, cfg.optim, total_steps=tc.steps), batch_size=tc.batch_size,
        workers=workers, ema_decay=tc.ema_decay, ema_sigma_rel=tc.ema_sigma_rel, device=device,
        precision=tc.precision, grad_clip=cfg.optim.grad_clip, seed=tc.seed, log_every=tc.log_every,
        ckpt_every=tc.ckpt_every, keep_ckpts=tc.keep_ckpts, resume=tc.resume, max_nonfinite=tc.max_nonfinite,
        progress=tc.progress, config=cfg.to_dict(), parallel=tc.parallel, grad_accum=tc.grad_accum, compile=tc.compile,
        sharded_checkpoints=tc.sharded_checkpoints,
        callbacks=loggers)  # previews and loss curves: `fewstep.apps.train` adds them
    return Built(net, method, dataset, options, teacher, cfg)


def pretrain_config(cfg: Config) -> Config:
    """The flow-matching run that `train.pretrain_steps` trains first: the same data and network,
    method 'flow' (with the run's sigma_d), `train.pretrain_lr`, ending at `pretrain_steps`."""
    tc = cfg.train
    return replace(
        cfg, method={"name": "flow", **({"sigma_d": cfg.method["sigma_d"]} if "sigma_d" in cfg.method else {})},
        optim=replace(cfg.optim, lr=tc.pretrain_lr or cfg.optim.lr),
        train=replace(tc, steps=tc.pretrain_steps, pretrain_steps=0, sample_every=0, resume=True,
                      ckpt_every=min(tc.ckpt_every or tc.pretrain_steps, tc.pretrain_steps)))


def after_pretrain_config(cfg: Config, pre_dir: str | Path) -> Config:
    """The second stage of `train.pretrain_steps`: the flow model in `pre_dir` is the teacher of a
    distillation method, else the starting weights."""
    key = "teacher" if build_method(cfg.method).takes_teacher else "init_from"
    return replace(cfg, train=replace(cfg.train, pretrain_steps=0, **{key: str(pre_dir)}))
