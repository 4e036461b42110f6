"""Region features: the tiny torchvision backend, batching, padding, failures, JSON layout, resuming."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.demo_corpus import generate_demo_corpus
from model.detectors.base import N_REGIONS, DecodedImage, RegionFeatures, pad_regions
from model.detectors.torchvision_frcnn import TorchvisionBackend, build_tiny_detector
from model.feature_store import FeatureStore
from model.image_io import load_image, to_tensor_uint8
from model.region_json import (
    RegionJsonError,
    json_folder_to_store,
    parse_region_json,
    read_region_json,
    region_json_bytes,
    store_to_json_folder,
    write_region_json,
)
from model.regions import (
    BackendSettings,
    ExtractorMismatchError,
    RegionFeatureReader,
    build_backend,
    check_extractor,
    extract_regions,
    extractor_identity,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_detector(tmp_path_factory.mktemp("models") / "frcnn")


@pytest.fixture(scope="module")
def backend(tiny_dir) -> TorchvisionBackend:
    return TorchvisionBackend(tiny_dir)


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory) -> dict[str, Path]:
    """Eight demo scenes as JPEG files, plus two resized copies of different sizes."""
    folder = tmp_path_factory.mktemp("demo_images")
    corpus = generate_demo_corpus(n_articles=5, seed=3)
    paths = {}
    for image_hash, data in sorted(corpus.images.items())[:8]:
        path = folder / f"{image_hash}.jpg"
        path.write_bytes(data)
        paths[image_hash] = path
    first = next(iter(paths.values()))
    for name, size in (("tall", (180, 260)), ("wide", (400, 200))):
        path = folder / f"{name}.jpg"
        Image.open(first).resize(size).save(path, quality=90)
        paths[name] = path
    return paths


def decoded(path: Path, key: str) -> DecodedImage:
    loaded = load_image(path)
    return DecodedImage(key, to_tensor_uint8(loaded.image), loaded.width, loaded.height)


def assert_same_regions(a: RegionFeatures, b: RegionFeatures, atol: float = 1e-4) -> None:
    assert a.n_regions == b.n_regions
    np.testing.assert_allclose(a.roi_features, b.roi_features, atol=atol)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=atol)
    np.testing.assert_allclose(a.normalized_boxes, b.normalized_boxes, atol=1e-5)
    assert a.obj_ids.tolist() == b.obj_ids.tolist()
    np.testing.assert_allclose(a.obj_probs, b.obj_probs, atol=1e-5)


# -- the tiny torchvision backend ----------------------------------------------------------


def test_batched_equals_one_at_a_time(backend, demo_images):
    images = [decoded(path, key) for key, path in demo_images.items()]
    batched = backend.extract(images)
    for image, together in zip(images, batched):
        alone = backend.extract([image])[0]
        assert_same_regions(together, alone)


def test_regions_shapes_and_boxes(backend, demo_images):
    image = decoded(demo_images["wide"], "wide")
    regions = backend.extract([image])[0]
    assert regions.roi_features.shape == (N_REGIONS, backend.feature_dim)
    assert regions.roi_features.dtype == np.float32
    assert regions.obj_ids.dtype == np.int64
    assert (regions.image_width, regions.image_height) == (400, 200)
    assert regions.n_regions == N_REGIONS
    assert regions.boxes[:, 0::2].max() <= 400 + 1e-3
    assert regions.boxes[:, 1::2].max() <= 200 + 1e-3
    assert np.all(regions.normalized_boxes >= 0)
    assert np.all(regions.normalized_boxes <= 1)
    np.testing.assert_allclose(regions.normalized_boxes * [400, 200, 400, 200], regions.boxes, rtol=1e-5, atol=1e-3)
    assert np.all(regions.attr_ids == -1)
    assert np.all(regions.attr_probs == 0)
    # The first region is the whole image (the tiny profile's 1x1 grid).
    np.testing.assert_allclose(regions.boxes[0], [0, 0, 400, 200], atol=1e-3)


def test_tiny_features_carry_content(backend, demo_images):
    keys = [key for key in demo_images if key not in ("tall", "wide")]
    first, second = (decoded(demo_images[key], key) for key in keys[:2])
    a1, a2, b = backend.extract([first])[0], backend.extract([first])[0], backend.extract([second])[0]
    assert np.array_equal(a1.roi_features, a2.roi_features)  # deterministic
    difference = np.linalg.norm(a1.roi_features - b.roi_features) / np.linalg.norm(a1.roi_features)
    assert difference > 0.05, f"features of two different scenes differ by only {difference:.3f}"
    distinct_boxes = {tuple(np.round(box, 1)) for box in a1.boxes[: a1.n_regions]}
    assert len(distinct_boxes) >= 30, "the boxes of one image are nearly all identical"
    # Region features differ within one image too: regions over different content.
    per_region = a1.roi_features[: a1.n_regions]
    assert np.linalg.matrix_rank(per_region, tol=1e-3) > 10


def test_fewer_detections_padded(tiny_dir, demo_images):
    sparse = TorchvisionBackend(tiny_dir, overrides={"grid_levels": [], "score_thresh": 0.99, "min_regions": 5})
    regions = sparse.extract([decoded(demo_images["tall"], "tall")])[0]
    assert regions.n_regions == 5
    assert regions.roi_features.shape == (N_REGIONS, sparse.feature_dim)
    assert np.all(regions.roi_features[5:] == 0)
    assert np.all(regions.boxes[5:] == 0)
    assert np.all(regions.normalized_boxes[5:] == 0)
    assert np.all(regions.obj_ids[5:] == -1)
    assert np.all(regions.obj_probs[5:] == 0)
    assert np.any(regions.roi_features[:5] != 0)


def test_pad_regions_rejects_too_many():
    with pytest.raises(ValueError, match="40 regions given, at most 36 fit"):
        pad_regions(np.zeros((40, 8)), np.zeros((40, 4)), np.zeros(40, int), np.zeros(40), 10, 10)


def test_base_profile_needs_weights():
    with pytest.raises(ValueError, match="no Faster R-CNN weights configured: set the region_features 'weights' setting"):
        build_backend(BackendSettings(backend="torchvision", profile="base"))


def test_missing_weights_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth not found"):
        build_backend(BackendSettings(weights=str(tmp_path / "absent.pth")))


def test_bare_state_dict_file(tiny_dir, tmp_path, demo_images):
    state_file = tmp_path / "tiny.pth"
    state_file.write_bytes((tiny_dir / "model.pt").read_bytes())
    config = json.loads((tiny_dir / "config.json").read_text())
    overrides = {key: value for key, value in config.items() if key not in ("architecture", "note")}
    from_file = TorchvisionBackend(state_file, architecture="tiny_convnet", overrides=overrides)
    from_folder = TorchvisionBackend(tiny_dir)
    image = decoded(demo_images["wide"], "wide")
    assert_same_regions(from_file.extract([image])[0], from_folder.extract([image])[0])
    with pytest.raises(ValueError, match="do not fit architecture 'fasterrcnn_mobilenet_v3_large_320_fpn'"):
        TorchvisionBackend(state_file, architecture="fasterrcnn_mobilenet_v3_large_320_fpn")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown region backend 'yolo'"):
        build_backend(BackendSettings(backend="yolo"))


@pytest.mark.parametrize("heads", ["fpn", "c4"])
def test_detectron2_backend(tmp_path, heads):
    pytest.importorskip("detectron2", reason="detectron2 is not installed; it installs only from its own source")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    # A small, randomly initialised model saved as a checkpoint, then loaded by the backend.
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18  # the smallest ResNet detectron2 builds
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # required for depths 18 and 34
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5
    if heads == "fpn":
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 128
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
        expected_dim = 128
    else:  # detectron2's default: ResNet C4 with res5 as the box head
        expected_dim = 512  # res5 channels of a ResNet-18
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 200
    config_file = tmp_path / "frcnn.yaml"
    config_file.write_text(cfg.dump())
    torch.manual_seed(0)
    model = build_model(cfg)
    # A random ResNet gives activations in the hundreds, which turn random box deltas into
    # degenerate boxes, so zero deltas keep each region at its proposal.
    torch.nn.init.zeros_(model.roi_heads.box_predictor.bbox_pred.weight)
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")

    backend = build_backend(
        BackendSettings(backend="detectron2", detectron2_config=str(config_file), weights=str(tmp_path / "model.pth"))
    )
    assert backend.feature_dim == expected_dim
    generator = torch.Generator().manual_seed(1)
    images = [
        DecodedImage(f"same-size-{i}", torch.randint(0, 255, (3, 120, 160), dtype=torch.uint8, generator=generator), 160, 120)
        for i in range(3)
    ]
    images.append(DecodedImage("other-size", torch.randint(0, 255, (3, 90, 170), dtype=torch.uint8, generator=generator), 170, 90))
    batched = backend.extract(images)
    for image, together in zip(images, batched):
        assert together.roi_features.shape == (N_REGIONS, expected_dim)
        assert together.n_regions >= 1
        assert np.all(together.boxes[: together.n_regions, 2] <= image.width + 1e-3)
        alone = backend.extract([image])[0]
        # detectron2's batched ResNet rounds differently from a single image. Random weights
        # amplify that into boxes a little apart, whose pooled features differ by up to 1%
        # in single elements, so features are compared by their relative distance.
        assert together.n_regions == alone.n_regions
        assert together.obj_ids.tolist() == alone.obj_ids.tolist()
        np.testing.assert_allclose(together.boxes, alone.boxes, rtol=1e-3, atol=1e-2)
        relative = np.linalg.norm(together.roi_features - alone.roi_features) / np.linalg.norm(alone.roi_features)
        assert relative < 1e-3, f"{image.key}: batched features differ by {relative:.2e} relative to single-image ones"


# -- the extraction loop ---------------------------------------------------------------------


def test_failures_recorded_and_run_goes_on(backend, demo_images, tmp_path):
    good = dict(list(demo_images.items())[:3])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(demo_images["wide"].read_bytes()[:600])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (2000, 2000), 0).save(bomb)
    html = tmp_path / "page.jpg"
    html.write_text("<html><body>gone</body></html>")
    items = {**good, "corrupt": corrupt, "empty": empty, "bomb": bomb, "html": html, "absent": tmp_path / "absent.jpg"}

    store = FeatureStore(tmp_path / "store")
    report = extract_regions(items, backend, store, batch_size=3, flush_every=2, max_pixels=1_000_000)
    assert sorted(report.done) == sorted(good)
    assert set(report.failed) == {"corrupt", "empty", "bomb", "html", "absent"}
    assert "truncated" in report.failed["corrupt"]
    assert "empty file (0 bytes)" in report.failed["empty"]
    assert "decompression bomb" in report.failed["bomb"]
    assert "HTML page" in report.failed["html"]
    assert "file not found" in report.failed["absent"]
    assert store.keys() == sorted(good)
    assert report.feature_dim == backend.feature_dim
    assert report.images_per_second > 0


def test_resume_skips_stored(backend, demo_images, tmp_path):
    keys = sorted(demo_images)
    store = FeatureStore(tmp_path / "store")
    json_dir = tmp_path / "json"
    first = extract_regions({k: demo_images[k] for k in keys[:4]}, backend, store, json_dir=json_dir, flush_every=2)
    assert sorted(first.done) == keys[:4]
    (json_dir / f"{keys[0]}.json").unlink()  # a lost JSON twin is rewritten from the store
    second = extract_regions({k: demo_images[k] for k in keys[:6]}, backend, store, json_dir=json_dir, flush_every=2)
    assert sorted(second.skipped) == keys[:4]
    assert sorted(second.done) == keys[4:6]
    assert (json_dir / f"{keys[0]}.json").exists()
    assert store.keys() == keys[:6]
    shards_before = len(list((tmp_path / "store" / "shards").iterdir()))
    third = extract_regions({k: demo_images[k] for k in keys[:6]}, backend, store, json_dir=json_dir)
    assert third.done == []
    assert len(list((tmp_path / "store" / "shards").iterdir())) == shards_before
    again = extract_regions({keys[0]: demo_images[keys[0]]}, backend, store, overwrite=True)
    assert again.done == [keys[0]]


SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from model.detectors.torchvision_frcnn import TorchvisionBackend
    from model.detectors.base import RegionBackend
    from model.feature_store import FeatureStore
    from model.regions import extract_regions

    tiny_dir, image_dir, out_dir = map(Path, sys.argv[1:4])

    class SlowBackend(RegionBackend):
        # Delays each batch so that the parent can kill the run halfway.
        def __init__(self, inner):
            self.inner, self.name, self.feature_dim = inner, inner.name, inner.feature_dim

        def extract(self, images):
            time.sleep(0.4)
            return self.inner.extract(images)

    items = {p.stem: p for p in sorted(image_dir.glob("*.jpg"))}
    backend = SlowBackend(TorchvisionBackend(tiny_dir))
    extract_regions(items, backend, FeatureStore(out_dir / "store"), json_dir=out_dir / "json", batch_size=1, flush_every=1)
    print("finished")
    """
)


def test_sigkill_then_rerun_equals_uninterrupted(tiny_dir, backend, demo_images, tmp_path):
    image_dir = demo_images["wide"].parent
    items = {p.stem: p for p in sorted(image_dir.glob("*.jpg"))}
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    killed_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, str(script), str(tiny_dir), str(image_dir), str(killed_dir)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    stored_before_kill: list[str] = []
    try:
        while time.monotonic() < deadline:
            stored_before_kill = FeatureStore(killed_dir / "store").keys() if (killed_dir / "store").exists() else []
            if len(stored_before_kill) >= 3 or process.poll() is not None:
                break
            time.sleep(0.05)
        assert process.poll() is None, f"the run ended before it could be killed: {process.communicate()}"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    stored_after_kill = FeatureStore(killed_dir / "store").keys()
    assert 3 <= len(stored_after_kill) < len(items)

    # Every file in place is complete: shards open, JSON files parse. Only hidden
    # temporary files may be left by the write that was interrupted.
    for path in (killed_dir / "json").iterdir():
        if path.name.startswith("."):
            assert path.name.endswith(".tmp")
            continue
        read_region_json(path)

    rerun = extract_regions(items, backend, FeatureStore(killed_dir / "store"), json_dir=killed_dir / "json")
    assert set(stored_after_kill) <= set(rerun.skipped)
    assert not set(stored_after_kill) & set(rerun.done)
    assert sorted(rerun.done + rerun.skipped) == sorted(items)

    reference_dir = tmp_path / "reference"
    extract_regions(items, backend, FeatureStore(reference_dir / "store"), json_dir=reference_dir / "json")
    resumed, reference = FeatureStore(killed_dir / "store"), FeatureStore(reference_dir / "store")
    assert resumed.keys() == reference.keys()
    for key in reference.keys():
        got, expected = resumed.get(key), reference.get(key)
        for field, value in expected.items():
            np.testing.assert_allclose(np.asarray(got[field]), np.asarray(value), atol=1e-5, err_msg=f"{key} {field}")
    json_names = sorted(p.name for p in (killed_dir / "json").iterdir() if not p.name.startswith("."))
    assert json_names == sorted(f"{key}.json" for key in items)


# -- the original JSON layout ------------------------------------------------------------------


def sample_regions(n_real: int = 30, dim: int = 8) -> RegionFeatures:
    rng = np.random.default_rng(0)
    boxes = np.sort(rng.uniform(0, 100, (n_real, 4)).astype(np.float32), axis=1)
    return pad_regions(
        roi_features=rng.normal(size=(n_real, dim)).astype(np.float32),
        boxes=boxes,
        obj_ids=rng.integers(0, 1600, n_real),
        obj_probs=rng.uniform(size=n_real).astype(np.float32),
        attr_ids=rng.integers(0, 400, n_real),
        attr_probs=rng.uniform(size=n_real).astype(np.float32),
        width=120,
        height=100,
    )


def test_json_round_trip_little_endian(tmp_path):
    regions = sample_regions()
    path = write_region_json(tmp_path, "abc", regions)
    assert path.name == "abc.json"
    content = json.loads(path.read_text())
    assert content["n_regions"] == 36
    assert content["n_real_regions"] == 30
    raw = base64.b64decode(content["roi_features"])
    assert raw == regions.roi_features.astype("<f4").tobytes()
    assert np.frombuffer(base64.b64decode(content["obj_ids"]), dtype="<i8").tolist() == regions.obj_ids.tolist()
    back = read_region_json(path)
    for name, value in regions.to_dict().items():
        assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(value)), name


def test_json_named_jpg_and_original_fields(tmp_path):
    """A file as the original scripts wrote it: .jpg name, 36 rows, no extra keys, count as text."""
    regions = sample_regions(n_real=36)
    content = json.loads(region_json_bytes(regions))
    for extra in ("n_real_regions", "image_width", "image_height"):
        del content[extra]
    content["n_regions"] = "36"
    content["roi_features"] = base64.encodebytes(regions.roi_features.tobytes()).decode()  # with line breaks
    (tmp_path / "hash1.jpg").write_text(json.dumps(content))
    reader = RegionFeatureReader(tmp_path / "dataset", json_dirs=[tmp_path])
    assert "hash1" in reader
    item = reader.get("hash1")
    assert item["n_regions"] == 36
    assert item["image_width"] == -1
    assert np.array_equal(item["roi_features"], regions.roi_features)
    assert np.array_equal(item["normalized_boxes"], regions.normalized_boxes)
    assert reader.feature_dim == 8


@pytest.mark.parametrize(
    "field, damage, message",
    [
        ("roi_features", lambda s: s[: len(s) // 2], "field 'roi_features' contains 576 bytes, expected 1152 for <f4 \\[36, 8\\]"),
        ("roi_features", lambda s: s[:-3], "field 'roi_features' is not valid base64"),
        ("boxes", lambda s: s[:-8], "field 'boxes'"),
        ("obj_ids", lambda s: base64.b64encode(np.zeros(36, "<i4").tobytes()).decode(), "field 'obj_ids' contains 144 bytes, expected 288"),
        ("obj_probs", lambda s: [0.5] * 36, "field 'obj_probs' must be a base64 string, found list"),
        ("attr_probs", lambda s: "not base64 at all!", "field 'attr_probs' is not valid base64"),
        ("n_regions", lambda s: "many", "field 'n_regions' must be a non-negative integer"),
    ],
)
def test_damaged_json_names_file_and_field(tmp_path, field, damage, message):
    content = json.loads(region_json_bytes(sample_regions()))
    content[field] = damage(content[field])
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(content))
    with pytest.raises(RegionJsonError, match=message) as raised:
        read_region_json(path)
    assert str(path) in str(raised.value)


def test_truncated_original_file_needs_dim(tmp_path):
    """Files of the original scripts carry no feature_dim, so a reader passes the one it expects."""
    content = json.loads(region_json_bytes(sample_regions()))
    del content["feature_dim"]
    content["roi_features"] = content["roi_features"][: len(content["roi_features"]) // 2]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(content))
    assert read_region_json(path).feature_dim == 4  # half of every row: undetectable alone
    with pytest.raises(RegionJsonError, match="old.json: field 'roi_features' contains 576 bytes, expected 1152"):
        read_region_json(path, feature_dim=8)


def test_json_missing_field_and_bad_file(tmp_path):
    content = json.loads(region_json_bytes(sample_regions()))
    del content["normalized_boxes"]
    with pytest.raises(RegionJsonError, match="x.json: required field 'normalized_boxes' is missing"):
        parse_region_json(content, "x.json")
    cut = tmp_path / "cut.json"
    cut.write_bytes(region_json_bytes(sample_regions())[:100])
    with pytest.raises(RegionJsonError, match="cut.json: not valid JSON"):
        read_region_json(cut)


def test_json_too_many_rows(tmp_path):
    regions = sample_regions(n_real=36)
    content = json.loads(region_json_bytes(regions))
    rows = np.concatenate([regions.roi_features, regions.roi_features[:4]])
    content.update(n_regions=40, n_real_regions=40, roi_features=base64.b64encode(rows.tobytes()).decode())
    with pytest.raises(RegionJsonError, match="40 regions stored, more than the 36"):
        parse_region_json(content, "big.json")


def test_converters_round_trip(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([sample_regions(n_real=k).to_record(f"h{k}") for k in (3, 20, 36)])
    assert store_to_json_folder(store, tmp_path / "json") == 3
    (tmp_path / "json" / "broken.json").write_text("{")
    copy = FeatureStore(tmp_path / "copy")
    report = json_folder_to_store(tmp_path / "json", copy)
    assert report["copied"] == 3
    assert list(report["failed"]) == ["broken"]
    for key in store.keys():
        for field, value in store.get(key).items():
            assert np.array_equal(np.asarray(copy.get(key)[field]), np.asarray(value)), (key, field)


def test_converter_command_line(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([sample_regions().to_record("h1")])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "model.region_json", "to-json", str(tmp_path / "store"), str(tmp_path / "json")],
        env=env, cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert "wrote 1 files" in done.stdout
    assert (tmp_path / "json" / "h1.json").exists()


# -- precomputed features, the reader, extractor identity ------------------------------------------


def test_precomputed_backend(backend, demo_images, tmp_path):
    keys = sorted(demo_images)[:3]
    original = tmp_path / "original"
    extracted = {}
    for key in keys:
        extracted[key] = backend.extract([decoded(demo_images[key], key)])[0]
        # The original README names the files <hash>.jpg.
        (original / f"{key}.jpg").parent.mkdir(exist_ok=True)
        (original / f"{key}.jpg").write_bytes(region_json_bytes(extracted[key]))
    precomputed = build_backend(BackendSettings(backend="precomputed", precomputed_dir=str(original)))
    assert precomputed.feature_dim == backend.feature_dim
    store = FeatureStore(tmp_path / "store")
    items = {key: demo_images[key] for key in keys}
    items["unknown"] = demo_images["wide"]
    report = extract_regions(items, precomputed, store)
    assert sorted(report.done) == keys
    assert "no unknown.json or unknown.jpg" in report.failed["unknown"]
    for key in keys:
        assert np.array_equal(store.get(key)["roi_features"], extracted[key].roi_features)


def test_reader_prefers_store(backend, demo_images, tmp_path):
    dataset_root = tmp_path / "newsimages"
    store = FeatureStore(dataset_root / "region_features" / "store")
    keys = sorted(demo_images)[:2]
    extract_regions({k: demo_images[k] for k in keys}, backend, store)
    extra = tmp_path / "extra"
    write_region_json(extra, "only-json", sample_regions(dim=backend.feature_dim))
    reader = RegionFeatureReader(dataset_root, json_dirs=[extra])
    assert reader.feature_dim == backend.feature_dim
    assert keys[0] in reader
    assert "only-json" in reader
    assert "nothing" not in reader
    item = reader.get(keys[0])
    assert item["roi_features"].shape == (36, backend.feature_dim)
    assert item["n_regions"] == 36
    assert reader.get("only-json")["n_regions"] == 30
    assert reader.keys() == sorted(keys + ["only-json"])
    with pytest.raises(KeyError, match="no region features for image 'nothing'"):
        reader.get("nothing")
    import pickle

    assert pickle.loads(pickle.dumps(reader)).get(keys[1])["n_regions"] == 36


def test_extractor_identity_guard(backend, tiny_dir, tmp_path):
    identity = extractor_identity(backend)
    assert set(identity["weights_sha256"]) == {"config.json", "model.pt"}
    check_extractor(tmp_path, identity)
    check_extractor(tmp_path, dict(identity, weights="/moved/elsewhere"))  # same files, other path
    with pytest.raises(ExtractorMismatchError, match="features of different extractors must not be mixed"):
        check_extractor(tmp_path, dict(identity, min_size=600))
