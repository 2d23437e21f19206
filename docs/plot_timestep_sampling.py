"""Plot the distribution of each --timestep_sampling choice and the curve of each --weighting_scheme.

    python docs/plot_timestep_sampling.py            # writes docs/timestep_sampling.png

The samplers are the trainer's own (diffsynth.trainers.timesteps), drawn from a seeded generator.
"""
import argparse
import os

import numpy as np
import torch

from diffsynth.schedulers import FlowMatchScheduler
from diffsynth.trainers.timesteps import TimestepSampling

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [  # label, sampling, target tokens of the batch (qwen_shift)
    ("diffsynth (default)", TimestepSampling(), None),
    ("uniform", TimestepSampling("uniform"), None),
    ("logit_normal (0, 1)", TimestepSampling("logit_normal"), None),
    ("shift 3 (--discrete_flow_shift)", TimestepSampling("shift", shift=3.0), None),
    ("qwen_shift, 512x512 target", TimestepSampling("qwen_shift"), 1024),
    ("qwen_shift, 1024x1024 target", TimestepSampling("qwen_shift"), 4096),
]


def plot(path, draws=200_000, seed=0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheduler = FlowMatchScheduler()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    bins = np.linspace(0, 1, 51)
    for label, sampling, tokens in CASES:
        sigma = sampling.sample(scheduler, draws, torch.Generator().manual_seed(seed), tokens).numpy()
        density, _ = np.histogram(sigma, bins=bins, density=True)
        left.step(bins[:-1], density, where="post", label=label, lw=1.2)
    left.set(title="--timestep_sampling: density of the drawn sigma", xlabel="sigma (timestep / 1000)",
             ylabel="density")
    left.legend(fontsize=7)
    sigma = torch.linspace(0.001, 0.999, 500)
    for name in ("bell", "none", "logit_normal"):
        right.plot(sigma.numpy(), TimestepSampling(weighting=name).weight(scheduler, sigma).numpy(),
                   label=name + (" (default)" if name == "bell" else ""))
    right.set(title="--weighting_scheme: loss weight", xlabel="sigma", ylabel="weight")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(HERE, "timestep_sampling.png"))
    parser.add_argument("--draws", type=int, default=200_000)
    args = parser.parse_args()
    print(plot(args.output, args.draws))
