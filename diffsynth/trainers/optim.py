"""Optimizers and learning-rate schedules of the trainer, built from flags.

Each optimizer comes from the library that owns it (torch, bitsandbytes, transformers, prodigyopt, lion-pytorch,
schedulefree) or from any importable `module.Class`; an optional package that is missing is named with the pip
command that installs it, before any model loads. The schedules count optimizer steps and share one warm-up
rule, today's `(step + 1) / warmup`, so `constant` with or without warm-up gives exactly the rates it always did.
"""
import importlib
import inspect
import math

import torch

from .options import LR_SCHEDULERS, OPTIMIZERS, OptimizerError, check_optimizer_installed


def resolve_optimizer(name: str):
    """Flag value -> optimizer class; raises OptimizerError naming the pip command for a missing package."""
    check_optimizer_installed(name)
    module, attr = OPTIMIZERS[name][:2] if name in OPTIMIZERS else name.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise OptimizerError(f"--optimizer {name}: cannot import {module}.{attr} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise OptimizerError(f"--optimizer {name}: {module}.{attr} is not a torch.optim.Optimizer subclass")
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise OptimizerError(f"--optimizer {name}: {module}.{attr}.step needs a closure that re-evaluates the loss "
                             "(as L-BFGS does); the trainer steps once per batch without one: choose another optimizer")
    return cls


def loraplus_groups(named_params, ratio: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): [(name, parameter)] -> the parameter groups of create_optimizer: LoRA's B (up)
    matrices (peft's `lora_B`, in either DiT layout) at `ratio` times the learning rate, everything else (the A
    matrices, a DoRA's magnitude) at it. The base group comes first: the log and the tracker show group 0's rate."""
    named_params = list(named_params)
    return [{"params": [p for n, p in named_params if ".lora_B." not in n]},
            {"params": [p for n, p in named_params if ".lora_B." in n], "lr_ratio": ratio}]


def create_optimizer(name: str, params, lr: float, weight_decay: float, optimizer_args: dict | None = None):
    """The optimizer `name` over `params` (parameters, or groups of them: a group's `lr_ratio` multiplies the
    resolved rate). --learning_rate and --weight_decay are passed as lr and weight_decay; --optimizer_args add to or
    override them (for a class that takes no weight_decay, leave it to them)."""
    cls = resolve_optimizer(name)
    kwargs = {"lr": lr}
    accepted = inspect.signature(cls.__init__).parameters
    if "weight_decay" in accepted or any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        kwargs["weight_decay"] = weight_decay
    if name == "adafactor":
        # A fixed learning rate (the schedule drives it), as diffusers', ai-toolkit's and musubi's recipes use it
        kwargs.update(scale_parameter=False, relative_step=False, warmup_init=False)
    kwargs.update(optimizer_args or {})
    params = list(params)
    if params and isinstance(params[0], dict):  # each group's rate, from the rate --optimizer_args may override
        params = [{k: v for k, v in g.items() if k != "lr_ratio"}
                  | ({"lr": kwargs["lr"] * g["lr_ratio"]} if "lr_ratio" in g else {}) for g in params]
    try:
        optimizer = cls(params, **kwargs)
    except TypeError as e:
        raise OptimizerError(f"--optimizer {name}: {cls.__module__}.{cls.__name__} rejects the arguments "
                             f"{sorted(kwargs)} ({e}); adjust --optimizer_args") from e
    if is_schedule_free(optimizer):
        optimizer.train()  # schedule-free optimizers start in eval mode and refuse to step there
    return optimizer


def unwrap_optimizer(optimizer):
    """accelerate's AcceleratedOptimizer -> the optimizer it wraps."""
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer) -> bool:
    """Schedule-free optimizers keep two weight sequences and switch the parameters with train()/eval()."""
    optimizer = unwrap_optimizer(optimizer)
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None)) \
        and "train_mode" in optimizer.param_groups[0]


class evaluation_weights:
    """`with evaluation_weights(optimizer):` the parameters hold the weights to evaluate and save (a schedule-free
    optimizer's averaged x instead of its training point y); a no-op for every other optimizer."""

    def __init__(self, optimizer):
        self.optimizer = unwrap_optimizer(optimizer) if is_schedule_free(optimizer) else None

    def __enter__(self):
        if self.optimizer is not None:
            self.optimizer.eval()

    def __exit__(self, *exc):
        if self.optimizer is not None:
            self.optimizer.train()


def lr_lambda(name: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, num_cycles: int = 1,
              power: float = 1.0):
    """Multiplier of the peak rate at optimizer step s (from 0).

    Warm-up: (s + 1) / warmup_steps for s < warmup_steps. Then, with p the fraction of the remaining steps done
    (0 at the end of warm-up, 1 at total_steps), the rate decays from 1 to min_ratio: linear (1 - p), cosine
    (half a cosine), cosine_with_restarts (`num_cycles` cosines, each restarting at 1), polynomial ((1 - p)^power).
    """
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown --lr_scheduler {name!r}; choose one of {', '.join(LR_SCHEDULERS)}")

    def factor(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if name == "constant":
            return 1.0
        p = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            decay = 1.0 - p
        elif name == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * p))
        elif name == "cosine_with_restarts":
            decay = 0.0 if p >= 1.0 else 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0)))
        else:
            decay = (1.0 - p) ** power
        return min_ratio + (1.0 - min_ratio) * decay

    return factor


def create_lr_scheduler(optimizer, name="constant", warmup_steps=0, total_steps=1, min_ratio=0.0, num_cycles=1,
                        power=1.0):
    """A LambdaLR stepped once per optimizer step. Its state is plain numbers (the multiplier is rebuilt from
    the flags on resume, not saved)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(name, warmup_steps, total_steps, min_ratio, num_cycles, power))
