"""Loading LXMERT weights into NewsLxmertForPreTraining: original NewsLXMERT ``.pth`` files and
transformers LXMERT checkpoints (``unc-nlp/lxmert-base-uncased`` or any local folder).

The original NewsLXMERT (github cbartolomeu/news-lxmert, MIT) saved ``state_dict()`` of its
LXMERT-with-faces module with ``torch.save``. Its key names follow transformers' LXMERT,
except for the face parts, which live here under other names:

    lxmert.encoder.visn_fc.visn_faces_fc.*           -> face_encoder.fc.*
    lxmert.encoder.visn_fc.visn_faces_layer_norm.*   -> face_encoder.layer_norm.*
    faces_predict_head.transform.*                   -> face_head.transform.*
    faces_predict_head.decoder_dict.faces_feat.*     -> face_head.decoder.*

Its QA head (``answer_head.*``) is dropped, as the original ``--loadLxmert`` did, and a
``module.`` prefix left by ``nn.DataParallel`` is removed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from model.modeling import (
    FACE_FEAT_DIM,
    TIED_DECODER_KEY,
    ModelWeightsNotFoundError,
    NewsLxmertForPreTraining,
    news_lxmert_config,
)

logger = logging.getLogger(__name__)

ORIGINAL_FACE_KEYS = {
    "lxmert.encoder.visn_fc.visn_faces_fc.": "face_encoder.fc.",
    "lxmert.encoder.visn_fc.visn_faces_layer_norm.": "face_encoder.layer_norm.",
    "faces_predict_head.transform.": "face_head.transform.",
    "faces_predict_head.decoder_dict.faces_feat.": "face_head.decoder.",
}
DROPPED_PREFIXES = ("answer_head.",)
# Parameters that may be missing from a checkpoint and keep their fresh initialisation.
FRESH_PREFIXES = ("face_encoder.", "face_head.")
ORIGINAL_FILE_SUFFIXES = (".pth", ".pt", ".bin")


def convert_original_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an original NewsLXMERT state dict to this model's keys; returns (converted, dropped keys)."""
    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith(DROPPED_PREFIXES) or key.endswith("position_ids"):
            dropped.append(key)
            continue
        for old, new in ORIGINAL_FACE_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        converted[key] = value
    return converted, dropped


def to_original_state_dict(model: NewsLxmertForPreTraining) -> dict[str, torch.Tensor]:
    """Return the model's weights under the original NewsLXMERT key names (tied decoder included)."""
    inverse = {new: old for old, new in ORIGINAL_FACE_KEYS.items()}
    state = {}
    for key, value in model.state_dict().items():
        for new, old in inverse.items():
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        state[key] = value.detach().cpu()
    return state


def _layer_count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indexes = {int(match.group(1)) for key in state for match in [pattern.match(key)] if match}
    return max(indexes) + 1 if indexes else 0


def infer_config_from_state_dict(state: Mapping[str, torch.Tensor], **overrides: Any):
    """Rebuild the LXMERT configuration from the shapes of a converted state dict.

    The shapes do not show the number of attention heads. It defaults to hidden / 64 (12 for
    the 768-wide base model) unless ``num_attention_heads`` is passed.
    """
    required = "lxmert.embeddings.word_embeddings.weight"
    if required not in state:
        raise ValueError(f"not an LXMERT state dict: key {required!r} is missing")
    vocab_size, hidden = state[required].shape
    values: dict[str, Any] = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden),
        "num_attention_heads": max(1, int(hidden) // 64),
        "max_position_embeddings": int(state["lxmert.embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state["lxmert.embeddings.token_type_embeddings.weight"].shape[0]),
        "intermediate_size": int(state["lxmert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "l_layers": _layer_count(state, "lxmert.encoder.layer."),
        "x_layers": _layer_count(state, "lxmert.encoder.x_layers."),
        "r_layers": _layer_count(state, "lxmert.encoder.r_layers."),
        "visual_feat_dim": int(state["lxmert.encoder.visn_fc.visn_fc.weight"].shape[1]),
        "visual_pos_dim": int(state["lxmert.encoder.visn_fc.box_fc.weight"].shape[1]),
        "use_faces": "face_encoder.fc.weight" in state,
        "face_feat_dim": int(state["face_encoder.fc.weight"].shape[1]) if "face_encoder.fc.weight" in state else FACE_FEAT_DIM,
    }
    for key, name in (("obj", "num_object_labels"), ("attr", "num_attr_labels")):
        weight = state.get(f"obj_predict_head.decoder_dict.{key}.weight")
        if weight is not None:
            values[name] = int(weight.shape[0])
    values.update(overrides)
    return news_lxmert_config(**values)


def load_state_dict_into(model: NewsLxmertForPreTraining, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; only face modules may be missing (they stay freshly initialised).

    Raises ValueError naming ``source`` when any other parameter is missing or a shape differs.
    """
    state = {key: value for key, value in state.items() if key != TIED_DECODER_KEY}
    if not model.use_faces:
        face_keys = [key for key in state if key.startswith(FRESH_PREFIXES)]
        if face_keys:
            logger.info("%s has face modules; the model is built without faces, so %d face tensors are ignored", source, len(face_keys))
            state = {key: value for key, value in state.items() if key not in face_keys}
    expected = {key: value.shape for key, value in model.state_dict().items() if key != TIED_DECODER_KEY}
    wrong_shape = [
        f"{key} {tuple(state[key].shape)} != {tuple(shape)}" for key, shape in expected.items() if key in state and state[key].shape != shape
    ]
    if wrong_shape:
        raise ValueError(f"{source} does not fit this model configuration: {'; '.join(wrong_shape[:5])}")
    missing = [key for key in expected if key not in state]
    not_fresh = [key for key in missing if not key.startswith(FRESH_PREFIXES)]
    if not_fresh:
        raise ValueError(
            f"{source} lacks {len(not_fresh)} parameters of the model, for example {not_fresh[:5]}; "
            "it is not a checkpoint of this LXMERT architecture"
        )
    if missing:
        logger.info("%s has no face modules; %d face tensors are freshly initialised", source, len(missing))
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        logger.warning("%s has %d tensors the model does not use, for example %s", source, len(unexpected), unexpected[:5])
    model.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=False)
    model.tie_weights()


def read_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict with ``torch.load(weights_only=True)`` (no code runs while loading)."""
    path = Path(path)
    if not path.is_file():
        raise ModelWeightsNotFoundError(f"checkpoint file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"cannot read {path} as a PyTorch state dict: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_original_checkpoint(path: str | Path, use_faces: bool | None = None, **overrides: Any) -> NewsLxmertForPreTraining:
    """Build a model from an original NewsLXMERT (or LXMERT) ``.pth`` state dict.

    ``use_faces`` None keeps faces when the file has face modules; True adds fresh ones to a
    file without them; False ignores them.
    """
    converted, dropped = convert_original_state_dict(read_original_state_dict(path))
    if dropped:
        logger.info("%s: dropped %d tensors not used by NewsLXMERT (QA head, buffers)", path, len(dropped))
    config = infer_config_from_state_dict(converted, **overrides)
    if use_faces is not None:
        config.use_faces = bool(use_faces)
    model = NewsLxmertForPreTraining(config)
    load_state_dict_into(model, converted, source=str(path))
    return model


def load_transformers_lxmert(name_or_folder: str, use_faces: bool = False, **overrides: Any) -> NewsLxmertForPreTraining:
    """Load a transformers LXMERT checkpoint (hub id or local folder) and add fresh face modules.

    Raises ModelWeightsNotFoundError naming ``name_or_folder`` when neither a local folder nor
    a cached hub copy exists; it never falls back to random weights.
    """
    from transformers import LxmertConfig, LxmertForPreTraining

    # A path that looks local never goes to the hub. A hub id is looked up in the local cache
    # first, so that an offline machine fails at once instead of after the hub's retries.
    looks_local = name_or_folder.startswith((".", "/", "~")) or name_or_folder.count("/") > 1
    try:
        try:
            base_config = LxmertConfig.from_pretrained(name_or_folder, local_files_only=True)
            local_only = True
        except OSError:
            if looks_local or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            base_config = LxmertConfig.from_pretrained(name_or_folder)
            local_only = False
        source = LxmertForPreTraining.from_pretrained(name_or_folder, config=base_config, local_files_only=local_only)
    except OSError as error:
        raise ModelWeightsNotFoundError(
            f"LXMERT weights {name_or_folder!r} could not be loaded ({error.__class__.__name__}: {str(error).splitlines()[0]}); "
            "give a local folder saved with save_pretrained, or a hub id that is already in the local cache"
        ) from error
    config = news_lxmert_config(base_config, use_faces=use_faces, **overrides)
    model = NewsLxmertForPreTraining(config)
    state = {key: value for key, value in source.state_dict().items() if not key.startswith(DROPPED_PREFIXES)}
    load_state_dict_into(model, state, source=name_or_folder)
    return model
