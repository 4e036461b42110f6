"""Tests of the NewsLXMERT network and of checkpoint loading."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LxmertConfig, LxmertForPreTraining

from model.checkpoints import convert_original_state_dict, to_original_state_dict
from model.modeling import (
    FeatureDimensionError,
    ModelWeightsNotFoundError,
    NewsLxmertForPreTraining,
    news_lxmert_config,
)

TINY = dict(
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=64,
    l_layers=2,
    x_layers=2,
    r_layers=1,
    vocab_size=120,
    visual_feat_dim=24,
    max_position_embeddings=64,
    num_object_labels=30,
    num_attr_labels=20,
)


def make_model(use_faces: bool = True, seed: int = 0) -> NewsLxmertForPreTraining:
    torch.manual_seed(seed)
    return NewsLxmertForPreTraining(news_lxmert_config(use_faces=use_faces, **TINY)).eval()


def make_inputs(batch: int = 3, length: int = 9, seed: int = 1, faces: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, TINY["vocab_size"], (batch, length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 2, 3
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
        "visual_feats": torch.randn(batch, 36, TINY["visual_feat_dim"], generator=generator),
        "visual_pos": torch.rand(batch, 36, 4, generator=generator),
    }
    if faces:
        face_mask = torch.zeros(batch, 10)
        face_mask[0, :2] = 1
        face_mask[1, :1] = 1
        inputs["face_feats"] = torch.randn(batch, 10, 512, generator=generator) * face_mask[..., None]
        inputs["face_mask"] = face_mask
    return inputs


def test_stage_shapes_with_and_without_faces():
    for use_faces, visual_tokens in ((True, 46), (False, 36)):
        model = make_model(use_faces)
        inputs = make_inputs(faces=use_faces)
        lang = model.encode_text(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
        vis, vis_mask = model.encode_visual(inputs["visual_feats"], inputs["visual_pos"], inputs.get("face_feats"), inputs.get("face_mask"))
        assert lang.shape == (3, 9, 32)
        assert vis.shape == (3, visual_tokens, 32)
        assert vis_mask.shape == (3, visual_tokens)
        lang_out, vis_out, pooled = model.cross_encode(lang, inputs["attention_mask"], vis, vis_mask)
        assert (lang_out.shape, vis_out.shape, pooled.shape) == (lang.shape, vis.shape, (3, 32))
        assert model.match_logits(pooled).shape == (3, 2)


def test_face_mask_marks_real_faces_only():
    model = make_model()
    inputs = make_inputs()
    _, vis_mask = model.encode_visual(inputs["visual_feats"], inputs["visual_pos"], inputs["face_feats"], inputs["face_mask"])
    assert vis_mask[:, :36].eq(1).all()
    assert vis_mask[:, 36:].tolist() == inputs["face_mask"].tolist()


def test_forward_equals_composed_stages():
    model = make_model()
    inputs = make_inputs()
    output = model(**inputs)
    lang = model.encode_text(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    vis, vis_mask = model.encode_visual(inputs["visual_feats"], inputs["visual_pos"], inputs["face_feats"], inputs["face_mask"])
    pooled = model.cross_encode(lang, inputs["attention_mask"], vis, vis_mask)[2]
    torch.testing.assert_close(output.match_logits, model.match_logits(pooled))
    assert output.loss is None, "no labels, no loss"


def test_text_padding_does_not_change_results():
    model = make_model()
    inputs = make_inputs()
    padded = dict(inputs)
    extra = 7
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.zeros(3, extra, dtype=torch.long)], 1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(3, extra, dtype=torch.long)], 1)
    padded["token_type_ids"] = torch.zeros_like(padded["input_ids"])
    plain, longer = model(**inputs), model(**padded)
    torch.testing.assert_close(plain.match_logits, longer.match_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.lang_output, longer.lang_output[:, :9], atol=1e-5, rtol=1e-5)


def test_padded_face_slots_do_not_change_results():
    model = make_model()
    inputs = make_inputs()
    noisy = dict(inputs)
    noise = torch.randn(3, 10, 512) * (1 - inputs["face_mask"])[..., None]
    noisy["face_feats"] = inputs["face_feats"] + noise
    torch.testing.assert_close(model(**inputs).match_logits, model(**noisy).match_logits, atol=1e-5, rtol=1e-5)


def test_batch_composition_does_not_change_results():
    """An item scores the same alone as in a batch with a longer text."""
    model = make_model()
    inputs = make_inputs()
    batch_logits = model(**inputs).match_logits
    shorter = {key: value[1:2] for key, value in inputs.items()}
    shorter["input_ids"] = shorter["input_ids"][:, :6].clone()
    shorter["input_ids"][:, -1] = 3
    shorter["attention_mask"] = shorter["attention_mask"][:, :6]
    shorter["token_type_ids"] = shorter["token_type_ids"][:, :6]
    padded = {key: value.clone() for key, value in inputs.items()}
    padded["input_ids"][1] = 0
    padded["input_ids"][1, :6] = shorter["input_ids"][0]
    padded["attention_mask"][1, 6:] = 0
    torch.testing.assert_close(model(**shorter).match_logits[0], model(**padded).match_logits[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch_logits[1], model(**padded).match_logits[1])


def test_nothing_masked_gives_finite_loss():
    model = make_model()
    inputs = make_inputs()
    labels = torch.full_like(inputs["input_ids"], -100)
    none = torch.zeros(3, 36)
    output = model(
        **inputs,
        labels=labels,
        matched_label=torch.tensor([1, 0, 1]),
        obj_labels={
            "obj": (torch.full((3, 36), -1), none),
            "attr": (torch.full((3, 36), -1), none),
            "feat": (inputs["visual_feats"], none),
            "faces_feat": (inputs["face_feats"], torch.zeros(3, 10)),
        },
    )
    assert torch.isfinite(output.loss)
    assert output.losses["masked_lm"].item() == 0.0
    assert output.losses["feat"].item() == 0.0
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_losses_reported_by_name():
    model = make_model()
    inputs = make_inputs()
    labels = inputs["input_ids"].clone()
    labels[:, ::2] = -100
    mask = (torch.rand(3, 36) < 0.3).float()
    output = model(
        **inputs,
        labels=labels,
        matched_label=torch.tensor([1, 0, 1]),
        obj_labels={"feat": (inputs["visual_feats"], mask), "faces_feat": (inputs["face_feats"], inputs["face_mask"])},
    )
    assert set(output.losses) == {"masked_lm", "matched", "feat", "faces_feat"}
    assert output.loss.item() == pytest.approx(sum(value.item() for value in output.losses.values()), rel=1e-5)


def test_model_without_faces_rejects_faces():
    model = make_model(use_faces=False)
    inputs = make_inputs()
    with pytest.raises(ValueError, match="without faces"):
        model(**inputs)


def test_wrong_feature_dimension_is_a_clear_error():
    model = make_model()
    inputs = make_inputs()
    inputs["visual_feats"] = torch.randn(3, 36, 2048)
    with pytest.raises(FeatureDimensionError, match="visual_feat_dim=24"):
        model(**inputs)


def test_save_and_load_round_trip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["use_faces"] is True
    assert config["architectures"] == ["NewsLxmertForPreTraining"]
    loaded = NewsLxmertForPreTraining.from_pretrained(tmp_path / "ckpt").eval()
    inputs = make_inputs()
    torch.testing.assert_close(model(**inputs).match_logits, loaded(**inputs).match_logits)
    assert loaded.cls.predictions.decoder.weight is loaded.lxmert.embeddings.word_embeddings.weight
    with pytest.raises(FeatureDimensionError, match="24-dimensional"):
        NewsLxmertForPreTraining.from_pretrained(tmp_path / "ckpt", visual_feat_dim=2048)


def test_load_without_faces_drops_face_modules(tmp_path):
    make_model().save_pretrained(tmp_path / "ckpt")
    loaded = NewsLxmertForPreTraining.from_pretrained(tmp_path / "ckpt", use_faces=False)
    assert not hasattr(loaded, "face_encoder")
    assert loaded.encode_visual(torch.randn(1, 36, 24), torch.rand(1, 36, 4))[0].shape == (1, 36, 32)


def test_transformers_lxmert_folder_gets_fresh_faces(tmp_path):
    torch.manual_seed(0)
    source = LxmertForPreTraining(LxmertConfig(task_qa=True, num_qa_labels=7, **TINY))
    source.save_pretrained(tmp_path / "hf")
    model = NewsLxmertForPreTraining.from_pretrained(str(tmp_path / "hf"), use_faces=True, visual_feat_dim=24)
    torch.testing.assert_close(model.lxmert.encoder.x_layers[1].visn_output.dense.weight, source.lxmert.encoder.x_layers[1].visn_output.dense.weight)
    torch.testing.assert_close(model.obj_predict_head.decoder_dict["obj"].weight, source.obj_predict_head.decoder_dict["obj"].weight)
    assert model.face_encoder.fc.weight.shape == (32, 512)
    assert not any(key.startswith("answer_head") for key in model.state_dict())


def test_missing_hub_model_names_the_value(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ModelWeightsNotFoundError, match="unc-nlp/lxmert-base-uncased"):
        NewsLxmertForPreTraining.from_pretrained("unc-nlp/lxmert-base-uncased")
    with pytest.raises(ModelWeightsNotFoundError, match="no_such_folder"):
        NewsLxmertForPreTraining.from_pretrained(str(tmp_path / "no_such_folder"))


def original_newslxmert_state_dict(hidden: int = 32, qa_labels: int = 7) -> dict[str, torch.Tensor]:
    """A state dict with the key names and shapes of the original NewsLXMERT release.

    Its LXMERT part has transformers' LxmertForPreTraining names (QA head included, as the
    original config had task_qa on); the face parts have the original's own names.
    """
    torch.manual_seed(3)
    state = LxmertForPreTraining(LxmertConfig(task_qa=True, num_qa_labels=qa_labels, **TINY)).state_dict()
    faces = {
        "lxmert.encoder.visn_fc.visn_faces_fc.weight": torch.randn(hidden, 512),
        "lxmert.encoder.visn_fc.visn_faces_fc.bias": torch.randn(hidden),
        "lxmert.encoder.visn_fc.visn_faces_layer_norm.weight": torch.randn(hidden),
        "lxmert.encoder.visn_fc.visn_faces_layer_norm.bias": torch.randn(hidden),
        "faces_predict_head.transform.dense.weight": torch.randn(hidden, hidden),
        "faces_predict_head.transform.dense.bias": torch.randn(hidden),
        "faces_predict_head.transform.LayerNorm.weight": torch.randn(hidden),
        "faces_predict_head.transform.LayerNorm.bias": torch.randn(hidden),
        "faces_predict_head.decoder_dict.faces_feat.weight": torch.randn(512, hidden),
        "faces_predict_head.decoder_dict.faces_feat.bias": torch.randn(512),
    }
    state = {key: value.clone() for key, value in state.items()}
    state.update(faces)
    return state


def test_original_pth_checkpoint_loads(tmp_path):
    state = original_newslxmert_state_dict()
    assert "answer_head.logit_fc.3.weight" in state
    path = tmp_path / "BEST_EVAL_LOSS_LXRT.pth"
    torch.save(state, path)

    model = NewsLxmertForPreTraining.from_pretrained(path, visual_feat_dim=24)
    assert model.use_faces
    assert model.config.l_layers == 2
    assert model.config.x_layers == 2
    assert model.config.r_layers == 1
    torch.testing.assert_close(model.face_encoder.fc.weight, state["lxmert.encoder.visn_fc.visn_faces_fc.weight"])
    torch.testing.assert_close(model.face_encoder.layer_norm.bias, state["lxmert.encoder.visn_fc.visn_faces_layer_norm.bias"])
    torch.testing.assert_close(model.face_head.transform.LayerNorm.weight, state["faces_predict_head.transform.LayerNorm.weight"])
    torch.testing.assert_close(model.face_head.decoder.weight, state["faces_predict_head.decoder_dict.faces_feat.weight"])
    torch.testing.assert_close(model.lxmert.encoder.r_layers[0].attention.self.key.weight, state["lxmert.encoder.r_layers.0.attention.self.key.weight"])
    torch.testing.assert_close(model.cls.predictions.decoder.weight, state["lxmert.embeddings.word_embeddings.weight"])
    assert not hasattr(model, "answer_head")


def test_original_pth_saved_from_data_parallel_loads(tmp_path):
    state = {f"module.{key}": value for key, value in original_newslxmert_state_dict().items()}
    torch.save(state, tmp_path / "Epoch20_LXRT.pth")
    model = NewsLxmertForPreTraining.from_pretrained(tmp_path / "Epoch20_LXRT.pth")
    torch.testing.assert_close(model.face_head.decoder.bias, state["module.faces_predict_head.decoder_dict.faces_feat.bias"])


def test_original_keys_round_trip():
    model = make_model()
    original = to_original_state_dict(model)
    assert "lxmert.encoder.visn_fc.visn_faces_fc.weight" in original
    assert "faces_predict_head.decoder_dict.faces_feat.bias" in original
    converted, dropped = convert_original_state_dict(original)
    assert dropped == []
    assert set(converted) == set(model.state_dict())


class Payload:
    """An arbitrary class: unpickling it would import and run code from this module."""


def test_pth_file_with_code_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"weight": Payload()}, path)
    with pytest.raises(ValueError, match="cannot read"):
        NewsLxmertForPreTraining.from_pretrained(path)


def test_checkpoint_of_other_architecture_is_rejected(tmp_path):
    state = original_newslxmert_state_dict()
    del state["lxmert.encoder.x_layers.1.lang_output.dense.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        NewsLxmertForPreTraining.from_pretrained(tmp_path / "broken.pth")
