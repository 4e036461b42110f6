"""The Arrow IPC feature store: round trips, dtypes, later writes winning, index rebuilds."""

from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from model.feature_store import FeatureStore, FeatureStoreError


def record(key: str, value: float, n: int = 3) -> dict:
    return {
        "key": key,
        "features": np.full((n, 4), value, dtype=np.float32),
        "ids": np.arange(n, dtype=np.int64) + int(value),
        "count": n,
        "label": f"item {key}",
    }


def test_round_trip(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0), record("b", 2.0)])
    assert store.keys() == ["a", "b"]
    assert "a" in store
    assert "c" not in store
    assert len(store) == 2
    item = store.get("b")
    assert item["features"].dtype == np.dtype("<f4")
    assert item["features"].shape == (3, 4)
    assert np.all(item["features"] == 2.0)
    assert item["ids"].tolist() == [2, 3, 4]
    assert item["count"] == 3
    assert item["label"] == "item b"


def test_schema_is_explicit_little_endian(tmp_path):
    store = FeatureStore(tmp_path / "store")
    big_endian = np.arange(6, dtype=">f4").reshape(3, 2)
    store.write([{"key": "x", "values": big_endian, "flag": np.bool_(True), "small": np.uint8(7)}])
    schema = json.loads((tmp_path / "store" / "schema.json").read_text())["fields"]
    assert schema["values"] == {"dtype": "<f4", "shape": [3, 2]}
    assert schema["flag"]["dtype"] == "|b1"
    assert schema["small"]["dtype"] == "|u1"
    reopened = FeatureStore(tmp_path / "store")
    assert np.array_equal(reopened.get("x")["values"], big_endian.astype("<f4"))
    assert reopened.get("x")["flag"] is True
    # The raw bytes in the shard are little-endian.
    shard = next((tmp_path / "store" / "shards").glob("*.arrow"))
    with pa.memory_map(str(shard)) as source:
        column = ipc.open_file(source).read_all().column("values").chunk(0)
    raw = column.values.buffers()[1].to_pybytes()[: 6 * 4]
    assert raw == np.arange(6, dtype="<f4").tobytes()


def test_later_write_wins(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0), record("b", 2.0)])
    store.write([record("a", 9.0)])
    assert float(store.get("a")["features"][0, 0]) == 9.0
    assert float(store.get("b")["features"][0, 0]) == 2.0
    assert float(FeatureStore(tmp_path / "store").get("a")["features"][0, 0]) == 9.0


def test_duplicate_key_in_one_write(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0), record("a", 5.0)])
    assert float(store.get("a")["features"][0, 0]) == 5.0
    assert len(store) == 1


def test_shape_mismatch_names_key_and_field(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0)])
    with pytest.raises(FeatureStoreError, match=r"record 'b': field 'features' has dtype <f4 shape \(5, 4\)"):
        store.write([record("b", 1.0, n=5)])
    assert store.keys() == ["a"]


def test_missing_field_rejected(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0)])
    bad = record("b", 1.0)
    del bad["label"]
    with pytest.raises(FeatureStoreError, match=r"record 'b': fields differ .*missing \['label'\]"):
        store.write([bad])


def test_bad_key_rejected(tmp_path):
    store = FeatureStore(tmp_path / "store")
    with pytest.raises(FeatureStoreError, match="non-empty string 'key'"):
        store.write([{"key": "", "x": 1}])


def test_object_field_rejected(tmp_path):
    store = FeatureStore(tmp_path / "store")
    with pytest.raises(FeatureStoreError, match="field 'x' has dtype object"):
        store.write([{"key": "a", "x": np.array([{"a": 1}], dtype=object)}])


def test_unknown_key(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0)])
    with pytest.raises(KeyError, match="key 'zz' not found in feature store"):
        store.get("zz")


def test_empty_store(tmp_path):
    store = FeatureStore(tmp_path / "nothing")
    assert store.keys() == []
    assert store.schema == {}
    assert store.write([]) is None


def test_arrays_are_read_only(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0)])
    with pytest.raises(ValueError):
        store.get("a")["features"][0, 0] = 3.0


def test_get_batch(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0), record("b", 2.0)])
    batch = store.get_batch(["b", "a"])
    assert batch["features"].shape == (2, 3, 4)
    assert batch["features"][:, 0, 0].tolist() == [2.0, 1.0]
    assert batch["count"].tolist() == [3, 3]
    assert batch["label"].tolist() == ["item b", "item a"]


def test_pickle_reopens(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0)])
    copy = pickle.loads(pickle.dumps(store))
    assert float(copy.get("a")["features"][0, 0]) == 1.0


def test_stale_index_rebuilt(tmp_path):
    folder = tmp_path / "store"
    FeatureStore(folder).write([record("a", 1.0)])
    index = (folder / "index.arrow").read_bytes()
    FeatureStore(folder).write([record("b", 2.0)])
    (folder / "index.arrow").write_bytes(index)  # an index that misses the second shard
    assert FeatureStore(folder).keys() == ["a", "b"]
    (folder / "index.arrow").write_bytes(b"garbage")
    assert FeatureStore(folder).keys() == ["a", "b"]
    (folder / "index.arrow").unlink()
    assert float(FeatureStore(folder).get("b")["features"][0, 0]) == 2.0


def test_refresh_sees_other_writers(tmp_path):
    reader = FeatureStore(tmp_path / "store")
    assert reader.keys() == []  # opens the store
    FeatureStore(tmp_path / "store").write([record("a", 1.0)])
    assert "a" not in reader
    reader.refresh()
    assert "a" in reader


def test_compact_keeps_latest(tmp_path):
    store = FeatureStore(tmp_path / "store")
    store.write([record("a", 1.0), record("b", 2.0)])
    store.write([record("a", 3.0)])
    store.write([record("c", 4.0)])
    store.compact()
    shards = list((tmp_path / "store" / "shards").glob("*.arrow"))
    assert len(shards) == 1
    reopened = FeatureStore(tmp_path / "store")
    assert reopened.keys() == ["a", "b", "c"]
    assert [float(reopened.get(k)["features"][0, 0]) for k in "abc"] == [3.0, 2.0, 4.0]


def test_concurrent_writers(tmp_path):
    folder = tmp_path / "store"
    errors = []

    def writer(prefix: str) -> None:
        try:
            for i in range(5):
                FeatureStore(folder).write([record(f"{prefix}{i}", float(i))])
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(p,)) for p in "xy"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = FeatureStore(folder)
    assert len(store) == 10
    assert len(list((folder / "shards").glob("*.arrow"))) == 10


def test_damaged_shard_named(tmp_path):
    folder = tmp_path / "store"
    FeatureStore(folder).write([record("a", 1.0)])
    shard = next((folder / "shards").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(FeatureStoreError, match=f"{shard.name}: unreadable feature store shard"):
        FeatureStore(folder).keys()
