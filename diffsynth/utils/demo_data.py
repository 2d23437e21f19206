"""A small synthetic edit dataset whose edit is visible: the same scene with the square's colour changed."""
import csv
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 70), "yellow": (230, 210, 40)}


def draw_scene(size, box, colour, background):
    img = Image.new("RGB", size, background)
    ImageDraw.Draw(img).rectangle(box, fill=colour)
    return img


def write_edit_dataset(folder, num_samples=8, size=(64, 64), seed=0, sizes=None) -> str:
    """Pairs (edit input: a red square; target: the same square in blue) -> metadata.csv path.

    `sizes` (a list of (w, h)) cycles through several aspect ratios, for bucketing.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "edits"), exist_ok=True)
    rows = []
    for i in range(num_samples):
        w, h = (sizes[i % len(sizes)] if sizes else size)
        bw, bh = rng.randint(w // 4, w // 2), rng.randint(h // 4, h // 2)
        x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
        background = tuple(rng.randint(150, 255) for _ in range(3))
        box = (x, y, x + bw, y + bh)
        draw_scene((w, h), box, COLOURS["red"], background).save(os.path.join(folder, "edits", f"edit{i:03d}.png"))
        draw_scene((w, h), box, COLOURS["blue"], background).save(os.path.join(folder, "images", f"img{i:03d}.png"))
        rows.append({"image": f"images/img{i:03d}.png", "edit_image": f"edits/edit{i:03d}.png",
                     "prompt": "make the red square blue"})
    path = os.path.join(folder, "metadata.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "edit_image", "prompt"])
        writer.writeheader()
        writer.writerows(rows)
    return path
