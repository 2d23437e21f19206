"""(audit-images) Images too large, or too far from the requested shape, are refused by name before training or
inference loads a model, with the same words in the metadata check and in the scripts."""
import os

import pytest
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
