"""torchvision's Faster R-CNN as a region-feature backend.

Region selection follows bottom-up attention (Anderson et al., 2018). Every RPN proposal
is classified and takes its best non-background class and that class's regressed box.
Per-class NMS removes duplicates. Proposals scoring above ``score_thresh`` are kept by
score, at least ``min_regions`` and at most 36 of them. A region's feature is the box
head's pooled RoI representation of its proposal (1024-d for torchvision's COCO models),
so no second RoI pass is needed. Object ids are the detector's class indexes (1..90 for
COCO); torchvision predicts no attributes, so ``attr_ids`` are -1 and ``attr_probs`` 0.

Weights come from a folder (``config.json`` + ``model.pt``) or from a bare state-dict
file such as torchvision's ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``, with the
architecture named separately. :func:`build_tiny_detector` writes the tiny profile's
folder.

Batching: images are resized one by one and then grouped by padded input size, so an
image's network input is the same whether it runs alone or in a batch. Only images of one
padded size share a backbone pass; the RPN and box heads then run per image.
NOTE: batched and single-image regions are bitwise equal only where the backbone's
convolutions round the same for every batch size (true for torch 2.14's CPU kernels in
the tests; cuDNN may choose other algorithms per batch size and differ by about 1e-6).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image

from model.detectors.base import (
    N_REGIONS,
    DecodedImage,
    RegionBackend,
    RegionFeatures,
    choose_regions,
    pad_regions,
    padded_size,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
ARCHITECTURES = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "tiny_convnet",
)

# Defaults for settings that a weights folder's config.json or the caller may override.
DEFAULT_DETECTOR_CONFIG: dict[str, Any] = {
    "architecture": "fasterrcnn_resnet50_fpn",
    "num_classes": 91,  # COCO as torchvision numbers it, 0 = background
    "min_size": 800,
    "max_size": 1333,
    "score_thresh": 0.2,
    "nms_thresh": 0.3,
    "min_regions": 10,
    "rpn_pre_nms_top_n": 1000,
    "rpn_post_nms_top_n": 300,
    "grid_levels": [],  # e.g. [1, 2, 3]: fixed regions on 1x1, 2x2 and 3x3 grids
}


class TinyConvBackbone(nn.Sequential):
    """Four stride-2 convolutions (stride 16 in all), for the tiny profile only."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64)):
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            in_channels = out_channels
        super().__init__(*layers)
        self.out_channels = in_channels


def build_architecture(config: dict[str, Any]) -> FasterRCNN:
    """Build the untrained network that ``config`` describes (weights are loaded separately)."""
    from torchvision.models import detection

    architecture = config["architecture"]
    common = dict(
        min_size=config["min_size"],
        max_size=config["max_size"],
        rpn_pre_nms_top_n_test=config["rpn_pre_nms_top_n"],
        rpn_post_nms_top_n_test=config["rpn_post_nms_top_n"],
    )
    if architecture == "tiny_convnet":
        backbone = TinyConvBackbone()
        anchors = AnchorGenerator(sizes=((16, 32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),))
        pooler = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
        representation = int(config.get("representation_size", 256))
        return FasterRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            box_roi_pool=pooler,
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, config["num_classes"]),
            **common,
        )
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown Faster R-CNN architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    builder = getattr(detection, architecture)
    return builder(weights=None, weights_backbone=None, num_classes=config["num_classes"], **common)


def box_head_dim(model: FasterRCNN) -> int:
    """Return the size of the box head's output, the region feature dimension."""
    linears = [module for module in model.roi_heads.box_head.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the box head has no Linear layer; cannot tell the region feature dimension")
    return linears[-1].out_features


def load_detector_weights(weights: str | Path, architecture: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a detector folder or a bare state-dict file; return (config, state dict).

    Raises FileNotFoundError naming ``weights`` when absent, ValueError for unreadable files.
    """
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(
            f"Faster R-CNN weights {path} not found; set the region_features 'weights' setting to a "
            f"torchvision state-dict file or a folder with {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    config = dict(DEFAULT_DETECTOR_CONFIG)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for required in (config_path, weights_path):
            if not required.exists():
                raise FileNotFoundError(f"detector folder {path} has no {required.name}; it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            config.update(json.loads(config_path.read_text(encoding="utf-8")))
        except ValueError as error:
            raise ValueError(f"{config_path}: invalid JSON ({error})") from None
    else:
        weights_path = path
        if architecture:
            config["architecture"] = architecture
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for bad files
        raise ValueError(f"{weights_path}: cannot be loaded as a PyTorch state dict ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint that wraps the state dict
    if not isinstance(state, dict):
        raise ValueError(f"{weights_path}: expected a state dict, found {type(state).__name__}")
    return config, state


def build_tiny_detector(folder: Path | str, seed: int = 0) -> Path:
    """Write the tiny profile's randomly initialised detector to ``folder`` unless present.

    The network is untrained, so its RPN ranks proposals almost at random. Its config
    therefore lists fixed grid regions (1x1, 2x2 and 3x3, 14 boxes) before the 22
    best-scoring detections: the regions then always cover the whole scene layout, and
    their features (random convolutions of the pixels) still differ with colour and
    content. ``score_thresh`` is 0 because an untrained classifier gives every class about
    the same low probability.
    """
    folder = Path(folder)
    if (folder / CONFIG_FILE).exists() and (folder / WEIGHTS_FILE).exists():
        return folder
    from model.storage import atomic_write_bytes, atomic_write_text

    config = dict(DEFAULT_DETECTOR_CONFIG)
    config.update(
        architecture="tiny_convnet",
        num_classes=16,
        min_size=192,
        max_size=320,
        score_thresh=0.0,
        nms_thresh=0.5,
        rpn_pre_nms_top_n=300,
        rpn_post_nms_top_n=100,
        grid_levels=[1, 2, 3],
        representation_size=256,
        note="tiny profile: random weights (seed %d), for tests and the demo only" % seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_architecture(config)
        # torchvision initialises the RPN head with std 0.01, which makes every objectness
        # score nearly equal, so float noise of about 1e-10 can reorder proposals.
        # Scale-preserving (He) initialisation spreads the scores apart.
        for layer in model.rpn.head.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        # Likewise the classifier: with std 1 its logits differ between regions by about one
        # unit, so region scores and object ids vary instead of being one near-uniform value.
        nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=1.0)
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(folder / WEIGHTS_FILE, buffer.getvalue())
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=1, sort_keys=True) + "\n")
    return folder


def grid_boxes(width: float, height: float, levels: list[int]) -> torch.Tensor:
    """Return boxes [sum(n*n), 4] tiling the image on an n x n grid for each n in ``levels``."""
    boxes = []
    for n in levels:
        for row in range(n):
            for col in range(n):
                boxes.append([col * width / n, row * height / n, (col + 1) * width / n, (row + 1) * height / n])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


class TorchvisionBackend(RegionBackend):
    """Regions from a torchvision FasterRCNN; see the module docstring for the selection rule."""

    name = "torchvision"
    has_attributes = False
    needs_pixels = True

    def __init__(
        self,
        weights: str | Path,
        architecture: str | None = None,
        device: str = "cpu",
        overrides: dict[str, Any] | None = None,
    ):
        config, state = load_detector_weights(weights, architecture)
        config.update({key: value for key, value in (overrides or {}).items() if value is not None})
        self.config = config
        self.weights = str(weights)
        model = build_architecture(config)
        hint = "set the architecture (and num_classes) that the weights were trained with"
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensor shapes differ
            first_line = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise ValueError(
                f"{weights}: weights do not fit architecture {config['architecture']!r} ({first_line}); {hint}"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"{weights}: weights do not fit architecture {config['architecture']!r} "
                f"(missing {len(missing)} keys such as {missing[:3]}, unexpected {len(unexpected)} such as {unexpected[:3]}); {hint}"
            )
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.feature_dim = box_head_dim(model)
        self.grid_levels = [int(n) for n in config.get("grid_levels") or []]
        self.n_grid = sum(n * n for n in self.grid_levels)
        if self.n_grid > N_REGIONS:
            raise ValueError(f"grid_levels {self.grid_levels} give {self.n_grid} regions, more than {N_REGIONS}")

    def describe(self) -> dict[str, Any]:
        settings = {key: self.config[key] for key in DEFAULT_DETECTOR_CONFIG}
        return {"backend": self.name, "weights": self.weights, "feature_dim": self.feature_dim, **settings}

    def _network_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Return the resized, normalised float input [3, h, w] for uint8 RGB ``pixels``."""
        transform = self.model.transform
        image = pixels.to(self.device, non_blocking=True).float().div_(255.0)  # (3, H, W)
        # Resizing before normalising gives the same result as torchvision's order (both
        # steps are linear per channel) with far fewer pixels to normalise.
        resized, _ = transform.resize(image, None)  # (3, h, w)
        return transform.normalize(resized)

    @torch.inference_mode()
    def prepare(self, image: DecodedImage) -> DecodedImage:
        """Resize and normalise in the DataLoader worker when the network runs on the CPU."""
        if self.device.type == "cpu" and image.pixels is not None and image.network_input is None:
            image.network_input = self._network_input(image.pixels)
            image.pixels = None  # not needed any more; less to send between processes
        return image

    @torch.inference_mode()
    def extract(self, images: list[DecodedImage]) -> list[RegionFeatures]:
        transform = self.model.transform
        prepared = []
        for image in images:
            if image.network_input is not None:
                prepared.append(image.network_input.to(self.device))
            elif image.pixels is not None:
                prepared.append(self._network_input(image.pixels))
            else:
                raise ValueError(f"image {image.key}: the torchvision backend needs pixels")

        # Group by padded size so that padding, and hence the network input, never depends
        # on which other images share the batch.
        groups: dict[tuple[int, int], list[int]] = {}
        for index, tensor in enumerate(prepared):
            height, width = tensor.shape[-2:]
            groups.setdefault(padded_size(height, width, transform.size_divisible), []).append(index)

        results: list[RegionFeatures | None] = [None] * len(images)
        for indexes in groups.values():
            group = [prepared[i] for i in indexes]
            for index, features in zip(indexes, self._forward_group(group, [images[i] for i in indexes])):
                results[index] = features
        return results  # type: ignore[return-value]

    def _forward_group(self, tensors: list[torch.Tensor], images: list[DecodedImage]) -> list[RegionFeatures]:
        model = self.model
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        batch = model.transform.batch_images(tensors, size_divisible=model.transform.size_divisible)  # (B, 3, H, W)
        feature_maps = model.backbone(batch)  # the costly part, batched
        if isinstance(feature_maps, torch.Tensor):
            feature_maps = {"0": feature_maps}

        # The RPN and box heads run per image, so an image's regions do not depend on its
        # batch mates. Batched, their convolutions may pick other kernels, and rounding
        # differences of about 1e-9 then reorder near-tied proposals.
        outputs = []
        for index, (image, size) in enumerate(zip(images, sizes)):
            maps = {name: level[index : index + 1] for name, level in feature_maps.items()}
            proposals, _ = model.rpn(ImageList(batch[index : index + 1], [size]), maps)
            grid = grid_boxes(size[1], size[0], self.grid_levels).to(self.device)
            rois = torch.cat([grid, proposals[0]])  # (R, 4), grid boxes first
            pooled = model.roi_heads.box_roi_pool(maps, [rois], [size])
            representation = model.roi_heads.box_head(pooled)  # (R, D)
            class_logits, box_deltas = model.roi_heads.box_predictor(representation)
            regressed = model.roi_heads.box_coder.decode(box_deltas, [rois])  # (R, C, 4)
            probabilities = torch.softmax(class_logits, dim=-1)
            outputs.append(self._select(image, size, rois, representation, probabilities, regressed))
        return outputs

    def _select(
        self,
        image: DecodedImage,
        size: tuple[int, int],
        rois: torch.Tensor,
        representation: torch.Tensor,
        probs: torch.Tensor,
        class_boxes: torch.Tensor,
    ) -> RegionFeatures:
        """Pick the regions of one image: grid boxes first, then the top detections."""
        n_grid = self.n_grid
        scores, labels = probs[:, 1:].max(dim=1)  # best non-background class per RoI
        labels = labels + 1
        boxes = class_boxes[torch.arange(len(labels), device=labels.device), labels]  # (R, 4)
        boxes = clip_boxes_to_image(boxes, size)
        boxes[:n_grid] = rois[:n_grid]  # grid regions keep their fixed boxes

        chosen = choose_regions(
            boxes[n_grid:],
            scores[n_grid:],
            labels[n_grid:],
            nms_thresh=float(self.config["nms_thresh"]),
            score_thresh=float(self.config["score_thresh"]),
            min_regions=int(self.config["min_regions"]),
            max_regions=N_REGIONS - n_grid,
        )
        chosen = chosen + n_grid
        chosen = torch.cat([torch.arange(n_grid, device=rois.device), chosen])

        # Map boxes from the resized input back to the upright image.
        height, width = size
        scale = torch.tensor(
            [image.width / width, image.height / height, image.width / width, image.height / height],
            device=boxes.device,
        )
        final_boxes = boxes[chosen] * scale
        final_boxes[:, 0::2] = final_boxes[:, 0::2].clamp(0, image.width)
        final_boxes[:, 1::2] = final_boxes[:, 1::2].clamp(0, image.height)
        return pad_regions(
            roi_features=representation[chosen].float().cpu().numpy(),
            boxes=final_boxes.float().cpu().numpy(),
            obj_ids=labels[chosen].cpu().numpy().astype(np.int64),
            obj_probs=scores[chosen].float().cpu().numpy(),
            width=image.width,
            height=image.height,
        )

