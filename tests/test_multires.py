"""Multi-resolution training: --max_pixels with several areas trains every row once at each (ai-toolkit's
`resolution: [512, 768, 1024]`); one area is the run it always was."""
import csv
import json
import os
from argparse import Namespace

import pytest

from conftest import TINY_MODEL_IDS
from diffsynth.trainers import Trainer, main, parse_args
from diffsynth.trainers.dataset import BucketBatchSampler, DatasetError, EditDataset, validate_metadata
from diffsynth.utils.demo_data import write_edit_dataset


def flags(tiny_models, data, out, *extra):
    return ["--dataset_base_path", data, "--dataset_metadata_path", os.path.join(data, "metadata.csv"),
            "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models,
            "--edit_image_area", "4096", "--output_path", out, "--lora_base_model", "dit", "--lora_rank", "4", *extra]


def logged_steps(out):
    with open(os.path.join(out, "train_log.csv")) as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture
def sized(tmp_path):
    """Rows of 64x64, 64x32 and 20x20 px (the last smaller than both areas below)."""
    folder = str(tmp_path / "sized")
    write_edit_dataset(folder, num_samples=3, sizes=[(64, 64), (64, 32), (20, 20)])
    return folder


def test_rows_times_areas_in_area_order_each_sized_by_its_area(sized):
    metadata = os.path.join(sized, "metadata.csv")
    samples = validate_metadata(metadata, sized, max_pixels=[1024, 4096], edit_area=4096)
    assert [(s.where, s.target_size, s.area) for s in samples] == [
        ("row 1 (line 2)", (32, 32), 1024), ("row 2 (line 3)", (32, 16), 1024), ("row 3 (line 4)", (16, 16), 1024),
        ("row 1 (line 2)", (64, 64), 4096), ("row 2 (line 3)", (64, 32), 4096), ("row 3 (line 4)", (16, 16), 4096)]
    # each area's samples are exactly those of that area alone: one area is the dataset it always was
    assert samples[:3] == validate_metadata(metadata, sized, max_pixels=1024, edit_area=4096)
    assert samples[3:] == validate_metadata(metadata, sized, max_pixels=4096, edit_area=4096)
    # the 20x20 target is never scaled up: at both areas the same sample, so one conditioning cache file
    assert samples[2].cache_key == samples[5].cache_key
    assert len({s.cache_key for s in samples}) == 5
    dataset = EditDataset(metadata, sized, max_pixels=[1024, 4096], edit_area=4096, dataset_repeat=2)
    assert len(dataset) == 12
    assert tuple(dataset[4]["image"].shape) == (3, 32, 64)  # row 2 at 4096 px: (3, h, w)


def test_buckets_never_mix_the_areas_sizes(sized):
    dataset = EditDataset(os.path.join(sized, "metadata.csv"), sized, max_pixels=[1024, 4096], edit_area=4096,
                          dataset_repeat=3)
    sampler = BucketBatchSampler(dataset, batch_size=2, seed=1)
    batches = sampler.batches()
    assert all(len({dataset.bucket_key(i) for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(18))  # each sample once an epoch
    # buckets of 3 samples (2 batches each): rows 1 and 2 at each area; of 6 (3 batches): row 3, 16x16 at both
    assert len(batches) == 2 * 4 + 3


def test_a_row_without_a_target_at_an_area_is_named_once(tmp_path):
    folder = str(tmp_path / "strip")
    write_edit_dataset(folder, num_samples=1, size=(256, 16))  # 4096 px: kept as is; at 1024 px 128x8: no row left
    with pytest.raises(DatasetError) as e:
        validate_metadata(os.path.join(folder, "metadata.csv"), folder, max_pixels=[4096, 1024], edit_area=4096)
    assert "1 problem(s)" in str(e.value)
    assert "row 1 (line 2): image images/img000.png: image of 256x16 px gives an empty target at --max_pixels 1024" \
        in str(e.value)


@pytest.mark.parametrize("value, message", [
    ("512x512", "--max_pixels '512x512': give an area in pixels (1048576 for 1024x1024), or a comma list"),
    ("4096,", "--max_pixels '4096,': give an area in pixels"),
    ("0", "--max_pixels 0: 0 is below 256 pixels, the smallest target (16x16)"),
    ("4096,-5", "--max_pixels 4096,-5: -5 is below 256 pixels"),
    ("1024,255", "--max_pixels 1024,255: 255 is below 256 pixels"),
    ("4096,1024,4096", "--max_pixels 4096,1024,4096: 4096 is given twice"),
    # ai-toolkit's resolution list typed as it is: side lengths, which as areas would train ~22-32 px targets
    ("512,768,1024", "--max_pixels 512,768,1024: these are areas in pixels, not side lengths: 1024 trains targets "
                     "of about 32x32 pixels. For sides 512,768,1024 give their squares: --max_pixels "
                     "262144,589824,1048576"),
    ("1024", "--max_pixels 1024: these are areas in pixels, not side lengths"),
])
def test_bad_areas_are_refused_naming_the_value(tiny_models, data, tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--max_pixels", value))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_fixed_size_refuses_a_list_of_areas(tiny_models, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--max_pixels", "1024,4096", "--height", "32",
                         "--width", "32"))
    assert e.value.code == 2
    assert "--max_pixels 1024,4096 would do nothing: --height 32 --width 32 fix every" in capsys.readouterr().err


def test_one_area_stays_an_int_and_several_a_list(tiny_models, data, tmp_path):
    one = parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--max_pixels", "4096"))
    several = parse_args(flags(tiny_models, data, str(tmp_path / "out"), "--max_pixels", "1024, 4096"))
    assert (one.max_pixels, several.max_pixels) == (4096, [1024, 4096])
    assert parse_args(flags(tiny_models, data, str(tmp_path / "out"))).max_pixels == 1024 * 1024


def test_the_vram_plan_is_for_the_largest_area():
    from diffsynth.utils.vram_planner import setup_from_args

    args = Namespace(height=None, width=None, max_pixels=[262144, 1048576, 589824], edit_image_area=1048576,
                     edit_plus=False, mixed_precision="bf16", batch_size=1, enable_fp8_training=False,
                     use_gradient_checkpointing=True, use_gradient_checkpointing_offload=False, blocks_to_swap=0,
                     cache_conditioning=None)
    assert setup_from_args(args).target_tokens == 4096  # 1024x1024 / 16x16


def test_dry_run_shows_the_areas(tiny_models, data, tmp_path, capsys):
    assert main(flags(tiny_models, data, str(tmp_path / "out"), "--max_pixels", "4096,1024", "--dry_run")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["max_pixels"] == [4096, 1024]
    assert "dry run: the flags, 4 training samples" in err
    assert ("--max_pixels: 2 areas, each row trained at each (before --dataset_repeat):\n"
            "  1024 px (~32x32): 2 samples in 1 size bucket(s)\n"
            "  4096 px (~64x64): 2 samples in 1 size bucket(s)\n") in err


def test_two_areas_train_encode_each_row_once_and_resume_only_with_the_same_list(tiny_models, data, tmp_path,
                                                                                monkeypatch, capsys):
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    calls = {"encode_prompt": 0, "encode_images": 0}
    for name in calls:
        original = getattr(QwenImagePipeline, name)

        def counted(self, *a, _original=original, _name=name, **k):
            calls[_name] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(QwenImagePipeline, name, counted)
    out = str(tmp_path / "out")
    common = ["--cache_conditioning", "--save_steps", "2", "--max_pixels", "1024,4096"]
    trainer = Trainer(parse_args(flags(tiny_models, data, out, *common, "--max_steps", "2")))
    trainer.setup()
    # 2 rows x 2 areas: the prompt (with its edit image) and the edit image's latents once a row, the target per area
    assert calls == {"encode_prompt": 2, "encode_images": 2 * 2 + 2}
    cached = [trainer.cache.get(s.cache_key) for s in trainer.dataset.samples]
    assert [tuple(c["latents"].shape) for c in cached] == [(4, 64)] * 2 + [(16, 64)] * 2
    for small, large in zip(cached[:2], cached[2:]):  # the same row: the same text and edit-image tensors
        assert small["prompt_emb"].equal(large["prompt_emb"]) and small["edit_latents"].equal(large["edit_latents"])
    assert trainer.steps_per_epoch == 4 and trainer.setup_info()["max_pixels"] == [1024, 4096]
    trainer.train()
    assert logged_steps(out) == [1, 2]
    # a state of [1024, 4096] resumes with that list only (saved in json, compared as a list)
    resume = ["--resume_from_checkpoint", "latest", "--max_steps", "4"]
    for other, shown in (("4096", "4096"), ("4096,1024", "[4096, 1024]")):
        code = main(flags(tiny_models, data, out, *common[:-1], other, *resume, "--models_dir",
                          str(tmp_path / "no-models")))  # refused before any model loads
        err = capsys.readouterr().err
        assert code == 2 and f"--max_pixels: state [1024, 4096], this run {shown}" in err, err
        if other == "4096":  # the sample count a state records is rows x areas: the message says so
            assert "training samples (rows x --max_pixels areas x --dataset_repeat): state 4, this run 2" in err, err
    assert main(flags(tiny_models, data, out, *common, *resume)) == 0
    assert logged_steps(out) == [1, 2, 3, 4]


def test_two_areas_train_without_the_cache_a_batch_an_area(tiny_models, data, tmp_path):
    out = str(tmp_path / "out")
    assert main(flags(tiny_models, data, out, "--max_pixels", "1024,4096", "--batch_size", "2")) == 0
    assert logged_steps(out) == [1, 2]  # 2 rows x 2 areas in batches of one size: 2 steps an epoch
