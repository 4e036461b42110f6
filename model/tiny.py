"""The tiny LXMERT of the ``tiny`` profile: a small, randomly initialised LXMERT and a WordPiece
tokenizer trained on the corpus, saved with ``save_pretrained`` so that training loads them
through the same code path as ``unc-nlp/lxmert-base-uncased``.

The folder ``<data_root>/models/tiny/lxmert/`` is built on first use and reused afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

# Sized so that a few hundred demo pairs train in seconds per epoch on one CPU core. The
# values below were chosen by how soon the image-text matching loss leaves log(2) when the
# model trains from scratch on demo-like data (batch 32, lr 3e-4, one CPU thread):
# - initializer_range 1/sqrt(hidden_size) instead of BERT's 0.02: with 0.02 attention stays
#   almost uniform and the loss stayed at log(2) for over 1,500 steps;
# - one language and one object-relationship layer: 2/2/2 layers had not left the plateau
#   after 400 steps, 1/1/2 left it after about 200 and runs each step about 40% faster.
TINY_LXMERT_SETTINGS = {
    "initializer_range": 0.125,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "l_layers": 1,
    "r_layers": 1,
    "x_layers": 2,
    "max_position_embeddings": 128,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
TINY_VOCAB_SIZE = 2000
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] is id 0, as LXMERT's embeddings expect


def tiny_lxmert_folder(data_root: str | Path) -> Path:
    return Path(data_root) / "models" / "tiny" / "lxmert"


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE, model_max_length: int = 128):
    """Train a lower-casing BERT-style WordPiece tokenizer on ``texts``; returns a fast tokenizer.

    The same texts give the same vocabulary in every process. ``WordPieceTrainer`` of
    tokenizers 0.23 alone does not, because it numbers the ``##`` continuation tokens in
    hash-map order and breaks ties between merges by those numbers
    (huggingface/tokenizers issue 1794). Here the trainer gets every continuation token up
    front, in sorted order, as a special token, which fixes their numbers. The returned
    tokenizer is then built from the trained vocabulary, with only the five BERT special
    tokens marked special.
    """
    from tokenizers import models, trainers

    texts = list(texts)
    trainer_tokenizer = _bert_style_tokenizer(models.WordPiece(unk_token="[UNK]"))
    continuation_tokens = _continuation_tokens(trainer_tokenizer, texts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + continuation_tokens, show_progress=False
    )
    trainer_tokenizer.train_from_iterator(texts, trainer)

    tokenizer = _bert_style_tokenizer(models.WordPiece(vocab=trainer_tokenizer.get_vocab(), unk_token="[UNK]"))
    return _lxmert_fast_tokenizer(tokenizer, model_max_length)


def _bert_style_tokenizer(model):
    """Wrap a WordPiece ``model`` with BERT's lower-casing normalizer, pre-tokenizer and decoder."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _continuation_tokens(tokenizer, texts: list[str]) -> list[str]:
    """Sorted ``##c`` tokens for every character ``c`` that occurs inside a word of ``texts``."""
    characters: set[str] = set()
    for text in texts:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)):
            characters.update(word[1:])
    return sorted(f"##{character}" for character in characters)


def _lxmert_fast_tokenizer(tokenizer, model_max_length: int):
    """Add BERT's [CLS]/[SEP] template to ``tokenizer`` and wrap it for transformers."""
    from tokenizers import processors
    from transformers import LxmertTokenizerFast

    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return LxmertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def build_tiny_lxmert(folder: str | Path, texts: Iterable[str], visual_feat_dim: int, seed: int = 0) -> Path:
    """Write a tiny transformers LXMERT and its tokenizer to ``folder`` (replaced atomically)."""
    import torch
    from transformers import LxmertConfig, LxmertForPreTraining

    folder = Path(folder)
    tokenizer = train_wordpiece_tokenizer(texts)
    config = LxmertConfig(
        vocab_size=len(tokenizer),
        visual_feat_dim=int(visual_feat_dim),
        task_qa=False,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LXMERT_SETTINGS,
    )
    torch.manual_seed(seed)
    model = LxmertForPreTraining(config)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Another process may have finished first; its folder is as good as ours.
        if not folder.exists():
            os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("built the tiny LXMERT (vocabulary %d, visual_feat_dim %d) in %s", len(tokenizer), visual_feat_dim, folder)
    return folder


def ensure_tiny_lxmert(data_root: str | Path, texts: Callable[[], Iterable[str]], visual_feat_dim: int) -> Path:
    """Return the tiny LXMERT folder, building it from ``texts()`` on first use.

    Raises ValueError when the folder exists but was built for another feature dimension.
    """
    folder = tiny_lxmert_folder(data_root)
    if not (folder / "config.json").is_file():
        build_tiny_lxmert(folder, texts(), visual_feat_dim)
    built_dim = json.loads((folder / "config.json").read_text(encoding="utf-8"))["visual_feat_dim"]
    if int(built_dim) != int(visual_feat_dim):
        raise ValueError(
            f"the tiny LXMERT in {folder} was built for {built_dim}-dimensional region features but the feature "
            f"store holds {visual_feat_dim}-dimensional ones; delete {folder} to rebuild it"
        )
    return folder
