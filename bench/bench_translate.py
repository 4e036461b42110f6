"""Translation throughput, batched against one document at a time, and the tiny model's quality.

Builds the tiny-profile MarianMT on the demo corpus's German-English pairs, as the tiny
profile does. Then it translates the same demo articles (title and text) three ways in one
run and prints generated tokens per second and the ratio to one document at a time:

- one piece at a time: every sentence piece in its own generate() call;
- one document at a time: one translate_texts() call per article (its title and text pieces);
- batched: every article at once, pieces sorted by length into batches of ``--batch-size``.

It checks that the three give the same English, and scores the translations against the
demo's reference English (exact match, BLEU and chrF with sacrebleu when installed).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_translate.py --articles 240 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.demo_corpus import generate_demo_corpus  # noqa: E402
from model.translate import (  # noqa: E402
    MarianTranslator,
    TinyMarianConfig,
    TranslationSettings,
    TranslationStats,
    build_tiny_marian,
    evaluate_translations,
)


def run(label: str, translate, documents: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    stats = TranslationStats()
    started = time.perf_counter()
    outputs = translate(documents, stats)
    seconds = time.perf_counter() - started
    return {
        "method": label,
        "seconds": round(seconds, 2),
        "generate_calls": stats.generate_calls,
        "chunks": stats.chunks,
        "generated_tokens": stats.generated_tokens,
        "generated_tokens_per_second": round(stats.generated_tokens / seconds, 1),
    }, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=240, help="demo articles to generate and translate (default 240)")
    parser.add_argument("--steps", type=int, default=TinyMarianConfig.train_steps, help="training steps of the tiny model")
    parser.add_argument("--num-beams", type=int, default=4, help="beam size (default 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="pieces per generate() call when batched (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--model", type=Path, help="an existing model folder instead of building the tiny model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    corpus = generate_demo_corpus(n_articles=args.articles)
    pairs = corpus.parallel_sentences  # per article: (title de, title en), (text de, text en)
    if args.model:
        folder, build = args.model, {}
    else:
        folder = Path(tempfile.mkdtemp(prefix="bench_translate_")) / "marian"
        build = build_tiny_marian(folder, pairs, (), dataclasses.replace(TinyMarianConfig(), train_steps=args.steps))

    documents = [(pairs[2 * i][0], pairs[2 * i + 1][0]) for i in range(args.articles)]
    references = [en for _, en in pairs]

    batched = MarianTranslator(str(folder), TranslationSettings(num_beams=args.num_beams, batch_size=args.batch_size))
    single = MarianTranslator(str(folder), TranslationSettings(num_beams=args.num_beams, batch_size=1))

    def per_piece(docs, stats):
        return [text for title, body in docs for text in single.translate_texts([title, body], stats)]

    def per_document(docs, stats):
        return [text for title, body in docs for text in batched.translate_texts([title, body], stats)]

    def all_at_once(docs, stats):
        return batched.translate_texts([text for title, body in docs for text in (title, body)], stats)

    rows, outputs = [], []
    for label, method in (("one piece at a time", per_piece), ("one document at a time", per_document), ("batched", all_at_once)):
        row, output = run(label, method, documents)
        rows.append(row)
        outputs.append(output)
    baseline = rows[1]["generated_tokens_per_second"]
    for row in rows:
        row["ratio_to_one_document"] = round(row["generated_tokens_per_second"] / baseline, 2)

    report = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "settings": {"articles": args.articles, "num_beams": args.num_beams, "batch_size": args.batch_size, "train_steps": args.steps},
        "throughput": rows,
        "same_output": all(output == outputs[0] for output in outputs),
        "tiny_build": {key: build.get(key) for key in ("pairs", "train_pairs", "heldout_pairs", "vocab_size", "training", "heldout")},
        "quality_on_demo_articles": evaluate_translations(outputs[2], references),
        "quality_on_demo_titles": evaluate_translations(outputs[2][0::2], references[0::2]),
        "quality_on_demo_texts": evaluate_translations(outputs[2][1::2], references[1::2]),
    }
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
