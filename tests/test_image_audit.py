"""Images read the same way everywhere: EXIF rotation in every format, transparency, animation, aspect ratios the
VL text encoder refuses, and the pipeline's own conversion of PIL images passed to it."""
import numpy as np
import pytest
from PIL import Image

from diffsynth.trainers.dataset import EditDataset, validate_metadata
from diffsynth.utils.image import open_image

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
