"""The NewsLXMERT network: LXMERT with a face stream, a face head and all pre-training losses.

Built from the parts of transformers' LXMERT (an ``LxmertModel`` at ``.lxmert``, its
language-model, matching and visual-object heads), plus two modules of its own when faces
are on:

- ``face_encoder``: each of up to ``max_faces`` FaceNet embeddings (512-d) goes through its
  own Linear(512 -> H) + LayerNorm + dropout, with no position input, and is appended after
  the 36 region tokens (46 visual tokens). Padded faces get visual attention mask 0.
- ``face_head``: a prediction transform and Linear(H -> 512) that regresses masked faces.

The forward pass is split into three public stages so that N x N retrieval scoring can run
the single-modality layers once per item and only the cross-modality layers per pair:
``encode_text`` -> ``encode_visual`` -> ``cross_encode`` -> ``match_logits``.

Losses: masked LM (mean over masked tokens, 0 when none is masked), image-text matching on
the pooled output (class 1 = match), object and attribute classification and SmoothL1
feature regression on masked regions, and SmoothL1 regression of masked faces. Each visual
loss averages over all visual tokens, counting 0 for unmasked ones, and is then multiplied
by ``visual_loss_normalizer`` (6.67, about 1 / 0.15). The factor undoes the dilution by the
85% unmasked tokens; transformers' ``LxmertForPreTraining`` and the original NewsLXMERT code
scale the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LxmertConfig
from transformers.models.lxmert.modeling_lxmert import (
    LxmertModel,
    LxmertPredictionHeadTransform,
    LxmertPreTrainingHeads,
    LxmertVisualObjHead,
)

logger = logging.getLogger(__name__)

FACE_FEAT_DIM = 512  # FaceNet (InceptionResnetV1) embedding size
MAX_FACES = 10
NUM_REGIONS = 36
# Marks a folder written by NewsLxmertForPreTraining.save_pretrained (config.json key).
FORMAT_KEY = "news_lxmert_format"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
TIED_DECODER_KEY = "cls.predictions.decoder.weight"
VISUAL_LOSS_KEYS = ("obj", "attr", "feat")
FACE_LOSS_KEY = "faces_feat"  # the original NewsLXMERT's name for the face regression loss


class ModelWeightsNotFoundError(FileNotFoundError):
    """A configured model name or folder could not be loaded; the message names the value."""


class FeatureDimensionError(ValueError):
    """The model's ``visual_feat_dim`` differs from the region features it is given."""


@dataclasses.dataclass
class NewsLxmertOutput:
    """Outputs of ``NewsLxmertForPreTraining.forward``.

    loss: () total loss, None when no label was given.
    losses: detached per-loss values by name (masked_lm, matched, obj, attr, feat, faces_feat).
    match_logits: (B, 2) image-text matching logits, index 1 = match.
    lm_logits: (B, T, vocab) masked-LM logits.
    lang_output: (B, T, H), vis_output: (B, V, H), pooled: (B, H) cross-modality outputs.
    vis_mask: (B, V) the visual attention mask used (1 = attended).
    """

    loss: torch.Tensor | None
    losses: dict[str, torch.Tensor]
    match_logits: torch.Tensor
    lm_logits: torch.Tensor
    lang_output: torch.Tensor
    vis_output: torch.Tensor
    pooled: torch.Tensor
    vis_mask: torch.Tensor


class FaceEncoder(nn.Module):
    """Projects FaceNet embeddings into the visual token space; faces carry no box input."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.fc = nn.Linear(config.face_feat_dim, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, face_feats: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(self.fc(face_feats)))  # (B, F, H)


class FaceHead(nn.Module):
    """Regresses the FaceNet embedding of a masked face from its output token."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.transform = LxmertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.face_feat_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))  # (B, F, 512)


def news_lxmert_config(base: LxmertConfig | Mapping[str, Any] | None = None, **overrides: Any) -> LxmertConfig:
    """Build an ``LxmertConfig`` with the NewsLXMERT fields (use_faces, face_feat_dim, max_faces) set.

    The question-answering task is always off because NewsLXMERT has no QA head.
    """
    if base is None:
        values: dict[str, Any] = {}
    elif isinstance(base, LxmertConfig):
        values = base.to_dict()
    else:
        values = dict(base)
    values.update(overrides)
    values.setdefault("use_faces", False)
    values.setdefault("face_feat_dim", FACE_FEAT_DIM)
    values.setdefault("max_faces", MAX_FACES)
    values["task_qa"] = False
    for key in ("model_type", "transformers_version", "architectures"):
        values.pop(key, None)
    return LxmertConfig(**values)


def extended_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) mask of 1 (attend) / 0 (ignore) -> (B, 1, 1, L) additive mask for attention scores."""
    mask = mask.to(dtype)[:, None, None, :]
    return (1.0 - mask) * torch.finfo(dtype).min


class NewsLxmertForPreTraining(nn.Module):
    """NewsLXMERT: LXMERT for news text-image matching, with optional FaceNet face tokens.

    Inputs follow transformers' names:

    - ``input_ids``, ``attention_mask``, ``token_type_ids``: (B, T)
    - ``visual_feats``: (B, 36, D) region features, ``visual_pos``: (B, 36, 4) normalized boxes
    - ``face_feats``: (B, F, 512) and ``face_mask``: (B, F), when faces are on
    """

    def __init__(self, config: LxmertConfig):
        super().__init__()
        config = news_lxmert_config(config)
        self.config = config
        self.use_faces = bool(config.use_faces)
        self.max_faces = int(config.max_faces)

        self.lxmert = LxmertModel(config)
        self.cls = LxmertPreTrainingHeads(config)
        self.obj_predict_head = LxmertVisualObjHead(config) if config.task_obj_predict else None
        if self.use_faces:
            self.face_encoder = FaceEncoder(config)
            self.face_head = FaceHead(config)

        for module in (self.cls, self.obj_predict_head, getattr(self, "face_encoder", None), getattr(self, "face_head", None)):
            if module is not None:
                module.apply(self._init_weights)
        nn.init.zeros_(self.cls.predictions.bias)
        self.tie_weights()

    # ------------------------------------------------------------------ weights

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """Share the masked-LM decoder matrix with the word embeddings, as BERT and LXMERT do."""
        self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ stages

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed the tokens and run the language-only layers; returns lang_hidden (B, T, H)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.lxmert.embeddings(input_ids, token_type_ids)  # (B, T, H)
        mask = extended_attention_mask(attention_mask, hidden.dtype)
        for layer in self.lxmert.encoder.layer:
            hidden = layer(hidden, mask)[0]
        return hidden

    def encode_visual(
        self,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        face_feats: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode regions (and faces) and run the object-relationship layers.

        Returns vis_hidden (B, V, H) and vis_mask (B, V), V = 36 without faces and
        36 + max_faces with them. Every region is attended, as in the original NewsLXMERT.
        A model with faces given no faces treats every face slot as absent.
        """
        expected = self.config.visual_feat_dim
        if visual_feats.shape[-1] != expected:
            raise FeatureDimensionError(
                f"region features have {visual_feats.shape[-1]} dimensions but the model expects "
                f"visual_feat_dim={expected}; use features from the extractor the model was trained on"
            )
        batch, regions = visual_feats.shape[:2]
        hidden = self.lxmert.encoder.visn_fc(visual_feats, visual_pos)  # (B, 36, H)
        mask = torch.ones(batch, regions, dtype=hidden.dtype, device=hidden.device)

        if self.use_faces:
            if face_feats is None:
                face_feats = hidden.new_zeros(batch, self.max_faces, self.config.face_feat_dim)
                face_mask = hidden.new_zeros(batch, self.max_faces)
            elif face_mask is None:
                raise ValueError("face_feats given without face_mask; pass 1 for real faces and 0 for padding")
            if face_feats.shape[1] != self.max_faces:
                raise ValueError(f"face_feats has {face_feats.shape[1]} face slots, the model expects max_faces={self.max_faces}")
            hidden = torch.cat([hidden, self.face_encoder(face_feats.to(hidden.dtype))], dim=1)  # (B, 36 + F, H)
            mask = torch.cat([mask, face_mask.to(mask.dtype)], dim=1)  # (B, 36 + F)
        elif face_feats is not None and face_mask is not None and bool(face_mask.any()):
            raise ValueError("this model was built without faces (use_faces=False) but face features were given")

        extended = extended_attention_mask(mask, hidden.dtype)
        for layer in self.lxmert.encoder.r_layers:
            hidden = layer(hidden, extended)[0]
        return hidden, mask

    def cross_encode(
        self,
        lang_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        vis_hidden: torch.Tensor,
        vis_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the cross-modality layers and the pooler; returns (lang_out, vis_out, pooled)."""
        lang_extended = extended_attention_mask(attention_mask, lang_hidden.dtype)
        vis_extended = extended_attention_mask(vis_mask, vis_hidden.dtype)
        for layer in self.lxmert.encoder.x_layers:
            lang_hidden, vis_hidden = layer(lang_hidden, lang_extended, vis_hidden, vis_extended)[:2]
        pooled = self.lxmert.pooler(lang_hidden)  # (B, H) from the [CLS] token
        return lang_hidden, vis_hidden, pooled

    def match_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """Image-text matching logits (B, 2); index 1 = match."""
        return self.cls.seq_relationship(pooled)

    # ------------------------------------------------------------------ forward and losses

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_feats: torch.Tensor,
        visual_pos: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        face_feats: torch.Tensor | None = None,
        face_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        obj_labels: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        matched_label: torch.Tensor | None = None,
    ) -> NewsLxmertOutput:
        """Run all stages and the losses whose labels are given.

        labels: (B, T) masked-LM targets, -100 where not masked.
        obj_labels: (target, mask) pairs by loss name. Targets: ``obj``/``attr`` (B, 36) class
        ids (-1: no label), ``feat`` (B, 36, D) features, ``faces_feat`` (B, F, 512)
        embeddings. Each mask is (B, n) with 1 at masked tokens. Absent keys are skipped, so
        a feature store without object or attribute labels still trains the other losses.
        matched_label: (B,) 1 for a true pair, 0 for a negative.
        """
        lang_hidden = self.encode_text(input_ids, attention_mask, token_type_ids)
        vis_hidden, vis_mask = self.encode_visual(visual_feats, visual_pos, face_feats, face_mask)
        lang_out, vis_out, pooled = self.cross_encode(lang_hidden, attention_mask, vis_hidden, vis_mask)
        lm_logits = self.cls.predictions(lang_out)  # (B, T, vocab)
        match_logits = self.match_logits(pooled)

        losses: dict[str, torch.Tensor] = {}
        if labels is not None and self.config.task_mask_lm:
            losses["masked_lm"] = masked_mean_cross_entropy(lm_logits, labels)
        if matched_label is not None and self.config.task_matched:
            losses["matched"] = F.cross_entropy(match_logits.float(), matched_label.view(-1))
        if obj_labels is not None and self.obj_predict_head is not None:
            losses.update(self._visual_losses(vis_out[:, :NUM_REGIONS], obj_labels))
        if obj_labels is not None and self.use_faces and FACE_LOSS_KEY in obj_labels:
            target, mask = obj_labels[FACE_LOSS_KEY]
            predicted = self.face_head(vis_out[:, NUM_REGIONS:])
            losses[FACE_LOSS_KEY] = self._regression_loss(predicted, target, mask)

        loss = None
        if losses:
            loss = torch.stack([value.float() for value in losses.values()]).sum()
        return NewsLxmertOutput(
            loss=loss,
            losses={name: value.detach() for name, value in losses.items()},
            match_logits=match_logits,
            lm_logits=lm_logits,
            lang_output=lang_out,
            vis_output=vis_out,
            pooled=pooled,
            vis_mask=vis_mask,
        )

    def _visual_losses(
        self, region_out: torch.Tensor, obj_labels: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        predictions = self.obj_predict_head(region_out)  # by key: (B, 36, n)
        losses = {}
        for key in VISUAL_LOSS_KEYS:
            if key not in obj_labels or key not in predictions:
                continue
            target, mask = obj_labels[key]
            if key == "feat":
                losses[key] = self._regression_loss(predictions[key], target, mask)
                continue
            scores = predictions[key].float()
            classes = scores.shape[-1]
            # A negative id means "no label" (a padded region, or a detector that predicts no
            # attributes): such regions add no loss even when masked. Clamping keeps the
            # lookup in range; the mask removes their loss.
            labelled = mask.reshape(-1).float() * (target.reshape(-1) >= 0).float()
            per_token = F.cross_entropy(
                scores.reshape(-1, classes), target.reshape(-1).clamp(0, classes - 1), reduction="none"
            )
            losses[key] = (per_token * labelled).mean() * self.config.visual_loss_normalizer
        return losses

    def _regression_loss(self, predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_token = F.smooth_l1_loss(predicted.float(), target.float(), reduction="none").mean(-1)  # (B, n)
        return (per_token * mask.float()).mean() * self.config.visual_loss_normalizer

    # ------------------------------------------------------------------ save and load

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (atomically) into ``folder``."""
        from safetensors.torch import save as safetensors_save

        from model.storage import atomic_write_bytes, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config[FORMAT_KEY] = FORMAT_VERSION
        config["architectures"] = [type(self).__name__]
        state = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items() if key != TIED_DECODER_KEY}
        atomic_write_bytes(folder / WEIGHTS_NAME, safetensors_save(state, metadata={"format": "pt"}))
        atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | Path,
        use_faces: bool | None = None,
        visual_feat_dim: int | None = None,
        **config_overrides: Any,
    ) -> "NewsLxmertForPreTraining":
        """Load a NewsLXMERT folder, an original NewsLXMERT ``.pth`` file, or any LXMERT.

        - a folder written by ``save_pretrained``: loaded as is;
        - a ``.pth``/``.pt``/``.bin`` file: the original NewsLXMERT release format (state dict
          of its LXMERT-with-faces module), see ``model.checkpoints``;
        - anything else: a transformers LXMERT hub id (``unc-nlp/lxmert-base-uncased``) or local
          folder, with the face modules freshly initialised.

        ``use_faces`` None keeps what the checkpoint has. ``visual_feat_dim``, when given, must
        equal the checkpoint's, else FeatureDimensionError.
        """
        from model import checkpoints

        path = Path(name_or_folder)
        if path.is_file():
            model = checkpoints.load_original_checkpoint(path, use_faces=use_faces, **config_overrides)
        elif path.is_dir() and _is_news_lxmert_folder(path):
            model = _load_news_lxmert_folder(cls, path, use_faces, config_overrides)
        else:
            model = checkpoints.load_transformers_lxmert(str(name_or_folder), use_faces=bool(use_faces), **config_overrides)
        if visual_feat_dim is not None and int(visual_feat_dim) != int(model.config.visual_feat_dim):
            raise FeatureDimensionError(
                f"{name_or_folder} expects {model.config.visual_feat_dim}-dimensional region features but the feature "
                f"store holds {visual_feat_dim}-dimensional ones; extract features with the backend this model was "
                "trained on, or start from a model whose visual_feat_dim matches"
            )
        return model


def masked_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not -100; 0 (not NaN) when there are none."""
    vocab = logits.shape[-1]
    total = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), ignore_index=-100, reduction="sum")
    count = (labels != -100).sum().clamp(min=1)
    return total / count


def _is_news_lxmert_folder(folder: Path) -> bool:
    config_file = folder / "config.json"
    if not config_file.is_file() or not (folder / WEIGHTS_NAME).is_file():
        return False
    return FORMAT_KEY in json.loads(config_file.read_text(encoding="utf-8"))


def _load_news_lxmert_folder(
    cls: type[NewsLxmertForPreTraining], folder: Path, use_faces: bool | None, overrides: dict[str, Any]
) -> NewsLxmertForPreTraining:
    from safetensors.torch import load_file

    from model.checkpoints import load_state_dict_into

    values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    values.pop(FORMAT_KEY, None)
    if use_faces is not None:
        values["use_faces"] = bool(use_faces)
    config = news_lxmert_config(values, **overrides)
    model = cls(config)
    load_state_dict_into(model, load_file(str(folder / WEIGHTS_NAME)), source=str(folder))
    return model
