import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img import QwenImageImg2ImgPipeline

from diffsynth.schedulers import FlowMatchScheduler

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_CONFIG = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)


def diffusers_scheduler(num_steps, image_seq_len):
    """Set up diffusers' scheduler exactly as QwenImagePipeline.__call__ does."""
    s = FlowMatchEulerDiscreteScheduler(**QWEN_CONFIG)
    mu = calculate_shift(image_seq_len, 256, 8192, 0.5, 0.9)
    s.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return s


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 8192])
@pytest.mark.parametrize("num_steps", [2, 4, 20, 50])
def test_sigmas_and_timesteps_match_diffusers(image_seq_len, num_steps):
    ref = diffusers_scheduler(num_steps, image_seq_len)
    ours = FlowMatchScheduler()
    timesteps = ours.set_timesteps(num_steps, image_seq_len)
    assert ours.sigmas.shape == ref.sigmas.shape == (num_steps + 1,)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=1e-6, rtol=0)
    # float32 spacing at 1000 is 6e-5, so timesteps are compared on the sigma scale
    torch.testing.assert_close(timesteps / 1000, ref.timesteps / 1000, atol=1e-6, rtol=0)
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0
    assert abs(ours.sigmas[-2].item() - 0.02) < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")
def test_single_step_is_sigma_one():
    # diffusers' terminal stretch divides 0 by 0 here and yields NaN; one step must go from pure noise to x0.
    ours = FlowMatchScheduler()
    ours.set_timesteps(1, 1024)
    assert ours.sigmas.tolist() == [1.0, 0.0]
    assert torch.isnan(diffusers_scheduler(1, 1024).sigmas[0])


def test_mu_is_linear_in_target_tokens():
    s = FlowMatchScheduler()
    assert s.calculate_shift(256) == pytest.approx(0.5)
    assert s.calculate_shift(8192) == pytest.approx(0.9)
    assert s.calculate_shift(4224) == pytest.approx(0.7)


def test_euler_steps_match_diffusers():
    torch.manual_seed(0)
    num_steps, seq = 6, 1024
    ref = diffusers_scheduler(num_steps, seq)
    ref.set_begin_index(0)
    ours = FlowMatchScheduler()
    ours.set_timesteps(num_steps, seq)
    x_ref = x_ours = torch.randn(2, seq, 64)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, seq, 64)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = ours.step(v, i, x_ours)
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)
    # a velocity of noise - x0 carries the noise exactly to x0
    x0, noise = torch.randn(1, 4, 64), torch.randn(1, 4, 64)
    x = noise
    for i in range(num_steps):
        x = ours.step(noise - x0, i, x)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)


def test_step_keeps_model_dtype():
    s = FlowMatchScheduler()
    s.set_timesteps(4, 256)
    out = s.step(torch.ones(3, dtype=torch.bfloat16), 0, torch.zeros(3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("num_steps,strength", [(10, 0.6), (20, 0.35), (8, 1.0), (7, 0.5)])
def test_denoising_strength_matches_diffusers_img2img(num_steps, strength):
    ref = diffusers_scheduler(num_steps, 1024)
    ref_timesteps, ref_steps = QwenImageImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=ref), num_steps, strength, "cpu"
    )
    ours = FlowMatchScheduler()
    timesteps = ours.set_timesteps(num_steps, 1024, denoising_strength=strength)
    assert len(timesteps) == ref_steps
    torch.testing.assert_close(timesteps / 1000, ref_timesteps / 1000, atol=1e-6, rtol=0)
    # the init image is noised to the first kept sigma, as diffusers' scale_noise does at begin_index
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 16, 64), torch.randn(1, 16, 64)
    expected = ref.scale_noise(x0, ref_timesteps[:1], noise)
    torch.testing.assert_close(ours.add_noise(x0, noise, ours.sigmas[0]), expected, atol=1e-6, rtol=0)
    if strength < 1:
        assert ours.sigmas[0] < 1


def test_bad_inference_arguments():
    s = FlowMatchScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0, 256)
    with pytest.raises(ValueError, match="denoising_strength"):
        s.set_timesteps(4, 256, denoising_strength=0.0)
    # a tiny strength still runs one (the last) step
    assert s.set_timesteps(4, 256, denoising_strength=0.01).shape == (1,)
    assert s.sigmas[0].item() == pytest.approx(0.02, abs=1e-6)


def test_training_schedule_is_diffsynth_qwen_image():
    s = FlowMatchScheduler()
    sigmas = s._training_schedule()[0]
    # DiffSynth: linspace(1, 0, 1001)[:-1], exponential shift with mu 0.8, terminal stretch to 0.02
    base = torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1]
    expected = math.exp(0.8) / (math.exp(0.8) + (1 / base - 1))
    expected = 1 - (1 - expected) / ((1 - expected[-1]) / 0.98)
    torch.testing.assert_close(sigmas, expected.float(), atol=1e-6, rtol=0)
    # resolution-dependent variant uses the inference mu
    torch.testing.assert_close(s._training_schedule(4224)[0], s.shifted_sigmas(1000, 0.7))


def test_training_sample_is_deterministic_and_from_the_schedule():
    s = FlowMatchScheduler()
    a = s.training_sample(64, torch.Generator().manual_seed(3))
    b = s.training_sample(64, torch.Generator().manual_seed(3))
    c = s.training_sample(64, torch.Generator().manual_seed(4))
    assert a.shape == (64,) and torch.equal(a, b) and not torch.equal(a, c)
    schedule = s._training_schedule()[0]
    assert all((schedule == v).any() for v in a)
    # uniform over the 1000 steps: the mean sigma of many draws is the schedule's mean
    many = s.training_sample(200_000, torch.Generator().manual_seed(0))
    assert abs(many.mean().item() - schedule.mean().item()) < 0.01


def test_training_weight_bell_mean_one():
    s = FlowMatchScheduler()
    schedule = s._training_schedule()[0]
    w = s.training_weight(schedule)
    assert w.shape == (1000,) and w.dtype == torch.float32
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert w.min().item() == pytest.approx(0.0, abs=1e-7) and w[0].item() == pytest.approx(0.0, abs=1e-7)
    # DiffSynth's formula on the same schedule
    y = torch.exp(-2 * ((schedule.double() * 1000 - 500) / 1000) ** 2)
    expected = (y - y.min()) * (1000 / (y - y.min()).sum())
    torch.testing.assert_close(w, expected.float(), atol=1e-5, rtol=1e-5)
    # the bell peaks mid-schedule
    assert s.training_weight(torch.tensor(0.5)) > s.training_weight(torch.tensor(0.9)) > s.training_weight(torch.tensor(1.0))


def test_training_noise_and_target():
    torch.manual_seed(0)
    s = FlowMatchScheduler()
    x0, noise = torch.randn(3, 8, 64), torch.randn(3, 8, 64)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    xt = s.add_noise(x0, noise, sigma)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(xt[2], noise[2])
    target = s.training_target(x0, noise)
    torch.testing.assert_close(target, noise - x0)
    # one Euler step along the true velocity from x_sigma lands on x_(sigma - d)
    torch.testing.assert_close(xt[1] - 0.25 * target[1], x0[1])
