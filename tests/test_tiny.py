"""The tiny profile's WordPiece tokenizer: same vocabulary in every process, BERT's special tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_dataset import DemoData

from model.tiny import SPECIAL_TOKENS, train_wordpiece_tokenizer

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]

# Trains on the texts in argv[1] and prints the vocabulary as sorted (token, id) pairs.
TRAIN_SCRIPT = """
import json, sys
from model.tiny import train_wordpiece_tokenizer
texts = json.loads(open(sys.argv[1], encoding="utf-8").read())
print(json.dumps(sorted(train_wordpiece_tokenizer(texts, vocab_size=400).get_vocab().items())))
"""


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return DemoData(n_articles=30).texts()


def test_vocabulary_same_in_every_process(texts, tmp_path):
    # Each process gets new hash-map seeds in the tokenizers library. Without the sorted
    # continuation tokens, four processes trained four different vocabularies.
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    vocabularies = [
        subprocess.run(
            [sys.executable, "-c", TRAIN_SCRIPT, str(texts_file)],
            cwd=REPOSITORY_ROOT, capture_output=True, text=True, check=True,
        ).stdout
        for _ in range(4)
    ]

    assert len(json.loads(vocabularies[0])) > 100
    assert len(set(vocabularies)) == 1


def test_special_tokens_keep_bert_ids(texts):
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=400)

    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0
    assert sorted(tokenizer.all_special_tokens) == sorted(SPECIAL_TOKENS)
    # Continuation tokens are ordinary vocabulary entries, not special tokens.
    assert sorted(token.content for token in tokenizer.added_tokens_decoder.values()) == sorted(SPECIAL_TOKENS)
    encoded = tokenizer("the red circle", "##e")
    assert encoded["input_ids"][0] == tokenizer.cls_token_id
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]).count("[SEP]") == 2
    assert "##e" not in tokenizer.convert_ids_to_tokens(encoded["input_ids"])


def test_unseen_word_splits_into_pieces(texts):
    tokenizer = train_wordpiece_tokenizer(texts, vocab_size=400)

    pieces = tokenizer.tokenize("Circlesque")

    assert len(pieces) > 1
    assert all(piece.startswith("##") for piece in pieces[1:])
    assert tokenizer.convert_tokens_to_string(pieces) == "circlesque"
