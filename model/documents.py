"""Reading exported article documents of both datasets through one interface.

NYTimes800k documents list their images as captions in ``parsed_section`` (``iid`` is the
index into ``image_positions``, the image hash is the caption's ``hash``). NewsImages
documents, as written by the NewsImages ingestion, have exactly one image (``iid`` 0)
described by ``image_hash`` and ``image_url``, and an optional ``image_file`` name in the
source's local image folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

from model.storage import check_safe_id, safe_join

DATASETS = ("nytimes800k", "newsimages")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """One image of one article."""

    aid: str
    iid: int  # index into image_positions; always 0 for NewsImages
    image_hash: str  # file stem under <dataset_root>/images/
    url: str | None
    caption: str | None
    local_name: str | None = None  # file name in a user-named source folder, when it differs


@dataclasses.dataclass(frozen=True)
class ArticleText:
    """The texts a model can see for one article, in English when a translation exists."""

    headline: str
    snippet: str
    captions: tuple[str, ...]  # one per image, in iid order; empty strings for NewsImages


def article_images(document: Mapping[str, Any]) -> list[ImageRef]:
    """Every image of ``document`` in iid order; raise ValueError naming a malformed field."""
    aid = str(document.get("_id", ""))
    if "image_positions" in document:
        sections = document.get("parsed_section") or []
        refs = []
        for iid, position in enumerate(document["image_positions"]):
            if not isinstance(position, int) or not 0 <= position < len(sections):
                raise ValueError(f"article {aid}: image_positions[{iid}] = {position!r} is not an index into parsed_section")
            section = sections[position]
            image_hash = section.get("hash")
            if not image_hash:
                raise ValueError(f"article {aid}: parsed_section[{position}] has no image 'hash'")
            refs.append(ImageRef(aid=aid, iid=iid, image_hash=str(image_hash), url=section.get("url"), caption=section.get("text")))
        return refs
    image_hash = document.get("image_hash")
    if not image_hash:
        raise ValueError(f"article {aid}: no 'image_positions' (NYTimes800k) and no 'image_hash' (NewsImages)")
    return [
        ImageRef(
            aid=aid,
            iid=0,
            image_hash=str(image_hash),
            url=document.get("image_url"),
            caption=None,
            local_name=document.get("image_file"),
        )
    ]


def article_text(document: Mapping[str, Any]) -> ArticleText:
    """Headline, snippet and captions; NewsImages uses ``title_en``/``text_en`` when present."""
    if "image_positions" in document:
        headline = (document.get("headline") or {}).get("main") or ""
        snippet = document.get("snippet") or document.get("abstract") or ""
        captions = tuple(ref.caption or "" for ref in article_images(document))
        return ArticleText(headline=headline, snippet=snippet, captions=captions)
    headline = document.get("title_en") or document.get("title") or ""
    snippet = document.get("text_en") or document.get("text") or ""
    return ArticleText(headline=headline, snippet=snippet, captions=("",))


def article_path(articles_root: Path | str, split: str, aid: str) -> Path:
    check_safe_id(aid)
    return safe_join(articles_root, split, f"{aid}.json")


def load_article(articles_root: Path | str, split: str, aid: str) -> dict[str, Any]:
    return json.loads(article_path(articles_root, split, aid).read_text(encoding="utf-8"))


def iter_articles(articles_root: Path | str, items: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(split, document)`` for ``items`` (pairs of split and aid), or for every file."""
    articles_root = Path(articles_root)
    if items is None:
        items = [
            (split_dir.name, path.stem)
            for split_dir in sorted(articles_root.iterdir())
            if split_dir.is_dir() and not split_dir.name.startswith("_")
            for path in sorted(split_dir.glob("*.json"))
        ]
    for split, aid in items:
        yield split, load_article(articles_root, split, aid)


# The article folder whose documents carry the text a model reads: NewsImages articles
# are read after translation, which adds title_en and text_en.
TEXT_STAGE = {"nytimes800k": "articles", "newsimages": "translated_articles"}
