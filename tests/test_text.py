"""Tests of text modes, entity spans and tokenization."""

from __future__ import annotations

import pytest

from model.documents import ArticleText
from model.text import MODES, ComposedText, check_mode, compose_text, tokenize_text

ARTICLE = ArticleText(
    headline="Mayor visits Vessingen",
    snippet="  Alda Brenner opened a park.",
    captions=("Two red circles in Lindenfeld", "A blue square"),
)
ENTITIES = {
    "headline": [{"text": "Vessingen", "start": 13, "end": 22}],
    "snippet": [{"text": "Alda Brenner", "start": 2, "end": 14}],
    "caption": [{"text": "Lindenfeld", "start": 19, "end": 29}],
}


@pytest.fixture(scope="module")
def tokenizer():
    from model.tiny import train_wordpiece_tokenizer

    texts = [ARTICLE.headline, ARTICLE.snippet, *ARTICLE.captions] * 5
    return train_wordpiece_tokenizer(texts, vocab_size=200)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (1, "Two red circles in Lindenfeld"),
        (2, "Two red circles in Lindenfeld Mayor visits Vessingen"),
        (3, "Two red circles in Lindenfeld Alda Brenner opened a park."),
        (4, "Two red circles in Lindenfeld Alda Brenner opened a park. Mayor visits Vessingen."),
        (5, "Mayor visits Vessingen"),
        (6, "Alda Brenner opened a park."),
        (7, "Alda Brenner opened a park. Mayor visits Vessingen."),
    ],
)
def test_modes_compose_the_original_texts(mode, expected):
    assert compose_text(ARTICLE, 0, mode).text == expected


def test_entity_spans_follow_the_composed_text():
    for mode in MODES:
        composed = compose_text(ARTICLE, 0, mode, ENTITIES)
        surfaces = sorted(composed.text[start:end] for start, end in composed.entity_spans)
        fields = {1: ["caption"], 2: ["caption", "headline"], 3: ["caption", "snippet"], 4: ["caption", "snippet", "headline"], 5: ["headline"], 6: ["snippet"], 7: ["snippet", "headline"]}[mode]
        assert surfaces == sorted(ENTITIES[field][0]["text"] for field in fields), mode


def test_caption_of_each_image():
    assert compose_text(ARTICLE, 1, 1).text == "A blue square"
    assert compose_text(ARTICLE, 5, 1).text == "", "a missing caption gives an empty text"


def test_empty_fields_leave_no_dangling_space():
    article = ArticleText(headline="", snippet="Snippet only", captions=("",))
    assert compose_text(article, 0, 7).text == "Snippet only."
    assert compose_text(article, 0, 4).text == "Snippet only."


def test_caption_modes_fail_for_newsimages():
    for mode in (1, 2, 3, 4):
        with pytest.raises(ValueError, match="needs image captions"):
            check_mode(mode, "newsimages")
    for mode in (5, 6, 7):
        assert check_mode(mode, "newsimages") == mode
        assert check_mode(mode - 4, "nytimes800k") == mode - 4
    with pytest.raises(ValueError, match="invalid"):
        check_mode(8, "nytimes800k")


def test_tokens_inside_entities_are_marked(tokenizer):
    composed = compose_text(ARTICLE, 0, 7, ENTITIES)
    tokenized = tokenize_text(tokenizer, composed, 100)
    tokens = tokenizer.convert_ids_to_tokens(tokenized.input_ids.tolist())
    marked = [token for token, inside in zip(tokens, tokenized.entity_mask) if inside]
    assert "".join(marked).replace("#", "") == "aldabrennervessingen"
    assert tokens[0] == "[CLS]"
    assert tokens[-1] == "[SEP]"
    assert tokenized.special_mask[0]
    assert tokenized.special_mask[-1]
    assert not tokenized.entity_mask[tokenized.special_mask].any()


def test_truncation_keeps_sep_and_max_length(tokenizer):
    composed = ComposedText(" ".join(["Lindenfeld"] * 80), ((0, 10),))
    tokenized = tokenize_text(tokenizer, composed, 12)
    assert len(tokenized.input_ids) == 12
    assert tokenizer.convert_ids_to_tokens(int(tokenized.input_ids[-1])) == "[SEP]"
    with pytest.raises(ValueError, match="maxSeqLen"):
        tokenize_text(tokenizer, composed, 2)
