"""Decoding images the same way in every stage, and the one place that fixes channel order.

Every stage that reads a photo (download verification, region features, faces) goes
through :func:`load_image` or :func:`decode_image_bytes`, so that a photo is upright and RGB
everywhere and its ``width`` and ``height`` are those of the upright image:

- EXIF orientation (tag 274, values 2 to 8) is applied. Malformed EXIF data is ignored,
  so such a photo keeps its stored orientation.
- Any mode becomes 8-bit RGB. Alpha (``LA``, ``RGBA``, ``PA``, ``P`` with transparency) is
  composited onto white. ``CMYK`` is converted through its embedded ICC profile when it
  has one, else with Pillow's formula. 16-bit and 32-bit greyscale (``I;16*``, ``I``) are
  scaled from 0..65535 to 0..255, and float greyscale (``F``) from 0..1 when its values
  lie there, else it is clipped to 0..255.
- Animated files (GIF, multi-page TIFF) give their first frame.

Failures raise :class:`ImageDecodeError` naming the file and the reason: empty file, not an
image (with a hint when it is an HTML page), truncated, corrupt, or more pixels than
``max_pixels`` (a decompression bomb).

Tensors are RGB, channel first, float in 0..1 (:func:`to_tensor_rgb`). A backend that wants
BGR (detectron2's default ``INPUT.FORMAT``) converts with :func:`to_array` and
``channel_order="BGR"`` rather than flipping channels itself.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# Pillow's own bomb threshold (about 89.5 million pixels). Pillow refuses images above
# twice its MAX_IMAGE_PIXELS in Image.open regardless of this value.
DEFAULT_MAX_PIXELS = 89_478_485

CHANNEL_ORDERS = ("RGB", "BGR")
EXIF_ORIENTATION_TAG = 0x0112
ALPHA_BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """A file or byte string that cannot be decoded as an image; the message names it and why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclasses.dataclass
class LoadedImage:
    """An upright RGB image with the facts about its source."""

    image: Image.Image  # mode "RGB", EXIF orientation applied
    width: int  # of the upright image
    height: int
    source_mode: str  # Pillow mode before conversion, e.g. "CMYK" or "I;16"
    source_format: str | None  # "JPEG", "PNG", ...
    exif_orientation: int  # 1 when the file had none


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode the image file at ``path`` into an upright RGB image.

    Raises ImageDecodeError naming ``path`` for a missing, empty, non-image, truncated,
    corrupt or too-large (``max_pixels``) file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError(str(path), "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(str(path), "is a directory, not an image file") from None
    except OSError as error:
        raise ImageDecodeError(str(path), f"cannot be read: {error.strerror or error}") from None
    return decode_image_bytes(data, name=str(path), max_pixels=max_pixels)


def decode_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode ``data`` like :func:`load_image`; ``name`` identifies the source in errors."""
    if len(data) == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The bomb check below replaces Pillow's warning with an error at max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(name, f"not an image: {_describe_non_image(data)}") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(name, f"decompression bomb: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        if _looks_truncated(error):
            raise ImageDecodeError(name, f"truncated image data ({error})") from None
        raise ImageDecodeError(name, f"corrupt image header ({error})") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(name, f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(
            name,
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )

    source_format = image.format
    try:
        image.seek(0)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        if _looks_truncated(error):
            raise ImageDecodeError(name, f"truncated image data ({error})") from None
        raise ImageDecodeError(name, f"corrupt image data ({error})") from None

    orientation = _exif_orientation(image)
    source_mode = image.mode
    rgb = to_rgb(image)
    if orientation in range(2, 9):
        rgb = _apply_orientation(rgb, orientation)
    return LoadedImage(
        image=rgb,
        width=rgb.width,
        height=rgb.height,
        source_mode=source_mode,
        source_format=source_format,
        exif_orientation=orientation,
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data stored as "I" (Pillow opens some 16-bit PNGs so) uses the same scale.
        scaled = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        scaled = np.clip(np.round(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, target, outputMode="RGB")
            if converted is not None:
                return converted
        except (ImportError, OSError, ValueError, ImageCms.PyCMSError):
            pass  # An unusable profile falls back to Pillow's plain formula below.
    return image.convert("RGB")


def _exif_orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    # Same mapping as PIL.ImageOps.exif_transpose, applied to the converted image, whose
    # EXIF block was dropped by the conversion.
    return image.transpose(_ORIENTATION_TRANSPOSE[orientation])


def _looks_truncated(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, EOFError) or "truncated" in message or "broken data stream" in message


def _describe_non_image(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<head" in head:
        return "the content is an HTML page"
    if head.startswith((b"{", b"[")):
        return "the content looks like JSON"
    for signature, image_format in _SIGNATURES:
        if data.startswith(signature):
            return f"the file starts like a {image_format} but its header is damaged; fetch or copy the file again"
    return f"format not recognised (first bytes {data[:8].hex()})"


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"RIFF", "RIFF (WebP)"),
)


def to_array(image: Image.Image, channel_order: str = "RGB") -> np.ndarray:
    """Return an RGB image as uint8 array [H, W, 3] in ``channel_order`` ("RGB" or "BGR")."""
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order {channel_order!r} is not one of {CHANNEL_ORDERS}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}; decode it with model.image_io.load_image")
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3) RGB
    if channel_order == "BGR":
        array = np.ascontiguousarray(array[:, :, ::-1])
    return array


def to_tensor_rgb(image: Image.Image) -> "torch.Tensor":
    """Return an RGB image as a float32 tensor [3, H, W] with values in 0..1."""
    import torch

    array = to_array(image, "RGB")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)  # (3, H, W)



def to_tensor_uint8(image: Image.Image) -> "torch.Tensor":
    """Return an RGB image as a uint8 tensor [3, H, W] (4x smaller than float to send between processes)."""
    import torch

    return torch.from_numpy(to_array(image, "RGB").copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def probe_size(path: Path | str) -> tuple[int, int] | None:
    """Return the upright (width, height) from the file header without decoding pixels, or None.

    Used to order images by size before batching; a None here is reported when the
    image is actually decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                orientation = _exif_orientation(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
