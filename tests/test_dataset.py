import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffsynth.trainers.dataset import BucketBatchSampler, DatasetError, EditDataset, collate_fn, validate_metadata
from diffsynth.utils.image import (
    edit_image_size, pil_to_tensor, resize_and_center_crop, resize_edit_image, target_size, tensor_to_pil,
)

EDIT_AREA = 64 * 64  # small edit images keep the tests fast; the real default is 1024*1024


def noise_image(path, w, h, seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def data(tmp_path):
    """Six pairs: two landscape, two portrait, two square targets; edit inputs of other shapes."""
    (tmp_path / "images").mkdir()
    (tmp_path / "edits").mkdir()
    shapes = [(64, 32), (64, 32), (32, 64), (32, 64), (48, 48), (48, 48)]
    rows = []
    for i, (w, h) in enumerate(shapes):
        noise_image(tmp_path / f"images/{i}.png", w, h, seed=i)
        noise_image(tmp_path / f"edits/{i}.png", h, w, seed=100 + i)
        rows.append({"image": f"images/{i}.png", "edit_image": f"edits/{i}.png", "prompt": f"make it {i}"})
    return tmp_path, rows


# ---------------------------------------------------------------- image sizing (diffusers is the oracle)

def test_edit_sizing_matches_diffusers_pipeline():
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as plus_dims

    for w, h in [(1024, 1024), (1920, 1080), (731, 1299), (3000, 400), (50, 37)]:
        assert edit_image_size(w, h) == calculate_dimensions(1024 * 1024, w / h)[:2] == plus_dims(1024 * 1024, w / h)
        assert edit_image_size(w, h, 384 * 384) == plus_dims(384 * 384, w / h)

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    ew, eh = edit_image_size(70, 45, EDIT_AREA)
    expected = VaeImageProcessor(vae_scale_factor=16).preprocess(img, eh, ew)[0]
    ours = pil_to_tensor(resize_edit_image(img, EDIT_AREA))
    assert ours.shape == (3, eh, ew)
    assert torch.equal(ours, expected)


def test_pil_tensor_round_trip_is_exact():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    t = pil_to_tensor(img)
    assert t.shape == (3, 9, 13) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)), np.asarray(img))


def test_target_size_fixed_and_max_pixels():
    assert target_size((1000, 500), height=256, width=512) == (512, 256)  # fixed wins over the image
    # 1000x500 to at most 100*100: scale sqrt(50) -> 141x70 -> floored to 16: 128x64
    assert target_size((1000, 500), max_pixels=100 * 100) == (128, 64)
    assert target_size((100, 50), max_pixels=1024 * 1024) == (96, 48)  # never scaled up, only floored
    w, h = target_size((4032, 3024), max_pixels=1024 * 1024)
    assert w * h <= 1024 * 1024 and w % 16 == 0 and h % 16 == 0 and abs(w / h - 4 / 3) < 0.02
    with pytest.raises(ValueError, match="--height and --width must be given together"):
        target_size((64, 64), height=64)
    with pytest.raises(ValueError, match="multiples of 16.*--height 496 --width 512"):
        target_size((64, 64), height=500, width=512)
    with pytest.raises(ValueError, match="10x300 px"):
        target_size((10, 300))


def test_resize_and_center_crop_keeps_the_centre():
    # Three vertical stripes; cropping a square from the 2:1 image keeps the middle (green) half.
    array = np.zeros((100, 200, 3), dtype=np.uint8)
    array[:, :50, 0] = 255
    array[:, 50:150, 1] = 255
    array[:, 150:, 2] = 255
    out = np.asarray(resize_and_center_crop(Image.fromarray(array), 64, 64)).astype(int)
    assert out.shape == (64, 64, 3)
    assert (out[:, 2:-2, 1] > 200).all() and (out[:, 2:-2, 0] < 50).all() and (out[:, 2:-2, 2] < 50).all()


# ---------------------------------------------------------------- metadata formats

def test_csv_json_jsonl_give_the_same_samples(data):
    root, rows = data
    write_csv(root / "m.csv", rows)
    (root / "m.json").write_text(json.dumps(rows))
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines ignored
    parsed = [validate_metadata(root / f"m.{ext}", str(root), edit_area=EDIT_AREA) for ext in ("csv", "json", "jsonl")]
    for samples in parsed[1:]:
        assert [(s.image, s.edit_images, s.prompt, s.target_size, s.edit_sizes, s.cache_key) for s in samples] == [
            (s.image, s.edit_images, s.prompt, s.target_size, s.edit_sizes, s.cache_key) for s in parsed[0]]
    assert parsed[0][0].prompt == "make it 0" and parsed[0][0].image == str(root / "images/0.png")
    assert parsed[0][0].where == "row 1 (line 2)" and parsed[2][0].where == "row 1 (line 1)"


def test_multiple_edit_images(data):
    root, _ = data
    noise_image(root / "edits/wide.png", 90, 30, seed=7)
    csv_rows = [
        {"image": "images/0.png", "edit_image": "edits/1.png|edits/wide.png", "prompt": "combine"},
        {"image": "images/1.png", "edit_image": '["edits/0.png", "edits/wide.png"]', "prompt": "combine"},
    ]
    json_rows = [{"image": "images/0.png", "edit_image": ["edits/1.png", "edits/wide.png"], "prompt": "combine"}]
    write_csv(root / "m.csv", csv_rows)
    (root / "m.json").write_text(json.dumps(json_rows))
    ds = EditDataset(root / "m.csv", str(root), edit_area=EDIT_AREA)
    assert [len(s.edit_images) for s in ds.samples] == [2, 2]
    assert ds.samples[1].edit_images == (str(root / "edits/0.png"), str(root / "edits/wide.png"))
    item = ds[0]
    assert [tuple(e.shape) for e in item["edit_images"]] == [(3, *edit_image_size(w, h, EDIT_AREA)[::-1])
                                                             for w, h in [(32, 64), (90, 30)]]
    assert EditDataset(root / "m.json", str(root), edit_area=EDIT_AREA).samples[0].cache_key == ds.samples[0].cache_key


def test_every_bad_row_in_one_error(data, tmp_path):
    root, rows = data
    (root / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    noise_image(root / "images/full.jpg", 64, 64, fmt="JPEG")
    jpeg = (root / "images/full.jpg").read_bytes()
    (root / "images/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad = [
        rows[0],  # row 1 is fine
        {"image": "images/missing.png", "edit_image": "edits/1.png", "prompt": "x"},  # row 2
        {"image": "images/corrupt.png", "edit_image": "edits/2.png", "prompt": "x"},  # row 3
        {"image": "images/3.png", "edit_image": "edits/3.png", "prompt": "   "},  # row 4
        {"image": "images/4.png", "edit_image": "", "prompt": "x"},  # row 5
        {"image": "images/truncated.jpg", "edit_image": "edits/nope.png", "prompt": "x"},  # row 6: two problems
    ]
    write_csv(root / "m.csv", bad)
    with pytest.raises(DatasetError) as err:
        EditDataset(root / "m.csv", str(root), edit_area=EDIT_AREA)
    msg = str(err.value)
    assert "6 problem(s)" in msg and "row 1 " not in msg
    assert "row 2 (line 3): image file not found: images/missing.png" in msg
    assert f"looked at {root / 'images/missing.png'}" in msg
    assert "row 3 (line 4): image images/corrupt.png is not an image file Pillow can read" in msg
    assert "row 4 (line 5): empty prompt" in msg
    assert "row 5 (line 6): empty path in column 'edit_image'" in msg
    assert "row 6 (line 7): image images/truncated.jpg is truncated" in msg
    assert "row 6 (line 7): edit_image file not found: edits/nope.png" in msg
    assert "--dataset_base_path" in msg


@pytest.mark.parametrize("fmt,damage", [("GIF", "cut"), ("TIFF", "cut"), ("BMP", "cut"), ("WEBP", "cut"),
                                         ("GIF", "xor")])
def test_damaged_gif_tiff_bmp_webp_are_reported_up_front(data, fmt, damage):
    # verify() passes all of these; training's decode does not: validation must decode them too.
    root, rows = data
    good = (noise_image(root / f"edits/full.{fmt.lower()}", 64, 64, fmt=fmt)).read_bytes()
    if damage == "cut":
        bad = good[: len(good) * 2 // 3]
    else:
        middle = len(good) // 2
        bad = good[:middle] + bytes(b ^ 0xFF for b in good[middle:middle + 40]) + good[middle + 40:]
    (root / f"edits/bad.{fmt.lower()}").write_bytes(bad)
    rows[1] = dict(rows[1], edit_image=f"edits/bad.{fmt.lower()}")
    write_csv(root / "m.csv", rows)
    with pytest.raises(DatasetError, match=rf"1 problem\(s\)(?s:.*)row 2 \(line 3\): edit_image edits/bad.{fmt.lower()} "
                                           r"(is truncated|is not a readable image)"):
        validate_metadata(root / "m.csv", str(root), edit_area=EDIT_AREA)


def test_a_file_damaged_after_validation_names_its_row(data):
    root, rows = data
    write_csv(root / "m.csv", rows)
    ds = EditDataset(root / "m.csv", str(root), edit_area=EDIT_AREA)
    png = (root / "edits/2.png").read_bytes()
    (root / "edits/2.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(DatasetError, match=r"^  row 3 \(line 4\): .*edits/2.png: is truncated or damaged .*remove the row"):
        ds[2]
    assert ds[1]["image"].shape[0] == 3  # the other rows still load
    # from a DataLoader worker (--dataset_num_workers) the same one message comes back, not the worker's traceback
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [2]), collate_fn=collate_fn, num_workers=1)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    assert str(err.value).startswith("  row 3 (line 4): ") and "Traceback" not in str(err.value)


@pytest.mark.parametrize("line,count,cause", [
    ("images/0.png,edits/0.png,edits/1.png,two edits", 4, "edit images separated by ',' instead of '|'?"),
    ("images/0.png,edits/0.png,make it red, then blue", 4, "a comma in an unquoted value?"),
    ("images/0.png,edits/0.png,make it red,", 4, "a trailing comma"),
    ("images/0.png,edits/0.png", 2, "a value is missing"),
])
def test_csv_row_with_another_field_count_is_named_not_shifted(data, line, count, cause):
    # pandas made the first column the index when every row had an extra field: image=edits/0.png, silently
    root, _ = data
    (root / "m.csv").write_text(f"image,edit_image,prompt\n\n{line}\n")
    with pytest.raises(DatasetError) as err:
        validate_metadata(root / "m.csv", str(root), edit_area=EDIT_AREA)
    assert str(err.value).splitlines()[1] == f"  row 1 (line 3): {count} fields, the header has 3 ({cause}): {line}"
    assert "Several edit images go in one cell separated by '|'" in str(err.value)
    assert 'must be in double quotes ("make it red, then blue")' in str(err.value)


def test_csv_quoting_blank_rows_and_header_problems(data):
    root, _ = data
    (root / "m.csv").write_text('image, edit_image, prompt\n\nimages/0.png,"edits/0.png|edits/1.png","red,\nblue"\n'
                                ',,\nimages/1.png,edits/1.png,1\n')
    samples = validate_metadata(root / "m.csv", str(root), edit_area=EDIT_AREA)
    assert [(s.where, s.prompt, len(s.edit_images)) for s in samples] == [
        ("row 1 (line 3)", "red,\nblue", 2), ("row 2 (line 6)", "1", 1)]
    (root / "m.csv").write_text("image,edit_image,prompt,\nimages/0.png,edits/0.png,x,\n")
    with pytest.raises(DatasetError, match=r"the header \(line 1\) 'image,edit_image,prompt,' has a column without a "
                                           r"name \(a trailing comma\?\)"):
        validate_metadata(root / "m.csv", str(root))
    (root / "m.csv").write_text('image,edit_image,prompt\nimages/0.png,edits/0.png,"never closed\n')
    with pytest.raises(DatasetError, match="line 2 is not readable as CSV .*ends with a double quote"):
        validate_metadata(root / "m.csv", str(root))


def test_missing_column_and_bad_json_lines(data):
    root, rows = data
    write_csv(root / "m.csv", [{k: v for k, v in r.items() if k != "prompt"} for r in rows])
    with pytest.raises(DatasetError, match=r"column 'prompt' is missing \(found: edit_image, image\)"):
        validate_metadata(root / "m.csv", str(root))
    (root / "m.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n[1,\n")
    with pytest.raises(DatasetError, match=r"(?s)2 line\(s\) are not valid JSON.*line 2:.*line 4:"):
        validate_metadata(root / "m.jsonl", str(root))
    (root / "m.json").write_text(json.dumps([rows[0], {"image": "images/1.png", "prompt": "x"}]))
    with pytest.raises(DatasetError, match="row 2: no 'edit_image' value"):
        validate_metadata(root / "m.json", str(root))
    with pytest.raises(DatasetError, match="unsupported column"):
        validate_metadata(root / "m.json", str(root), data_file_keys="image,depth")
    with pytest.raises(DatasetError, match="unsupported metadata format '.txt'"):
        (root / "m.txt").write_text("x")
        validate_metadata(root / "m.txt", str(root))


def test_same_target_and_edit_image_warns(data):
    root, rows = data
    rows[2] = dict(rows[2], edit_image=rows[2]["image"])
    write_csv(root / "m.csv", rows)
    with pytest.warns(UserWarning, match=r"(?s)1 row\(s\) use the same image.*row 3 \(line 4\): images/2.png"):
        samples = validate_metadata(root / "m.csv", str(root), edit_area=EDIT_AREA)
    assert len(samples) == 6  # a warning, not a failure


# ---------------------------------------------------------------- samples

def test_items_fixed_and_max_pixels_sizes(data):
    root, rows = data
    write_csv(root / "m.csv", rows)
    ds = EditDataset(root / "m.csv", str(root), max_pixels=40 * 20, edit_area=EDIT_AREA, dataset_repeat=3)
    assert len(ds) == 18
    item = ds[7]  # row 1 again: 64x32 scaled to <= 800 px -> 40x20 -> floored to 32x16
    assert item["index"] == 1 and item["prompt"] == "make it 1"
    assert item["image"].shape == (3, 16, 32) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["edit_images"][0].shape == (3, *edit_image_size(32, 64, EDIT_AREA)[::-1])
    fixed = EditDataset(root / "m.csv", str(root), height=32, width=48, edit_area=EDIT_AREA)
    assert {tuple(fixed[i]["image"].shape) for i in range(6)} == {(3, 32, 48)}
    # centre-crop of the target, identical to the helper applied to the file
    expected = pil_to_tensor(resize_and_center_crop(Image.open(root / "images/2.png").convert("RGB"), 48, 32))
    assert torch.equal(fixed[2]["image"], expected)


def test_cache_key_follows_content_prompt_and_size(data):
    root, rows = data
    write_csv(root / "m.csv", rows)
    key = lambda **kw: EditDataset(root / "m.csv", str(root), edit_area=EDIT_AREA, **kw).samples[0].cache_key
    base = key()
    assert key() == base
    assert key(height=32, width=32) != base
    noise_image(root / "images/0.png", 64, 32, seed=99)  # same name, new pixels
    changed = key()
    assert changed != base
    rows[0]["prompt"] = "another prompt"
    write_csv(root / "m.csv", rows)
    assert key() not in (base, changed)


# ---------------------------------------------------------------- buckets

@pytest.fixture
def mixed(data):
    root, rows = data
    write_csv(root / "m.csv", rows)
    return EditDataset(root / "m.csv", str(root), edit_area=EDIT_AREA, dataset_repeat=3)  # 18 items, 3 buckets


def test_batch_of_4_mixed_aspect_ratios_is_one_size_per_batch(mixed):
    sampler = BucketBatchSampler(mixed, batch_size=4, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(mixed, batch_sampler=sampler, collate_fn=collate_fn)
    batches = sampler.batches()
    for batch, indices in zip(loader, batches, strict=True):
        assert batch["index"] == [i % 6 for i in indices]
        assert batch["image"].shape[0] == len(batch["edit_images"][0]) == len(indices) <= 4
    assert sorted(i for b in batches for i in b) == list(range(18))  # every item exactly once
    assert all(len({mixed.bucket_key(i) for i in b}) == 1 for b in batches)
    assert sorted(len(b) for b in batches) == [2, 2, 2, 4, 4, 4]  # 6 per bucket: one full, one partial
    assert len(loader) == len(sampler) == 6
    summary = sampler.bucket_summary()
    assert "18 samples in 3 size bucket(s), batch size 4: 6 batches per epoch" in summary
    ew, eh = edit_image_size(32, 64, EDIT_AREA)
    assert f"  64x32 | edit {ew}x{eh}: 6 samples -> 1 full batch(es) + 1 partial of 2" in summary
    dropped = BucketBatchSampler(mixed, batch_size=4, seed=0, drop_last=True)
    assert len(dropped) == 3 and all(len(b) == 4 for b in dropped)
    with pytest.raises(ValueError, match="mixes image sizes"):
        collate_fn([mixed[0], mixed[2]])


def test_batch_size_1_is_the_seeded_shuffle(mixed):
    sampler = BucketBatchSampler(mixed, batch_size=1, shuffle=True, seed=5)
    sampler.set_epoch(2)
    expected = torch.randperm(18, generator=torch.Generator().manual_seed(7)).tolist()
    assert [b[0] for b in sampler] == expected
    assert [b[0] for b in BucketBatchSampler(mixed, batch_size=1, shuffle=False)] == list(range(18))


def test_deterministic_per_seed_and_epoch(mixed):
    make = lambda seed: BucketBatchSampler(mixed, batch_size=4, seed=seed)
    a, b = make(0), make(0)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(make(1)) != list(make(0))


@pytest.mark.parametrize("batch_size,replicas", [(4, 2), (4, 3), (1, 4), (2, 4)])
def test_rank_sharding(mixed, batch_size, replicas):
    full = BucketBatchSampler(mixed, batch_size, seed=3).batches()
    shards = [BucketBatchSampler(mixed, batch_size, seed=3, num_replicas=replicas, rank=r) for r in range(replicas)]
    lists = [list(s) for s in shards]
    assert len({len(x) for x in lists}) == 1 and all(len(s) == len(lists[0]) for s in shards)  # same step count
    flat = [tuple(b) for x in lists for b in x]
    assert set(flat) == {tuple(b) for b in full}  # covering
    if len(full) % replicas == 0:
        assert len(flat) == len(set(flat)) == len(full)  # disjoint
    else:  # padded with wrapped batches only
        assert len(flat) - len(set(flat)) == (-len(full)) % replicas
    with pytest.raises(ValueError, match="rank 3 is outside 0..2"):
        BucketBatchSampler(mixed, batch_size, num_replicas=3, rank=3)


def test_resume_skips_the_consumed_batches(mixed):
    sampler = BucketBatchSampler(mixed, batch_size=4, seed=11, num_replicas=2, rank=1)
    sampler.set_epoch(4)
    uninterrupted = list(sampler)
    sampler.set_start(2)
    assert len(sampler) == len(uninterrupted) - 2
    loader = torch.utils.data.DataLoader(mixed, batch_sampler=sampler, collate_fn=collate_fn, num_workers=2)
    resumed = [batch["index"] for batch in loader]
    assert resumed == [[i % 6 for i in b] for b in uninterrupted[2:]]
    sampler.set_epoch(5)  # a new epoch starts from its beginning
    assert len(sampler) == len(uninterrupted)
    with pytest.raises(ValueError, match="cannot skip 9 batches"):
        sampler.set_start(9)


def test_exif_rotation_is_applied_to_sizes_and_pixels(data):
    # A phone photo stored 64x32 but shown 32x64: header sizes (buckets) and decoded tensors must agree.
    root, rows = data
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    Image.new("RGB", (64, 32), (200, 10, 10)).save(root / "images/rotated.jpg", exif=exif.tobytes())
    rows[0] = dict(rows[2], image="images/rotated.jpg")
    write_csv(root / "m.csv", rows)
    ds = EditDataset(root / "m.csv", str(root), edit_area=EDIT_AREA)
    assert ds.samples[0].target_size == (32, 64)
    assert ds[0]["image"].shape == (3, 64, 32)
    assert ds.bucket_key(0) == ds.bucket_key(2)  # row 3: a 32x64 portrait with the same edit input
    batch = collate_fn([ds[0], ds[2]])
    assert batch["image"].shape == (2, 3, 64, 32)
