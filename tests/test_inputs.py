"""Issue 10: images in every mode, metadata encodings and headers, the converter never writes into its input,
truncated model files and bad inference inputs named before any model loads."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from safetensors.torch import save_file

from conftest import TINY_MODEL_IDS, load_script
from diffsynth.trainers.dataset import DatasetError, validate_metadata
from diffsynth.utils.image import ImageError, open_image
from diffsynth.utils.io import WeightFileError, read_keys_and_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "examples/qwen_image/model_training/utils/convert_merged_qkv_checkpoint.py")
INFER = os.path.join(ROOT, "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")
RAMP = (np.arange(32 * 48).reshape(32, 48) * 43 % 65536).astype(np.uint16)  # a 16-bit grey ramp


# ---- item 3: images -------------------------------------------------------------------------------------------

def expected_grey(values16):
    return np.round(values16.astype(np.float64) * 255 / 65535).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_greyscale_becomes_grey_not_white(tmp_path, mode):
    if mode == "I;16":
        img, path = Image.fromarray(RAMP), tmp_path / "g.png"  # Pillow opens 16-bit grey PNGs as I;16
    elif mode == "I":
        img, path = Image.fromarray(RAMP.astype(np.int32)), tmp_path / "g.tif"
    else:
        img, path = Image.fromarray((RAMP / 65535).astype(np.float32)), tmp_path / "g.tif"
    img.save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (32, 48, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(int) - expected_grey(RAMP)).max() <= 1
    assert rgb.std() > 50  # Pillow's own convert("RGB") clips these to white


def test_transparency_palette_cmyk_and_refusals(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent
    la.save(tmp_path / "la.png")
    assert (np.asarray(open_image(tmp_path / "la.png")) == 255).all()  # shown over white
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    assert (np.asarray(open_image(tmp_path / "p.png")) == 255).all()
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "c.jpg")
    r, g, b = np.asarray(open_image(tmp_path / "c.jpg"))[4, 4]
    assert r > 200 and g < 60 and b < 60
    with_profile = tmp_path / "cp.tif"
    cmyk.save(with_profile, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    # an embedded profile is used; one that does not fit (an RGB profile on CMYK data) falls back to the plain conversion
    r, g, b = np.asarray(open_image(with_profile))[4, 4]
    assert r > 200 and g < 60 and b < 60
    Image.fromarray(np.full((4, 4), 1e6, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="f.tif: has float pixels from 1e\\+06 to 1e\\+06, whose range is unknown"):
        open_image(tmp_path / "f.tif")


def test_directory_empty_truncated_and_huge_images_say_what_they_are(tmp_path):
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name, what in (("dir.png", "is a directory, not an image file"), ("empty.png", "is empty (0 bytes)"),
                       ("cut.png", "is truncated or damaged"), ("nope.png", "not found")):
        with pytest.raises(ImageError, match=re.escape(f"{name}: {what}")):
            open_image(tmp_path / name)
    Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")  # 400 megapixels, a few kB on disk
    with pytest.raises(ImageError, match="huge.png: is 400 megapixels, more than the 179 MP limit"):
        open_image(tmp_path / "huge.png")
    # the dataset check says the same, row by row, before anything loads
    rows = [f"{n},ok.png,edit it" for n in ("dir.png", "empty.png", "cut.png")]
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path, max_pixels=4096, edit_area=4096)
    msg = str(e.value)
    assert "row 1 (line 2): image dir.png is a directory, not an image file" in msg
    assert "row 2 (line 3): image empty.png is empty (0 bytes)" in msg and "BytesIO" not in msg
    assert "row 3 (line 4): image cut.png is truncated" in msg


def test_sixteen_bit_targets_train_as_grey(tmp_path):
    from diffsynth.trainers.dataset import EditDataset

    Image.fromarray(RAMP).save(tmp_path / "t.png")
    Image.fromarray(RAMP).save(tmp_path / "e.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nt.png,e.png,x\n")
    with pytest.warns(UserWarning):  # same content as target and input
        item = EditDataset(tmp_path / "m.csv", tmp_path, max_pixels=48 * 32, edit_area=48 * 32)[0]
    assert item["image"].std() > 0.3 and item["image"].mean() < 0.5  # a ramp, not all white (1.0)


def test_csv_header_spaces_bom_and_encodings(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32), (9, 9, 9) if name == "a.png" else (200, 0, 0)).save(tmp_path / name)
    (tmp_path / "spaces.csv").write_text("image, edit_image, prompt\na.png, b.png, make it red\n", encoding="utf-8-sig")
    [sample] = validate_metadata(tmp_path / "spaces.csv", tmp_path, max_pixels=4096, edit_area=4096)
    assert sample.image.endswith("a.png") and sample.edit_images[0].endswith("b.png")
    (tmp_path / "latin1.csv").write_bytes("image,edit_image,prompt\na.png,b.png,ok\na.png,b.png,caf\xe9 au lait\n"
                                          .encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.csv: line 3 is not UTF-8 text \(byte 0xe9 at column 16; the file "
                                           r"looks Latin-1"):
        validate_metadata(tmp_path / "latin1.csv", tmp_path)
    (tmp_path / "u16.jsonl").write_bytes('{"image": "a.png"}\n'.encode("utf-16"))
    with pytest.raises(DatasetError, match="u16.jsonl: line 1 is not UTF-8 text .*UTF-16"):
        validate_metadata(tmp_path / "u16.jsonl", tmp_path)


# ---- item 4: the converter never writes into its input ---------------------------------------------------------

@pytest.fixture
def sharded_dit(tiny_models, tmp_path):
    """A sharded DiT in the official layout (3 shards, index json, config) and a single-file copy."""
    import shutil

    from diffsynth.models.dit_loader import convert_dit_checkpoint

    shutil.copytree(os.path.join(tiny_models, "tiny-random/Qwen-Image-Edit/transformer"), tmp_path / "sharded")
    convert_dit_checkpoint(tmp_path / "sharded", tmp_path / "standard.safetensors", "to_merged")
    return tmp_path


def test_converter_refuses_its_own_inputs_as_output(sharded_dit, capsys):
    convert = load_script(CONVERT, "convert_cli").main
    shards = sorted(f for f in os.listdir(sharded_dit / "sharded") if f.endswith(".safetensors"))
    index = sharded_dit / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    before = {p: p.read_bytes() for p in (sharded_dit / "sharded").iterdir()}
    for source, target in ((sharded_dit / "sharded", sharded_dit / "sharded"),  # the folder (sharded output)
                           (index, sharded_dit / "sharded" / shards[1]),  # one of its shards
                           (index, index),
                           (sharded_dit / "standard.safetensors", sharded_dit / "standard.safetensors")):
        direction = "to_merged" if "sharded" in str(source) else "to_standard"
        assert convert(["--input", str(source), "--output", str(target), "--direction", direction]) == 2
        assert "--output" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (sharded_dit / "sharded").iterdir()} == before  # nothing was touched
    assert not [p for p in sharded_dit.rglob(".tmp*")]


def test_converter_messages_for_each_refusal(sharded_dit, capsys):
    convert = load_script(CONVERT, "convert_cli").main
    folder = sharded_dit / "sharded"
    assert convert(["--input", str(folder), "--output", str(folder), "--direction", "to_merged"]) == 2
    assert "is the folder the input files are in" in capsys.readouterr().err
    shard = sorted(folder.glob("*-00002-*.safetensors"))[0]
    assert convert(["--input", str(folder), "--output", str(shard), "--direction", "to_merged"]) == 2
    assert f"--output {shard} is one of the input files" in capsys.readouterr().err


def test_a_truncated_shard_is_named_before_anything_loads(sharded_dit, tmp_path):
    import shutil

    copy = tmp_path / "dit"
    shutil.copytree(sharded_dit / "sharded", copy)
    shard = sorted(copy.glob("*-00002-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match=f"{shard}: truncated: .* bytes, its header needs"):
        read_keys_and_shapes(sorted(copy.glob("*.safetensors")))
    from diffsynth.models import load_qwen_image_dit

    with pytest.raises(WeightFileError, match="truncated"):
        load_qwen_image_dit(copy, merged_qkv=False)


# ---- item 8: inference inputs checked before the models load --------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--lora_scale", "nan"], "--lora_scale must be a finite number"),
    (["--prompt", "bad \udce9 bytes"], "--prompt is not valid UTF-8 text"),
    (["--denoising_strength", "0"], "--denoising_strength must be in (0, 1]"),
])
def test_inference_flags_refused_up_front(tmp_path, capsys, extra, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "e.png")
    with pytest.raises(SystemExit) as e:
        load_script(INFER, "infer").main(["--edit_image", str(tmp_path / "e.png"), "--prompt", "x", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_inference_files_refused_before_models_load(tmp_path, capsys, offline):
    main = load_script(INFER, "infer").main
    Image.new("RGB", (32, 32)).save(tmp_path / "e.png")
    Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")
    nan_lora = tmp_path / "nan.safetensors"
    save_file({"transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.zeros(4, 64),
               "transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.full((64, 4), float("inf"))}, str(nan_lora))
    (tmp_path / "a_file").write_text("x")
    base = ["--prompt", "x", "--models_dir", str(tmp_path / "no-models")]
    for extra, message in (
            (["--edit_image", str(tmp_path / "huge.png")], "huge.png: is 400 megapixels, more than the 179 MP limit"),
            (["--edit_image", str(tmp_path)], f"{tmp_path}: is a directory, not an image file"),
            (["--edit_image", str(tmp_path / "e.png"), "--lora_path", str(nan_lora)], "nan.safetensors: 1 tensor(s) hold NaN"),
            (["--edit_image", str(tmp_path / "e.png"), "--output", str(tmp_path)], "is a folder; name an image file"),
            (["--edit_image", str(tmp_path / "e.png"), "--output", str(tmp_path / "a_file" / "o.png")], "a_file is a file"),
    ):
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert offline == []  # refused before any model was looked up


@pytest.mark.slow
def test_a_nan_output_is_an_error_not_a_black_png(tiny_models, tmp_path, capsys, monkeypatch):
    from diffsynth.pipelines import qwen_image

    main = load_script(INFER, "infer").main
    Image.new("RGB", (32, 32)).save(tmp_path / "e.png")
    real = qwen_image.QwenImagePipeline.predict
    monkeypatch.setattr(qwen_image.QwenImagePipeline, "predict",
                        lambda self, *a, **k: real(self, *a, **k) * float("inf"))  # as an fp16 overflow would
    code = main(["--edit_image", str(tmp_path / "e.png"), "--prompt", "x", "--output", str(tmp_path / "o.png"),
                 "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", tiny_models, "--num_steps", "2",
                 "--edit_image_area", "1024", "--cfg_scale", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "the latents became NaN/inf at denoising step 1 of 2" in err and "no image written" in err
    assert not (tmp_path / "o.png").exists()
