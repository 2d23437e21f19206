"""Issue 12: caption dropout and the masked loss (the `mask` column) on the tiny models."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffsynth.trainers import Trainer, main, parse_args
from diffsynth.trainers.dataset import DatasetError, EditDataset, collate_fn
from diffsynth.trainers.trainer import flow_matching_loss
from test_trainer import flags, losses


def add_masks(data, masks):
    """Write `masks` ({row: PIL image or None}) beside the data and a `mask` column into metadata.csv."""
    frame = pd.read_csv(os.path.join(data, "metadata.csv"), dtype=str, keep_default_na=False)
    os.makedirs(os.path.join(data, "masks"), exist_ok=True)
    column = []
    for i in range(len(frame)):
        if masks.get(i) is None:
            column.append("")
        else:
            masks[i].save(os.path.join(data, "masks", f"{i}.png"))
            column.append(f"masks/{i}.png")
    frame["mask"] = column
    frame.to_csv(os.path.join(data, "metadata.csv"), index=False)


def left_half(w=64, h=64):
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, : w // 2] = 255
    return Image.fromarray(mask)


# ---- masked loss -----------------------------------------------------------------------------------------------

def test_mask_column_is_validated_up_front(data, tmp_path):
    add_masks(data, {0: Image.new("L", (64, 32), 255), 1: None})  # row 1 (line 2): wrong aspect ratio
    csv = os.path.join(data, "metadata.csv")
    with pytest.raises(DatasetError) as e:
        EditDataset(csv, data, "image,edit_image,mask")
    assert "row 1 (line 2): mask masks/0.png is 64x32, the image 64x64" in str(e.value)
    os.remove(os.path.join(data, "masks", "0.png"))
    with pytest.raises(DatasetError, match="row 1 .*mask file not found: masks/0.png"):
        EditDataset(csv, data, "image,edit_image,mask")
    # a mask column the flags do not name is reported, not silently ignored
    with pytest.warns(UserWarning, match="the metadata has a mask column, but --data_file_keys"):
        EditDataset(csv, data, "image,edit_image")
    # --data_file_keys names a mask column the metadata does not have
    plain = str(tmp_path / "plain")
    from diffsynth.utils.demo_data import write_edit_dataset

    write_edit_dataset(plain, num_samples=1)
    with pytest.raises(DatasetError, match="column 'mask' is missing"):
        EditDataset(os.path.join(plain, "metadata.csv"), plain, "image,edit_image,mask")


def test_mask_is_sized_like_the_target_and_weights_its_tokens(tiny_models, data, tmp_path):
    # a 128x128 mask for a 64x64 target: resized like the target; row 2 has no mask and trains everywhere
    add_masks(data, {0: left_half(128, 128), 1: None})
    args = parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--data_file_keys", "image,edit_image,mask",
                            "--cache_conditioning"))
    t = Trainer(args)
    t.setup()
    batch = collate_fn([t.dataset[0], t.dataset[1]])
    assert batch["mask"].shape == (2, 1, 64, 64)
    cond = t.conditions(batch)
    # 64x64 pixels -> 4x4 tokens of 16x16 pixels, row-major: the left two columns train
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0] * 4, [1.0] * 16])
    torch.testing.assert_close(cond["mask"], expected, atol=1e-2, rtol=0)  # LANCZOS rings a little at the edge
    # the masked loss is the (bell-weighted) mean squared error over the white tokens only
    binary = dict(cond, mask=(cond["mask"] > 0.5).float())
    with torch.no_grad():
        masked = flow_matching_loss(t.dit, t.pipe.scheduler, binary, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        sigma = t.pipe.scheduler.training_sample(2, generator=g)
        x0 = cond["latents"]
        noise = torch.randn(x0.shape, generator=g)
        x = torch.cat([t.pipe.scheduler.add_noise(x0, noise, sigma), cond["edit_latents"]], dim=1)
        pred = t.dit(x, cond["prompt_emb"], cond["prompt_mask"], sigma, [cond["shapes"]] * 2)[:, : x0.shape[1]]
        err = (pred - (noise - x0)).pow(2).mean(dim=2)
        left = [i for i in range(16) if i % 4 < 2]
        per_sample = torch.stack([err[0, left].mean(), err[1].mean()])
        reference = (per_sample * t.pipe.scheduler.training_weight(sigma)).mean()
    torch.testing.assert_close(masked, reference, rtol=1e-5, atol=1e-7)


def test_masked_training_changes_the_loss_and_an_all_white_mask_does_not(tiny_models, data, tmp_path):
    common = ["--max_steps", "3", "--dataset_repeat", "2", "--cache_conditioning", str(tmp_path / "cache")]
    base = str(tmp_path / "base")
    assert main(flags(tiny_models, data, base, *common)) == 0
    add_masks(data, {0: Image.new("L", (64, 64), 255), 1: Image.new("L", (64, 64), 255)})
    white = str(tmp_path / "white")
    assert main(flags(tiny_models, data, white, *common, "--data_file_keys", "image,edit_image,mask")) == 0
    assert losses(white) == pytest.approx(losses(base), rel=1e-5)
    add_masks(data, {0: left_half(), 1: left_half()})
    half = str(tmp_path / "half")
    assert main(flags(tiny_models, data, half, *common, "--data_file_keys", "image,edit_image,mask")) == 0
    assert all(a != pytest.approx(b, rel=1e-4) for a, b in zip(losses(half), losses(base)))


# ---- caption dropout -------------------------------------------------------------------------------------------

def test_caption_dropout_uses_the_empty_prompt_with_the_edit_images(tiny_models, data, tmp_path):
    from diffsynth.trainers.conditioning import DROPOUT_PROMPT
    from diffsynth.utils.image import open_image

    args = parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--caption_dropout_rate", "1"))
    t = Trainer(args)
    t.setup()
    batch = collate_fn([t.dataset[0]])
    cond = t.conditions(batch)
    edit = open_image(t.dataset.samples[0].edit_images[0])
    expected, _ = t.pipe.encode_prompt([DROPOUT_PROMPT], [[edit]])
    torch.testing.assert_close(cond["prompt_emb"], expected)
    prompt, _ = t.pipe.encode_prompt([t.dataset.samples[0].prompt], [[edit]])
    assert prompt.shape != expected.shape or not torch.equal(prompt, expected)


def test_caption_dropout_cached_equals_uncached_and_drops_only_some_samples(tiny_models, data, tmp_path):
    # a vanishing learning rate keeps the weights: a kept sample's loss equals the run without dropout
    common = ["--max_steps", "4", "--dataset_repeat", "2", "--learning_rate", "1e-30"]
    base = str(tmp_path / "base")
    assert main(flags(tiny_models, data, base, *common, "--cache_conditioning", str(tmp_path / "base-cache"))) == 0
    plain = str(tmp_path / "plain")
    assert main(flags(tiny_models, data, plain, *common, "--caption_dropout_rate", "0.5")) == 0
    cached = str(tmp_path / "cached")
    cache = str(tmp_path / "cache")
    assert main(flags(tiny_models, data, cached, *common, "--caption_dropout_rate", "0.5",
                      "--cache_conditioning", cache)) == 0
    assert losses(cached) == losses(plain)
    assert len(os.listdir(cache)) == 2  # one file per sample, holding both embeddings
    same = [a == b for a, b in zip(losses(plain), losses(base))]
    assert any(same) and not all(same), same


def test_masked_loss_and_caption_dropout_resume_exactly(tiny_models, data, tmp_path):
    from test_training_options import assert_resumes_exactly

    add_masks(data, {0: left_half(), 1: None})
    assert_resumes_exactly(tiny_models, (data, str(tmp_path / "cache")), tmp_path, "--data_file_keys",
                           "image,edit_image,mask", "--caption_dropout_rate", "0.5")
