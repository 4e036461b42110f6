"""A corpus of bad and awkward inputs, generated into a folder at test time.

Nothing here is committed as a binary file: every case is built from a few lines of
Pillow, numpy or BSON code, so that a reader sees exactly what is wrong with it. Each case
carries its expected outcome, which ``docs/reliability.md`` lists and
``tests/test_bad_inputs.py`` checks:

- ``Rejected(reason)``: the stage raises or records a failure whose message contains
  ``reason`` and names the item;
- ``Accepted(...)``: the stage reads the input and the result has the stated properties.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import io
import json
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

UPRIGHT_SIZE = (40, 20)  # width, height of every EXIF orientation case once it is upright
MARK_COLOUR = (230, 20, 20)  # top-left quarter of the upright orientation images
BACKGROUND_COLOUR = (20, 20, 230)


@dataclasses.dataclass(frozen=True)
class Rejected:
    """The input fails with a message containing ``reason``."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Accepted:
    """The input decodes to an upright RGB image of ``size``; ``note`` says what is special."""

    size: tuple[int, int]
    note: str = ""
    top_left: tuple[int, int, int] | None = None  # expected RGB near the upright top-left corner


@dataclasses.dataclass(frozen=True)
class ImageCase:
    name: str
    data: bytes
    expected: Rejected | Accepted


# --------------------------------------------------------------------------- images


def encode_image(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient_photo(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A small RGB picture with a gradient, so that every decoder has real data to read."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` 8-bit grey pixels but holds almost no data.

    Pillow reads the size from the header, so a decompression-bomb guard must reject the
    file before any pixel is decoded.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b"")


# EXIF orientation -> the operation that turns the stored pixels upright (as in the EXIF
# 2.3 specification and PIL.ImageOps.exif_transpose), and the inverse that produced them.
_TO_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_INVERSE = {
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
}


def upright_orientation_image() -> Image.Image:
    """A 40x20 blue image whose top-left 20x10 quarter is red: every flip or turn moves the red."""
    image = Image.new("RGB", UPRIGHT_SIZE, BACKGROUND_COLOUR)
    image.paste(MARK_COLOUR, (0, 0, UPRIGHT_SIZE[0] // 2, UPRIGHT_SIZE[1] // 2))
    return image


def oriented_jpeg(orientation: int) -> bytes:
    """A JPEG with EXIF ``orientation`` whose pixels are stored so that they show upright."""
    stored = upright_orientation_image()
    if orientation != 1:
        operation = _TO_UPRIGHT[orientation]
        stored = stored.transpose(_INVERSE.get(operation, operation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode_image(stored, "JPEG", quality=95, exif=exif.tobytes())


def image_cases() -> list[ImageCase]:
    """Every image case with its expected outcome from ``model.image_io.load_image``."""
    photo = gradient_photo()
    jpeg = encode_image(photo, "JPEG", quality=90)
    cases = [
        ImageCase("zero_byte", b"", Rejected("empty file (0 bytes)")),
        ImageCase("truncated_jpeg", jpeg[: len(jpeg) // 2], Rejected("truncated image data")),
        ImageCase(
            "corrupt_jpeg_header",
            b"\xff\xd8\xff" + bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)),
            Rejected("starts like a JPEG but its header is damaged"),
        ),
        ImageCase("corrupt_png_crc", _corrupt_png_crc(), Rejected("starts like a PNG but its header is damaged")),
        ImageCase("not_an_image", b"This is a plain text file, not a photo.\n" * 20, Rejected("not an image: format not recognised")),
        ImageCase(
            "html_saved_as_jpg",
            b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n",
            Rejected("the content is an HTML page"),
        ),
        ImageCase("json_saved_as_jpg", b'{"error": "rate limited"}', Rejected("the content looks like JSON")),
        # 30000 x 30000: Pillow's own limit (twice its MAX_IMAGE_PIXELS) rejects it on open.
        ImageCase("decompression_bomb_huge", png_header_only(30_000, 30_000), Rejected("decompression bomb")),
        # 10000 x 10000 = 1e8 pixels: under Pillow's hard limit, over the pipeline's max_pixels.
        ImageCase("decompression_bomb_over_max_pixels", png_header_only(10_000, 10_000), Rejected("exceeds max_pixels")),
        ImageCase("one_by_one", encode_image(Image.new("RGB", (1, 1), (10, 200, 10)), "PNG"), Accepted((1, 1), top_left=(10, 200, 10))),
        ImageCase("mode_L", encode_image(photo.convert("L"), "PNG"), Accepted((64, 48), "greyscale")),
        ImageCase("mode_LA", encode_image(_with_alpha(photo.convert("L"), "LA"), "PNG"), Accepted((64, 48), "alpha on white")),
        ImageCase("mode_P", encode_image(photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"), Accepted((64, 48), "palette")),
        ImageCase("mode_P_transparent", _palette_with_transparency(), Accepted((8, 8), "transparent palette entry on white", top_left=(255, 255, 255))),
        ImageCase("mode_RGBA", encode_image(_with_alpha(photo, "RGBA"), "PNG"), Accepted((64, 48), "alpha on white")),
        ImageCase("mode_RGBA_fully_transparent", encode_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), Accepted((8, 8), top_left=(255, 255, 255))),
        ImageCase("mode_CMYK", encode_image(photo.convert("CMYK"), "JPEG", quality=90), Accepted((64, 48), "CMYK without ICC profile")),
        ImageCase("mode_I16", encode_image(_sixteen_bit(), "PNG"), Accepted((32, 16), "16-bit grey scaled to 8 bits", top_left=(255, 255, 255))),
        ImageCase("gif_animated", _animated_gif(), Accepted((16, 16), "first frame", top_left=(255, 0, 0))),
        ImageCase("png_named_jpg", encode_image(photo, "PNG"), Accepted((64, 48), "PNG bytes under a .jpg name")),
    ]
    for orientation in range(1, 9):
        cases.append(
            ImageCase(f"exif_orientation_{orientation}", oriented_jpeg(orientation), Accepted(UPRIGHT_SIZE, "EXIF orientation applied", top_left=MARK_COLOUR))
        )
    return cases


def _corrupt_png_crc() -> bytes:
    data = bytearray(encode_image(gradient_photo(), "PNG"))
    data[29] ^= 0xFF  # a byte of the IHDR chunk's CRC
    return bytes(data)


def _with_alpha(image: Image.Image, mode: str) -> Image.Image:
    converted = image.convert(mode)
    alpha = Image.linear_gradient("L").resize(image.size)
    converted.putalpha(alpha)
    return converted


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] + [200, 40, 40] * 255)
    image.paste(1, (4, 0, 8, 8))
    return encode_image(image, "PNG", transparency=0)


def _sixteen_bit() -> Image.Image:
    values = np.full((16, 32), 65535, dtype=np.uint16)
    values[8:, :] = 257 * 100
    return Image.fromarray(values)  # uint16 becomes mode I;16


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def write_image_cases(folder: Path) -> dict[str, Path]:
    """Write every image case as ``<folder>/<name>.jpg`` (the name the pipeline gives images)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case in image_cases():
        path = folder / f"{case.name}.jpg"
        path.write_bytes(case.data)
        paths[case.name] = path
    return paths


# --------------------------------------------------------------------------- text

FIVE_THOUSAND_WORDS = " ".join(f"Wort{i % 97}" if i % 11 else "Der Hafen." for i in range(5000))

# name -> German article text. Invalid UTF-8 cannot be a str: see INVALID_UTF8_DOCUMENT.
TEXT_CASES: dict[str, str] = {
    "empty": "",
    "whitespace": " \t\n  \u00a0 ",
    "punctuation": "?!... -- ;;; ***",
    "all_caps": "ZWEI ROTE KREISE LINKS IM HAFEN VON PORT ELWOOD",
    "five_thousand_words": FIVE_THOUSAND_WORDS,
}

# An article file whose bytes are not UTF-8 (Latin-1 umlauts), as a foreign tool might write it.
INVALID_UTF8_DOCUMENT = b'{"_id": "bad-utf8", "split": "train", "language": "de", "title": "Gr\xfc\xdfe aus K\xf6ln", "text": "", "image_hash": "h0"}'


def text_documents() -> list[dict[str, Any]]:
    """One NewsImages-style German document per text case (the case name is the id)."""
    return [
        {"_id": f"text-{name}", "split": "train", "language": "de", "title": text, "text": text, "image_hash": f"h-{name}"}
        for name, text in TEXT_CASES.items()
    ]


def write_article_files(articles_root: Path, documents: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Write ``documents`` as ``<articles_root>/<split>/<_id>.json``; return (split, aid) pairs."""
    items = []
    for document in documents:
        folder = articles_root / document["split"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{document['_id']}.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
        items.append((document["split"], document["_id"]))
    return items


# --------------------------------------------------------------------------- MongoDB documents


def _nytimes_document(aid: Any, split: Any = "train", day: int = 1, **extra: Any) -> dict[str, Any]:
    document = {
        "_id": aid,
        "pub_date": dt.datetime(2024, 1, day, 12, 0),
        "headline": {"main": f"Headline of {aid}"},
        "snippet": "A snippet.",
        "parsed_section": [
            {"type": "paragraph", "text": "Body text."},
            {"type": "caption", "text": "Two red circles on the left.", "hash": hashlib.sha256(str(aid).encode()).hexdigest()},
        ],
        "image_positions": [1],
        **extra,
    }
    if split is not None:
        document["split"] = split
    return document


@dataclasses.dataclass(frozen=True)
class DocumentCase:
    name: str
    document: dict[str, Any]
    expected: str  # "exported", or the failure reason that the export records


def document_cases() -> list[DocumentCase]:
    """NYTimes800k-schema MongoDB documents that test the export's id, split and BSON handling."""
    from bson import Binary, Decimal128, Int64, ObjectId

    oid = ObjectId("65a0000000000000000000aa")
    return [
        DocumentCase("object_id", _nytimes_document(oid), "exported"),
        # The string form of the same ObjectId names the same file: the second one is a duplicate.
        DocumentCase("duplicate_of_object_id", _nytimes_document(str(oid)), "duplicate"),
        DocumentCase("int_id", _nytimes_document(7), "exported"),
        DocumentCase("duplicate_of_int_id", _nytimes_document("7"), "duplicate"),
        DocumentCase("slash_in_id", _nytimes_document("2024/01/article"), "path separator"),
        DocumentCase("dot_dot_id", _nytimes_document("../escaped"), "path separator"),
        DocumentCase("backslash_id", _nytimes_document("a\\b"), "path separator"),
        DocumentCase("missing_split", _nytimes_document("no-split", split=None), "missing 'split'"),
        DocumentCase("unknown_split", _nytimes_document("odd-split", split="holdout"), "unknown split"),
        DocumentCase("alias_split", _nytimes_document("val-split", split="VAL"), "exported"),
        DocumentCase(
            "bson_types",
            _nytimes_document(
                "bson-types",
                abstract="Decimal and binary fields",
                web_url=Binary(b"\x00\x01binary\xff"),
                snippet=Decimal128("12.50"),
            ),
            "exported",
        ),
        DocumentCase("int64_field", _nytimes_document("int64", abstract=Int64(2**40)), "exported"),
        # 23:30 at UTC+2 is 21:30 UTC, still the first of January.
        DocumentCase(
            "aware_datetime",
            _nytimes_document("tz-date", pub_date=dt.datetime(2024, 1, 1, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
            "exported",
        ),
    ]


# --------------------------------------------------------------------------- features


def region_json_content(rows: int = 36, dim: int = 8, seed: int = 0) -> dict[str, Any]:
    """A valid region-feature JSON object in the original layout (no pipeline extras)."""
    rng = np.random.default_rng(seed)

    def b64(array: np.ndarray, dtype: str) -> str:
        return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")

    boxes = np.sort(rng.uniform(0, 100, (rows, 4)), axis=1)
    return {
        "roi_features": b64(rng.normal(size=(rows, dim)), "<f4"),
        "boxes": b64(boxes, "<f4"),
        "normalized_boxes": b64(boxes / 100.0, "<f4"),
        "obj_ids": b64(rng.integers(0, 1600, rows), "<i8"),
        "obj_probs": b64(rng.uniform(size=rows), "<f4"),
        "attr_ids": b64(rng.integers(0, 400, rows), "<i8"),
        "attr_probs": b64(rng.uniform(size=rows), "<f4"),
        "n_regions": rows,
    }


def region_feature_cases(dim: int = 8) -> dict[str, tuple[dict[str, Any] | bytes, str | None]]:
    """name -> (JSON object or raw bytes, text of the expected RegionJsonError, or None for a valid file)."""
    good = region_json_content(dim=dim)
    bad_base64 = dict(good, roi_features=good["roi_features"][:-7] + "!!*&^%$")
    float64 = dict(good, boxes=base64.b64encode(np.zeros((36, 4), "<f8").tobytes()).decode("ascii"))
    int_features = dict(good, obj_ids=base64.b64encode(np.zeros(36, "<i4").tobytes()).decode("ascii"))
    cut = dict(good, roi_features=good["roi_features"][: len(good["roi_features"]) // 2])
    nan = np.random.default_rng(1).normal(size=(36, dim)).astype("<f4")
    nan[3, 2] = np.nan
    nan[5, 0] = np.inf
    with_nan = dict(good, roi_features=base64.b64encode(nan.tobytes()).decode("ascii"))
    return {
        "valid": (good, None),
        "bad_base64": (bad_base64, "field 'roi_features' is not valid base64"),
        "boxes_float64": (float64, "field 'boxes' contains 1152 bytes, expected 576"),
        "obj_ids_int32": (int_features, "field 'obj_ids' contains 144 bytes, expected 288"),
        "roi_features_cut": (cut, "field 'roi_features' contains"),
        "not_json": (b"\x00\x01 not json", "not valid JSON"),
        "nan_values": (with_nan, "field 'roi_features' contains NaN or infinite values"),
    }


def face_json_content(rows: int = 2, dtype: str = "<f8", seed: int = 0) -> dict[str, Any]:
    """A valid face-feature JSON object in the original layout (float64 embeddings, as the original wrote)."""
    rng = np.random.default_rng(seed)
    return {
        "faces_embeddings": base64.b64encode(rng.normal(size=(rows, 512)).astype(dtype).tobytes()).decode("ascii"),
        "n_faces": rows,
        "faces_detect_probs": base64.b64encode(np.full(rows, 0.99, dtype).tobytes()).decode("ascii"),
        "faces_size": rows,
    }


def face_feature_cases() -> dict[str, tuple[dict[str, Any] | bytes, str | None]]:
    """name -> (JSON object or raw bytes, text of the expected error, or None for a valid file)."""
    good = face_json_content()
    nan = np.zeros((2, 512), "<f8")
    nan[1, 7] = np.nan
    return {
        "valid_float64": (good, None),
        "valid_float32": (face_json_content(dtype="<f4"), None),
        "bad_base64": (dict(good, faces_embeddings="%%%" + good["faces_embeddings"][3:]), "faces_embeddings is not valid base64"),
        "float16": (face_json_content(dtype="<f2"), "not 2 x 512 float32 or float64"),
        "nan_values": (dict(good, faces_embeddings=base64.b64encode(nan.tobytes()).decode("ascii")), "NaN or infinite"),
        "not_json": (b"{\"faces_size\": 2, ", "JSONDecodeError"),
    }


MARKER_NAME = "pickle_ran_code.txt"


class WritesMarker:
    """Unpickling an instance calls ``Path.write_text``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from a foreign pickle ran\n"))


def foreign_index_pickle(marker: Path) -> bytes:
    """An index pickle that the pipeline did not write and that runs code when unpickled."""
    return pickle.dumps({0: ("aid-1", 0), 1: WritesMarker(marker)}, protocol=4)


def plain_foreign_index_pickle() -> bytes:
    """An index pickle from another tool: plain data, in the original ``{i: (aid, iid)}`` form."""
    return pickle.dumps({0: ("aid-1", 0), 1: ("aid-2", 1)}, protocol=2)


# --------------------------------------------------------------------------- snapshots


def snapshot(folder: Path, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file and folder under ``folder``, except ``exclude``."""
    entries = {}
    exclude = exclude.resolve() if exclude is not None else None
    for path in sorted(folder.rglob("*")):
        resolved = path.resolve()
        if exclude is not None and (resolved == exclude or exclude in resolved.parents):
            continue
        stat = path.lstat()
        entries[str(path.relative_to(folder))] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns)
    return entries
