"""MTCNN + FaceNet extraction on real photos, the feature store records and the reader."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.demo_corpus import Scene, ShapeGroup, draw_scene
from model.faces import (
    EMBEDDING_SIZE,
    FaceConfig,
    FaceExtractor,
    FaceFeatureReader,
    FaceNetWeightsNotFoundError,
    extract_face_features,
    face_store,
    load_facenet,
    original_json,
    read_original_json,
    resolve_facenet_weights,
)
from model.image_io import load_image

REPO = Path(__file__).resolve().parents[1]

# newsimages-2025 photos (460x259) and what MTCNN with the default settings finds in them.
FOUR_FACES = "0016AB727ED58EC496D107D6D4EFB9B7"
TWO_FACES = "00701358E67D2970B2227DCF67886EAB"
ONE_LARGE_FACE = "05F1409F8910483729B83D645D89679D"
NO_FACE = "001A69D51E2C3F96D6AB808E3BD10C5B"


@pytest.fixture(scope="module")
def photos(shared_data) -> Path:
    folder = shared_data / "newsimages-2025" / "images"
    if not folder.is_dir():
        pytest.skip(f"newsimages-2025 photos not found at {folder}")
    return folder


@pytest.fixture(scope="module")
def extractor(tiny_facenet_file) -> FaceExtractor:
    torch.set_num_threads(1)
    facenet, facenet_id = load_facenet(tiny_facenet_file)
    return FaceExtractor(FaceConfig(), facenet, facenet_id)


def _photo(photos: Path, key: str) -> Image.Image:
    return load_image(photos / f"{key}.jpg").image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_real_photos_faces_found(extractor, photos):
    expected = {FOUR_FACES: 4, TWO_FACES: 2, ONE_LARGE_FACE: 1}

    for key, count in expected.items():
        image = _photo(photos, key)
        result = extractor.process([image])[0]

        assert result.n_faces == count, key
        assert result.n_detected == count, key
        assert result.embeddings.shape == (count, EMBEDDING_SIZE)
        assert result.embeddings.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-4)
        assert np.all(result.detect_probs >= 0.7), key
        areas = (result.boxes[:, 2] - result.boxes[:, 0]) * (result.boxes[:, 3] - result.boxes[:, 1])
        assert np.all(np.diff(areas) <= 0), f"{key}: faces not largest first: {areas}"
        assert (result.width, result.height) == image.size


def test_no_face_photo_gives_zero_faces(extractor, photos):
    result = extractor.process([_photo(photos, NO_FACE)])[0]

    assert result.n_faces == 0
    assert result.embeddings.shape == (0, EMBEDDING_SIZE)
    record = result.to_record(NO_FACE, 10, extractor.model_id)
    assert record["embeddings"].shape == (10, EMBEDDING_SIZE)
    assert not record["embeddings"].any()
    assert record["n_faces"] == 0


def test_drawn_demo_image_gives_zero_faces(extractor):
    scene = Scene(place="Lindenfeld", person="Mayor Alda Brenner", groups=(ShapeGroup(2, "red", "circle", "left"),))
    import random

    result = extractor.process([draw_scene(scene, random.Random(0))])[0]

    assert result.n_faces == 0


def test_max_faces_keeps_largest(tiny_facenet_file, photos):
    facenet, facenet_id = load_facenet(tiny_facenet_file)
    two = FaceExtractor(FaceConfig(max_faces=2), facenet, facenet_id)
    four = FaceExtractor(FaceConfig(), facenet, facenet_id)
    image = _photo(photos, FOUR_FACES)

    cut = two.process([image])[0]
    full = four.process([image])[0]

    assert cut.n_faces == 2
    assert cut.n_detected == 4
    np.testing.assert_array_equal(cut.boxes, full.boxes[:2])


def test_batch_equals_single(extractor, photos):
    keys = [NO_FACE, FOUR_FACES, NO_FACE, TWO_FACES, ONE_LARGE_FACE]
    images = [_photo(photos, key) for key in keys]

    batched = extractor.process(images)
    single = [extractor.process([image])[0] for image in images]

    for key, alone, in_batch in zip(keys, single, batched):
        assert alone.n_faces == in_batch.n_faces, key
        assert alone.n_detected == in_batch.n_detected, key
        np.testing.assert_array_equal(alone.boxes, in_batch.boxes)
        np.testing.assert_array_equal(alone.detect_probs, in_batch.detect_probs)
        # FaceNet runs on a different number of faces per pass, so float sums may differ slightly.
        np.testing.assert_allclose(alone.embeddings, in_batch.embeddings, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK"])
def test_colour_modes_through_image_io(extractor, photos, tmp_path, mode):
    rgb = _photo(photos, ONE_LARGE_FACE)
    reference = extractor.process([rgb])[0]
    path = tmp_path / ("face.jpg" if mode == "CMYK" else "face.png")
    rgb.convert(mode).save(path)

    loaded = load_image(path)
    result = extractor.process([loaded.image])[0]

    assert loaded.source_mode == mode
    assert result.n_faces >= 1, f"no face found in the {mode} image"
    assert _iou(result.boxes[0], reference.boxes[0]) > 0.7


def test_exif_orientation_applied(extractor, photos, tmp_path):
    upright = _photo(photos, TWO_FACES)
    reference = extractor.process([upright])[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate the stored pixels 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif)

    loaded = load_image(tmp_path / "rotated.png")
    result = extractor.process([loaded.image])[0]

    assert (loaded.width, loaded.height) == upright.size
    assert result.n_faces == reference.n_faces
    np.testing.assert_allclose(result.boxes, reference.boxes, atol=1e-3)


def _items(photos: Path, keys: list[str]) -> list[tuple[str, Path]]:
    return [(key, photos / f"{key}.jpg") for key in keys]


def test_store_records_and_reader(extractor, photos, tmp_path):
    face_root = tmp_path / "ds" / "face_features"
    keys = [FOUR_FACES, NO_FACE, TWO_FACES]

    report = extract_face_features(_items(photos, keys), face_root, FaceConfig(images_per_write=2), extractor)
    reader = FaceFeatureReader(tmp_path / "ds")

    assert sorted(report.done) == sorted(keys)
    assert report.computed == 3
    assert report.with_faces == 2
    assert report.faces == 6
    assert dict(report.faces_per_image) == {0: 1, 2: 1, 4: 1}
    assert len(list((face_root / "store" / "shards").iterdir())) == 2
    item = reader.get(FOUR_FACES)
    assert item["embeddings"].shape == (10, EMBEDDING_SIZE)
    assert item["embeddings"].dtype == np.float32
    assert item["mask"].tolist() == [True] * 4 + [False] * 6
    assert item["n_faces"] == 4
    assert item["detect_probs"].shape == (10,)
    assert not item["embeddings"][4:].any()
    assert NO_FACE in reader
    assert reader.get(NO_FACE)["n_faces"] == 0
    assert "0" * 32 not in reader


def test_rerun_skips_stored_images(extractor, photos, tmp_path):
    face_root = tmp_path / "face_features"
    extract_face_features(_items(photos, [FOUR_FACES]), face_root, FaceConfig(), extractor)

    report = extract_face_features(_items(photos, [FOUR_FACES, NO_FACE]), face_root, FaceConfig(), extractor)

    assert report.resumed == 1
    assert report.computed == 1
    assert len(report.done) == 2


def test_loader_workers_match_in_process(extractor, photos, tmp_path):
    keys = [FOUR_FACES, NO_FACE, TWO_FACES]

    in_process = extract_face_features(_items(photos, keys), tmp_path / "a", FaceConfig(), extractor)
    in_workers = extract_face_features(_items(photos, keys), tmp_path / "b", FaceConfig(loader_workers=1), extractor)
    stored_a, stored_b = _store_arrays(tmp_path / "a"), _store_arrays(tmp_path / "b")

    assert in_workers.done == in_process.done
    for key in keys:
        np.testing.assert_array_equal(stored_a[key]["boxes"], stored_b[key]["boxes"])
        np.testing.assert_array_equal(stored_a[key]["n_faces"], stored_b[key]["n_faces"])
        np.testing.assert_allclose(stored_a[key]["embeddings"], stored_b[key]["embeddings"], atol=1e-5)


def test_undecodable_image_is_a_failure(extractor, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"<html><body>not found</body></html>")
    items = [("broken", broken)] + _items(photos, [TWO_FACES])

    report = extract_face_features(items, tmp_path / "face_features", FaceConfig(), extractor)

    assert report.done == [TWO_FACES]
    assert [key for key, _ in report.failures] == ["broken"]
    assert "HTML" in report.failures[0][1]


def test_facenet_details_used_instead_of_computing(photos, tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(3, EMBEDDING_SIZE)).astype(np.float32)
    details = {"n_faces": 3, "embeddings": embeddings.tolist(), "detect_probs": [0.99, 0.98, 0.97]}

    def no_extractor():
        raise AssertionError("faces were computed although the document carries them")

    report = extract_face_features(
        _items(photos, [FOUR_FACES]), tmp_path / "ds" / "face_features", FaceConfig(), no_extractor,
        document_faces={FOUR_FACES: details},
    )
    item = FaceFeatureReader(tmp_path / "ds").get(FOUR_FACES)

    assert report.from_documents == 1
    assert report.computed == 0
    assert item["n_faces"] == 3
    np.testing.assert_array_equal(item["embeddings"][:3], embeddings)
    np.testing.assert_allclose(item["detect_probs"][:3], [0.99, 0.98, 0.97], rtol=1e-6)
    assert face_store(tmp_path / "ds" / "face_features").get(FOUR_FACES)["model_id"] == "document"


def test_invalid_facenet_details_are_computed(extractor, photos, tmp_path):
    details = {"n_faces": 2, "embeddings": [[0.0] * 100], "detect_probs": [0.9]}

    report = extract_face_features(
        _items(photos, [TWO_FACES]), tmp_path / "face_features", FaceConfig(), extractor,
        document_faces={TWO_FACES: details},
    )

    assert report.computed == 1
    assert len(report.invalid_document_faces) == 1
    assert "shape" in report.invalid_document_faces[0]


def test_original_json_round_trip(extractor, photos, tmp_path):
    face_root = tmp_path / "ds" / "face_features"
    extract_face_features(_items(photos, [TWO_FACES]), face_root, FaceConfig(), extractor, write_json=True)
    stored = face_store(face_root).get(TWO_FACES)
    content = json.loads((face_root / "json" / f"{TWO_FACES}.json").read_text())

    raw = np.frombuffer(base64.b64decode(content["faces_embeddings"]), "<f8").reshape(content["faces_size"], -1)
    parsed = read_original_json(content)
    (face_root / "store").rename(tmp_path / "moved_store")  # the reader falls back to the JSON
    item = FaceFeatureReader(tmp_path / "ds").get(TWO_FACES)

    assert content["n_faces"] == 2
    assert content["faces_size"] == 2
    np.testing.assert_allclose(raw, stored["embeddings"][:2], rtol=1e-7)
    np.testing.assert_allclose(parsed.embeddings, stored["embeddings"][:2], rtol=1e-7)
    assert item["n_faces"] == 2
    np.testing.assert_allclose(item["boxes"][:2], stored["boxes"][:2])
    float32_json = original_json(parsed, "float32")
    np.testing.assert_array_equal(read_original_json(float32_json).embeddings, parsed.embeddings)


def test_missing_vggface2_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    with pytest.raises(FaceNetWeightsNotFoundError, match="facenet_weights") as raised:
        resolve_facenet_weights(None, "base", tmp_path)

    assert "20180402-114759-vggface2.pt" in str(raised.value)
    assert not (tmp_path / "models").exists()


def test_missing_weights_file_names_the_setting(tmp_path):
    with pytest.raises(FaceNetWeightsNotFoundError, match="facenet_weights"):
        resolve_facenet_weights(str(tmp_path / "nowhere.pt"), "base", tmp_path)


def test_weights_folder_and_cache_resolve(tiny_facenet_file, tmp_path, monkeypatch):
    cache = tmp_path / "torch_home" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "20180402-114759-vggface2.pt").symlink_to(tiny_facenet_file)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    assert resolve_facenet_weights("vggface2", "base", None) == cache / "20180402-114759-vggface2.pt"
    assert resolve_facenet_weights(str(tiny_facenet_file.parent), "base", None) == tiny_facenet_file


def test_published_file_with_logits_loads(tiny_facenet_file, tmp_path):
    state = torch.load(tiny_facenet_file, weights_only=True)
    state["logits.weight"] = torch.zeros(8631, 512)
    state["logits.bias"] = torch.zeros(8631)
    torch.save(state, tmp_path / "with_logits.pt")

    network, weights_id = load_facenet(tmp_path / "with_logits.pt")

    assert not hasattr(network, "logits")
    assert weights_id.startswith("facenet:")


def test_tiny_weights_built_once_and_seeded(tmp_path):
    first = resolve_facenet_weights(None, "tiny", tmp_path / "a")
    second = resolve_facenet_weights(None, "tiny", tmp_path / "b")
    mtime = first.stat().st_mtime_ns

    again = resolve_facenet_weights(None, "tiny", tmp_path / "a")

    assert first == tmp_path / "a" / "models" / "tiny" / "facenet" / "facenet.pt"
    assert again.stat().st_mtime_ns == mtime
    assert load_facenet(first)[1] == load_facenet(second)[1]


def _run_cli(args: list[str], **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "model.faces", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, **popen,
    )


def _summary_of(process: subprocess.Popen) -> dict:
    """The JSON summary the CLI prints after its progress lines."""
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    return json.loads(output[output.index("\n{") + 1 :])


def _store_arrays(face_root: Path) -> dict[str, dict]:
    store = face_store(face_root)
    return {key: {name: np.array(value) for name, value in store.get(key).items()} for key in store.keys()}


def test_killed_run_resumes_without_redoing(photos, tmp_path, link_tiny_facenet):
    link_tiny_facenet(tmp_path)
    common = ["--profile", "tiny", "--data-root", str(tmp_path), "--limit", "12", "--images-per-write", "2", "--threads", "1"]
    killed_out = tmp_path / "killed" / "face_features"
    clean_out = tmp_path / "clean" / "face_features"

    process = _run_cli([str(photos), str(killed_out), *common])
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if line.startswith("progress ") and int(line.split()[1].split("/")[0]) >= 4:
            process.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "the face CLI reported no progress in 120 s"
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    shards_before = {path.name: path.read_bytes() for path in (killed_out / "store" / "shards").iterdir()}
    finished_before = len(face_store(killed_out))

    resumed = _run_cli([str(photos), str(killed_out), *common])
    resumed_summary = _summary_of(resumed)
    clean_summary = _summary_of(_run_cli([str(photos), str(clean_out), *common]))

    assert 4 <= finished_before < 12
    assert resumed_summary["resumed"] == finished_before
    assert resumed_summary["computed"] == 12 - finished_before
    for name, data in shards_before.items():
        assert (killed_out / "store" / "shards" / name).read_bytes() == data, f"shard {name} was rewritten"
    killed, uninterrupted = _store_arrays(killed_out), _store_arrays(clean_out)
    assert sorted(killed) == sorted(uninterrupted)
    assert clean_summary["images"] == 12
    for key in uninterrupted:
        for name in ("n_faces", "n_detected", "boxes", "detect_probs", "model_id"):
            np.testing.assert_array_equal(killed[key][name], uninterrupted[key][name], err_msg=f"{key} {name}")
        np.testing.assert_allclose(killed[key]["embeddings"], uninterrupted[key]["embeddings"], atol=1e-5)
