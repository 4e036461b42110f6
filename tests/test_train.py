"""Tests of the training loop on demo-like data with the tiny LXMERT, on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from test_dataset import FEATURE_DIM, DemoData

from model.dataset import PairDatasetConfig, collate_samples
from model.modeling import NewsLxmertForPreTraining
from model.train import (
    LAST_POINTER,
    TrainConfig,
    optimizer_batches,
    plot_loss_curves,
    read_last_checkpoint,
    train_model,
    warmup_linear_decay,
)


@pytest.fixture(scope="module")
def demo() -> DemoData:
    return DemoData(n_articles=120, seed=5)


@pytest.fixture(scope="module")
def tiny_folder(demo, tmp_path_factory):
    from model.tiny import build_tiny_lxmert

    return build_tiny_lxmert(tmp_path_factory.mktemp("models") / "lxmert", demo.texts(), FEATURE_DIM)


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_folder)


def new_model(tiny_folder, use_faces=False, seed=0, **overrides) -> NewsLxmertForPreTraining:
    torch.manual_seed(seed)
    return NewsLxmertForPreTraining.from_pretrained(tiny_folder, use_faces=use_faces, visual_feat_dim=FEATURE_DIM, **overrides)


def small_split(demo, split, tokenizer, count, fixed_epoch=None, **config):
    dataset = demo.dataset(split, tokenizer, PairDatasetConfig(mode=1, max_seq_len=48, **config), fixed_epoch=fixed_epoch)
    dataset.pairs = dataset.pairs[:count]
    dataset._article_of = dataset._article_of[:count]
    return dataset


def state_of(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


QUICK = dict(batch_size=8, micro_batch_size=4, lr=3e-4, num_workers=0, log_every_steps=1)


def test_schedule_warms_up_then_decays():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_linear_decay(optimizer, total_steps=100, warmup_steps=5)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1 / 6)
    assert rates[4] == pytest.approx(5 / 6)
    assert rates[5] == pytest.approx(1.0)
    assert rates[99] == pytest.approx(1 / 95)
    assert all(later <= earlier for earlier, later in zip(rates[5:], rates[6:]))


def test_epoch_order_depends_on_seed_and_epoch():
    first = optimizer_batches(50, 8, seed=1, epoch=0)
    assert [len(batch) for batch in first] == [8] * 6 + [2]
    assert sorted(int(i) for batch in first for i in batch) == list(range(50))
    assert all((a == b).all() for a, b in zip(first, optimizer_batches(50, 8, seed=1, epoch=0)))
    assert not (first[0] == optimizer_batches(50, 8, seed=1, epoch=1)[0]).all()


def test_training_writes_checkpoints_best_and_history(demo, tiny_folder, tokenizer, tmp_path):
    train = small_split(demo, "train", tokenizer, 24, use_faces=True)
    valid = small_split(demo, "valid", tokenizer, 8, fixed_epoch=0, use_faces=True)
    result = train_model(new_model(tiny_folder, use_faces=True), tokenizer, train, valid, tmp_path, TrainConfig(epochs=2, **QUICK), run_info={"fingerprint": "f"})

    assert [record["epoch"] for record in result.history] == [1, 2]
    assert {"masked_lm", "matched", "feat", "obj", "attr", "faces_feat"} <= set(result.history[0]["train_losses"])
    assert all(record["valid_loss"] is not None for record in result.history)
    assert all(record["samples_per_second"] > 0 for record in result.history)
    assert result.global_step == 6
    assert (tmp_path / "checkpoints" / "epoch_001" / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoints" / "epoch_001" / "trainer_state.pt").exists(), "only the newest checkpoint keeps optimizer state"
    folder, record = read_last_checkpoint(tmp_path)
    assert folder.name == "epoch_002"
    assert record["global_step"] == 6
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["epoch"] == result.best_epoch
    assert (tmp_path / "best" / "tokenizer.json").is_file()
    reloaded = NewsLxmertForPreTraining.from_pretrained(tmp_path / "best")
    assert reloaded.use_faces

    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["steps"]) == 6
    assert len(history["epochs"]) == 2
    png = plot_loss_curves(tmp_path / "history.json", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_same_weights(demo, tiny_folder, tokenizer, tmp_path):
    results = []
    for run in ("a", "b"):
        model = new_model(tiny_folder)
        train_model(model, tokenizer, small_split(demo, "train", tokenizer, 16), None, tmp_path / run, TrainConfig(epochs=1, **QUICK))
        results.append(state_of(model))
    assert_same_weights(*results)


class Crash(RuntimeError):
    pass


def test_resume_after_crash_ends_with_same_weights(demo, tiny_folder, tokenizer, tmp_path):
    config = TrainConfig(epochs=3, **QUICK)
    valid = small_split(demo, "valid", tokenizer, 8, fixed_epoch=0)

    straight = new_model(tiny_folder)
    uninterrupted = train_model(straight, tokenizer, small_split(demo, "train", tokenizer, 16), valid, tmp_path / "straight", config, run_info={"fingerprint": "x"})

    def crash_after_second(record):
        if record["epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_model(new_model(tiny_folder), tokenizer, small_split(demo, "train", tokenizer, 16), valid, tmp_path / "resumed", config, run_info={"fingerprint": "x"}, on_epoch_end=crash_after_second)
    resumed_model = new_model(tiny_folder, seed=99)  # the checkpoint must override everything
    resumed = train_model(resumed_model, tokenizer, small_split(demo, "train", tokenizer, 16), valid, tmp_path / "resumed", config, resume=True, run_info={"fingerprint": "x"})

    assert resumed.resumed_from.endswith("epoch_002")
    assert_same_weights(state_of(straight), state_of(resumed_model))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in uninterrupted.history]


def test_resume_refuses_other_settings(demo, tiny_folder, tokenizer, tmp_path):
    train = small_split(demo, "train", tokenizer, 8)
    train_model(new_model(tiny_folder), tokenizer, train, None, tmp_path, TrainConfig(epochs=1, **QUICK), run_info={"fingerprint": "one"})
    with pytest.raises(ValueError, match="other settings"):
        train_model(new_model(tiny_folder), tokenizer, train, None, tmp_path, TrainConfig(epochs=2, **QUICK), resume=True, run_info={"fingerprint": "two"})
    assert (tmp_path / LAST_POINTER).is_file()


def test_micro_batches_accumulate_to_the_full_batch(demo, tiny_folder, tokenizer, tmp_path):
    """Without dropout and masked-LM (whose mean is per micro-batch), accumulation equals one big batch."""
    weights = []
    for micro in (8, 2):
        model = new_model(tiny_folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        train = small_split(demo, "train", tokenizer, 8, masked_lm_ratio=0.0)
        config = TrainConfig(epochs=1, batch_size=8, micro_batch_size=micro, lr=1e-3, num_workers=0, warmup_ratio=0.0)
        train_model(model, tokenizer, train, None, tmp_path / str(micro), config)
        weights.append(state_of(model))
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=2e-6, rtol=1e-4, msg=key)


def match_probabilities(model, dataset, tokenizer, shift=0):
    batch = collate_samples([dataset[i] for i in range(len(dataset))], tokenizer.pad_token_id)
    order = torch.roll(torch.arange(len(dataset)), shift)
    model.eval()
    with torch.no_grad():
        lang = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        vis, vis_mask = model.encode_visual(batch["visual_feats"][order], batch["visual_pos"][order])
        pooled = model.cross_encode(lang, batch["attention_mask"], vis, vis_mask)[2]
        return model.match_logits(pooled).softmax(-1)[:, 1]


def test_short_training_learns_matching(tiny_folder, tokenizer, tmp_path):
    """After a short training, a held-out matched pair scores higher than a shuffled one.

    Only the matching loss is on (nothing is masked), which keeps the run to about 440
    optimizer steps. With all losses on, the tiny model needs a few times more. With half
    the epochs, the result depended on the initial weights: of five seeds of the tiny
    LXMERT, two stayed below the thresholds. With 40 epochs, seeds 0, 1 and 2 scored
    0.81 to 0.85 and a mean gap of 0.51 to 0.57.
    """
    demo = DemoData(n_articles=240, seed=5)
    train = demo.dataset("train", tokenizer, PairDatasetConfig(mode=1, max_seq_len=48, masked_lm_ratio=0.0, masked_feats_ratio=0.0))
    model = new_model(tiny_folder)
    config = TrainConfig(epochs=40, batch_size=32, micro_batch_size=32, lr=3e-4, num_workers=0, log_every_steps=50)
    train_model(model, tokenizer, train, None, tmp_path, config)

    clean = PairDatasetConfig(mode=1, max_seq_len=48, negative_ratio=0.0, masked_lm_ratio=0.0, masked_feats_ratio=0.0)
    valid = demo.dataset("valid", tokenizer, clean, fixed_epoch=0)
    matched = match_probabilities(model, valid, tokenizer)
    shuffled = match_probabilities(model, valid, tokenizer, shift=1)
    assert (matched > shuffled).float().mean().item() > 0.75
    assert matched.mean().item() > shuffled.mean().item() + 0.15
