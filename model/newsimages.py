"""MediaEval NewsImages source files: discovery, decoding, normalization, splits and loading.

Three editions are read, each detected from its header row:

- 2021: German TSVs ``article aid url img iid hashvalue title text imgFile`` (one file per
  month, tab-separated, CRLF). The test batch keeps articles and images in two files,
  ``<prefix>articles.tsv`` and ``<prefix>images.tsv``, with other column names; their rows are
  joined by the article URL.
- 2023: TSVs ``url title tags image``, optionally with ``text``, ``titleEN`` and ``textEN``.
- 2025: English CSV with a byte-order mark, ``article_id article_url article_title article_tags
  image_id image_url``.

A *batch* is one source file (or the test batch's pair of files). Its key is the file stem,
cleaned to the characters ``[A-Za-z0-9._-]``; it names a Dagster partition downstream.

Every row becomes one normalized document (see :func:`normalized_document`). Loading upserts
by ``_id``, so loading a batch twice changes nothing. A new article gets its split when it is
first inserted and keeps it: see :class:`SplitPolicy`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import logging
import math
import re
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from model.storage import UnsafePathError, check_safe_id

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SOURCE_SUFFIXES = (".tsv", ".csv", ".txt")
MAX_EXAMPLES = 10

# Language of each edition's title and text. The 2025 release is English (GDELT sources);
# 2021 is German (Kölner Stadt-Anzeiger). 2023 mixed English and German sets, so its German
# default can be overridden per batch.
DEFAULT_LANGUAGES = {"2021": "de", "2023": "de", "2025": "en"}

# Column names by role, lower-cased. The 2021 test batch's exact header is not part of the
# public description of the release, so its columns are matched through these aliases.
TEST_ARTICLE_ID_COLUMNS = ("articleid", "article_id", "aid", "article")
ARTICLE_URL_COLUMNS = ("articleurl", "article_url", "url")
IMAGE_URL_COLUMNS = ("imgurl", "imageurl", "image_url", "img", "image")
IMAGE_ID_COLUMNS = ("iid", "imgid", "imageid", "image_id")
IMAGE_FILE_COLUMNS = ("imgfile", "imagefile", "imgname", "imagename", "image_file")
DATE_COLUMNS = ("pub_date", "date", "published", "publication_date")


class SourceFormatError(ValueError):
    """A source file cannot be read as any NewsImages layout; the message names the file."""


class SourceDecodeError(SourceFormatError):
    """A source file's bytes do not decode in the configured or detected encoding."""


@dataclasses.dataclass(frozen=True)
class SourceBatch:
    """One source batch: a file, or the 2021 test batch's articles and images files."""

    key: str
    edition: str  # "2021", "2023" or "2025"
    layout: str  # "2021", "2021-test", "2023" or "2025"
    files: tuple[Path, ...]  # (file,) or (articles file, images file)


@dataclasses.dataclass
class RowFailure:
    """One source row that produced no document, and why."""

    where: str  # "<file>:<line>"
    reason: str


@dataclasses.dataclass
class BatchRead:
    """The documents read from one batch, the rows that failed and the encodings used."""

    batch: SourceBatch
    documents: list[dict[str, Any]]
    failures: list[RowFailure]
    encodings: dict[str, str]
    rows: int
    unmatched_images: int = 0


# --------------------------------------------------------------------------- decoding


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}")


def decode_source(path: Path, data: bytes, encoding: str = "auto") -> tuple[str, str]:
    """Decode ``data`` read from ``path``; return ``(text, encoding used)``.

    ``auto`` reads a byte-order mark, else UTF-8. A file that is not UTF-8 is read as
    Latin-1, or as Windows-1252 when it contains bytes 0x80-0x9F (control characters in
    Latin-1, typographic quotes and dashes in Windows-1252). A file that mixes valid UTF-8
    sequences with invalid bytes is rejected: any single-byte guess would garble its UTF-8
    lines. Errors name the file, the line and the setting to change.
    """
    name = str(path)
    requested = encoding.strip().lower()
    if requested != "auto":
        try:
            text = data.decode(requested)
        except LookupError:
            raise SourceDecodeError(f"{name}: unknown encoding {encoding!r}; use 'auto' or a Python codec name such as 'utf-8' or 'latin-1'") from None
        except UnicodeDecodeError as error:
            raise SourceDecodeError(
                f"{name}, line {_line_of(data, error.start)}: byte 0x{data[error.start]:02x} is not valid {requested}; "
                f"set the encoding for this file to the one it was written in, or to 'auto'"
            ) from None
        return text.lstrip("\ufeff"), requested

    if data.startswith(b"\xef\xbb\xbf"):
        return _decode_strict(name, data[3:], "utf-8", "utf-8-sig"), "utf-8-sig"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return _decode_strict(name, data, "utf-16", "utf-16"), "utf-16"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as error:
        first_bad_line = _line_of(data, error.start)
        if _UTF8_MULTIBYTE.search(data):
            raise SourceDecodeError(
                f"{name}, line {first_bad_line}: the file mixes UTF-8 text with bytes that are not UTF-8 "
                f"(first at byte 0x{data[error.start]:02x}); re-encode it as one encoding, or configure its encoding explicitly"
            ) from None
    if any(0x80 <= byte <= 0x9F for byte in data):
        return _decode_strict(name, data, "cp1252", "cp1252"), "cp1252"
    return data.decode("latin-1"), "latin-1"


def _decode_strict(name: str, data: bytes, codec: str, label: str) -> str:
    try:
        return data.decode(codec)
    except UnicodeDecodeError as error:
        raise SourceDecodeError(
            f"{name}, line {_line_of(data, error.start)}: byte 0x{data[error.start]:02x} is not valid {label}; "
            f"configure this file's encoding explicitly"
        ) from None


# --------------------------------------------------------------------------- tables


@dataclasses.dataclass
class Table:
    """A decoded source table: header and rows as dicts, with each row's line number."""

    path: Path
    encoding: str
    header: list[str]
    rows: list[tuple[int, dict[str, str]]]
    malformed: list[RowFailure]

    def column(self, *aliases: str) -> str | None:
        """Return the header name matching the first of ``aliases``, compared case-insensitively."""
        by_lower = {name.lower(): name for name in self.header}
        for alias in aliases:
            if alias in by_lower:
                return by_lower[alias]
        return None


def _delimiter(header_line: str, path: Path) -> str:
    if "\t" in header_line:
        return "\t"
    if "," in header_line:
        return ","
    if path.suffix.lower() == ".csv":
        return ","
    return "\t"


def _parse_rows(text: str, delimiter: str, quoting: int) -> list[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=False)
    rows = []
    start_line = 1
    for fields in reader:
        rows.append((start_line, fields))
        start_line = reader.line_num + 1
    return rows


def read_table(path: Path, encoding: str = "auto") -> Table:
    """Decode and parse a TSV or CSV source file.

    TSVs are read without quote handling first, as the 2021 files are plain tab-separated
    text with literal quote characters. When rows then disagree with the header's column
    count, the file is parsed again with CSV quoting, and the parse with fewer such rows is
    kept. Rows that still have the wrong number of fields are returned in ``malformed``
    with their line number.
    """
    path = Path(path)
    data = path.read_bytes()
    text, used = decode_source(path, data, encoding)
    header_line = text.split("\n", 1)[0].rstrip("\r")
    if not header_line.strip():
        raise SourceFormatError(f"{path}: the first line is empty; a NewsImages file starts with a header row")
    delimiter = _delimiter(header_line, path)

    attempts = [csv.QUOTE_NONE, csv.QUOTE_MINIMAL] if delimiter == "\t" else [csv.QUOTE_MINIMAL]
    parsed: list[tuple[int, list[str]]] = []
    fewest_mismatches = None
    for quoting in attempts:
        candidate = [(line, fields) for line, fields in _parse_rows(text, delimiter, quoting) if fields]
        width = len(candidate[0][1])
        mismatches = sum(1 for _, fields in candidate if len(fields) != width)
        if fewest_mismatches is None or mismatches < fewest_mismatches:
            parsed, fewest_mismatches = candidate, mismatches
        if mismatches == 0:
            break

    header = [name.strip() for name in parsed[0][1]]
    rows, malformed = [], []
    for line, fields in parsed[1:]:
        if len(fields) != len(header):
            malformed.append(
                RowFailure(f"{path.name}:{line}", f"{len(fields)} fields where the header has {len(header)}; the row is skipped")
            )
            continue
        rows.append((line, dict(zip(header, fields))))
    return Table(path=path, encoding=used, header=header, rows=rows, malformed=malformed)


# --------------------------------------------------------------------------- discovery


def _header_names(path: Path) -> set[str] | None:
    """Lower-cased header names of a candidate file, or None when it has no readable header."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(1 << 16)
    except OSError:
        return None
    first = first.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")
    line = first.decode("latin-1")
    separator = "\t" if "\t" in line else ","
    return {name.strip().strip('"').lower() for name in line.split(separator) if name.strip()}


def detect_layout(header: set[str]) -> str | None:
    """Return the layout of a header row: "2021", "2023", "2025", "2021-articles", "2021-images" or None."""
    if {"article_id", "article_title", "image_id", "image_url"} <= header:
        return "2025"
    if {"aid", "title", "text"} <= header and header & {"hashvalue", "imgfile", "img", "iid"}:
        return "2021"
    if {"url", "title", "image"} <= header:
        return "2023"
    if {"title"} <= header and header & set(TEST_ARTICLE_ID_COLUMNS):
        return "2021-articles"
    if header & set(IMAGE_URL_COLUMNS) and header & set(IMAGE_ID_COLUMNS + IMAGE_FILE_COLUMNS) and "title" not in header:
        return "2021-images"
    return None


_PAIR_NAME = re.compile(r"^(?P<prefix>.*?)[_\-. ]?(?P<part>articles|images)$", re.IGNORECASE)
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def batch_key(stem: str) -> str:
    """Return the partition key of a file stem, with characters outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    key = _UNSAFE_KEY_CHARS.sub("_", stem).strip("._") or "batch"
    return check_safe_id(key)


def _candidate_files(source_dir: Path) -> list[Path]:
    files = []
    for path in sorted(source_dir.rglob("*")):
        relative = path.relative_to(source_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in SOURCE_SUFFIXES:
            files.append(path)
    return files


def find_batches(source_dir: Path | str) -> dict[str, SourceBatch]:
    """Find every NewsImages batch under ``source_dir``, searched recursively, and return them by key.

    Files whose header matches no layout are skipped with a log message. Two files that
    would get the same key raise SourceFormatError naming both.
    """
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"NewsImages source folder {source_dir} does not exist; point the source setting at the folder with the TSV/CSV files")

    batches: dict[str, SourceBatch] = {}
    halves: dict[str, dict[str, Path]] = {}

    def add(batch: SourceBatch) -> None:
        if batch.key in batches:
            first = ", ".join(str(p) for p in batches[batch.key].files)
            second = ", ".join(str(p) for p in batch.files)
            raise SourceFormatError(
                f"two NewsImages batches would share the partition key {batch.key!r}: {first} and {second}; rename one of the files"
            )
        batches[batch.key] = batch

    for path in _candidate_files(source_dir):
        header = _header_names(path)
        layout = detect_layout(header) if header else None
        if layout in ("2021-articles", "2021-images"):
            match = _PAIR_NAME.match(path.stem)
            prefix = match.group("prefix") if match else path.stem
            halves.setdefault(prefix, {})[layout] = path
            continue
        if layout is None:
            logger.info("skipping %s: its header matches no NewsImages layout", path)
            continue
        add(SourceBatch(key=batch_key(path.stem), edition=layout, layout=layout, files=(path,)))

    for prefix, parts in sorted(halves.items()):
        if set(parts) != {"2021-articles", "2021-images"}:
            (only,) = parts.values()
            logger.warning("skipping %s: a 2021 test-batch file needs its partner (<prefix>articles.tsv and <prefix>images.tsv)", only)
            continue
        key = batch_key(prefix or "articles_images")
        add(SourceBatch(key=key, edition="2021", layout="2021-test", files=(parts["2021-articles"], parts["2021-images"])))
    return dict(sorted(batches.items()))


def discover_batches(source_dir: Path | str) -> list[str]:
    """Return the sorted partition keys of every batch under ``source_dir``, for dynamic partitions."""
    return list(find_batches(source_dir))


# --------------------------------------------------------------------------- normalization


def clean_text(value: str | None) -> str:
    """Unicode NFC with surrounding whitespace removed; None becomes an empty string."""
    if value is None:
        return ""
    return unicodedata.normalize("NFC", value).strip()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_tags(value: str) -> list[str]:
    """Tags of a 2023/2025 row: separated by ``;`` when one occurs, else by ``,``."""
    value = clean_text(value)
    if not value:
        return []
    separator = ";" if ";" in value else ","
    return [tag.strip() for tag in value.split(separator) if tag.strip()]


def tags_as_text(tags: list[str]) -> str:
    """Join the tags of a tags-only article into the text a model reads, a comma-separated phrase."""
    return ", ".join(tags)


def _safe_part(value: str) -> str | None:
    value = clean_text(value)
    if value and not _UNSAFE_KEY_CHARS.search(value):
        return value
    return None


def document_id(edition: str, article_id: str | None, url: str | None) -> str:
    """``<edition>-<article id>``, or ``<edition>-url-<sha256 of the URL, 24 hex>`` without a usable id."""
    part = _safe_part(article_id or "")
    if part is None:
        if not url:
            raise ValueError("the row has neither an article id nor an article URL to identify it")
        part = "url-" + sha256_hex(url)[:24]
    return check_safe_id(f"{edition}-{part}")


def _image_stem(value: str) -> str | None:
    value = clean_text(value)
    if not value:
        return None
    stem = value.rsplit("/", 1)[-1]
    stem = stem[:-4] if stem.lower().endswith((".jpg", ".png")) else stem
    try:
        return check_safe_id(stem)
    except UnsafePathError:
        return None


def parse_date(value: str) -> dt.datetime | None:
    """Parse a publication date into a UTC datetime; return None when ``value`` is empty or not ISO-8601."""
    value = clean_text(value)
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    return parsed.astimezone(dt.timezone.utc)


def normalized_document(
    *,
    edition: str,
    source_file: str,
    source_line: int,
    source: Mapping[str, str],
    article_id: str | None,
    url: str | None,
    title: str,
    text: str,
    image_url: str | None,
    image_id: str | None,
    image_hash: str | None,
    image_file: str | None,
    language: str,
    tags: list[str] | None = None,
    title_en: str | None = None,
    text_en: str | None = None,
    pub_date: dt.datetime | None = None,
) -> dict[str, Any]:
    """Build one article in the schema every later stage reads.

    ``_id`` and ``aid`` are the same string, the file name of the exported article. ``iid``
    is 0 because a NewsImages article has one image. ``image_hash`` is the image's file
    stem: the source's own hash or id, else the sha256 of the image URL. ``source`` keeps
    the row's own fields. ``split`` and ``batch`` are added when the document is first
    inserted.
    """
    url = clean_text(url) or None
    image_url = clean_text(image_url) or None
    if not image_hash:
        if not image_url:
            raise ValueError("the row names no image: no image id, hash or URL")
        image_hash = sha256_hex(image_url)
    check_safe_id(image_hash)
    aid = document_id(edition, article_id, url)
    document: dict[str, Any] = {
        "_id": aid,
        "aid": aid,
        "iid": 0,
        "article_id": clean_text(article_id) or None,
        "url": url,
        "title": clean_text(title),
        "text": clean_text(text),
        "image_id": clean_text(image_id) or None,
        "image_hash": image_hash,
        "image_url": image_url,
        "image_file": clean_text(image_file) or None,
        "edition": edition,
        "language": language,
        "source_file": source_file,
        "source_line": source_line,
        "source": dict(source),
    }
    if tags is not None:
        document["tags"] = tags
    if title_en is not None:
        document["title_en"] = clean_text(title_en)
    if text_en is not None:
        document["text_en"] = clean_text(text_en)
    if pub_date is not None:
        document["pub_date"] = pub_date
    return document


def _value(row: Mapping[str, str], table: Table, *aliases: str) -> str:
    name = table.column(*aliases)
    return row.get(name, "") if name else ""


def _date_of(row: Mapping[str, str], table: Table) -> dt.datetime | None:
    return parse_date(_value(row, table, *DATE_COLUMNS))


def _rows_2021(table: Table, common: dict[str, Any]) -> Iterable[tuple[int, dict[str, Any]]]:
    for line, row in table.rows:
        image_file = clean_text(_value(row, table, "imgfile"))
        image_hash = clean_text(_value(row, table, "hashvalue")) or _image_stem(image_file)
        yield line, dict(
            common,
            source_line=line,
            source=row,
            article_id=_value(row, table, "aid"),
            url=_value(row, table, "url"),
            title=_value(row, table, "title"),
            text=_value(row, table, "text"),
            image_url=_value(row, table, "img"),
            image_id=_value(row, table, "iid"),
            image_hash=image_hash,
            image_file=image_file or None,
            pub_date=_date_of(row, table),
        )


def _rows_2023(table: Table, common: dict[str, Any]) -> Iterable[tuple[int, dict[str, Any]]]:
    for line, row in table.rows:
        tags = split_tags(_value(row, table, "tags"))
        text = _value(row, table, "text") or tags_as_text(tags)
        image = clean_text(_value(row, table, "image"))
        is_url = image.lower().startswith(("http://", "https://"))
        image_id = _value(row, table, "iid", "image_id", "imgid")
        # An empty titleEN/textEN cell means "not given", so the field is translated later.
        title_en = clean_text(_value(row, table, "titleen")) or None
        text_en = clean_text(_value(row, table, "texten")) or None
        yield line, dict(
            common,
            source_line=line,
            source=row,
            article_id=_value(row, table, "aid", "article_id", "id"),
            url=_value(row, table, "url"),
            title=_value(row, table, "title"),
            text=text,
            tags=tags,
            image_url=image if is_url else None,
            image_id=image_id or (None if is_url else _image_stem(image)),
            image_hash=None if is_url else _image_stem(image),
            image_file=None if is_url else (image or None),
            title_en=title_en,
            text_en=text_en,
            pub_date=_date_of(row, table),
        )


def _rows_2025(table: Table, common: dict[str, Any]) -> Iterable[tuple[int, dict[str, Any]]]:
    english = common["language"] == "en"
    for line, row in table.rows:
        tags = split_tags(_value(row, table, "article_tags"))
        title = _value(row, table, "article_title")
        text = tags_as_text(tags)
        image_id = clean_text(_value(row, table, "image_id"))
        image_hash = _image_stem(image_id)
        yield line, dict(
            common,
            source_line=line,
            source=row,
            article_id=_value(row, table, "article_id"),
            url=_value(row, table, "article_url"),
            title=title,
            text=text,
            tags=tags,
            image_url=_value(row, table, "image_url"),
            image_id=image_id,
            image_hash=image_hash,
            image_file=f"{image_hash}.jpg" if image_hash else None,
            title_en=title if english else None,
            text_en=text if english else None,
            pub_date=_date_of(row, table),
        )


def _rows_2021_test(articles: Table, images: Table, common: dict[str, Any], failures: list[RowFailure]) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    article_url = articles.column(*ARTICLE_URL_COLUMNS)
    image_article_url = images.column(*ARTICLE_URL_COLUMNS)
    image_url_column = images.column(*IMAGE_URL_COLUMNS)
    if article_url is None or image_article_url is None:
        missing = articles.path if article_url is None else images.path
        raise SourceFormatError(
            f"{missing}: no article URL column (one of {', '.join(ARTICLE_URL_COLUMNS)}); "
            f"the test batch's articles and images are joined by the article URL"
        )
    by_url: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in images.rows:
        key = clean_text(row[image_article_url])
        if key in by_url:
            failures.append(RowFailure(f"{images.path.name}:{line}", f"a second image row for article URL {key}; the first one (line {by_url[key][0]}) is kept"))
            continue
        by_url[key] = (line, row)

    joined, used = [], set()
    for line, row in articles.rows:
        key = clean_text(row[article_url])
        if key not in by_url:
            failures.append(RowFailure(f"{articles.path.name}:{line}", f"no row in {images.path.name} has the article URL {key!r}"))
            continue
        used.add(key)
        image_line, image_row = by_url[key]
        image_file = clean_text(_value(image_row, images, *IMAGE_FILE_COLUMNS))
        image_hash = clean_text(_value(image_row, images, "hashvalue")) or _image_stem(image_file)
        source = dict(row)
        source.update({f"image.{name}": value for name, value in image_row.items()})
        joined.append(
            (
                line,
                dict(
                    common,
                    source_line=line,
                    source=source,
                    article_id=_value(row, articles, *TEST_ARTICLE_ID_COLUMNS),
                    url=key,
                    title=_value(row, articles, "title"),
                    text=_value(row, articles, "text"),
                    image_url=image_row.get(image_url_column, "") if image_url_column else "",
                    image_id=_value(image_row, images, *IMAGE_ID_COLUMNS),
                    image_hash=image_hash,
                    image_file=image_file or None,
                    pub_date=_date_of(row, articles),
                ),
            )
        )
    return joined, len(by_url) - len(used)


def read_batch(
    batch: SourceBatch,
    source_dir: Path | str,
    encoding: str = "auto",
    file_encodings: Mapping[str, str] | None = None,
    languages: Mapping[str, str] | None = None,
) -> BatchRead:
    """Read and normalize every row of ``batch``.

    ``file_encodings`` maps a file name (or its path relative to ``source_dir``) to an
    encoding that overrides ``encoding`` for that file. ``languages`` maps an edition or a
    batch key to the language of its title and text; unset ones use DEFAULT_LANGUAGES.
    Rows without an id, image or the right number of fields become failure records; a
    file that does not decode raises SourceDecodeError.
    """
    source_dir = Path(source_dir)
    file_encodings = dict(file_encodings or {})
    languages = {**DEFAULT_LANGUAGES, **(languages or {})}
    language = languages.get(batch.key) or languages.get(batch.edition, "de")

    def relative(path: Path) -> str:
        try:
            return path.relative_to(source_dir).as_posix()
        except ValueError:
            return path.name

    def encoding_for(path: Path) -> str:
        return file_encodings.get(relative(path)) or file_encodings.get(path.name) or encoding

    tables = [read_table(path, encoding_for(path)) for path in batch.files]
    failures: list[RowFailure] = [failure for table in tables for failure in table.malformed]
    common = {"edition": batch.edition, "source_file": relative(batch.files[0]), "language": language}
    unmatched_images = 0
    if batch.layout == "2021":
        rows = list(_rows_2021(tables[0], common))
    elif batch.layout == "2023":
        rows = list(_rows_2023(tables[0], common))
    elif batch.layout == "2025":
        rows = list(_rows_2025(tables[0], common))
    elif batch.layout == "2021-test":
        common["source_image_file"] = relative(batch.files[1])
        rows, unmatched_images = _rows_2021_test(tables[0], tables[1], common, failures)
    else:
        raise SourceFormatError(f"unknown layout {batch.layout!r} for batch {batch.key}")

    documents, seen = [], {}
    for line, fields in rows:
        where = f"{tables[0].path.name}:{line}"
        source_image_file = fields.pop("source_image_file", None)
        try:
            document = normalized_document(**fields)
        except (ValueError, UnsafePathError) as error:
            failures.append(RowFailure(where, str(error)))
            continue
        if source_image_file:
            document["source_image_file"] = source_image_file
        if document["_id"] in seen:
            failures.append(RowFailure(where, f"duplicate article {document['_id']} (first at line {seen[document['_id']]}); the first row is kept"))
            continue
        seen[document["_id"]] = line
        documents.append(document)

    encodings = {relative(table.path): table.encoding for table in tables}
    row_count = sum(len(table.rows) + len(table.malformed) for table in tables[:1])
    return BatchRead(batch=batch, documents=documents, failures=failures, encodings=encodings, rows=row_count, unmatched_images=unmatched_images)


# --------------------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True)
class SplitPolicy:
    """Rules that assign new articles to splits, per edition.

    Each edition gets ``test_size`` test and ``valid_size`` valid articles in total, as the
    original NewsLXMERT did for NewsImages 2021 (1,000 and 500). The rest are train. A batch
    fills the remaining test and valid quotas in a seeded order, but gives them at most
    ``max_heldout_fraction`` of its new articles, so that small editions and the first
    batches keep training data. A split is stored when the article is first inserted and
    never recomputed, so articles do not move when later batches arrive.

    NOTE: the quotas are counted before a batch is written. Two batches loaded at the same
    time into an external MongoDB can overshoot them; the embedded server serializes loads.
    """

    test_size: int = 1000
    valid_size: int = 500
    seed: int = 42
    max_heldout_fraction: float = 0.3

    def __post_init__(self) -> None:
        if self.test_size < 0 or self.valid_size < 0:
            raise ValueError(f"split sizes must not be negative, got test {self.test_size} and valid {self.valid_size}")
        if not 0.0 <= self.max_heldout_fraction <= 1.0:
            raise ValueError(f"max_heldout_fraction must be between 0 and 1, got {self.max_heldout_fraction}")


def split_order_key(seed: int, aid: str) -> str:
    return sha256_hex(f"{seed}:{aid}")


def assign_splits(new_ids: list[str], existing: Mapping[str, int], policy: SplitPolicy) -> dict[str, str]:
    """Splits for ``new_ids`` of one edition, given the counts ``existing`` already stored."""
    remaining_test = max(0, policy.test_size - existing.get("test", 0))
    remaining_valid = max(0, policy.valid_size - existing.get("valid", 0))
    remaining = remaining_test + remaining_valid
    heldout = min(remaining, math.floor(len(new_ids) * policy.max_heldout_fraction))
    n_test = round(heldout * remaining_test / remaining) if remaining else 0
    n_valid = heldout - n_test

    ordered = sorted(new_ids, key=lambda aid: split_order_key(policy.seed, aid))
    splits = {}
    for rank, aid in enumerate(ordered):
        if rank < n_test:
            splits[aid] = "test"
        elif rank < n_test + n_valid:
            splits[aid] = "valid"
        else:
            splits[aid] = "train"
    return splits


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadReport:
    """Counts and failures of loading one batch into the collection."""

    batch: str
    edition: str
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    in_other_batch: list[str] = dataclasses.field(default_factory=list)
    failures: list[RowFailure] = dataclasses.field(default_factory=list)
    inserted_per_split: Counter = dataclasses.field(default_factory=Counter)
    per_split: Counter = dataclasses.field(default_factory=Counter)
    encodings: dict[str, str] = dataclasses.field(default_factory=dict)
    unmatched_images: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "edition": self.edition,
            "rows": self.rows,
            "documents": sum(self.per_split.values()),
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "in_other_batch": len(self.in_other_batch),
            "in_other_batch_examples": self.in_other_batch[:MAX_EXAMPLES],
            "failed_rows": len(self.failures),
            "failed_examples": [f"{f.where}: {f.reason}" for f in self.failures[:MAX_EXAMPLES]],
            "per_split": {split: self.per_split.get(split, 0) for split in SPLITS},
            "inserted_per_split": {split: self.inserted_per_split.get(split, 0) for split in SPLITS},
            "encodings": dict(self.encodings),
            "unmatched_images": self.unmatched_images,
            "seconds": round(self.seconds, 3),
        }


def ensure_indexes(collection) -> None:
    """Indexes the loader and the export query on: the batch and the split counts per edition."""
    collection.create_index([("batch", 1)])
    collection.create_index([("edition", 1), ("split", 1)])


def split_counts(collection, edition: str) -> Counter:
    counts: Counter = Counter()
    for split in SPLITS:
        counts[split] = collection.count_documents({"edition": edition, "split": split})
    return counts


def upsert_documents(collection, batch_read: BatchRead, policy: SplitPolicy, page_size: int = 500) -> LoadReport:
    """Upsert the documents of one batch by ``_id`` and assign splits to the new ones.

    Existing documents of the same batch get their content fields set again, which changes
    nothing when the source is unchanged. ``split`` and ``batch`` are only written on
    insert. A document already loaded from another batch is left alone and listed in
    ``in_other_batch``.
    """
    from pymongo import UpdateOne

    started = time.perf_counter()
    batch = batch_read.batch
    report = LoadReport(
        batch=batch.key,
        edition=batch.edition,
        rows=batch_read.rows,
        failures=list(batch_read.failures),
        encodings=dict(batch_read.encodings),
        unmatched_images=batch_read.unmatched_images,
    )
    ensure_indexes(collection)

    documents = batch_read.documents
    ids = [doc["_id"] for doc in documents]
    stored: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), page_size):
        for found in collection.find({"_id": {"$in": ids[start : start + page_size]}}, {"_id": 1, "split": 1, "batch": 1}):
            stored[found["_id"]] = found

    new_ids = [aid for aid in ids if aid not in stored]
    splits = assign_splits(new_ids, split_counts(collection, batch.edition), policy)

    operations = []
    for document in documents:
        aid = document["_id"]
        content = {key: value for key, value in document.items() if key != "_id"}
        previous = stored.get(aid)
        if previous is not None and previous.get("batch") != batch.key:
            report.in_other_batch.append(f"{aid} (batch {previous.get('batch')})")
            continue
        split = previous.get("split") if previous else splits[aid]
        report.per_split[split] += 1
        if previous is None:
            report.inserted_per_split[split] += 1
        operations.append(UpdateOne({"_id": aid}, {"$set": content, "$setOnInsert": {"split": split, "batch": batch.key}}, upsert=True))

    for start in range(0, len(operations), page_size):
        result = collection.bulk_write(operations[start : start + page_size], ordered=False)
        report.inserted += result.upserted_count
        report.updated += result.modified_count
    report.unchanged = len(operations) - report.inserted - report.updated
    report.seconds = time.perf_counter() - started
    logger.info("loaded NewsImages batch %s: %s", batch.key, report.summary())
    return report


def load_batch(
    collection,
    source_dir: Path | str,
    key: str,
    policy: SplitPolicy = SplitPolicy(),
    encoding: str = "auto",
    file_encodings: Mapping[str, str] | None = None,
    languages: Mapping[str, str] | None = None,
) -> LoadReport:
    """Find batch ``key`` under ``source_dir``, read it and upsert it into ``collection``."""
    batches = find_batches(source_dir)
    if key not in batches:
        known = ", ".join(batches) or "none"
        raise KeyError(f"no NewsImages batch {key!r} under {source_dir} (found: {known}); check the source folder or the partition key")
    started = time.perf_counter()
    batch_read = read_batch(batches[key], source_dir, encoding=encoding, file_encodings=file_encodings, languages=languages)
    report = upsert_documents(collection, batch_read, policy)
    report.seconds = time.perf_counter() - started
    return report
