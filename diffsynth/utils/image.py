"""Image sizing and conversion shared by training and inference.

Edit images are sized exactly as diffusers' QwenImageEdit(Plus)Pipeline sizes them (`calculate_dimensions`:
keep the aspect ratio, hit a target area, round sides to 32, then a plain LANCZOS resize without cropping),
so a LoRA sees at training time what the pipeline feeds it at inference. Target images follow DiffSynth's
rule: a fixed --height/--width, or scaled down to at most --max_pixels, sides floored to 16, centre-cropped.
"""
import functools
import io
import math
import os
import re
import struct
import warnings

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError  # ImageCms imports without littlecms too

# VAE 8x downsampling times the DiT's 2x2 patch: a side must be a multiple of 16 to become whole tokens.
SIZE_MULTIPLE = 16
VAE_EDIT_AREA = 1024 * 1024  # area of an edit image fed to the VAE (diffusers VAE_IMAGE_SIZE)
# the largest edit area accepted: 16x the 1 MP the models were trained at (1e8 px exhausted 128 GB of host memory)
MAX_EDIT_AREA = 4096 * 4096
VL_EDIT_AREA = 384 * 384  # area of an edit image fed to the VL text encoder in Edit-Plus (CONDITION_IMAGE_SIZE)
# the area each prompt template shows an edit image to the VL model at: Edit (diffusers resizes it once, for the VAE
# and the VL model alike), Edit-2509/2511 ("edit-plus")
VL_TEMPLATE_AREAS = {"edit": 1024 * 1024, "edit-plus": VL_EDIT_AREA}
VL_AREAS = tuple(VL_TEMPLATE_AREAS.values())
VL_MAX_ASPECT = 200  # Qwen2-VL's image processor (smart_resize) refuses a longer side over 200x the shorter
_EXIF_ORIENTATION = 0x0112


def edit_image_size(width, height, target_area=VAE_EDIT_AREA, multiple=32) -> tuple[int, int]:
    """(w, h) of an edit image: the input's aspect ratio at about `target_area` pixels, sides rounded to 32."""
    ratio = width / height
    w = math.sqrt(target_area * ratio)
    h = w / ratio
    return round(w / multiple) * multiple, round(h / multiple) * multiple


def check_edit_size(what, size, target_area, vl=True):
    """Refuse an image whose aspect ratio is too extreme: resized to `target_area` (the VAE's) one side would round
    to 0 px; or, with `vl` (an edit image, which the text encoder sees too), resized to either template's VL area it
    would be narrower than the 1:VL_MAX_ASPECT Qwen2-VL's image processor accepts (it raises mid-run otherwise)."""
    w, h = size
    if 0 in edit_image_size(w, h, target_area=target_area):
        raise ImageError(f"{what}: its {w}x{h} px aspect ratio is too extreme: resized to a "
                         f"{target_area} px area one side rounds to 0; crop it closer to square (within about "
                         f"1:{target_area // 256})")
    for area in VL_AREAS if vl else ():
        vw, vh = edit_image_size(w, h, target_area=area)
        if min(vw, vh) == 0 or max(vw, vh) / min(vw, vh) > VL_MAX_ASPECT:
            raise ImageError(f"{what}: its {w}x{h} px aspect ratio is too extreme for the text encoder: resized to "
                             f"the {area} px area Qwen2.5-VL sees it is {vw}x{vh}, and its image processor accepts at "
                             f"most 1:{VL_MAX_ASPECT}; crop it closer to square (within about 1:150)")


def pixel_areas(max_pixels) -> list:
    """--max_pixels as its list of areas: one value (an int, or None: no cap) is one area, a list several (every
    target is trained once at each)."""
    return list(max_pixels) if isinstance(max_pixels, (list, tuple)) else [max_pixels]


def target_size(image_size, max_pixels=1024 * 1024, height=None, width=None, multiple=SIZE_MULTIPLE):
    """(w, h) of a training target: fixed `width` x `height`, else the image scaled down to at most
    `max_pixels` area (never up), sides floored to `multiple`."""
    if (height is None) != (width is None):
        raise ValueError("--height and --width must be given together (or neither, to size by --max_pixels)")
    if height is not None:
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"--height {height} --width {width}: both must be positive multiples of {multiple} "
                f"(VAE 8x times patch 2); e.g. --height {max(multiple, height // multiple * multiple)} "
                f"--width {max(multiple, width // multiple * multiple)}"
            )
        return width, height
    w, h = image_size
    if max_pixels is not None and w * h > max_pixels:
        scale = math.sqrt(w * h / max_pixels)
        w, h = int(w / scale), int(h / scale)
    w, h = w // multiple * multiple, h // multiple * multiple
    if w == 0 or h == 0:
        if min(image_size) < multiple:  # never scaled up: no --max_pixels helps
            raise ValueError(f"image of {image_size[0]}x{image_size[1]} px is smaller than {multiple} px on a side "
                             "(targets are never scaled up); use a larger image")
        raise ValueError(
            f"image of {image_size[0]}x{image_size[1]} px gives an empty target at --max_pixels {max_pixels}: "
            f"both sides must reach {multiple} px; use a less elongated image or raise --max_pixels"
        )
    return w, h


class NonFiniteOutputError(ValueError):
    """A generation produced NaN or inf: there is no image to write (it would be black)."""


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and what is wrong with it."""


# Pillow refuses images above twice its MAX_IMAGE_PIXELS as decompression bombs; so do we, by name and up front.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr", "I", "F", "I;16", "I;16L", "I;16B", "I;16N", *_ALPHA_MODES)


def file_problem(path) -> str | None:
    """What makes `path` unusable before it is even opened ("is a directory", "is empty"), or None."""
    if os.path.isdir(path):
        return "is a directory, not an image file"
    if not os.path.exists(path):
        return "not found"
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    return None


def check_header(img: Image.Image):
    """Refuse, from the header alone, what cannot become a sane RGB picture: unknown modes, huge images."""
    if img.mode not in _MODES:
        raise ImageError(f"has pixel mode {img.mode!r}, which is not converted to RGB here; save it as RGB "
                         "(8- or 16-bit PNG, or JPEG)")
    try:  # counting reads every frame's header: a cut animation fails here, with whatever Pillow raises
        frames = getattr(img, "n_frames", 1)
    except Exception as e:
        raise ImageError(f"is truncated or damaged ({type(e).__name__} counting its frames: {e}); re-export or "
                         "replace it") from None
    if frames > 1 and img.format != "MPO":  # an MPO (many phones' JPEGs) is the photo plus previews: frame 0 is it
        what = "pages (a multi-page TIFF)" if img.format == "TIFF" else f"frames (an animated {img.format})"
        raise ImageError(f"has {frames} {what}: which one is the picture is a guess; save the frame you mean as a "
                         "still image (PNG or JPEG)")
    if img.width * img.height > MAX_PIXELS:
        raise _too_large(f"{img.width}x{img.height} = {img.width * img.height / 1e6:.0f} megapixels")


def _too_large(what) -> ImageError:
    return ImageError(f"is {what}, more than the {MAX_PIXELS / 1e6:.0f} MP limit (it would be shrunk to about 1 MP "
                      "anyway); downscale it")


def open_header(source) -> Image.Image:
    """Image.open (header only, nothing decoded) and check_header. Pillow refuses an image over MAX_PIXELS inside
    Image.open, before check_header can look: its DecompressionBombError gets check_header's words, so the metadata
    check and the scripts say the same thing. Below it, Pillow's DecompressionBombWarning (from 89 MP) is not shown:
    this limit is the one that counts, and the warning repeated on every open of a large photo that is used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(f"{int(pixels.group(1)) / 1e6:.0f} megapixels" if pixels else f"too large ({e})") from None
    try:
        check_header(img)
    except ImageError:
        img.close()
        raise
    return img


def _gray_to_rgb(values: np.ndarray, scale: float) -> Image.Image:
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L").convert("RGB")


# Formats whose mode-I pixels Pillow always scales to 0..65535 (a 16-bit PGM/PPM, a 16-bit grey PNG in older Pillow):
# their range is known, however dark the picture; only other mode-I images (a 32-bit TIFF) are judged by their values
_SIXTEEN_BIT_I_FORMATS = ("PPM", "PNG")


# A profile's colour space (ICC header bytes 16..20) -> the mode littlecms converts from, and the modes it describes.
_ICC_SPACES = {b"RGB ": "RGB", b"GRAY": "L", b"CMYK": "CMYK"}
# sRGB by its description: 'sRGB IEC61966-2.1' (and '-2-1 black scaled', 'sRGB2014', 'sRGB built-in'), GIMP's own;
# not a linear-light profile with sRGB's primaries ('sRGB-elle-V2-g10', 'Linear sRGB'), nor Elle Stone's others with
# sRGB's primaries and another curve ('-g22', '-g18', '-labl', '-rec709': only '-srgbtrc' is sRGB), which convert
_SRGB_DESCRIPTION = re.compile(r"(GIMP built-in )?sRGB(?!.*(linear|g10|-elle-V\d-(?!srgbtrc)))", re.IGNORECASE)
_ICC_MODES = {"RGB": ("RGB", "RGBA", "RGBa", "P", "PA"), "CMYK": ("CMYK",),
              "L": ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")}


def _icc_description(data: bytes) -> str:
    """An ICC profile's description tag (v2 'desc' or v4 'mluc', its first text), read from the bytes: '' if none.
    Read here, not by littlecms, so that an sRGB image needs no parsing (nor littlecms at all)."""
    try:
        for i in range(min(struct.unpack(">I", data[128:132])[0], 256)):
            sig, offset, size = struct.unpack(">4sII", data[132 + 12 * i:144 + 12 * i])
            if sig == b"desc":
                tag = data[offset:offset + size]
                if tag[:4] == b"desc":
                    return tag[12:12 + struct.unpack(">I", tag[8:12])[0]].split(b"\0")[0].decode("latin-1")
                if tag[:4] == b"mluc":
                    length, start = struct.unpack(">II", tag[20:28])
                    return tag[start:start + length].decode("utf-16-be", "replace")
    except struct.error:
        pass
    return ""


@functools.lru_cache(maxsize=8)  # a dataset's photos share a few profiles (every iPhone's Display P3)
def _build_srgb_transform(data: bytes, mode: str):
    # Relative colorimetric with black point compensation (Photoshop's default conversion): colours sRGB can show
    # come out exactly, the rest are clipped, and a CMYK profile's black (its ink limit) becomes sRGB black. Matrix
    # profiles (Display P3, Adobe RGB, ProPhoto) have no perceptual table: littlecms would do the same for either.
    return ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(data)), ImageCms.createProfile("sRGB"), mode,
                                   "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                   flags=ImageCms.Flags.BLACKPOINTCOMPENSATION)


def srgb_transform(img: Image.Image):
    """The littlecms transform from `img`'s embedded ICC profile to sRGB, or None where there is nothing to convert:
    no profile; an sRGB one (the sRGB IEC61966 family, 'sRGB built-in': told by its description and skipped, so an
    sRGB image reads bit-identical to an untagged one); or a profile of another colour space than the pixels' (an
    RGB profile Pillow's convert("L") kept on a grey copy: viewers ignore it too, and so does this). Header only:
    the metadata check calls it before training. Raises ImageError for a profile that cannot be used."""
    data = img.info.get("icc_profile")
    description = _icc_description(data) if data else ""
    if not data or _SRGB_DESCRIPTION.match(description):
        return None
    mode = next((m for m, modes in _ICC_MODES.items() if img.mode in modes), None)
    space = _ICC_SPACES.get(bytes(data[16:20]))
    if mode is None or (space is not None and space != mode):
        return None
    what = f"ICC colour profile {description!r}" if description else "ICC colour profile"
    try:
        return _build_srgb_transform(bytes(data), mode)
    except ImportError as e:  # Pillow built without littlecms: ImageCms raises it when used
        raise ImageError(f"has an {what}, but this Pillow has no littlecms to convert it to sRGB ({e}); install "
                         "Pillow's wheel (pip install --force-reinstall pillow), or save the image as sRGB") from None
    except (ImageCms.PyCMSError, OSError, ValueError) as e:  # unreadable bytes, a profile littlecms refuses
        # Refused, not read as sRGB: its colours are unknown, and guessing sRGB would shift a wide-gamut photo's
        # silently (as a multi-frame file's picture or a float image's range are refused, not guessed)
        raise ImageError(f"has an {what} that cannot be used (littlecms: {e}), so its colours are unknown; re-export it (with "
                         "its profile intact, or converted to sRGB)") from None


def to_rgb(img: Image.Image, source_format=None, icc=True) -> Image.Image:
    """Any supported mode -> 8-bit sRGB as a viewer shows it: 16-bit and integer/float greyscale scaled (not clipped
    to white), transparency composited over white, colours converted from an embedded ICC profile (`srgb_transform`;
    icc=False: a mask, read by its grey level). `source_format`: the file's format when `img` is a copy (which has
    none), e.g. after the EXIF rotation."""
    transform = srgb_transform(img) if icc else None
    if transform is None:
        return _plain_rgb(img, source_format)
    if img.mode == "CMYK":
        return transform.apply(img)
    # after the bit-depth scaling and compositing: the 8-bit result is converted (Pillow decodes a 16-bit RGB PNG to
    # 8 bits anyway); a grey profile converts the grey values (the plain RGB of a grey picture, exactly)
    rgb = _plain_rgb(img, source_format)
    return transform.apply(rgb.convert("L") if transform.input_mode == "L" else rgb)


def _plain_rgb(img: Image.Image, source_format=None) -> Image.Image:
    """to_rgb without colour management: the pixel values as they are, in RGB."""
    mode = img.mode
    if mode == "I" and (source_format or img.format) in _SIXTEEN_BIT_I_FORMATS:
        mode = "I;16"  # values in 0..65535, scaled as such below
    if mode == "RGB" and "transparency" not in img.info:  # an RGB PNG's tRNS colour key is transparency too
        return img
    if mode.startswith("I;16"):
        return _gray_to_rgb(np.clip(np.asarray(img, dtype=np.float64), 0, 65535), 255 / 65535)
    if mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        if not np.isfinite(values).all():
            raise ImageError(f"has NaN or infinite pixel values (mode {mode})")
        if mode == "F" and lo >= 0 and hi <= 1:
            return _gray_to_rgb(values, 255)
        # 0..255 when whole numbers (an 8-bit picture stored as float): fractions over 1 are a 0..1 picture's overshoot
        # (HDR) as likely, which read as 0..255 would come out all but black
        if lo >= 0 and hi <= 255 and (mode == "I" or np.array_equal(values, np.round(values))):
            return _gray_to_rgb(values, 1)
        if lo >= 0 and hi <= 65535 and mode == "I":
            return _gray_to_rgb(values, 255 / 65535)  # a 16-bit greyscale image decoded as 32-bit
        raise ImageError(f"has {'float' if mode == 'F' else '32-bit integer'} pixels from {lo:g} to {hi:g}, whose "
                         "range is unknown (not 0..1, 0..255 or 0..65535); save it as an 8- or 16-bit image")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def has_transparency(img: Image.Image) -> bool:
    """Whether any pixel is (partly) transparent: an alpha channel below 255, or a palette / colour-key entry."""
    if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
        return False
    return img.convert("RGBA").getextrema()[3][0] < 255


def is_grey(img: Image.Image, tolerance=16) -> bool:
    """Whether every pixel's red, green and blue are within `tolerance` levels of each other (a JPEG's chroma noise
    passes): a greyscale picture, whatever its mode."""
    if img.mode in ("1", "L", "LA", "La", "I", "F") or img.mode.startswith("I;16"):
        return True
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return int((rgb.max(-1) - rgb.min(-1)).max(initial=0)) <= tolerance


def as_rgb(img: Image.Image, icc=True) -> Image.Image:
    """A decoded PIL image as every reader here takes it: the EXIF rotation applied (once: the result carries no
    orientation), then `to_rgb`. The pipeline applies it to the images it is given, `open_image` to files. An image
    not decoded yet is decoded here, and refused if it decodes at another size than its header's (check_decoded_size)."""
    header = img.size
    upright = ImageOps.exif_transpose(img)  # decodes
    check_decoded_size(img, header)
    return to_rgb(upright, img.format, icc)


def open_image(path, icc=True) -> Image.Image:
    """Decode an image file as RGB (EXIF rotation applied, like diffusers' `load_image`; modes and colour profiles as
    `to_rgb`, icc=False for a mask), or raise an ImageError naming the file and the problem."""
    problem = file_problem(path)
    if problem:
        raise ImageError(f"{path}: {problem}")
    try:
        # through an open file, not the name: Pillow memory-maps an uncompressed file it opens by name, and so
        # decodes an uncompressed non-RGB TIFF with an EXIF rotation of 90 degrees scrambled
        with open(path, "rb") as f, open_header(f) as img:
            header = img.size
            img.load()
            check_decoded_size(img, header)
            return as_rgb(img, icc)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # Pillow's errors for damaged files
        raise ImageError(f"{path}: {decode_problem(path, e)}") from None


def check_decoded_size(img: Image.Image, header_size):
    """Refuse a decode whose size is not the one the header gave (and that sized the training target and buckets):
    Pillow memory-mapping an uncompressed non-RGB TIFF with an EXIF rotation of 90 degrees decoded its rows into the
    rotated shape, scrambled (open_image avoids that path; this keeps any other such mismatch from being used)."""
    if img.size != tuple(header_size):
        raise ImageError(f"decodes at {img.width}x{img.height} px, not the {header_size[0]}x{header_size[1]} px its "
                         "header gives: its pixels would be garbage; save it as PNG or JPEG")


def decode_problem(path, error) -> str:
    """What Pillow's `error` while opening or decoding the file `path` tells the user, and the fix (shared by
    open_image and the metadata check, which decodes from the file's bytes)."""
    if isinstance(error, (PermissionError, FileNotFoundError, IsADirectoryError)):  # the file, not its content
        return f"cannot be read ({error.strerror}); check its permissions"
    if isinstance(error, UnidentifiedImageError):  # an OSError too, but nothing was cut: no reader knows the bytes
        try:
            with open(path, "rb") as f:
                head = f.read(12)
        except OSError:
            head = b""
        if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "is a HEIC/HEIF photo (whatever its extension), which Pillow cannot read; convert it to PNG or JPEG"
        ext = os.path.splitext(os.fspath(path))[1].lower()
        if ext and ext not in Image.registered_extensions():  # e.g. a phone's .heic
            return f"is a {ext} file, which Pillow cannot read; convert it to PNG or JPEG"
        return "is not an image file Pillow can read (cannot identify image file); re-export or replace it"
    what = "is truncated or damaged" if "truncated" in str(error).lower() or isinstance(error, (OSError, SyntaxError)) \
        else "is not an image file Pillow can read"
    return f"{what} ({type(error).__name__}: {error}); re-export or replace it"


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(w, h) after EXIF rotation, read from the header of an opened (not decoded) image."""
    w, h = img.size
    if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # the rotations by 90 or 270 degrees
        # Pillow's TIFF reader rotates by itself: its size is already the displayed one (and the tag is gone once
        # it has decoded), so swapping again would size the target for the unrotated picture
        tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
        if tags is None or (w, h) == (tags.get(256), tags.get(257)):  # 256, 257: the stored width and height
            w, h = h, w
    return w, h


def resize_edit_image(img: Image.Image, target_area=VAE_EDIT_AREA) -> Image.Image:
    """Resize (stretch, no crop) an edit image to `edit_image_size`, as the pipeline does."""
    w, h = edit_image_size(*img.size, target_area=target_area)
    return img.resize((w, h), resample=Image.LANCZOS)


def _cover(size, width, height):
    """(scale, resized (w, h)) of resize_and_center_crop: the image scaled to cover width x height."""
    scale = max(width / size[0], height / size[1])
    return scale, (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))


def check_cover(what, size, width, height, fix):
    """Refuse an image that resize_and_center_crop cannot make a sane width x height picture of: the centre crop
    would keep less than SIZE_MULTIPLE px of it on a side (a strip or a thumbnail stretched many times), or the
    resized image it is cut from would be over MAX_PIXELS (gigabytes of memory, for each use). `fix`: what to do."""
    scale, (rw, rh) = _cover(size, width, height)
    kept_w, kept_h = min(size[0], width / scale), min(size[1], height / scale)
    if min(kept_w, kept_h) < SIZE_MULTIPLE or rw * rh > MAX_PIXELS:
        raise ImageError(f"{what}: its {size[0]}x{size[1]} px cannot fill {width}x{height}: the centre crop keeps "
                         f"{kept_w:.0f}x{kept_h:.0f} px of it, stretched {scale:.3g}x (resized to {rw}x{rh} px first); "
                         f"{fix}")


def resize_and_center_crop(img: Image.Image, width, height) -> Image.Image:
    """Scale so the image covers width x height, then cut the centre (`check_cover` refuses what this cannot do)."""
    _, (rw, rh) = _cover(img.size, width, height)
    img = img.resize((rw, rh), resample=Image.LANCZOS)
    left, top = (rw - width) // 2, (rh - height) // 2
    return img.crop((left, top, left + width, top + height))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode, converted by `to_rgb`) -> float tensor (3, H, W) in [-1, 1] (diffusers' VaeImageProcessor
    arithmetic)."""
    array = np.asarray(to_rgb(img), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Tensor (3, H, W) in [-1, 1] -> RGB PIL image (values clamped, rounded like diffusers)."""
    array = (tensor.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))
