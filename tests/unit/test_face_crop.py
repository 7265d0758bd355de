"""Face-crop augmentation (engine.data.face_crop): the face box from the file name, and the cut around it."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from engine.data.face_crop import face_box, face_crop


@pytest.mark.parametrize(("name", "box"), [
    ("me_120_50_40_30.png", (120, 50, 40, 30)),
    ("a_b_1_2_3_4.jpg", (1, 2, 3, 4)),
    ("me_120_50_40.png", None),  # four tokens: no box
    ("me_x_50_40_30.png", None),  # not numbers
    ("me_0_50_40_30.png", None),  # centre x 0 means "no face" (sd-scripts)
    ("photo_2023_01_0_0.png", None),  # a date: a box with no size would divide by zero
    ("photo_2023_01_40_0.png", None),
])
def test_face_box_from_the_file_name(name, box):
    assert face_box(name) == box


def test_a_random_range_keeps_the_face_inside_the_cut():
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)
    pixels[130:170, 280:320] = 255  # the face: 40 px, centred at (300, 150)
    image = Image.fromarray(pixels)
    for seed in range(20):
        prepared = face_crop(image, (300, 150, 40, 40), (128, 96), (1.5, 3.0), random_crop=False,
                             rng=random.Random(seed))
        assert prepared.pixels.shape == (96, 128, 3)
        assert prepared.pixels.max() == 255  # some of the face is always in the cut
        assert prepared.crop_ltrb == (0, 0, 128, 96) and prepared.original_size == (128, 96)


def test_an_image_smaller_than_the_target_is_enlarged_to_cover_it():
    image = Image.new("RGB", (50, 40), (10, 20, 30))
    prepared = face_crop(image, (25, 20, 10, 10), (64, 64), (2.0, 2.0), random_crop=True, rng=random.Random(0))
    assert prepared.pixels.shape == (64, 64, 3)
