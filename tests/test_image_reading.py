"""Images read the same way everywhere: EXIF rotation in every format, transparency, animation, aspect ratios
the VL text encoder refuses, and the pipeline's own conversion of PIL images passed to it."""
import os

import numpy as np
import torch
import pytest
from PIL import Image

from conftest import load_script
from diffsynth.trainers.dataset import DatasetError, EditDataset, validate_metadata
from diffsynth.utils.image import ImageError, check_edit_size, edit_image_size, open_image

INFER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")

# a 64x32 picture whose every pixel differs, so a wrong rotation or crop shows
LANDSCAPE = (np.random.RandomState(0).rand(32, 64, 3) * 255).astype(np.uint8)


def with_orientation(path, orientation, **kwargs):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(LANDSCAPE).save(path, exif=exif.tobytes(), **kwargs)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_rotated_images_train_upright_at_their_displayed_size(tmp_path, ext, orientation):
    """The size read from the header (which sizes the target and the buckets) is the size of the decoded, upright
    image, in every format: Pillow's TIFF reader reports a rotated TIFF's size already rotated."""
    with_orientation(tmp_path / f"t.{ext}", orientation)
    Image.fromarray(LANDSCAPE).save(tmp_path / "e.png")
    (tmp_path / "m.csv").write_text(f"image,edit_image,prompt\nt.{ext},e.png,rotate\n")
    upright = open_image(tmp_path / f"t.{ext}")
    assert upright.size == ((32, 64) if orientation in (6, 8) else (64, 32))
    [sample] = validate_metadata(tmp_path / "m.csv", tmp_path, max_pixels=None, edit_area=64 * 32)
    assert sample.target_size == upright.size
    item = EditDataset(tmp_path / "m.csv", tmp_path, max_pixels=None, edit_area=64 * 32)[0]
    expected = np.asarray(upright, dtype=np.float32) / 255 * 2 - 1  # nothing cropped, nothing resized
    assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), expected)


# ---- aspect ratios the VL text encoder refuses ----------------------------------------------------------------

def test_edit_images_too_narrow_for_the_vl_encoder_are_refused_by_name_before_training(tmp_path):
    """An 8x2000 edit image resizes fine for the VAE, but shown to Qwen2.5-VL at 1024x1024 area it is 64x16192 px,
    over the 1:200 its image processor takes ('absolute aspect ratio must be smaller than 200', mid-run, no file
    named). The metadata check names the row and file."""
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "t.png")
    Image.new("RGB", (8, 2000), (200, 20, 30)).save(tmp_path / "tall.png")
    Image.new("RGB", (40, 40), (0, 200, 30)).save(tmp_path / "ok.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nt.png,ok.png,fine\nt.png,ok.png|tall.png,too tall\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path)
    msg = str(e.value)
    assert "row 2 (line 3): edit_image tall.png" in msg and "aspect ratio" in msg and "1:200" in msg, msg
    assert "row 1" not in msg


def test_the_vl_limit_is_the_image_processors():
    """The refusal matches transformers' Qwen2-VL processor: what it accepts passes, what it refuses is refused."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for size in [(8, 2000), (2000, 8), (1, 300), (16, 3300), (10, 1900), (10, 1500), (64, 64), (1, 150), (3, 580)]:
        def processor_accepts(area):
            w, h = edit_image_size(*size, target_area=area)
            try:
                return w > 0 and h > 0 and bool(smart_resize(h, w))
            except ValueError:
                return False
        accepted = all(processor_accepts(area) for area in (1024 * 1024, 384 * 384))
        try:
            check_edit_size("x", size, 1024 * 1024)
            refused = False
        except ImageError:
            refused = True
        assert refused != accepted, size


def test_inference_script_refuses_a_too_narrow_edit_image_before_loading(tmp_path, capsys, offline):
    Image.new("RGB", (8, 2000)).save(tmp_path / "tall.png")
    main = load_script(INFER, "infer").main
    code = main(["--edit_image", str(tmp_path / "tall.png"), "--prompt", "x", "--output", str(tmp_path / "o.png"),
                 "--models_dir", str(tmp_path / "no-models")])
    err = capsys.readouterr().err
    assert code == 2 and f"--edit_image {tmp_path / 'tall.png'}: its 8x2000 px aspect ratio" in err, err
    assert "1:200" in err and "Traceback" not in err
    assert offline == []


def test_a_too_narrow_validation_edit_image_is_refused_by_preflight(tmp_path):
    from diffsynth.trainers.preflight import preflight

    Image.new("RGB", (2000, 8)).save(tmp_path / "wide.png")
    from conftest import TINY_MODEL_IDS
    from diffsynth.trainers.args import parse_args

    args = parse_args(["--dataset_base_path", str(tmp_path), "--dataset_metadata_path", str(tmp_path / "m.csv"),
                       "--output_path", str(tmp_path / "out"), "--model_id_with_origin_paths", TINY_MODEL_IDS,
                       "--models_dir", str(tmp_path / "models"), "--validation_prompt", "x", "--validation_edit_image", str(tmp_path / "wide.png")])
    with pytest.raises(ImageError, match=r"--validation_edit_image .*wide.png: its 2000x8 px aspect ratio"):
        preflight(args, dataset=False)


# ---- transparency, and the pipeline reading PIL images as the files are read ---------------------------------

def test_an_rgb_colour_key_is_transparent_like_every_other_mode(tmp_path):
    """A PNG's tRNS colour key on an RGB image marks transparent pixels as it does on L and P images: all of them
    are composited over white (the RGB one kept its key colour)."""
    a = np.full((8, 8, 3), 200, np.uint8)
    a[:4] = (10, 20, 30)
    Image.fromarray(a).save(tmp_path / "rgb.png", transparency=(10, 20, 30))
    Image.fromarray(a[..., 0]).save(tmp_path / "l.png", transparency=10)
    for name in ("rgb.png", "l.png"):
        rgb = np.asarray(open_image(tmp_path / name))
        assert (rgb[:4] == 255).all(), name
        assert (rgb[4:] == 200).all(), name


def test_the_pipeline_reads_a_pil_image_as_the_scripts_read_its_file(tiny_pipe, tmp_path):
    """A PIL image given to the pipeline directly (RGBA, 16-bit grey, a JPEG with an EXIF rotation) gives what the
    same picture gives through its file and open_image (training, validation, the inference script): it used
    convert("RGB"), which drops alpha (the hidden colour shows), clips 16-bit grey to white and ignores EXIF."""
    rgba = np.zeros((48, 80, 4), np.uint8)
    rgba[..., :3] = (np.random.RandomState(1).rand(48, 80, 3) * 255).astype(np.uint8)
    rgba[..., 3] = 255
    rgba[:, :40, 3] = 0  # left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray((np.arange(48 * 80).reshape(48, 80) * 17).astype(np.uint16)).save(tmp_path / "g.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgba[..., :3].copy()).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)

    def latents(edit):
        return tiny_pipe("make it blue", edit_image=edit, num_inference_steps=1, seed=0, edit_image_area=64 * 64,
                         progress=False, output_type="latent")

    for name in ("a.png", "g.png", "r.jpg"):
        with Image.open(tmp_path / name) as raw:
            direct = latents(raw)
        assert torch.equal(direct, latents(open_image(tmp_path / name))), name
    with Image.open(tmp_path / "r.jpg") as raw:  # upright: the output takes the rotated (portrait) size
        assert tiny_pipe("x", edit_image=raw, num_inference_steps=1, seed=0, edit_image_area=64 * 64,
                         progress=False).size == (64, 96)  # 48x80 at 4096 px area; unrotated 96x64


# ---- animation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["gif", "webp", "png", "tif"])
def test_animated_and_multi_page_images_are_refused_by_name(tmp_path, ext):
    """Which frame of an animation (or page of a TIFF) is the picture is a guess: frame 0 was taken silently. They are
    refused with the file, the row, the frame count and the fix, before anything loads; a phone's MPO JPEG (the
    photo plus a preview) is one picture and is read."""
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / f"anim.{ext}", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "t.png")
    refusal = rf"anim.{ext}: has 3 (frames|pages) .*save the frame you mean as a still image"
    with pytest.raises(ImageError, match=refusal):
        open_image(tmp_path / f"anim.{ext}")
    (tmp_path / "m.csv").write_text(f"image,edit_image,prompt\nt.png,anim.{ext},x\n")
    with pytest.raises(DatasetError, match=rf"row 1 \(line 2\): edit_image anim.{ext} has 3 (frames|pages)"):
        validate_metadata(tmp_path / "m.csv", tmp_path, max_pixels=4096, edit_area=4096)


def test_an_mpo_photo_is_one_picture(tmp_path):
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    frames[0].save(tmp_path / "photo.jpg", format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "photo.jpg") as img:
        assert img.format == "MPO" and img.n_frames == 2
    assert open_image(tmp_path / "photo.jpg").getpixel((5, 5))[0] > 200


def test_conditioning_cached_before_the_colour_key_change_is_not_reused(tmp_path):
    """An RGB PNG with a colour key now yields other pixels for the same file, so a conditioning cache entry written
    before (its key: format version 1, the file's hash, prompt, sizes) must not be found again."""
    import hashlib
    import json

    a = np.full((32, 32, 3), 200, np.uint8)
    a[:16] = (10, 20, 30)
    Image.fromarray(a).save(tmp_path / "t.png", transparency=(10, 20, 30))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "e.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nt.png,e.png,x\n")
    [s] = validate_metadata(tmp_path / "m.csv", tmp_path, max_pixels=4096, edit_area=32 * 32)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("t.png", "e.png")]
    old = json.dumps([1, digest[0], [digest[1]], "x", list(s.target_size), [list(e) for e in s.edit_sizes]])
    assert s.cache_key != hashlib.sha256(old.encode()).hexdigest()


# ---- masks -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_mask_with_transparent_pixels_is_refused(tmp_path, mode):
    """A mask painted as opaque white on a transparent layer (as image editors and ComfyUI's alpha masks are saved)
    was composited over white: transparent became white, 'train', and the mask trained everywhere, silently."""
    grey = np.zeros((32, 32), np.uint8)
    grey[8:24, 8:24] = 255
    alpha = grey.copy()  # the painted square opaque, the rest transparent
    if mode == "P":
        mask = Image.fromarray(grey).convert("P")
        mask.save(tmp_path / "mask.png", transparency=0)
    else:
        channels = [grey] * (3 if mode == "RGBA" else 1) + [alpha]
        Image.fromarray(np.stack(channels, -1), mode).save(tmp_path / "mask.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "opaque.png")  # a plain grey mask passes
    Image.fromarray(np.stack([grey] * 3 + [np.full((32, 32), 255, np.uint8)], -1), "RGBA").save(tmp_path / "rgba.png")
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "t.png")
    Image.new("RGB", (32, 32), (40, 50, 60)).save(tmp_path / "e.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt,mask\nt.png,e.png,x,opaque.png\nt.png,e.png,x,rgba.png\n"
                                    "t.png,e.png,x,mask.png\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path, data_file_keys="image,edit_image,mask", max_pixels=4096,
                          edit_area=4096)
    msg = str(e.value)
    assert "row 3 (line 4): mask mask.png has transparent pixels" in msg and "white = train" in msg, msg
    assert "row 1" not in msg and "row 2" not in msg  # opaque masks, RGBA or not, are fine


@pytest.mark.parametrize("keep", [1 / 3, 2 / 3])
def test_a_cut_animated_gif_is_named_damaged_not_a_traceback(tmp_path, keep):
    """Counting an animation's frames reads every frame header: in a cut GIF that raised struct.error or IndexError
    out of open_image (a traceback from the inference script) instead of naming the damaged file."""
    frames = [Image.fromarray((np.random.RandomState(i).rand(64, 64, 3) * 255).astype(np.uint8)) for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    data = (tmp_path / "a.gif").read_bytes()
    (tmp_path / "cut.gif").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageError, match=r"cut.gif: (is truncated or damaged|has \d frames)"):
        open_image(tmp_path / "cut.gif")


def test_a_coloured_mask_is_refused_a_grey_one_in_any_mode_is_read(tmp_path):
    """A mask is read by its grey level: red paint (255, 0, 0) became grey 76, training that region at 30% without a
    word. A coloured mask is refused by row; grey masks in RGB (a JPEG too), L or palette mode are read."""
    square = np.zeros((32, 32, 3), np.uint8)
    square[8:24, 8:24] = (255, 0, 0)
    Image.fromarray(square).save(tmp_path / "red.png")
    grey = np.zeros((32, 32), np.uint8)
    grey[8:24, 8:24] = 255
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey.jpg", quality=90)
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "t.png")
    Image.new("RGB", (32, 32), (40, 50, 60)).save(tmp_path / "e.png")
    rows = "".join(f"t.png,e.png,x,{m}\n" for m in ("grey.jpg", "l.png", "p.png", "red.png"))
    (tmp_path / "m.csv").write_text("image,edit_image,prompt,mask\n" + rows)
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path, data_file_keys="image,edit_image,mask", max_pixels=4096,
                          edit_area=4096)
    msg = str(e.value)
    assert "1 problem(s)" in msg and "row 4 (line 5): mask red.png is coloured" in msg and "greyscale" in msg, msg


# ---- the edit image resolution a LoRA was trained at ---------------------------------------------------------

def lora_trained_at(path, edit_image_area):
    from diffsynth.lora import save_lora
    from diffsynth.models import load_qwen_image_dit
    from diffsynth.utils.tiny_models import write_tiny_models

    write_tiny_models(path.parent / "models", seed=0)
    dit = load_qwen_image_dit(str(path.parent / "models/tiny-random/Qwen-Image-Edit/transformer"), merged_qkv=True)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, module in dit.named_modules():
        if name.endswith("attn.to_qkv"):
            sd[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            sd[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
    save_lora(sd, str(path), rank=4, alpha=4, target_modules="to_qkv", architecture="merged_qkv",
              extra_metadata={"edit_image_area": edit_image_area, "steps": 10})
    return str(path.parent / "models")


@pytest.mark.slow
def test_inference_sizes_edit_images_as_the_lora_was_trained(tmp_path, capsys):
    """A LoRA trained with --edit_image_area 4096 (the README's memory saver) saw edit images, and learned outputs,
    at that area; the inference script defaulted to 1024x1024 regardless, silently feeding it 256x more tokens than
    it ever saw. It now takes the area from the LoRA's metadata and says so; an explicit flag wins, with a note."""
    models = lora_trained_at(tmp_path / "lora.safetensors", 4096)
    Image.fromarray((np.random.RandomState(0).rand(80, 48, 3) * 255).astype(np.uint8)).save(tmp_path / "e.png")
    from conftest import TINY_MODEL_IDS

    main = load_script(INFER, "infer").main
    base = ["--edit_image", str(tmp_path / "e.png"), "--prompt", "x", "--lora_path", str(tmp_path / "lora.safetensors"),
            "--model_id_with_origin_paths", TINY_MODEL_IDS, "--models_dir", models, "--num_steps", "1",
            "--device", "cpu", "--cfg_scale", "1"]
    assert main([*base, "--output", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    assert "--edit_image_area 4096: the area" in err and "lora.safetensors was trained at" in err, err
    with Image.open(tmp_path / "o.png") as out:
        assert out.size == (64, 96)  # 48x80 at 4096 px area, not 1024x1024's 800x1328
    assert main([*base, "--output", str(tmp_path / "o2.png"), "--edit_image_area", "16384"]) == 0
    err = capsys.readouterr().err
    assert "--edit_image_area 16384 differs from the 4096 px area" in err, err


def test_pil_to_tensor_converts_like_every_reader():
    """pil_to_tensor (QwenImagePipeline.encode_edit_images hands it the caller's images) used convert("RGB"):
    transparent pixels showed their hidden colour and 16-bit grey went white, unlike every other reader."""
    from diffsynth.utils.image import pil_to_tensor

    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert torch.equal(pil_to_tensor(rgba), torch.ones(3, 16, 16))
    grey16 = Image.fromarray(np.full((16, 16), 32768, np.uint16))
    assert abs(pil_to_tensor(grey16).mean().item()) < 0.01  # mid grey, not white (1.0)


def test_rows_whose_target_and_edit_image_differ_in_shape_are_named(tmp_path):
    """Inference (and validation during training) outputs the last edit image's aspect ratio unless --height and
    --width say otherwise: a LoRA trained on square targets of 3:2 inputs then runs at a shape it never made. The
    rows are named once with the fix; rows of one shape are not."""
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "square.png")
    Image.new("RGB", (96, 64), (4, 5, 6)).save(tmp_path / "wide.png")
    Image.new("RGB", (48, 32), (7, 8, 9)).save(tmp_path / "wide_small.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nsquare.png,wide.png,x\nwide.png,wide_small.png,y\n")
    with pytest.warns(UserWarning) as caught:
        validate_metadata(tmp_path / "m.csv", tmp_path, max_pixels=None, edit_area=4096)
    said = "\n".join(str(w.message) for w in caught)
    assert "1 row(s) have a target whose aspect ratio differs from their last edit image's" in said, said
    assert "row 1 (line 2): square.png is 64x64, wide.png 96x64" in said and "--height and --width" in said
    assert "row 2" not in said


def test_training_and_the_pipeline_feed_the_vae_the_same_edit_tensor(tiny_pipe, tmp_path):
    """One reading end to end: the tensor the dataset yields for an edit image file (a rotated phone JPEG, a
    transparent grey PNG) is the one the pipeline encodes when given the same file opened with PIL."""
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(LANDSCAPE).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    la = np.zeros((40, 24, 2), np.uint8)
    la[..., 0] = 90
    la[:20, :, 1] = 255  # bottom half transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "t.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nt.png,phone.jpg|la.png,x\n")
    with pytest.warns(UserWarning):  # the target is square, the last edit image is not
        item = EditDataset(tmp_path / "m.csv", tmp_path, max_pixels=None, edit_area=4096)[0]
    seen = []
    encode = tiny_pipe.encode_images
    tiny_pipe.encode_images = lambda x: seen.append(x[0].clone()) or encode(x)
    try:
        with Image.open(tmp_path / "phone.jpg") as a, Image.open(tmp_path / "la.png") as b:
            tiny_pipe("x", edit_image=[a, b], num_inference_steps=1, seed=0, edit_image_area=4096, progress=False,
                      output_type="latent")
    finally:
        del tiny_pipe.encode_images
    assert len(seen) == 2
    for ours, theirs in zip(item["edit_images"], seen):
        assert torch.equal(ours, theirs.float())
