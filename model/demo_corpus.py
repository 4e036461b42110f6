"""Seeded synthetic news corpus for the demo and the tests.

Each article shows one to three drawn scenes: coloured shapes at named positions on a
background that belongs to a recurring place, sometimes with the emblem of a recurring
person. Headline, snippet and captions describe what the images show, so that a model
can learn which text goes with which photo. The same scenes are written in the
NYTimes800k document schema (English, for MongoDB) and as a NewsImages-2021-style
German TSV with an English reference translation of every German text.

Run ``python -m model.demo_corpus OUT_DIR`` to write the files without MongoDB.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from model.storage import atomic_write_bytes, canonical_json

IMAGE_SIZE = (320, 240)
DEMO_URL_PREFIX = "https://demo.newslxmert.invalid/images/"

COLOURS = {  # English name: (German stem, RGB)
    "red": ("rot", (220, 30, 30)),
    "green": ("grün", (30, 170, 50)),
    "blue": ("blau", (30, 60, 220)),
    "yellow": ("gelb", (240, 220, 20)),
    "purple": ("lila", (140, 40, 170)),
    "orange": ("orange", (250, 140, 10)),
}
SHAPES = {  # English singular, English plural, German singular, German plural, German gender
    "circle": ("circle", "circles", "Kreis", "Kreise", "m"),
    "square": ("square", "squares", "Quadrat", "Quadrate", "n"),
    "triangle": ("triangle", "triangles", "Dreieck", "Dreiecke", "n"),
}
POSITIONS = {  # English phrase, German phrase, centre in relative coordinates
    "left": ("on the left", "links", (0.22, 0.5)),
    "right": ("on the right", "rechts", (0.78, 0.5)),
    "top": ("at the top", "oben", (0.5, 0.22)),
    "bottom": ("at the bottom", "unten", (0.5, 0.78)),
    "centre": ("in the centre", "in der Mitte", (0.5, 0.5)),
}
COUNT_WORDS = {1: ("one", "ein"), 2: ("two", "zwei"), 3: ("three", "drei")}
PLACES = {  # name: background RGB and a German description
    "Port Elwood": ((150, 200, 235), "der Hafen von Port Elwood"),
    "Mount Carrow": ((170, 170, 160), "der Berg Carrow"),
    "Lindenfeld": ((200, 235, 170), "Lindenfeld"),
    "Vessingen": ((240, 225, 200), "Vessingen"),
}
PEOPLE = {  # name: emblem colour (a striped banner drawn in the top-left corner)
    "Mayor Alda Brenner": (0, 0, 0),
    "Coach Tomas Veldt": (255, 255, 255),
    "Judge Mira Okafor": (120, 60, 20),
}
SPLIT_WEIGHTS = (("train", 0.7), ("valid", 0.15), ("test", 0.15))


@dataclasses.dataclass(frozen=True)
class ShapeGroup:
    count: int
    colour: str
    shape: str
    position: str

    def english(self) -> str:
        singular, plural = SHAPES[self.shape][0], SHAPES[self.shape][1]
        noun = singular if self.count == 1 else plural
        return f"{COUNT_WORDS[self.count][0]} {self.colour} {noun} {POSITIONS[self.position][0]}"

    def german(self) -> str:
        stem = COLOURS[self.colour][0]
        _, _, noun_singular, noun_plural, gender = SHAPES[self.shape]
        if self.count == 1:
            article = "ein"
            ending = "er" if gender == "m" else "es"
            adjective = stem if stem == "orange" else stem + ending
            return f"{article} {adjective} {noun_singular} {POSITIONS[self.position][1]}"
        adjective = stem if stem == "orange" else stem + "e"
        return f"{COUNT_WORDS[self.count][1]} {adjective} {noun_plural} {POSITIONS[self.position][1]}"


@dataclasses.dataclass(frozen=True)
class Scene:
    place: str
    person: str | None
    groups: tuple[ShapeGroup, ...]

    def english(self) -> str:
        shapes = " and ".join(group.english() for group in self.groups)
        subject = f"{self.person} stands near " if self.person else "There are "
        return f"{subject}{shapes} in {self.place}."

    def german(self) -> str:
        shapes = " und ".join(group.german() for group in self.groups)
        place = PLACES[self.place][1]
        if self.person:
            return f"{self.person} steht bei {shapes} in {place}."
        return f"Zu sehen sind {shapes} in {place}."

    def entities(self) -> list[tuple[str, str]]:
        """Named entities of the English text as (text, spaCy label) pairs."""
        found = [(self.place, "GPE")]
        if self.person:
            found.insert(0, (self.person.split(" ", 1)[1], "PERSON"))
        return found


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Render ``scene`` as an RGB image of IMAGE_SIZE."""
    width, height = IMAGE_SIZE
    background = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in PLACES[scene.place][0])
    image = Image.new("RGB", IMAGE_SIZE, background)
    draw = ImageDraw.Draw(image)
    if scene.place == "Mount Carrow":
        draw.polygon([(0, height), (width // 2, height // 3), (width, height)], fill=(120, 120, 110))
    elif scene.place == "Port Elwood":
        draw.rectangle([0, int(height * 0.85), width, height], fill=(20, 80, 160))
    if scene.person:
        emblem = PEOPLE[scene.person]
        for stripe in range(3):
            draw.rectangle([4, 4 + stripe * 12, 44, 10 + stripe * 12], fill=emblem)
    for group in scene.groups:
        centre_x, centre_y = POSITIONS[group.position][2]
        rgb = COLOURS[group.colour][1]
        for k in range(group.count):
            offset = (k - (group.count - 1) / 2) * 0.12
            along_x = group.position in ("top", "bottom", "centre")
            cx = (centre_x + (offset if along_x else 0)) * width + rng.randint(-4, 4)
            cy = (centre_y + (0 if along_x else offset)) * height + rng.randint(-4, 4)
            radius = rng.randint(14, 20)
            box = [cx - radius, cy - radius, cx + radius, cy + radius]
            if group.shape == "circle":
                draw.ellipse(box, fill=rgb)
            elif group.shape == "square":
                draw.rectangle(box, fill=rgb)
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=rgb)
    return image


def random_scene(rng: random.Random) -> Scene:
    place = rng.choice(sorted(PLACES))
    person = rng.choice(sorted(PEOPLE)) if rng.random() < 0.5 else None
    positions = rng.sample(sorted(POSITIONS), k=rng.choice((1, 2)))
    groups = tuple(
        ShapeGroup(
            count=rng.randint(1, 3),
            colour=rng.choice(sorted(COLOURS)),
            shape=rng.choice(sorted(SHAPES)),
            position=position,
        )
        for position in positions
    )
    return Scene(place=place, person=person, groups=groups)


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _object_id_hex(seed: int, index: int) -> str:
    """A deterministic 24-hex-digit id, so that two generations with one seed are identical."""
    return hashlib.sha256(f"demo-article-{seed}-{index}".encode()).hexdigest()[:24]


def _entity_spans(text: str, entities: list[tuple[str, str]]) -> list[dict[str, Any]]:
    spans = []
    for surface, label in entities:
        start = text.find(surface)
        if start >= 0:
            spans.append({"text": surface, "label": label, "start": start, "end": start + len(surface)})
    return spans


@dataclasses.dataclass
class DemoCorpus:
    """Documents in the NYTimes800k schema, their image bytes by hash, and German TSV rows."""

    documents: list[dict[str, Any]]
    images: dict[str, bytes]
    german_rows: list[dict[str, str]]
    parallel_sentences: list[tuple[str, str]]  # (German, English) reference pairs


def generate_demo_corpus(
    n_articles: int = 240,
    seed: int = 0,
    start_date: dt.date = dt.date(2024, 1, 1),
    n_days: int = 6,
) -> DemoCorpus:
    """Generate ``n_articles`` articles spread evenly over ``n_days`` publication days.

    Documents use BSON-ready types: ``_id`` is an ObjectId and ``pub_date`` a UTC datetime.
    """
    from bson import ObjectId

    rng = random.Random(seed)
    documents: list[dict[str, Any]] = []
    images: dict[str, bytes] = {}
    german_rows: list[dict[str, str]] = []
    parallel: list[tuple[str, str]] = []

    for index in range(n_articles):
        day = start_date + dt.timedelta(days=index % n_days)
        pub_date = dt.datetime(day.year, day.month, day.day, 6 + index % 12, index % 60, tzinfo=dt.timezone.utc)
        split = rng.choices([name for name, _ in SPLIT_WEIGHTS], weights=[w for _, w in SPLIT_WEIGHTS])[0]
        scenes = [random_scene(rng) for _ in range(rng.randint(1, 3))]
        main = scenes[0]
        aid = _object_id_hex(seed, index)

        headline = f"News from {main.place}" + (f": {main.person} on the scene" if main.person else "")
        snippet = main.english()
        sections: list[dict[str, Any]] = [
            {
                "type": "paragraph",
                "text": snippet,
                "named_entities": _entity_spans(snippet, main.entities()),
            }
        ]
        image_positions = []
        for image_index, scene in enumerate(scenes):
            url = f"{DEMO_URL_PREFIX}{aid}-{image_index}.jpg"
            image_hash = hashlib.sha256(url.encode()).hexdigest()
            images[image_hash] = _jpeg_bytes(draw_scene(scene, rng))
            caption = scene.english()
            image_positions.append(len(sections))
            sections.append(
                {
                    "type": "caption",
                    "text": caption,
                    "hash": image_hash,
                    "url": url,
                    "named_entities": _entity_spans(caption, scene.entities()),
                }
            )
        documents.append(
            {
                "_id": ObjectId(aid),
                "split": split,
                "pub_date": pub_date,
                "headline": {"main": headline},
                "snippet": snippet,
                "abstract": snippet,
                "web_url": f"https://demo.newslxmert.invalid/articles/{aid}",
                "parsed_section": sections,
                "image_positions": image_positions,
            }
        )

        german_title = f"Neues aus {PLACES[main.place][1]}"
        german_text = main.german()
        parallel.append((german_title, f"News from {main.place}"))
        parallel.append((german_text, main.english()))
        url = f"{DEMO_URL_PREFIX}{aid}-0.jpg"
        german_rows.append(
            {
                "article": str(900000 + index),
                "aid": str(100000 + index),
                "url": f"https://demo.newslxmert.invalid/artikel/{aid}",
                "img": url,
                "iid": str(200000 + index),
                "hashvalue": hashlib.sha256(url.encode()).hexdigest(),
                "title": german_title,
                "text": german_text,
                "imgFile": f"{hashlib.sha256(url.encode()).hexdigest()}.jpg",
                "pub_date": pub_date.date().isoformat(),
            }
        )
    return DemoCorpus(documents=documents, images=images, german_rows=german_rows, parallel_sentences=parallel)


NEWSIMAGES_2021_COLUMNS = ["article", "aid", "url", "img", "iid", "hashvalue", "title", "text", "imgFile"]


def write_demo_files(corpus: DemoCorpus, out_dir: Path) -> dict[str, Path]:
    """Write images, the NYTimes-schema documents (JSON lines) and the German TSVs under ``out_dir``.

    The German rows are split into one TSV per publication month-day batch, named like the
    NewsImages 2021 files (``content<date>.tsv``), with CRLF line ends.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    for image_hash, data in sorted(corpus.images.items()):
        target = image_dir / f"{image_hash}.jpg"
        if not target.exists() or target.read_bytes() != data:
            atomic_write_bytes(target, data)

    lines = "".join(canonical_json(doc).replace("\n", "") + "\n" for doc in corpus.documents)
    atomic_write_bytes(out_dir / "nytimes_articles.jsonl", lines.encode("utf-8"))

    batches: dict[str, list[dict[str, str]]] = {}
    for row in corpus.german_rows:
        batches.setdefault(row["pub_date"], []).append(row)
    tsv_dir = out_dir / "newsimages"
    for batch, rows in sorted(batches.items()):
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=NEWSIMAGES_2021_COLUMNS, delimiter="\t", lineterminator="\r\n", extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(tsv_dir / f"content{batch}.tsv", buffer.getvalue().encode("utf-8"))

    pairs = [{"de": de, "en": en} for de, en in corpus.parallel_sentences]
    atomic_write_bytes(out_dir / "parallel_de_en.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs).encode())
    return {"images": image_dir, "documents": out_dir / "nytimes_articles.jsonl", "newsimages": tsv_dir}


def insert_demo_documents(collection, documents: list[dict[str, Any]]) -> int:
    """Upsert ``documents`` into a pymongo ``collection`` by ``_id``; return how many were new."""
    from pymongo import ReplaceOne

    if not documents:
        return 0
    result = collection.bulk_write([ReplaceOne({"_id": doc["_id"]}, doc, upsert=True) for doc in documents])
    return result.upserted_count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write images/, nytimes_articles.jsonl and newsimages/ into")
    parser.add_argument("--articles", type=int, default=240, help="number of articles (default 240)")
    parser.add_argument("--days", type=int, default=6, help="publication days to spread them over (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    corpus = generate_demo_corpus(n_articles=args.articles, seed=args.seed, n_days=args.days)
    paths = write_demo_files(corpus, args.out_dir)
    print(f"wrote {len(corpus.documents)} articles and {len(corpus.images)} images: {paths}")


if __name__ == "__main__":
    main()
