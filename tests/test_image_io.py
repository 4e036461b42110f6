"""Decoding images: modes, EXIF orientation, failures, channel order."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.image_io import (
    ImageDecodeError,
    decode_image_bytes,
    load_image,
    probe_size,
    to_array,
    to_tensor_rgb,
    to_tensor_uint8,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def marked_image(width: int = 40, height: int = 20) -> Image.Image:
    """A grey image with a red top-left corner, to follow where the corner ends up."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    return image


@pytest.mark.parametrize(
    "mode, fmt, expected",
    [
        ("L", "PNG", (200, 200, 200)),
        ("1", "PNG", (255, 255, 255)),
        ("LA", "PNG", (200, 200, 200)),
        ("RGBA", "PNG", (10, 20, 30)),
        ("P", "PNG", (10, 20, 30)),
        ("CMYK", "JPEG", None),
        ("CMYK", "TIFF", (255, 0, 0)),
        ("I;16", "PNG", (200, 200, 200)),
        ("I", "TIFF", (200, 200, 200)),
        ("F", "TIFF", (200, 200, 200)),
        ("YCbCr", "JPEG", None),
    ],
)
def test_modes_become_rgb(mode, fmt, expected):
    if mode in ("L", "LA"):
        image = Image.new(mode, (16, 12), 200 if mode == "L" else (200, 255))
    elif mode == "1":
        image = Image.new("1", (16, 12), 1)
    elif mode == "RGBA":
        image = Image.new("RGBA", (16, 12), (10, 20, 30, 255))
    elif mode == "P":
        image = Image.new("P", (16, 12), 1)
        image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    elif mode == "CMYK":
        image = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # pure red
    elif mode == "I;16":
        image = Image.fromarray(np.full((12, 16), 200 * 257, dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(np.full((12, 16), 200 * 257, dtype=np.int32))
    elif mode == "F":
        image = Image.fromarray(np.full((12, 16), 200 / 255, dtype=np.float32))
    else:
        image = Image.new("YCbCr", (16, 12), (120, 100, 160))
    loaded = decode_image_bytes(encode(image, fmt), name=f"test.{fmt.lower()}")
    assert loaded.image.mode == "RGB"
    assert (loaded.width, loaded.height) == (16, 12)
    assert loaded.source_mode == Image.open(io.BytesIO(encode(image, fmt))).mode
    pixel = loaded.image.getpixel((8, 6))
    if expected is None:  # lossy JPEG colour: only check it is the intended hue
        if mode == "CMYK":
            assert pixel[0] > 200, pixel
            assert max(pixel[1], pixel[2]) < 60, pixel
    else:
        assert all(abs(a - b) <= 2 for a, b in zip(pixel, expected)), pixel


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    loaded = decode_image_bytes(encode(image, "PNG"))
    assert loaded.image.getpixel((1, 1)) == (255, 255, 255)


def test_palette_transparency_becomes_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 255] + [0] * 765)
    loaded = decode_image_bytes(encode(image, "PNG", transparency=0))
    assert loaded.image.getpixel((1, 1)) == (255, 255, 255)


# Where the red corner of the stored image lands after applying each EXIF orientation,
# and whether width and height swap. Orientation 6 means the camera was turned 90° clockwise,
# so the stored top-left corner is displayed at the top right.
ORIENTATIONS = {
    1: ("top_left", False),
    2: ("top_right", False),
    3: ("bottom_right", False),
    4: ("bottom_left", False),
    5: ("top_left", True),
    6: ("top_right", True),
    7: ("bottom_right", True),
    8: ("bottom_left", True),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_applied(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(marked_image(), "JPEG", exif=exif, quality=95)
    loaded = decode_image_bytes(data, name="rotated.jpg")
    corner, swapped = ORIENTATIONS[orientation]
    assert (loaded.width, loaded.height) == ((20, 40) if swapped else (40, 20))
    assert loaded.exif_orientation == orientation
    x = 2 if "left" in corner else loaded.width - 3
    y = 2 if "top" in corner else loaded.height - 3
    red, green, blue = loaded.image.getpixel((x, y))
    assert red > 200, (corner, (red, green, blue))
    assert max(green, blue) < 60, (corner, (red, green, blue))
    assert probe_size_of(data, tmp_name=f"o{orientation}.jpg") == (loaded.width, loaded.height)


def probe_size_of(data: bytes, tmp_name: str):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / tmp_name
        path.write_bytes(data)
        return probe_size(path)


def test_exif_orientation_matches_pillow():
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(marked_image(), "PNG", exif=exif)
    ours = decode_image_bytes(data).image
    pillow = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(ours), np.asarray(pillow))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg: empty file"):
        load_image(path)


def test_html_named_jpg(tmp_path):
    path = tmp_path / "page.jpg"
    path.write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")
    with pytest.raises(ImageDecodeError, match="page.jpg: not an image: the content is an HTML page"):
        load_image(path)


def test_random_bytes_not_image(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ImageDecodeError, match="noise.jpg: not an image: format not recognised"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    data = encode(noisy, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg: truncated image data"):
        load_image(path)


def test_corrupt_header(tmp_path):
    data = bytearray(encode(marked_image(), "PNG"))
    data[16:24] = b"\xff" * 8  # width and height of the IHDR chunk, breaking its CRC
    path = tmp_path / "broken.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="broken.png"):
        load_image(path)


def test_decompression_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (3000, 3000), 0).save(path)  # 9 MP, compresses to a few kB
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageDecodeError, match=r"bomb.png: decompression bomb: 3000x3000 = 9000000 pixels exceeds max_pixels=1000000"):
        load_image(path, max_pixels=1_000_000)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="absent.jpg: file not found"):
        load_image(tmp_path / "absent.jpg")


def test_decode_error_is_value_error():
    assert issubclass(ImageDecodeError, ValueError)


def test_tensor_channel_order():
    image = Image.new("RGB", (3, 2), (255, 0, 0))
    tensor = to_tensor_rgb(image)
    assert tuple(tensor.shape) == (3, 2, 3)
    assert tensor.dtype.is_floating_point
    assert float(tensor[0].min()) == 1.0
    assert float(tensor[1:].max()) == 0.0
    assert to_array(image, "BGR")[0, 0].tolist() == [0, 0, 255]
    assert to_array(image, "RGB")[0, 0].tolist() == [255, 0, 0]
    assert to_tensor_uint8(image)[:, 0, 0].tolist() == [255, 0, 0]


def test_tensor_rejects_non_rgb():
    with pytest.raises(ValueError, match="expected an RGB image"):
        to_tensor_rgb(Image.new("L", (2, 2)))


def test_bad_channel_order():
    with pytest.raises(ValueError, match="channel_order 'GBR'"):
        to_array(Image.new("RGB", (2, 2)), "GBR")


def test_probe_size_unreadable(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("hello")
    assert probe_size(path) is None


def test_real_photos_decode(shared_data):
    photos = sorted((shared_data / "newsimages-2025" / "images").glob("*.jpg"))[:5]
    if not photos:
        pytest.skip("no photos in newsimages-2025/images")
    for photo in photos:
        loaded = load_image(photo)
        assert loaded.image.mode == "RGB"
        assert loaded.width > 0
        assert loaded.height > 0
