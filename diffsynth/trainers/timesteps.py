"""Which noise levels (sigmas) training draws, and how the loss of each is weighted.

`diffsynth` + `bell` is this project's scheme since its first version (DiffSynth-Studio's): a uniform draw from
the scheduler's 1000 shifted training steps and a bell-shaped weight; it calls the scheduler's own functions, so
the default run's losses are those it always gave. The other samplers are the ones musubi-tuner and diffusers
offer, drawn continuously in (0, 1):
- uniform: sigma ~ U(0, 1);
- logit_normal: sigma = sigmoid(N(logit_mean, logit_std)) (SD3, diffusers' default; musubi's `sigmoid` at mean 0);
- shift: a logit-normal draw shifted by `--discrete_flow_shift` s: s*t / (1 + (s - 1)*t) (musubi's `shift`);
- qwen_shift: the same with s = exp(mu), mu the pipeline's resolution-dependent dynamic shift for this batch's
  target token count (the scheduler's `calculate_shift`, as at inference; musubi's `qwen_shift`).
`--min_timestep` / `--max_timestep` (0..1000) then map the drawn sigma linearly into [min, max] / 1000.
Weightings: bell (the scheduler's, mean 1 over its schedule), none, logit_normal (the logit-normal density at
sigma, which has mean 1 over U(0, 1)).
"""
import math
from dataclasses import dataclass

import torch

from .options import SAMPLERS, WEIGHTINGS


@dataclass(frozen=True)
class TimestepSampling:
    sampling: str = "diffsynth"
    weighting: str = "bell"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    min_timestep: float | None = None
    max_timestep: float | None = None

    def __post_init__(self):
        if self.sampling not in SAMPLERS:
            raise ValueError(f"--timestep_sampling {self.sampling!r}: choose one of {', '.join(SAMPLERS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--weighting_scheme {self.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")

    @classmethod
    def from_args(cls, args):
        return cls(args.timestep_sampling, args.weighting_scheme, args.logit_mean, args.logit_std,
                   args.discrete_flow_shift, args.min_timestep, args.max_timestep)

    def sample(self, scheduler, batch: int, generator=None, image_seq_len: int | None = None) -> torch.Tensor:
        """One sigma per sample (float32, CPU). `image_seq_len`: the target tokens of this batch (qwen_shift)."""
        if self.sampling == "diffsynth":
            sigma = scheduler.training_sample(batch, generator=generator)
        elif self.sampling == "uniform":
            sigma = torch.rand(batch, generator=generator, dtype=torch.float64)
        else:
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, generator=generator,
                                                                                  dtype=torch.float64))
            if self.sampling == "shift":
                sigma = scheduler.time_shift(sigma, math.log(self.shift))
            elif self.sampling == "qwen_shift":
                if image_seq_len is None:
                    raise ValueError("qwen_shift needs the target token count of the batch")
                sigma = scheduler.time_shift(sigma, scheduler.calculate_shift(image_seq_len))
        if self.min_timestep is not None or self.max_timestep is not None:
            low = (self.min_timestep or 0.0) / 1000
            high = (1000.0 if self.max_timestep is None else self.max_timestep) / 1000
            sigma = low + (high - low) * sigma.double()
        return sigma.float()

    def weight(self, scheduler, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight per sample for these sigmas."""
        if self.weighting == "bell":
            return scheduler.training_weight(sigma)
        if self.weighting == "none":
            return torch.ones_like(torch.as_tensor(sigma, dtype=torch.float32))
        s = torch.as_tensor(sigma).double().clamp(1e-6, 1 - 1e-6)
        logit = torch.log(s / (1 - s))
        density = torch.exp(-((logit - self.logit_mean) ** 2) / (2 * self.logit_std ** 2)) / (
            self.logit_std * math.sqrt(2 * math.pi) * s * (1 - s))
        return density.float()
