"""Image files: extensions, header sizes as displayed, decoding every odd format to RGB, and clear errors."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from engine.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImage,
    is_image_file,
    load_rgb_image,
    read_image_size,
    verify_image,
)

WHITE = (255, 255, 255)


def pixel(path, xy=(0, 0)):
    return load_rgb_image(path).getpixel(xy)


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def marked_image(width=40, height=20) -> Image.Image:
    """Distinct corners, so any rotation or mirror shows."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = (255, 0, 0)  # top-left red
    array[: height // 2, width // 2:] = (0, 255, 0)  # top-right green
    array[height // 2:, : width // 2] = (0, 0, 255)  # bottom-left blue
    array[height // 2:, width // 2:] = (255, 255, 0)  # bottom-right yellow
    return Image.fromarray(array)


# --- extensions ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.png", "b.jpg", "c.jpeg", "d.webp", "e.bmp", "F.PNG", "g.JPG", "h.JpEg",
                                  "i.WEBP", "j.Bmp", "dir/k.tar.png"])
def test_image_extensions_in_any_case(name):
    assert is_image_file(name)


@pytest.mark.parametrize("name", ["a.txt", "b.gif", "c.png.txt", "png", ".png.caption", "d.tif", "e"])
def test_other_names_are_not_images(name):
    assert not is_image_file(name)


def test_extension_set_is_lower_case_with_dots():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp"} == IMAGE_EXTENSIONS


def test_upper_case_files_read_and_load(tmp_path):
    path = tmp_path / "PHOTO.JPG"
    marked_image(64, 32).save(path, format="JPEG")
    assert read_image_size(path) == (64, 32)
    assert load_rgb_image(path).size == (64, 32)


# --- sizes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "kwargs"), [(".png", {}), (".jpg", {}), (".jpeg", {}), (".webp", {}),
                                                (".bmp", {}), (".webp", {"lossless": True})])
def test_header_size_of_each_format(tmp_path, suffix, kwargs):
    path = tmp_path / f"img{suffix}"
    marked_image(123, 45).save(path, **kwargs)
    assert read_image_size(path) == (123, 45)
    assert read_image_size(str(path)) == (123, 45)


def test_exif_orientation_6_swaps_the_size_and_rotates_the_pixels(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = marked_image(40, 20)
    stored.save(path, exif=exif_bytes(6), quality=95)
    assert read_image_size(path) == (20, 40)
    loaded = load_rgb_image(path)
    assert loaded.size == (20, 40)
    # Orientation 6: the stored image must turn 90° clockwise to show upright, so the stored top-left (red)
    # ends up top-right, and the stored bottom-left (blue) top-left.
    assert np.allclose(loaded.getpixel((15, 5)), (255, 0, 0), atol=30)
    assert np.allclose(loaded.getpixel((5, 5)), (0, 0, 255), atol=30)
    raw = Image.open(path).convert("RGB")
    assert np.array_equal(np.asarray(loaded), np.asarray(raw.transpose(Image.Transpose.ROTATE_270)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil_exif_transpose(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    marked_image(40, 20).save(path, exif=exif_bytes(orientation))
    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    loaded = load_rgb_image(path)
    assert read_image_size(path) == loaded.size == expected.size
    assert np.array_equal(np.asarray(loaded), np.asarray(expected))


@pytest.mark.parametrize(("suffix", "kwargs"), [(".png", {}), (".webp", {"lossless": True})])
def test_orientation_in_png_and_webp_containers(tmp_path, suffix, kwargs):
    path = tmp_path / f"rotated{suffix}"
    marked_image(40, 20).save(path, exif=exif_bytes(8), **kwargs)
    assert read_image_size(path) == (20, 40)
    loaded = load_rgb_image(path)
    assert loaded.size == (20, 40)
    # Orientation 8 turns 90° counter-clockwise: the stored top-right (green) shows at the top-left.
    assert loaded.getpixel((5, 5)) == (0, 255, 0)


def test_exif_without_orientation_changes_nothing(tmp_path):
    path = tmp_path / "plain.jpg"
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    marked_image(40, 20).save(path, exif=exif.tobytes())
    assert read_image_size(path) == (40, 20) == load_rgb_image(path).size


# --- odd formats -----------------------------------------------------------------------------------------------


def test_palette_png_without_transparency(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.save(path)
    assert Image.open(path).mode == "P"
    loaded = load_rgb_image(path)
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (200, 100, 50)


def test_palette_png_with_transparency_becomes_white(tmp_path):
    path = tmp_path / "palette_alpha.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(path, transparency=0)
    assert "transparency" in Image.open(path).info
    assert pixel(path, (0, 0)) == WHITE  # index 0 is transparent, whatever colour it holds
    assert pixel(path, (1, 1)) == (200, 100, 50)


def test_la_is_composited_on_white(tmp_path):
    path = tmp_path / "la.png"
    array = np.array([[[0, 0], [100, 255], [0, 128]]], dtype=np.uint8)
    Image.fromarray(array, mode="LA").save(path)
    loaded = load_rgb_image(path)
    assert loaded.getpixel((0, 0)) == WHITE
    assert loaded.getpixel((1, 0)) == (100, 100, 100)
    assert all(abs(channel - 127) <= 1 for channel in loaded.getpixel((2, 0)))  # half-transparent black


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    path = tmp_path / "rgba.png"
    array = np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    Image.fromarray(array, mode="RGBA").save(path)
    assert pixel(path, (0, 0)) == WHITE
    assert pixel(path, (1, 0)) == (10, 20, 30)


def test_rgba_webp(tmp_path):
    path = tmp_path / "rgba.webp"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path, lossless=True)
    assert pixel(path) == WHITE


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    loaded = load_rgb_image(path)
    assert loaded.mode == "RGB"
    assert np.allclose(loaded.getpixel((4, 4)), (0, 255, 255), atol=3)  # pure cyan


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    loaded = np.asarray(load_rgb_image(path))
    assert loaded[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()


def test_16_bit_big_endian(tmp_path):
    path = tmp_path / "gray16b.tif"  # TIFF keeps I;16B on disk; the loader does not care about the extension
    values = np.array([[0, 32768, 65535]], dtype=">u2")
    Image.frombytes("I;16B", (3, 1), values.tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    assert np.asarray(load_rgb_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_32_bit_integer_and_float_modes(tmp_path):
    int_path, float_path = tmp_path / "i32.tif", tmp_path / "f32.tif"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I").save(int_path)
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(float_path)
    assert np.asarray(load_rgb_image(int_path))[0, :, 0].tolist() == [0, 128, 255]
    assert np.asarray(load_rgb_image(float_path))[0, :, 0].tolist() == [0, 128, 255]


def test_grayscale_and_one_bit(tmp_path):
    gray, bits = tmp_path / "gray.png", tmp_path / "bits.png"
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L").save(gray)
    Image.fromarray(np.array([[True, False]])).convert("1").save(bits)
    assert Image.open(bits).mode == "1"
    assert [pixel(gray, (x, 0)) for x in range(3)] == [(0, 0, 0), (77, 77, 77), WHITE]
    assert [pixel(bits, (x, 0)) for x in range(2)] == [WHITE, (0, 0, 0)]


def test_grayscale_bmp(tmp_path):
    path = tmp_path / "gray.bmp"
    Image.fromarray(np.full((3, 5), 90, dtype=np.uint8), mode="L").save(path)
    assert read_image_size(path) == (5, 3)
    assert pixel(path) == (90, 90, 90)


def test_loaded_image_is_independent_of_the_file(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    loaded = load_rgb_image(path)
    path.unlink()
    assert loaded.getpixel((0, 0)) == (1, 2, 3)


# --- errors ----------------------------------------------------------------------------------------------------


def test_truncated_jpeg_raises_naming_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert read_image_size(path) == (256, 256)  # the header survives; only a decode finds the damage
    with pytest.raises(UnreadableImage, match="cut.jpg.*truncated") as caught:
        load_rgb_image(path)
    assert caught.value.path == path
    with pytest.raises(UnreadableImage, match="cut.jpg"):
        verify_image(path)


def test_text_file_named_png_raises_naming_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    for function in (read_image_size, load_rgb_image, verify_image):
        with pytest.raises(UnreadableImage, match="notes.png.*not an image"):
            function(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty.jpg"):
        read_image_size(empty)
    with pytest.raises(UnreadableImage, match="missing.png.*cannot be opened"):
        read_image_size(tmp_path / "missing.png")


def test_png_with_a_damaged_body(tmp_path):
    path = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[100:140] = b"\x00" * 40  # inside the compressed image data
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableImage, match="broken.png"):
        verify_image(path)


def test_verify_accepts_a_good_image(tmp_path):
    path = tmp_path / "good.jpg"
    marked_image().save(path, exif=exif_bytes(6))
    verify_image(path)


def test_importing_images_does_not_import_torch():
    code = "import sys, engine.data.images, engine.data.buckets, engine.data.transforms; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_directory_named_like_an_image(tmp_path):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(UnreadableImage, match="folder.png"):
        read_image_size(folder)
    with pytest.raises(UnreadableImage, match="folder.png"):
        load_rgb_image(folder)
