"""Colour management: an image with an embedded non-sRGB ICC profile (an iPhone's Display P3, Adobe RGB, a CMYK
press profile, a grey gamma) is converted to sRGB wherever images are read, as a colour-managed viewer shows it;
sRGB-tagged and untagged images read exactly as before; masks keep their grey levels. The profiles are built here:
Pillow's ImageCms.createProfile makes only sRGB, LAB and XYZ."""
import hashlib
import io
import itertools
import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from conftest import load_script
from diffsynth.trainers.dataset import SAMPLE_FORMAT_VERSION, DatasetError, EditDataset, validate_metadata
from diffsynth.utils.image import ImageError, as_rgb, open_image, pil_to_tensor, resize_edit_image

INFER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "examples/qwen_image/model_inference/Qwen-Image-Edit-LoRA-MergedQKV-Inference.py")


# ---- minimal ICC v2 profiles -----------------------------------------------------------------------------------

def s15(v):
    return struct.pack(">i", round(v * 65536))


def xyz(x, y, z):
    return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)


def desc(text):  # v2 textDescriptionType: ASCII, then empty Unicode and ScriptCode parts
    ascii_ = text.encode() + b"\0"
    return b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0" * 3 + b"\0" * 67


def mluc(text):  # v4 multiLocalizedUnicodeType, one en-US record
    utf16 = text.encode("utf-16-be")
    return b"mluc" + b"\0" * 4 + struct.pack(">II", 1, 12) + b"enUS" + struct.pack(">II", len(utf16), 28) + utf16


SRGB_CURVE = b"para" + b"\0" * 4 + struct.pack(">HH", 3, 0) + b"".join(
    s15(v) for v in (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045))  # the sRGB transfer function


def gamma_curve(g):
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(g * 256)) + b"\0\0"


def icc(space, tags, pcs="XYZ ", cls="mntr"):
    """Header (128 bytes) + tag table + tags, each 4-byte aligned."""
    offset, table, body = 132 + 12 * len(tags), b"", b""
    for sig, data in tags.items():
        data += b"\0" * (-len(data) % 4)
        table += sig.encode() + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + cls.encode()
              + space.encode() + pcs.encode() + b"\0" * 12 + b"acsp" + b"\0" * 28 + s15(0.9642) + s15(1.0)
              + s15(0.8249) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + body


D50 = (0.9642, 1.0, 0.8249)


def rgb_profile(description, colorants, describe=desc):
    r, g, b = colorants
    return icc("RGB ", {"desc": describe(description), "wtpt": xyz(*D50), "rXYZ": xyz(*r), "gXYZ": xyz(*g),
                        "bXYZ": xyz(*b), "rTRC": SRGB_CURVE, "gTRC": SRGB_CURVE, "bTRC": SRGB_CURVE})


# Display P3 (Apple's profile): the DCI-P3 primaries, D65 white, the sRGB curve; colorants adapted to D50
P3 = rgb_profile("Display P3", ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)))
SRGB_COLORANTS = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))
GREY_18 = icc("GRAY", {"desc": desc("Gray Gamma 1.8"), "wtpt": xyz(*D50), "kTRC": gamma_curve(1.8)})


def cmyk_profile():
    """A press-like CMYK profile: an 'mft1' A2B0 table (2 grid points) from ink amounts to Lab."""
    ramp, clut = bytes(range(256)), b""
    for c, m, y, k in itertools.product((0, 1), repeat=4):
        r, g, b = (1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)
        lab = (100 * (0.3 * r + 0.59 * g + 0.11 * b), 60 * (r - g), 60 * ((r + g) / 2 - b))
        clut += bytes([round(lab[0] * 2.55), round(lab[1] + 128), round(lab[2] + 128)])
    a2b0 = (b"mft1" + b"\0" * 4 + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
            + ramp * 4 + clut + ramp * 3)
    return icc("CMYK", {"desc": desc("Test press CMYK"), "wtpt": xyz(*D50), "A2B0": a2b0}, pcs="Lab ", cls="prtr")


def littlecms(img, profile, mode="RGB"):
    """What littlecms gives directly: relative colorimetric with black point compensation, to sRGB."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
    return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB",
                                     renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                     flags=ImageCms.Flags.BLACKPOINTCOMPENSATION)


RED = (220, 40, 40)  # a saturated red; in Display P3 it is redder than sRGB can show
PIXELS = (np.random.RandomState(0).rand(32, 48, 3) * 255).astype(np.uint8)
PIXELS[:8] = RED


def p3_file(path, pixels=PIXELS, profile=P3, **save):
    Image.fromarray(pixels).save(path, icc_profile=profile, **save)
    return path


def srgb_from_p3_by_hand(rgb):
    """P3 -> sRGB with the published matrix (both D65, linear light), clipped: the hand value."""
    v = np.asarray(rgb, np.float64) / 255
    linear = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    m = np.array([[1.2249, -0.2247, 0], [-0.0420, 1.0419, 0], [-0.0197, -0.0786, 1.0979]])
    out = np.clip(m @ linear, 0, 1)
    return np.round(255 * np.where(out <= 0.0031308, 12.92 * out, 1.055 * out ** (1 / 2.4) - 0.055))


# ---- decoding ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", ["png", "tif", "webp"])
def test_a_display_p3_image_reads_as_its_srgb_colours(tmp_path, ext):
    """A P3-tagged image was read as if its values were sRGB: every colour desaturated, silently. It now reads as
    littlecms converts it, which matches the textbook P3 -> sRGB matrix."""
    path = p3_file(tmp_path / f"p3.{ext}", **({"lossless": True} if ext == "webp" else {}))
    with Image.open(path) as raw:
        assert raw.info.get("icc_profile") == P3
        expected = np.asarray(littlecms(raw.convert("RGB"), P3))
    got = np.asarray(open_image(path))
    assert np.array_equal(got, expected)
    assert tuple(got[0, 0]) == (240, 0, 21)
    assert np.abs(got[0, 0] - srgb_from_p3_by_hand(RED)).max() <= 2
    assert np.array_equal(np.asarray(open_image(path, icc=False)), PIXELS)  # the values as stored


def test_srgb_tagged_and_untagged_images_read_bit_identical(tmp_path):
    """No round trip through littlecms for sRGB (it would move values by a level here and there): an sRGB profile
    is told by its description, v2 or v4, and skipped."""
    Image.fromarray(PIXELS).save(tmp_path / "plain.png")
    profiles = {
        "builtin": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),
        "v2": rgb_profile("sRGB IEC61966-2.1", SRGB_COLORANTS),
        "v4": rgb_profile("sRGB IEC61966-2.1", SRGB_COLORANTS, describe=mluc),
    }
    for name, profile in profiles.items():
        Image.fromarray(PIXELS).save(tmp_path / f"{name}.png", icc_profile=profile)
        assert open_image(tmp_path / f"{name}.png").tobytes() == PIXELS.tobytes(), name
    assert open_image(tmp_path / "plain.png").tobytes() == PIXELS.tobytes()
    # sRGB's primaries in linear light are not sRGB: converted (the picture gets lighter)
    linear = icc("RGB ", {"desc": desc("sRGB-elle-V2-g10"), "wtpt": xyz(*D50), **{
        f"{c}XYZ": xyz(*v) for c, v in zip("rgb", SRGB_COLORANTS)}, **{f"{c}TRC": gamma_curve(1) for c in "rgb"}})
    Image.fromarray(PIXELS).save(tmp_path / "linear.png", icc_profile=linear)
    assert np.asarray(open_image(tmp_path / "linear.png")).mean() > PIXELS.mean() + 20
    # Elle Stone's sRGB-primaries profiles with another curve than sRGB's convert; her '-srgbtrc' one is sRGB
    for name, curve in (("sRGB-elle-V2-g22", gamma_curve(2.2)), ("sRGB-elle-V4-labl", gamma_curve(3.0))):
        other = icc("RGB ", {"desc": desc(name), "wtpt": xyz(*D50), **{
            f"{c}XYZ": xyz(*v) for c, v in zip("rgb", SRGB_COLORANTS)}, **{f"{c}TRC": curve for c in "rgb"}})
        Image.fromarray(PIXELS).save(tmp_path / "other.png", icc_profile=other)
        assert open_image(tmp_path / "other.png").tobytes() != PIXELS.tobytes(), name
    Image.fromarray(PIXELS).save(tmp_path / "elle.png", icc_profile=rgb_profile("sRGB-elle-V2-srgbtrc",
                                                                               SRGB_COLORANTS))
    assert open_image(tmp_path / "elle.png").tobytes() == PIXELS.tobytes()
    # the v4 description is read too: a P3 profile described in 'mluc' is converted
    p3_file(tmp_path / "p3v4.png", profile=rgb_profile("Display P3", ((0.5151, 0.2412, -0.0011),
                                                                      (0.2920, 0.6922, 0.0419),
                                                                      (0.1571, 0.0666, 0.7841)), describe=mluc))
    assert tuple(np.asarray(open_image(tmp_path / "p3v4.png"))[0, 0]) == (240, 0, 21)


def test_grey_profiles_convert_after_the_bit_depth_scaling(tmp_path):
    """A grey image with a grey profile (gamma 1.8) shows lighter than its values read as sRGB; 8- and 16-bit files
    of the same picture read alike (16-bit scaled to 8 first, then converted). An RGB profile left on a grey image
    (Pillow's convert("L") keeps it) does not describe it: ignored, as viewers ignore it."""
    Image.new("L", (8, 8), 128).save(tmp_path / "g8.png", icc_profile=GREY_18)
    Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)).save(tmp_path / "g16.png", icc_profile=GREY_18)
    expected = littlecms(Image.new("L", (8, 8), 128), GREY_18).getpixel((0, 0))
    assert expected == (146, 146, 146)  # (128/255)^1.8 in linear light, sRGB-encoded
    for name in ("g8.png", "g16.png"):
        assert (np.asarray(open_image(tmp_path / name)) == expected).all(), name
    Image.new("L", (8, 8), 128).save(tmp_path / "l_p3.png", icc_profile=P3)
    assert (np.asarray(open_image(tmp_path / "l_p3.png")) == 128).all()


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_cmyk_converts_through_its_profile_plain_without_one(tmp_path, ext):
    """A CMYK file with a CMYK profile is converted by it (Pillow undoes an Adobe JPEG's inverted storage first); one
    without a profile keeps the plain conversion."""
    cmyk = Image.fromarray((np.random.RandomState(1).rand(16, 16, 4) * 255).astype(np.uint8), "CMYK")
    profile = cmyk_profile()
    cmyk.save(tmp_path / f"c.{ext}", icc_profile=profile)
    cmyk.save(tmp_path / f"plain.{ext}")
    with Image.open(tmp_path / f"c.{ext}") as raw:
        raw.load()
        expected, plain = np.asarray(littlecms(raw, profile)), np.asarray(raw.convert("RGB"))
    assert np.array_equal(np.asarray(open_image(tmp_path / f"c.{ext}")), expected)
    assert np.abs(expected.astype(int) - plain).max() > 30
    with Image.open(tmp_path / f"plain.{ext}") as raw:
        assert np.array_equal(np.asarray(open_image(tmp_path / f"plain.{ext}")), np.asarray(raw.convert("RGB")))


def test_a_damaged_profile_is_refused_by_name(tmp_path):
    """Its colours are unknown: reading it as sRGB would be the silent shift this avoids."""
    p3_file(tmp_path / "bad.png", profile=P3.replace(b"para", b"\xff" * 4))  # its curves unreadable
    with pytest.raises(ImageError, match=r"bad.png: has an ICC colour profile 'Display P3' that cannot be used "
                                         r"\(littlecms: .*\), so its colours are unknown; re-export it"):
        open_image(tmp_path / "bad.png")
    p3_file(tmp_path / "junk.png", profile=b"not a profile" * 20)
    with pytest.raises(ImageError, match=r"junk.png: has an ICC colour profile that cannot be used"):
        open_image(tmp_path / "junk.png")


def test_without_littlecms_a_profile_to_convert_is_refused_srgb_still_reads(tmp_path, monkeypatch):
    from PIL._util import DeferredError

    from diffsynth.utils import image

    monkeypatch.setattr(ImageCms, "core", DeferredError(ImportError("The _imagingcms C module is not installed")))
    image._build_srgb_transform.cache_clear()
    try:
        p3_file(tmp_path / "p3.png")
        with pytest.raises(ImageError, match=r"p3.png: has an ICC colour profile 'Display P3', but this Pillow has no "
                                             r"littlecms .*pip install --force-reinstall pillow"):
            open_image(tmp_path / "p3.png")
        p3_file(tmp_path / "srgb.png", profile=rgb_profile("sRGB IEC61966-2.1", SRGB_COLORANTS))
        assert open_image(tmp_path / "srgb.png").tobytes() == PIXELS.tobytes()
    finally:
        image._build_srgb_transform.cache_clear()


# ---- every reader --------------------------------------------------------------------------------------------------

def test_training_converts_targets_and_edit_images_not_masks(tmp_path):
    """The dataset's target and edit tensors are the converted colours; the mask (a P3 profile on a grey picture
    saved as RGB, as an editor exporting from a P3 canvas writes it) keeps its grey levels: 0.5 stays 0.5."""
    p3_file(tmp_path / "t.png")
    p3_file(tmp_path / "e.png", pixels=PIXELS[::-1].copy())
    mask = np.zeros((32, 48, 3), np.uint8)
    mask[:, 24:] = 128
    p3_file(tmp_path / "m.png", pixels=mask)
    (tmp_path / "m.csv").write_text("image,edit_image,mask,prompt\nt.png,e.png,m.png,x\n")
    item = EditDataset(tmp_path / "m.csv", tmp_path, data_file_keys="image,edit_image,mask", max_pixels=None,
                       edit_area=48 * 32)[0]
    converted = pil_to_tensor(open_image(tmp_path / "t.png"))
    assert torch.equal(item["image"], converted)
    assert torch.equal(item["edit_images"][0], pil_to_tensor(resize_edit_image(open_image(tmp_path / "e.png"),
                                                                               48 * 32)))
    assert not torch.equal(item["image"], pil_to_tensor(Image.fromarray(PIXELS)))
    assert set(item["mask"].unique().tolist()) == {0.0, np.float32(128 / 255)}


def test_a_damaged_profile_is_refused_before_training_except_on_a_mask(tmp_path):
    damaged = b"not a profile" * 20
    p3_file(tmp_path / "bad.png", profile=damaged)
    p3_file(tmp_path / "ok.png")
    p3_file(tmp_path / "ok2.png", pixels=PIXELS[::-1].copy())
    Image.new("L", (48, 32), 255).save(tmp_path / "mask.png", icc_profile=damaged)
    (tmp_path / "m.csv").write_text("image,edit_image,mask,prompt\nok.png,bad.png,mask.png,x\n"
                                    "ok.png,ok2.png,mask.png,y\n")
    with pytest.raises(DatasetError) as e:
        validate_metadata(tmp_path / "m.csv", tmp_path, data_file_keys="image,edit_image,mask", max_pixels=None)
    msg = str(e.value)
    assert "row 1 (line 2): edit_image bad.png has an ICC colour profile that cannot be used" in msg, msg
    assert "row 2" not in msg and "mask.png" not in msg


def test_conditioning_cached_before_colour_management_is_not_reused(tmp_path):
    """A P3 file yields other pixels now, so a cache entry keyed with the previous format version is not found."""
    p3_file(tmp_path / "t.png")
    p3_file(tmp_path / "e.png", pixels=PIXELS[::-1].copy())
    (tmp_path / "m.csv").write_text("image,edit_image,prompt\nt.png,e.png,x\n")
    [s] = validate_metadata(tmp_path / "m.csv", tmp_path, max_pixels=None, edit_area=48 * 32)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("t.png", "e.png")]
    old = json.dumps([3, digest[0], [digest[1]], "x", list(s.target_size), [list(e) for e in s.edit_sizes]])
    assert SAMPLE_FORMAT_VERSION > 3 and s.cache_key != hashlib.sha256(old.encode()).hexdigest()


def test_the_inference_script_converts_its_inputs_and_refuses_a_damaged_profile(tmp_path, capsys, offline):
    script = load_script(INFER, "infer_colour")
    p3_file(tmp_path / "e.png")
    p3_file(tmp_path / "i.png")
    args = script.parse_args(["--edit_image", str(tmp_path / "e.png"), "--input_image", str(tmp_path / "i.png"),
                              "--prompt", "x", "--output", str(tmp_path / "o.png")])
    _, images, input_image = script.open_inputs(args)
    [edit] = images.values()
    assert "--input_image" in capsys.readouterr().err  # its note on the output size
    expected = littlecms(Image.fromarray(PIXELS), P3).tobytes()
    assert edit.tobytes() == expected and input_image.tobytes() == expected
    assert as_rgb(edit).tobytes() == expected  # the pipeline, given the converted image, does not convert again
    p3_file(tmp_path / "bad.png", profile=b"not a profile" * 20)
    code = script.main(["--edit_image", str(tmp_path / "bad.png"), "--prompt", "x", "--output",
                        str(tmp_path / "o.png"), "--models_dir", str(tmp_path / "no-models")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'bad.png'}: has an ICC colour profile that cannot be used" in err, err
    assert err.count("\n") == 1 and offline == []  # one line, before any model is looked up


def test_a_damaged_validation_edit_image_profile_is_refused_by_preflight(tmp_path):
    from conftest import TINY_MODEL_IDS
    from diffsynth.trainers.args import parse_args
    from diffsynth.trainers.preflight import preflight

    p3_file(tmp_path / "bad.png", profile=b"not a profile" * 20)
    args = parse_args(["--dataset_base_path", str(tmp_path), "--dataset_metadata_path", str(tmp_path / "m.csv"),
                       "--output_path", str(tmp_path / "out"), "--model_id_with_origin_paths", TINY_MODEL_IDS,
                       "--models_dir", str(tmp_path / "models"), "--validation_prompt", "x",
                       "--validation_edit_image", str(tmp_path / "bad.png")])
    with pytest.raises(ImageError, match=r"bad.png: has an ICC colour profile that cannot be used"):
        preflight(args, dataset=False)


def test_the_pipeline_and_validation_convert_pil_images(tiny_pipe, tmp_path):
    """A P3 PIL image given to the pipeline reaches the VAE converted, as its file does through open_image; the
    trainer's validation inputs (read from files) are the converted ones too."""
    from diffsynth.trainers.validation import ValidationInputs, ValidationSample

    path = p3_file(tmp_path / "e.png")
    expected = open_image(path)
    seen = []
    encode = tiny_pipe.encode_images
    tiny_pipe.encode_images = lambda x: seen.append(x[0].clone()) or encode(x)
    try:
        with Image.open(path) as raw:
            tiny_pipe("x", edit_image=raw, num_inference_steps=1, seed=0, edit_image_area=48 * 32, progress=False,
                      output_type="latent")
    finally:
        del tiny_pipe.encode_images
    assert torch.equal(seen[0].float(), pil_to_tensor(resize_edit_image(expected, 48 * 32)))
    validation = ValidationInputs(tiny_pipe, [ValidationSample("x", (str(path),), cfg_scale=1.0)], 48 * 32)
    assert validation.edit_images[0][0].tobytes() == expected.tobytes() != PIXELS.tobytes()
    p3_file(tmp_path / "bad.png", profile=b"not a profile" * 20)
    with Image.open(tmp_path / "bad.png") as bad, pytest.raises(
            ImageError, match=r"^edit image 2: has an ICC colour profile that cannot be used"):
        tiny_pipe("x", edit_image=[expected, bad], num_inference_steps=1, progress=False, output_type="latent")
