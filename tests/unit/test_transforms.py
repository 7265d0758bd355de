"""Resize, crop, flip, colour augmentation and tensor conversion of training images."""

import random

import numpy as np
import pytest
from PIL import Image

from engine.data.buckets import BucketAssignment, BucketManager, fixed_bucket
from engine.data.resize import PreparedImage, resize_image
from engine.data.transforms import color_augment, flip_horizontal, prepare, resize_and_crop, to_model_tensor


def coordinate_image(width: int, height: int) -> Image.Image:
    """Red = x mod 256, green = y mod 256, blue = 77: every pixel says where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x, y, np.full_like(x, 77)], axis=-1).astype(np.uint8)
    return Image.fromarray(array)


def gradient_image(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(array)


UPSCALE = BucketManager((512, 512))
NO_UPSCALE = BucketManager((512, 512), no_upscale=True)


@pytest.mark.parametrize(("manager", "size"), [
    (UPSCALE, (640, 480)), (UPSCALE, (480, 640)), (UPSCALE, (100, 100)), (UPSCALE, (2700, 800)),
    (UPSCALE, (448, 576)), (NO_UPSCALE, (600, 500)), (NO_UPSCALE, (300, 70)), (NO_UPSCALE, (1000, 700)),
    (fixed_bucket((512, 512)), (1024, 768)),
])
def test_output_is_exactly_the_bucket(manager, size):
    assignment = manager.assign(size)
    prepared = resize_and_crop(gradient_image(*size), assignment)
    bucket_w, bucket_h = assignment.bucket
    assert prepared.pixels.shape == (bucket_h, bucket_w, 3)
    assert prepared.pixels.dtype == np.uint8
    assert prepared.bucket == assignment.bucket
    assert prepared.resized == assignment.resized
    assert prepared.original_size == size
    left, top, right, bottom = prepared.crop_ltrb
    assert (right - left, bottom - top) == assignment.bucket


def test_centre_crop_offsets():
    prepared = resize_and_crop(gradient_image(640, 480), BucketAssignment((576, 448), (597, 448), 0.0))
    assert prepared.crop_ltrb == (10, 0, 586, 448)  # excess 21 -> 21 // 2
    tall = resize_and_crop(gradient_image(300, 1000), BucketAssignment((256, 832), (256, 853), 0.0))
    assert tall.crop_ltrb == (0, 10, 256, 842)


def test_crop_of_an_unresized_image_takes_exactly_the_recorded_pixels():
    # No-upscale: 300x70 keeps its size and crops to 256x64 in both axes; the pixels name their origin.
    assignment = NO_UPSCALE.assign((300, 70))
    assert assignment.resized == (300, 70)
    prepared = resize_and_crop(coordinate_image(300, 70), assignment)
    assert prepared.crop_ltrb == (22, 3, 278, 67)
    left, top, _, _ = prepared.crop_ltrb
    assert tuple(prepared.pixels[0, 0]) == (left, top, 77)
    assert tuple(prepared.pixels[-1, -1]) == ((left + 255) % 256, top + 63, 77)
    assert np.array_equal(prepared.pixels, np.asarray(coordinate_image(300, 70))[3:67, 22:278])


@pytest.mark.parametrize(("size", "bucket", "resized"), [
    ((640, 480), (576, 448), (597, 448)),  # shrinking: area filter
    ((120, 90), (576, 448), (597, 448)),  # enlarging: Lanczos
    ((300, 1000), (256, 832), (256, 853)),
])
def test_crop_ltrb_is_the_crop_actually_applied(size, bucket, resized):
    image = gradient_image(*size)
    prepared = resize_and_crop(image, BucketAssignment(bucket, resized, 0.0))
    manual = np.asarray(resize_image(image, resized))
    left, top, right, bottom = prepared.crop_ltrb
    assert np.array_equal(prepared.pixels, manual[top:bottom, left:right])
    # ...and not the fit-inside geometry of sd-scripts' get_crop_ltrb (issue #1443)
    if size == (640, 480):
        assert prepared.crop_ltrb[1] == 0 and prepared.crop_ltrb[0] > 0


def test_manual_resize_uses_the_expected_filters():
    image = gradient_image(640, 480)
    shrunk = np.asarray(resize_image(image, (597, 448)))
    assert np.array_equal(shrunk, np.asarray(image.resize((597, 448), Image.Resampling.HAMMING, reducing_gap=3.0)))
    small = gradient_image(120, 90)
    grown = np.asarray(resize_image(small, (597, 448)))
    assert np.array_equal(grown, np.asarray(small.resize((597, 448), Image.Resampling.LANCZOS)))


def test_area_shrink_by_a_whole_factor_is_the_block_average():
    array = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out = np.asarray(resize_image(Image.fromarray(array), (32, 16))).astype(int)
    blocks = array.reshape(16, 4, 32, 3, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(out - blocks).max() <= 0.5 + 1e-9  # the nearest integer (either one on an exact half)


@pytest.mark.parametrize("name", ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box",
                                  "LANCZOS"])
def test_named_interpolations(name):
    for size in ((200, 150), (50, 40)):  # shrinking and enlarging
        out = resize_image(gradient_image(*size), (100, 80), name)
        assert out.size == (100, 80) and out.mode == "RGB"


def test_nearest_really_is_nearest():
    image = coordinate_image(200, 100)
    out = np.asarray(resize_image(image, (100, 50), "nearest"))
    assert set(np.unique(out[..., 0])) <= set(range(200))
    assert out[0, 1, 0] in (2, 3)


def test_unknown_interpolation_is_rejected():
    with pytest.raises(ValueError, match="unknown interpolation 'sinc'"):
        resize_image(gradient_image(20, 20), (10, 10), "sinc")


def test_resized_smaller_than_bucket_is_rejected():
    with pytest.raises(ValueError, match="smaller than the bucket"):
        resize_and_crop(gradient_image(20, 20), BucketAssignment((64, 64), (64, 32), 0.0))


def test_random_crop_varies_with_rng_and_stays_in_range():
    assignment = NO_UPSCALE.assign((300, 70))  # excess 44 horizontally, 6 vertically
    image = coordinate_image(300, 70)
    rng = random.Random(1234)
    boxes = [resize_and_crop(image, assignment, random_crop=True, rng=rng).crop_ltrb for _ in range(60)]
    lefts, tops = {box[0] for box in boxes}, {box[1] for box in boxes}
    assert len(lefts) > 10 and len(tops) > 3
    assert min(lefts) >= 0 and max(lefts) <= 44 and min(tops) >= 0 and max(tops) <= 6
    # the recorded box is the real one, for random crops too
    prepared = resize_and_crop(image, assignment, random_crop=True, rng=random.Random(7))
    left, top, _, _ = prepared.crop_ltrb
    assert tuple(prepared.pixels[0, 0]) == (left, top, 77)
    # the same seed gives the same crop, drawing x before y like sd-scripts
    again = resize_and_crop(image, assignment, random_crop=True, rng=random.Random(7))
    expected = random.Random(7)
    assert again.crop_ltrb[:2] == prepared.crop_ltrb[:2] == (expected.randint(0, 44), expected.randint(0, 6))


def test_random_crop_without_excess_is_at_zero():
    prepared = resize_and_crop(gradient_image(64, 64), BucketAssignment((64, 64), (64, 64), 0.0), random_crop=True,
                               rng=random.Random(0))
    assert prepared.crop_ltrb == (0, 0, 64, 64)


def test_flip_mirrors_pixels_and_crop_box():
    prepared = resize_and_crop(gradient_image(640, 480), BucketAssignment((576, 448), (597, 448), 0.0))
    flipped = flip_horizontal(prepared)
    assert flipped.flipped and not prepared.flipped
    assert np.array_equal(flipped.pixels, prepared.pixels[:, ::-1])
    assert flipped.pixels.flags.c_contiguous
    assert flipped.crop_ltrb == (597 - 586, 0, 597 - 10, 448) == (11, 0, 587, 448)
    # SDXL's flipped crop_top_left is (top, resized_w - right) of the unflipped box
    assert (flipped.crop_ltrb[1], flipped.crop_ltrb[0]) == (prepared.crop_ltrb[1], 597 - prepared.crop_ltrb[2])
    twice = flip_horizontal(flipped)
    assert twice.crop_ltrb == prepared.crop_ltrb and not twice.flipped
    assert np.array_equal(twice.pixels, prepared.pixels)


def test_flipped_box_selects_the_mirrored_pixels():
    # Cropping the mirrored resized image with the mirrored box gives the flipped pixels.
    image = coordinate_image(300, 70)
    flipped = flip_horizontal(resize_and_crop(image, NO_UPSCALE.assign((300, 70))))
    mirrored = np.asarray(image)[:, ::-1]
    left, top, right, bottom = flipped.crop_ltrb
    assert np.array_equal(flipped.pixels, mirrored[top:bottom, left:right])


def test_to_model_tensor_range_and_layout():
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 128)
    pixels[3, 5] = (255, 255, 255)
    tensor = to_model_tensor(pixels)
    assert tuple(tensor.shape) == (3, 4, 6)
    assert str(tensor.dtype) == "torch.float32"
    assert tensor[0, 0, 0].item() == 1.0 and tensor[1, 0, 0].item() == -1.0
    assert tensor[2, 0, 0].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    assert tensor[:, 3, 5].tolist() == [1.0, 1.0, 1.0] and tensor[0, 1, 1].item() == -1.0
    assert tensor.min().item() >= -1.0 and tensor.max().item() <= 1.0
    assert tensor.is_contiguous()


def test_to_model_tensor_of_flipped_pixels():
    prepared = resize_and_crop(gradient_image(64, 64), BucketAssignment((64, 64), (64, 64), 0.0))
    tensor = to_model_tensor(flip_horizontal(prepared).pixels)
    assert tensor[0, 0, 0].item() == pytest.approx(prepared.pixels[0, -1, 0] / 127.5 - 1, abs=1e-6)


def test_color_augment_applies_about_a_third_of_the_time():
    image = gradient_image(32, 32)
    changed = sum(color_augment(image, random.Random(seed)) is not image for seed in range(300))
    assert 70 <= changed <= 130  # p = 0.33


def test_color_augment_keeps_size_and_is_reproducible():
    image = gradient_image(40, 30)
    for seed in range(20):
        out = color_augment(image, random.Random(seed))
        assert out.size == image.size and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(color_augment(image, random.Random(seed))))


def test_color_augment_hue_and_gamma_branches():
    colourful = Image.fromarray(np.array([[[200, 40, 40], [0, 0, 0], [255, 255, 255], [90, 90, 90]]], np.uint8))
    hue_seen = gamma_seen = False
    red_moved = 0
    for seed in range(200):
        rng = random.Random(seed)
        applies, hue = rng.random() <= 0.33, rng.random() > 0.5
        if not applies:
            continue
        out = np.asarray(color_augment(colourful, random.Random(seed))).astype(int)
        assert out[0, 1].tolist() == [0, 0, 0] and out[0, 2].tolist() == [255, 255, 255]  # both keep black/white
        if hue:
            hue_seen = True
            assert len(set(out[0, 3].tolist())) == 1  # grey has no hue to shift
            assert abs(out[0, 0] - [200, 40, 40]).max() <= 60  # ±16° moves red only so far
            red_moved += out[0, 0].tolist() != [200, 40, 40]
        else:
            gamma_seen = True
            assert abs(out[0, 3, 0] - 90) <= 5  # gamma 0.95..1.05 on normalised values is gentle
    assert hue_seen and gamma_seen and red_moved > 0


def test_prepare_loads_and_runs_every_step(tmp_path):
    path = tmp_path / "photo.JPG"
    gradient_image(640, 480).save(path, quality=95)
    assignment = UPSCALE.assign((640, 480))
    plain = prepare(path, assignment)
    assert isinstance(plain, PreparedImage)
    assert plain.pixels.shape == (448, 576, 3) and plain.original_size == (640, 480)
    assert plain.crop_ltrb == (10, 0, 586, 448) and not plain.flipped
    flipped = prepare(path, assignment, flip=True)
    assert flipped.flipped and np.array_equal(flipped.pixels, plain.pixels[:, ::-1])
    cropped = prepare(path, assignment, random_crop=True, rng=random.Random(3))
    assert 0 <= cropped.crop_ltrb[0] <= 21
    augmented = prepare(path, assignment, color_aug=True, rng=random.Random(0))
    assert augmented.pixels.shape == plain.pixels.shape


def exact_inter_area(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.INTER_AREA for shrinking, written out: each output pixel averages the input area it covers,
    counting pixels cut by its edges by the fraction covered."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        matrix = np.zeros((n_out, n_in))
        for i in range(n_out):
            start, end = i * scale, (i + 1) * scale
            for j in range(int(start), min(n_in, int(np.ceil(end)))):
                matrix[i, j] = max(0.0, min(end, j + 1) - max(start, j))
        return matrix / scale

    rows, cols = weights(array.shape[0], size[1]), weights(array.shape[1], size[0])
    out = np.einsum("ij,jkc->ikc", rows, array.astype(np.float64))
    return np.einsum("lk,ikc->ilc", cols, out)


def test_default_shrink_stays_close_to_cv2_inter_area():
    # Photo-like content: smooth noise at two scales plus a hard edge.
    rng = np.random.default_rng(5)
    coarse = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300)))
    fine = rng.normal(0, 12, (300, 400, 3))
    array = np.clip(coarse + fine + np.where(np.arange(400) < 170, 30, -30)[None, :, None], 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    for size in [(219, 164), (256, 192), (133, 100)]:
        reference = exact_inter_area(array, size)
        errors = {name: np.abs(np.asarray(resize_image(image, size, name)) - reference).mean()
                  for name in (None, "lanczos", "box", "bilinear", "bicubic")}
        # Rounding to integers alone costs 0.25 on average; every other PIL filter is measurably further off.
        assert errors[None] < 1.25, errors
        assert errors[None] == min(errors.values()), errors
