"""(audit-images) Images too large, or too far from the requested shape, are refused by name before training or
inference loads a model, with the same words in the metadata check and in the scripts."""
import os

import pytest
import torch
from PIL import Image

from conftest import load_script
from diffsynth.trainers.dataset import DatasetError, validate_metadata

INFER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")


def test_a_decompression_bomb_row_says_the_limit_and_the_fix_as_inference_does(tmp_path):
    """Pillow raises DecompressionBombError from Image.open itself: the metadata check reported it as 'is not a
    readable image ...; re-export or replace it' where the inference script says the limit and to downscale."""
    Image.new("1", (20000, 20000)).save(tmp_path / "huge.png")  # 400 megapixels, a few kB on disk
    Image.new("RGB", (64, 64)).save(tmp_path / "e.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nhuge.png,e.png,x\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path)
    msg = str(e.value)
    assert "row 1 (line 2): image huge.png is 400 megapixels, more than the 179 MP limit" in msg, msg
    assert "downscale it" in msg and "not a readable image" not in msg and "re-export" not in msg, msg


def test_a_target_far_from_the_fixed_size_is_refused_not_stretched(tmp_path):
    """With --height/--width a target is scaled to cover the size, then its centre cut: a 20000x4 strip at 512x512 was
    resized to 2560000x512 px first (5 GB of memory and half a minute per sample, on every epoch) to train on 4x4 of
    its pixels stretched 128x. An 8x8 image, stretched 64x, is no better. Both are refused by row, before training."""
    Image.new("RGB", (20000, 4), (200, 10, 10)).save(tmp_path / "strip.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "tiny.png")
    Image.new("RGB", (600, 500), (10, 200, 10)).save(tmp_path / "ok.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nstrip.png,ok.png,x\ntiny.png,ok.png,x\nok.png,ok.png,x\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path, height=512, width=512)
    msg = str(e.value)
    assert "row 1 (line 2): image strip.png: its 20000x4 px cannot fill 512x512" in msg, msg
    assert "row 2 (line 3): image tiny.png: its 8x8 px cannot fill 512x512" in msg, msg
    assert "row 3" not in msg and "--height/--width" in msg


def test_inference_refuses_an_input_image_far_from_height_and_width_before_loading(tmp_path, capsys, offline):
    Image.new("RGB", (20000, 4)).save(tmp_path / "strip.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "e.png")
    code = load_script(INFER, "infer").main([
        "--edit_image", str(tmp_path / "e.png"), "--input_image", str(tmp_path / "strip.png"), "--height", "512",
        "--width", "512", "--denoising_strength", "0.5", "--prompt", "x", "--output", str(tmp_path / "o.png"),
        "--models_dir", str(tmp_path / "no-models")])
    err = capsys.readouterr().err
    assert code == 2 and f"--input_image {tmp_path / 'strip.png'}: its 20000x4 px cannot fill 512x512" in err, err
    assert "Traceback" not in err and offline == []


@pytest.mark.parametrize("name, content, what", [
    ("notes.png", b"not an image", "notes.png: is not an image file Pillow can read (cannot identify image file)"),
    # an iPhone photo as it comes off the phone: Pillow has no HEIC reader
    ("phone.heic", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic", "phone.heic: is a HEIC/HEIF photo (whatever its extension)"),
    ("scan.xyz", b"no reader knows these bytes", "scan.xyz: is a .xyz file, which Pillow cannot read"),
])
def test_a_file_that_is_no_image_pillow_reads_is_named_alike_by_training_and_inference(tmp_path, name, content, what):
    """UnidentifiedImageError is an OSError: the scripts called such a file 'truncated or damaged', the metadata check
    'not a readable image (... <_io.BytesIO object at 0x...>)'. One wording now, with the format when it is the cause."""
    from diffsynth.utils.image import ImageError, open_image

    (tmp_path / name).write_bytes(content)
    Image.new("RGB", (64, 64)).save(tmp_path / "e.png")
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / name)
    script = str(e.value)
    (tmp_path / "m.csv").write_text(f"image,edit_image,prompt\n{name},e.png,x\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path)
    row = str(e.value).splitlines()[1]
    for msg in (script, row):
        assert what.split(": ", 1)[1] in msg and "truncated" not in msg and "BytesIO" not in msg, msg
    assert f"row 1 (line 2): image {name} {what.split(': ', 1)[1]}" in row, row
    assert ("re-export or replace it" if name.endswith(".png") else "convert it to PNG or JPEG") in row


def test_an_image_under_the_limit_opens_without_pillows_bomb_warning(tmp_path):
    """Between 89 and 179 megapixels (a medium-format photo, a panorama) Pillow warns 'could be decompression bomb DOS
    attack' on every open, three times per row in training, though the image is within this project's own limit
    (and is used). It is read quietly; over the limit it is refused (above)."""
    import warnings

    from diffsynth.utils.image import open_image

    Image.new("1", (10000, 10000), 1).save(tmp_path / "big.png")  # 100 megapixels, a few kB on disk
    Image.new("RGB", (64, 64)).save(tmp_path / "e.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nbig.png,e.png,x\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [sample] = validate_metadata(tmp_path / "m.csv", tmp_path)
        assert sample.target_size == (1024, 1024) and open_image(tmp_path / "big.png").size == (10000, 10000)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16"])
def test_a_rotated_uncompressed_tiff_reads_upright_not_scrambled(tmp_path, mode):
    """Pillow (13.0), decoding an uncompressed non-RGB TIFF with EXIF orientation 5-8 from a file NAME (memory-mapped),
    reports it at its rotated size and decodes its rows into that shape: scrambled, unrotated pixels (48x32 where the
    header said 32x48), trained on and edited without a word. From an open file it decodes right: open_image reads
    the file through one, and a decode at another size than the header's is refused (check_decoded_size)."""
    import numpy as np

    from diffsynth.trainers.dataset import EditDataset
    from diffsynth.utils.image import ImageError, check_decoded_size, open_image

    a = (np.arange(32 * 48).reshape(32, 48) % 251).astype(np.uint8)
    img = Image.fromarray(a.astype(np.uint16) * 257) if mode == "I;16" else Image.fromarray(a).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "scan.tif", exif=exif.tobytes())  # uncompressed
    img.save(tmp_path / "lzw.tif", exif=exif.tobytes(), compression="tiff_lzw")  # decoded right either way
    upright = np.asarray(open_image(tmp_path / "lzw.tif"))
    assert upright.shape[:2] == (48, 32)
    assert np.array_equal(np.asarray(open_image(tmp_path / "scan.tif")), upright)
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nscan.tif,lzw.tif,x\n")
    ds = EditDataset(tmp_path / "m.csv", tmp_path, max_pixels=None, edit_area=32 * 48)
    assert ds.samples[0].target_size == (32, 48)
    assert torch.equal(ds[0]["image"], torch.from_numpy(upright).permute(2, 0, 1) / 255.0 * 2.0 - 1.0)
    with pytest.raises(ImageError, match="decodes at 20x12 px, not the 12x20 px its header gives"):
        check_decoded_size(Image.new("RGB", (20, 12)), (12, 20))


def test_a_dark_sixteen_bit_pgm_stays_dark(tmp_path):
    """Pillow reads a 16-bit PGM (a camera's or a scanner's raw grey) as mode I, its samples scaled to 0..65535. to_rgb
    took any mode-I image whose values all fit 0..255 for an 8-bit one: a dark frame (values up to 200 of 65535)
    turned light grey, 256 times too bright, while a brighter frame of the same camera was right."""
    import numpy as np

    from diffsynth.utils.image import open_image

    for name, value in (("dark.pgm", 200), ("bright.pgm", 30000)):
        (tmp_path / name).write_bytes(b"P5\n4 4\n65535\n" + np.full((4, 4), value, ">u2").tobytes())
        assert Image.open(tmp_path / name).mode == "I"
        grey = np.asarray(open_image(tmp_path / name))
        assert (grey == round(value * 255 / 65535)).all(), (name, grey[0, 0])


def test_an_unreadable_file_is_not_called_damaged(tmp_path, monkeypatch):
    """A file the process may not read (another user's, mode 600) raised PermissionError, an OSError, which the
    scripts reported as 'is truncated or damaged ...; re-export or replace it'. It says what the metadata check says."""
    import builtins

    from diffsynth.utils import image
    from diffsynth.utils.image import ImageError, open_image

    Image.new("RGB", (64, 64)).save(tmp_path / "theirs.png")
    real_open = builtins.open

    def denied(path, *args, **kwargs):  # root reads everything: simulate the refusal
        if str(path).endswith("theirs.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(image, "open", denied, raising=False)
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "theirs.png")
    assert str(e.value) == f"{tmp_path / 'theirs.png'}: cannot be read (Permission denied); check its permissions"


def test_the_pipeline_names_an_edit_image_too_narrow_for_its_area(tiny_models):
    """From Python (no script to check first) a 32x1920 edit image at edit_image_area 4096 rounds to 0 px wide: PIL
    raised 'height and width must be > 0' from inside the resize. The pipeline refuses it as the scripts do."""
    from conftest import TINY_MODEL_IDS
    from diffsynth.pipelines.qwen_image import QwenImagePipeline
    from diffsynth.utils.image import ImageError

    pipe = QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=tiny_models, download=False)
    ok = Image.new("RGB", (64, 64))
    with pytest.raises(ImageError, match=r"edit image 2: its 32x1920 px aspect ratio is too extreme"):
        pipe("x", edit_image=[ok, Image.new("RGB", (32, 1920))], num_inference_steps=1, edit_image_area=4096,
             progress=False)


def test_the_vae_refuses_pixels_outside_minus_one_to_one():
    """encode_latents takes images in [-1, 1] (pil_to_tensor's range). From Python a 0..255 tensor (torch's
    pil_to_tensor / numpy pixels) was encoded without a word into latents of a blown-out picture."""
    from diffusers import AutoencoderKLQwenImage

    from diffsynth.models.qwen_image_vae import encode_latents
    from diffsynth.utils.image import pil_to_tensor

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    pixels = torch.randint(0, 256, (1, 3, 16, 16)).float()
    with pytest.raises(ValueError, match=r"images in \[-1, 1\], got values from 0 to 255"):
        encode_latents(vae, pixels)
    ok = pil_to_tensor(Image.new("RGB", (16, 16), (255, 0, 0)))[None]  # exactly -1 and 1
    assert encode_latents(vae, ok).shape == (1, 16, 2, 2)


def test_a_pil_image_pillow_decodes_scrambled_is_refused_by_the_pipelines_reader(tmp_path):
    """From Python, Image.open(name) of a rotated uncompressed greyscale TIFF decodes scrambled (see above) when the
    pipeline first touches its pixels: as_rgb refuses a decode whose size is not the header's, as open_image does."""
    import numpy as np

    from diffsynth.utils.image import ImageError, as_rgb

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray((np.arange(32 * 48).reshape(32, 48) % 251).astype(np.uint8)).save(tmp_path / "scan.tif",
                                                                                       exif=exif.tobytes())
    with pytest.raises(ImageError, match="decodes at 48x32 px, not the 32x48 px its header gives"):
        as_rgb(Image.open(tmp_path / "scan.tif"))
    with open(tmp_path / "scan.tif", "rb") as f:  # through an open file Pillow decodes it right
        assert as_rgb(Image.open(f)).size == (32, 48)


def test_a_float_image_just_over_one_is_refused_not_blackened(tmp_path):
    """A float TIFF is read as 0..1 when its values fit, else as 0..255. A 0..1 picture with a highlight at 1.2 (an
    HDR export, a filter's overshoot) was therefore read as 0..255: all but black, silently. Fractional values over 1
    have no known range and are refused; whole numbers up to 255 (an 8-bit picture stored as float) still read."""
    import numpy as np

    from diffsynth.utils.image import ImageError, open_image

    hdr = np.linspace(0, 1.2, 32 * 48, dtype=np.float32).reshape(32, 48)
    Image.fromarray(hdr).save(tmp_path / "hdr.tif")
    with pytest.raises(ImageError, match="hdr.tif: has float pixels from 0 to 1.2, whose range is unknown"):
        open_image(tmp_path / "hdr.tif")
    eight_bit = np.arange(32 * 48, dtype=np.float32).reshape(32, 48) % 256
    Image.fromarray(eight_bit).save(tmp_path / "f8.tif")
    assert (np.asarray(open_image(tmp_path / "f8.tif"))[..., 0] == eight_bit).all()
    Image.fromarray(hdr / 1.2).save(tmp_path / "unit.tif")
    assert np.asarray(open_image(tmp_path / "unit.tif")).max() == 255


def test_the_pipeline_refuses_an_input_image_it_would_stretch(tiny_models):
    """From Python, an input_image far from height x width (denoising from its pixels) was scaled to cover the size
    first (gigabytes for a strip) after the text encoder had run. Refused up front, as the script does."""
    from conftest import TINY_MODEL_IDS
    from diffsynth.pipelines.qwen_image import QwenImagePipeline
    from diffsynth.utils.image import ImageError

    pipe = QwenImagePipeline.from_pretrained(TINY_MODEL_IDS, models_dir=tiny_models, download=False)
    with pytest.raises(ImageError, match="input_image: its 20000x4 px cannot fill 64x64"):
        pipe("x", edit_image=Image.new("RGB", (64, 64)), input_image=Image.new("RGB", (20000, 4)),
             denoising_strength=0.5, height=64, width=64, num_inference_steps=2, edit_image_area=4096, progress=False)


def test_a_target_too_small_is_told_the_fix_that_works(tmp_path):
    """An 8x8 target is never scaled up, so 'raise --max_pixels' cannot help it; a strip that --max_pixels shrank
    below 16 px can be helped by it. Each row is told the fix that works."""
    Image.new("RGB", (8, 8)).save(tmp_path / "thumb.png")
    Image.new("RGB", (40, 4000)).save(tmp_path / "strip.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "e.png")
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nthumb.png,e.png,x\nstrip.png,e.png,x\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path, max_pixels=64 * 64)
    thumb, strip = str(e.value).splitlines()[1:3]
    assert "thumb.png" in thumb and "is smaller than 16 px on a side (targets are never scaled up)" in thumb, thumb
    assert "--max_pixels" not in thumb, thumb
    assert "strip.png" in strip and "raise --max_pixels" in strip, strip


def test_a_heic_photo_renamed_to_jpg_is_named_for_what_it_is(tmp_path):
    """Phones and transfer tools hand out HEIC photos as .jpg: the extension looks readable, so the message said
    'not an image file Pillow can read; re-export or replace it'. Its bytes say HEIC: convert it."""
    from diffsynth.utils.image import ImageError, open_image

    (tmp_path / "IMG_0001.jpg").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    with pytest.raises(ImageError, match=r"IMG_0001.jpg: is a HEIC/HEIF photo \(whatever its extension\), which "
                                         r"Pillow cannot read; convert it to PNG or JPEG"):
        open_image(tmp_path / "IMG_0001.jpg")
