"""Flow-matching scheduler for Qwen-Image: the inference schedule and the training side.

Inference matches diffusers' `FlowMatchEulerDiscreteScheduler` with the Qwen-Image scheduler config
(exponential dynamic shift, mu linear in the target token count, shift_terminal 0.02) driven the way
`QwenImagePipeline` drives it. Training follows DiffSynth-Studio: the timestep is drawn uniformly from the
1000-step shifted schedule, and the loss is weighted by a bell centred mid-schedule.

Convention: x_sigma = (1 - sigma) * x0 + sigma * noise; the model predicts the velocity noise - x0;
sigma 1 is pure noise and the DiT takes sigma itself as its timestep (diffusers' t / 1000).
"""
import math

import torch

# Scheduler settings by name. lightning: the 4/8-step Lightning LoRAs (lightx2v/Qwen-Image-Lightning) were distilled
# with a fixed shift of 3 and no terminal stretch; their published diffusers config sets base_shift = max_shift =
# log(3) (so mu = log 3 at every resolution) and shift_terminal None, and they run without true CFG.
SCHEDULER_PRESETS = {
    "default": {},
    "lightning": {"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None},
}


class FlowMatchScheduler:
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 8192,
        base_shift: float = 0.5,
        max_shift: float = 0.9,
        shift_terminal: float = 0.02,
        training_mu: float = 0.8,
    ):
        self.num_train_timesteps = num_train_timesteps
        self.base_image_seq_len = base_image_seq_len
        self.max_image_seq_len = max_image_seq_len
        self.base_shift = base_shift
        self.max_shift = max_shift
        self.shift_terminal = shift_terminal
        # DiffSynth trains Qwen-Image with a fixed mu of 0.8 whatever the resolution; `image_seq_len` given to
        # the training methods switches to the resolution-dependent mu used at inference instead.
        self.training_mu = training_mu
        self.sigmas = None  # inference schedule, N + 1 values ending in 0 (set by set_timesteps)
        self.timesteps = None  # sigmas[:-1] * num_train_timesteps
        self._train_cache = {}

    @classmethod
    def from_preset(cls, name: str) -> "FlowMatchScheduler":
        if name not in SCHEDULER_PRESETS:
            raise ValueError(f"unknown scheduler preset {name!r}; choose one of {', '.join(SCHEDULER_PRESETS)}")
        return cls(**SCHEDULER_PRESETS[name])

    # ---- schedule -------------------------------------------------------------------------------------------

    def calculate_shift(self, image_seq_len: int) -> float:
        """mu of the exponential shift, linear in the target token count (diffusers' `calculate_shift`)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + self.base_shift - m * self.base_image_seq_len

    @staticmethod
    def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
        """The exponential time shift: exp(mu) / (exp(mu) + 1/sigma - 1), i.e. shift = exp(mu)."""
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))

    def shifted_sigmas(self, num_steps: int, mu: float) -> torch.Tensor:
        """linspace(1, 1/N, N), exponentially shifted by mu, stretched so the last sigma is shift_terminal."""
        sigmas = self.time_shift(torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64), mu)
        # A single step is sigma 1 alone: the terminal stretch would divide 0 by 0 (diffusers returns NaN there).
        if self.shift_terminal and num_steps > 1:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus * (1 - self.shift_terminal) / one_minus[-1]
        return sigmas.float()

    # ---- inference --------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int, denoising_strength: float = 1.0):
        """Build the sampling schedule for `image_seq_len` target tokens (the noisy image only, no edit images).

        `denoising_strength` < 1 (image-to-image) keeps the tail of the full N-step schedule, as diffusers'
        QwenImageImg2ImgPipeline does: int(N * strength) steps are run, starting at the first kept sigma, so
        the init latents are noised with `add_noise(x0, noise, self.sigmas[0])`.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not 0.0 < denoising_strength <= 1.0:
            raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
        sigmas = self.shifted_sigmas(num_inference_steps, self.calculate_shift(image_seq_len))
        # At least one step always remains: start < N for any strength > 0.
        start = int(num_inference_steps - num_inference_steps * denoising_strength)
        self.sigmas = torch.cat([sigmas[start:], torch.zeros(1)])
        self.timesteps = self.sigmas[:-1] * self.num_train_timesteps
        return self.timesteps

    def step(self, model_output: torch.Tensor, sigma_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Euler step from sigmas[i] to sigmas[i + 1]; computed in float32 like diffusers, returned in the
        model output's dtype."""
        dt = self.sigmas[sigma_index + 1] - self.sigmas[sigma_index]
        prev = sample.float() + dt * model_output.float()
        return prev.to(model_output.dtype)

    # ---- both -------------------------------------------------------------------------------------------------

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """(1 - sigma) * x0 + sigma * noise; sigma a number, a 0-d tensor or one value per sample (B,)."""
        sigma = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device)
        if sigma.ndim == 1:
            sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
        return (1 - sigma) * x0 + sigma * noise

    # ---- training ---------------------------------------------------------------------------------------------

    def _training_schedule(self, image_seq_len=None):
        """The 1000 shifted training sigmas and the normaliser of their bell weights, cached per mu."""
        mu = self.training_mu if image_seq_len is None else self.calculate_shift(image_seq_len)
        if mu not in self._train_cache:
            sigmas = self.shifted_sigmas(self.num_train_timesteps, mu)
            bell = self._bell(sigmas)
            # Shift so the least-weighted step gets 0 and scale so the weights average 1 over the schedule.
            floor = bell.min()
            self._train_cache[mu] = (sigmas, floor, (bell - floor).mean())
        return self._train_cache[mu]

    @staticmethod
    def _bell(sigmas: torch.Tensor) -> torch.Tensor:
        # DiffSynth's exp(-2 * ((t - 500) / 1000) ** 2) with t = 1000 * sigma.
        return torch.exp(-2 * (sigmas.double() - 0.5) ** 2)

    def training_sample(self, batch_size: int, generator: torch.Generator | None = None, image_seq_len=None):
        """One sigma per sample, drawn uniformly from the 1000 shifted training steps (DiffSynth's choice)."""
        sigmas = self._training_schedule(image_seq_len)[0]
        index = torch.randint(0, len(sigmas), (batch_size,), generator=generator)
        return sigmas[index]

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def training_weight(self, sigma, image_seq_len=None) -> torch.Tensor:
        """Loss weight per sample: the bell over the schedule, zero at its lowest step, mean 1 over all 1000."""
        _, floor, mean = self._training_schedule(image_seq_len)
        sigma = torch.as_tensor(sigma)
        return ((self._bell(sigma.cpu()) - floor) / mean).float().to(sigma.device)
