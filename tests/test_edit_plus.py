"""Qwen-Image-Edit-2509/2511 end to end: several edit images (and zero_cond_t) through our pipeline and trainer.

The oracle is diffusers' QwenImageEditPlusPipeline over the same tiny files, same initial latents: each edit image
goes to the VAE at its own ~1024x1024 area and to the VL model at ~384x384 ("Picture i:" template), the edit
tokens follow the target tokens in one sequence, and the output defaults to the last edit image's size.
"""
import csv
import json
import os

import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import TINY_MODEL_IDS
from diffsynth.models.qwen_image_vae import pack_latents
from diffsynth.pipelines.qwen_image import QwenImagePipeline
from diffsynth.trainers import main
from diffsynth.trainers.dataset import validate_metadata
from diffsynth.utils.image import open_image, resize_edit_image
from diffsynth.utils.tiny_models import reference_pipeline
from test_pipeline import LAYOUT, make_image, pixels
from test_trainer import flags, losses

PROMPT = "put the dog of picture 2 into picture 1"
NEGATIVE = "blurry, low quality"
SMALL_AREA = 128 * 128  # VAE area of each edit image in the fast tests (diffusers: 1024 x 1024)
H, W, STEPS = 64, 96, 2
# Two edit images of different sizes and aspects: 160x96 and 96x160 at SMALL_AREA.
EDITS = [make_image(0, (80, 48)), make_image(3, (40, 72))]
TOL = dict(rtol=1e-5, atol=1e-5)


def noise(height=H, width=W, seed=1):
    return torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def paths_of(models_dir):
    return {k: os.path.join(models_dir, "tiny-random", v) for k, v in LAYOUT.items()}


def load(models_dir, merged=True):
    return QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=models_dir, merged_qkv=merged, download=False)


def record_img_shapes(module, seen):
    """Hook that keeps the img_shapes of every forward call (ours passes them positionally, diffusers by name)."""
    def hook(_, args, kwargs):
        seen.append(kwargs["img_shapes"] if "img_shapes" in kwargs else args[4])
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def run_reference(ref, latents, negative=None, images=EDITS, output_type="np", **kwargs):
    """diffusers' Plus pipeline -> (final packed latents, uint8 image or None, img_shapes its DiT saw)."""
    final, seen = {}, []

    def keep_latents(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    handle = record_img_shapes(ref.transformer, seen)
    try:
        out = ref(image=images, prompt=PROMPT, negative_prompt=negative, true_cfg_scale=4.0,
                  num_inference_steps=STEPS, latents=pack_latents(latents),
                  output_type=output_type, callback_on_step_end=keep_latents, **kwargs)
    finally:
        handle.remove()
    image = (out.images[0] * 255).round().astype(np.int16) if output_type == "np" else None
    return final["latents"], image, seen


def run_ours(pipe, latents, negative=None, images=EDITS, area=SMALL_AREA, decode=True, default_size=False):
    """Our pipeline -> (final packed latents, uint8 image or None, img_shapes its DiT saw). The output size is the
    latents', or with `default_size` the pipeline's own choice (it raises if that does not fit the latents)."""
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    size = {} if default_size else dict(height=h, width=w)
    seen = []
    handle = record_img_shapes(pipe.dit, seen)
    try:
        out = pipe(PROMPT, edit_image=images, negative_prompt=negative, cfg_scale=4.0, num_inference_steps=STEPS,
                   latents=latents, edit_image_area=area, output_type="latent", progress=False, **size)
    finally:
        handle.remove()
    return out, (pixels(pipe.decode(out, h, w)) if decode else None), seen


def assert_same(ours, reference):
    (lat, img, shapes), (ref_lat, ref_img, ref_shapes) = ours, reference
    assert [[tuple(s) for s in sample] for sample in shapes] == [[tuple(s) for s in sample] for sample in ref_shapes]
    torch.testing.assert_close(lat, ref_lat, **TOL)
    if img is not None:
        assert np.abs(img - ref_img).max() <= 1  # rounding to 8 bits may flip a level


@pytest.fixture(scope="module")
def ref(tiny_models):
    pipe = reference_pipeline(paths_of(tiny_models), "edit-plus")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny_models):
    return {merged: load(tiny_models, merged) for merged in (True, False)}


@pytest.fixture
def small_vae_area(monkeypatch):
    """diffusers' Plus pipeline with each edit image VAE-encoded at SMALL_AREA (its VL size stays 384 x 384)."""
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", SMALL_AREA)


# ---- Edit-2509: two edit images ------------------------------------------------------------------------------


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "standard"])
@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["no_cfg", "true_cfg"])
def test_two_edit_images_match_diffusers(ref, pipes, small_vae_area, merged, negative):
    latents = noise()
    reference = run_reference(ref, latents, negative, height=H, width=W)
    # target tokens, then each edit image at its own VAE size (160x96 and 96x160 px -> 6x10 and 10x6 tokens)
    calls = (2 if negative else 1) * STEPS  # img_shapes of each DiT call: one list per sample
    assert reference[2] == [[[(1, H // 16, W // 16), (1, 6, 10), (1, 10, 6)]]] * calls
    assert_same(run_ours(pipes[merged], latents, negative), reference)


def test_two_image_comparisons_are_not_vacuous(pipes):
    """The tolerance above is far below what CFG, the second image and the image order change."""
    latents = noise()
    base = run_ours(pipes[True], latents, decode=False)[0]
    for variant in (dict(negative=NEGATIVE), dict(images=EDITS[:1]), dict(images=EDITS[::-1])):
        assert (run_ours(pipes[True], latents, decode=False, **variant)[0] - base).abs().max() > 20 * 1e-5, variant


def test_default_size_follows_the_last_edit_image(ref, pipes, small_vae_area):
    """diffusers sizes the output as the last edit image at 1024 x 1024 area; ours as the last edit image at
    edit_image_area (the same rule; equal sizes at the default area, see the slow test below)."""
    width, height = edit_plus.calculate_dimensions(1024 * 1024, EDITS[-1].width / EDITS[-1].height)
    reference = run_reference(ref, noise(height, width), output_type="latent")
    assert reference[2][0][0][0] == (1, height // 16, width // 16)
    image = pipes[True](PROMPT, edit_image=EDITS, num_inference_steps=STEPS, edit_image_area=SMALL_AREA, seed=0,
                        progress=False)
    assert image.size == resize_edit_image(EDITS[-1], SMALL_AREA).size == (96, 160)


@pytest.mark.slow  # four VAE encodes of ~1024 x 1024 edit images: about 25 s on one core
def test_matches_untouched_diffusers_at_the_default_sizes(ref, pipes):
    """No monkeypatching: each edit image at ~1024 x 1024 for the VAE, ~384 x 384 for the VL model; the default
    output size (ours raises if its size differs from that of the latents diffusers was given)."""
    width, height = edit_plus.calculate_dimensions(1024 * 1024, EDITS[-1].width / EDITS[-1].height)
    latents = noise(height, width)
    reference = run_reference(ref, latents, output_type="latent")
    assert reference[2][0][0][1:] == [(1, 50, 82), (1, 86, 48)]  # 1312x800 and 768x1376 px for the VAE
    assert_same(run_ours(pipes[True], latents, area=1024 * 1024, decode=False, default_size=True), reference)


# ---- Edit-2511: zero_cond_t ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_2511(tiny_models, tmp_path_factory):
    """The tiny set with its transformer saved again by diffusers with zero_cond_t=True (same weights), in the
    official layout; the other components are links to the tiny set's."""
    root = tmp_path_factory.mktemp("models-2511")
    for name, sub in LAYOUT.items():
        os.makedirs(root / "tiny-random" / os.path.dirname(sub), exist_ok=True)
        if name != "transformer":
            os.symlink(os.path.join(tiny_models, "tiny-random", sub), root / "tiny-random" / sub)
    dit = QwenImageTransformer2DModel.from_pretrained(paths_of(tiny_models)["transformer"], zero_cond_t=True)
    dit.save_pretrained(root / "tiny-random" / LAYOUT["transformer"], max_shard_size="500KB", safe_serialization=True)
    with open(root / "tiny-random" / LAYOUT["transformer"] / "config.json") as f:
        assert json.load(f)["zero_cond_t"] is True
    return str(root)


@pytest.fixture(scope="module")
def ref_2511(models_2511):
    pipe = reference_pipeline(paths_of(models_2511), "edit-plus")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.zero_cond_t
    return pipe


@pytest.fixture(scope="module")
def pipes_2511(models_2511):
    return {merged: load(models_2511, merged) for merged in (True, False)}


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "standard"])
@pytest.mark.parametrize("images", [EDITS, EDITS[:1]], ids=["two_images", "one_image"])
def test_zero_cond_t_model_matches_diffusers(ref_2511, pipes_2511, pipes, small_vae_area, merged, images):
    """Edit-2511 takes the Edit-Plus path ("Picture i:" template) with one edit image as with several."""
    pipe = pipes_2511[merged]
    assert pipe.dit.config["zero_cond_t"] is True  # read from config.json beside the weights
    latents = noise()
    for negative in (None, NEGATIVE):
        ours = run_ours(pipe, latents, negative, images)
        assert_same(ours, run_reference(ref_2511, latents, negative, images, height=H, width=W))
    # Same weights without zero_cond_t (Edit-2509) give another result: the flag was picked up and matters.
    assert (run_ours(pipes[merged], latents, NEGATIVE, images, decode=False)[0] - ours[0]).abs().max() > 20 * 1e-5


def test_edit_plus_flag_gives_one_image_the_plus_template(ref, pipes, small_vae_area):
    """Edit-2509 with one edit image: its DiT looks like Qwen-Image-Edit's, so the choice is the user's."""
    pipe, latents = pipes[True], noise()
    try:
        pipe.edit_plus = True
        assert_same(run_ours(pipe, latents, NEGATIVE, EDITS[:1]),
                    run_reference(ref, latents, NEGATIVE, EDITS[:1], height=H, width=W))
    finally:
        pipe.edit_plus = None
    # without it, one image takes the plain Edit template: another result
    assert (run_ours(pipe, latents, NEGATIVE, EDITS[:1], decode=False)[0]
            - run_reference(ref, latents, NEGATIVE, EDITS[:1], height=H, width=W)[0]).abs().max() > 20 * 1e-5


# ---- trainer: two edit images per row ------------------------------------------------------------------------


@pytest.fixture
def two_image_data(data):
    """The demo pairs with a second, differently sized edit image per row (`a.png|b.png` in the CSV)."""
    os.makedirs(os.path.join(data, "refs"))
    with open(os.path.join(data, "metadata.csv")) as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        Image.new("RGB", (96, 32), (40, 70, 220 - 40 * i)).save(os.path.join(data, "refs", f"ref{i:03d}.png"))
        row["edit_image"] += f"|refs/ref{i:03d}.png"
        row["prompt"] = "make the red square of picture 1 the colour of picture 2"
    with open(os.path.join(data, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "edit_image", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    return data


def test_trainer_with_two_edit_images(tiny_models, two_image_data, tmp_path):
    runs = {}
    cache = tmp_path / "cache"
    for name, extra in (("plain", []), ("cached", ["--cache_conditioning", str(cache)])):
        out = str(tmp_path / name)
        assert main(flags(tiny_models, two_image_data, out, "--max_steps", "3", "--dataset_repeat", "2",
                          "--learning_rate", "5e-2", *extra)) == 0
        runs[name] = losses(out)
    assert len(runs["plain"]) == 3 and runs["plain"] == runs["cached"]
    # Each cached sample holds both edit images: 64x64 and 96x32 px at --edit_image_area 4096 -> 16 + 12 tokens.
    files = sorted(cache.iterdir())
    assert len(files) == 2
    for path in files:
        with safe_open(str(path), "pt") as f:
            assert json.loads(f.metadata()["shapes"]) == [[1, 4, 4], [1, 4, 4], [1, 2, 6]]
            assert tuple(f.get_slice("edit_latents").get_shape()) == (16 + 12, 64)

    # What training saw is what the pipeline computes at inference for the same two images ("Picture i:" template).
    pipe = load(tiny_models)
    sample = validate_metadata(os.path.join(two_image_data, "metadata.csv"), two_image_data, max_pixels=4096,
                               edit_area=4096)[0]
    edits = [open_image(path) for path in sample.edit_images]
    emb, mask = pipe.encode_prompt([sample.prompt], [edits])
    assert mask is None
    # the cache file of this sample is the one holding exactly these embeddings (files are named by a hash)
    matches = [f for f in files if torch.equal(load_file(str(f))["prompt_emb"], emb[0])]
    assert len(matches) == 1
    cached = load_file(str(matches[0]))
    tokens, shapes = pipe.encode_edit_images([resize_edit_image(e, 4096) for e in edits])
    assert shapes == [(1, 4, 4), (1, 2, 6)]
    torch.testing.assert_close(cached["edit_latents"], tokens[0], rtol=0, atol=0)

    # The checkpoint loads into the pipeline and changes a two-image edit.
    kwargs = dict(edit_image=edits, seed=0, num_inference_steps=2, edit_image_area=4096, output_type="latent",
                  progress=False)
    before = pipe("make the red square of picture 1 the colour of picture 2", **kwargs)
    assert len(pipe.load_lora(os.path.join(tmp_path, "plain", "checkpoint-final.safetensors"))) > 0
    after = pipe("make the red square of picture 1 the colour of picture 2", **kwargs)
    assert before.shape == after.shape == (1, 12, 64)  # the last edit image's size: 96x32 px
    assert (after - before).abs().max() > 1e-4
