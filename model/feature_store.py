"""A fast on-disk store of per-item feature arrays: Arrow IPC shards read by memory map.

Region features and face features are stored this way so that a training data loader
reads an item with one dictionary lookup and a zero-copy slice of a memory-mapped file.

Layout of a store folder::

    <folder>/
      schema.json                 field names, dtypes and shapes, fixed by the first write
      shards/shard-000001.arrow   Arrow IPC files, one per write(); never modified
      index.arrow                 key -> (shard, row); a cache rebuilt from the shards
      .lock                       serialises writers (fcntl)

API::

    store = FeatureStore(folder)
    store.write([{"key": "abc", "roi_features": np.zeros((36, 2048), "float32"), "n_regions": 36}])
    "abc" in store; store.keys(); len(store)
    store.get("abc")          # {"roi_features": array (36, 2048) float32, "n_regions": 36}
    store.get_batch(["abc"])  # {"roi_features": array (1, 36, 2048), "n_regions": array (1,)}
    store.schema              # {"roi_features": FieldSpec(dtype="<f4", shape=(36, 2048)), ...}
    store.refresh()           # pick up shards written by other processes since opening

Rules:

- Each record is a dict with a ``"key"`` (non-empty string, for example an image hash) and
  the same set of fields. A field is a numpy array (or anything ``np.asarray`` accepts) of
  a numeric or bool dtype, or a Python ``str``. The first write fixes each field's dtype
  and shape for the whole store. A later record that differs raises FeatureStoreError (a
  ValueError) naming the key and field. Arrays are stored little-endian (the dtype is recorded as
  ``"<f4"``, ``"<i8"`` and so on) whatever the host byte order.
- ``write`` appends one new shard atomically (temporary file, fsync, rename) under an
  exclusive file lock, so a killed writer leaves no partial shard and concurrent writers
  (for example two partitions in two processes) do not collide. Within a write and across
  writes the last record of a key wins.
- ``get`` returns read-only numpy views of the memory-mapped file for fixed-size fields,
  and a Python scalar for 0-d fields. Copy an array before changing it.
- A ``FeatureStore`` can be pickled (for DataLoader workers): the memory maps are reopened
  lazily in the receiving process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from model.storage import atomic_write_bytes, atomic_write_text

KEY_FIELD = "key"
SCHEMA_FILE = "schema.json"
INDEX_FILE = "index.arrow"
SHARD_DIR = "shards"
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})\.arrow$")
STORE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """Dtype and per-item shape of one field; dtype is a little-endian numpy string or "str"."""

    dtype: str  # e.g. "<f4", "<i8", "|b1", "|u1", or "str"
    shape: tuple[int, ...]  # () for scalars

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "FieldSpec":
        return cls(dtype=str(value["dtype"]), shape=tuple(int(n) for n in value["shape"]))


class FeatureStoreError(ValueError):
    """A record or store file that does not fit the store; the message names the key or file."""


def _little_endian(dtype: np.dtype) -> np.dtype:
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not np.little_endian):
        return dtype.newbyteorder("<")
    return dtype


def _field_spec(key: str, name: str, value: Any) -> tuple[FieldSpec, Any]:
    """Return the spec of one field value and the value converted for storage."""
    if isinstance(value, str):
        return FieldSpec("str", ()), value
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise FeatureStoreError(
            f"record {key!r}: field {name!r} has dtype {array.dtype}; only numeric, bool or str fields can be stored"
        )
    dtype = _little_endian(array.dtype)
    array = array.astype(dtype, copy=False)
    return FieldSpec(dtype.str, tuple(array.shape)), array


def _arrow_type(spec: FieldSpec) -> pa.DataType:
    if spec.dtype == "str":
        return pa.string()
    value_type = pa.from_numpy_dtype(np.dtype(spec.dtype))
    size = int(np.prod(spec.shape)) if spec.shape else 0
    return pa.list_(value_type, size) if spec.shape else value_type


def _column(spec: FieldSpec, values: list[Any]) -> pa.Array:
    if spec.dtype == "str":
        return pa.array(values, type=pa.string())
    dtype = np.dtype(spec.dtype)
    if not spec.shape:
        return pa.array(np.asarray(values, dtype=dtype))
    size = int(np.prod(spec.shape))
    flat = np.stack([np.asarray(v, dtype=dtype).reshape(size) for v in values]) if values else np.zeros((0, size), dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size)


@dataclasses.dataclass
class _Shard:
    name: str
    table: pa.Table


class FeatureStore:
    """Arrow IPC shards with a key index; see the module docstring for layout and rules."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self._schema: dict[str, FieldSpec] | None = None
        self._shards: list[_Shard] | None = None
        self._index: dict[str, tuple[int, int]] | None = None

    # -- pickling for DataLoader workers: drop memory maps, reopen lazily -------------
    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.folder)!r})"

    # -- reading ---------------------------------------------------------------------
    @property
    def schema(self) -> dict[str, FieldSpec]:
        """Field name -> FieldSpec, empty before the first write."""
        self._ensure_open()
        return dict(self._schema or {})

    def keys(self) -> list[str]:
        """Return every stored key, sorted."""
        self._ensure_open()
        return sorted(self._index)

    def __contains__(self, key: object) -> bool:
        self._ensure_open()
        return key in self._index

    def __len__(self) -> int:
        self._ensure_open()
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str) -> dict[str, Any]:
        """Return the fields of ``key``, or raise KeyError naming the key and the store."""
        self._ensure_open()
        try:
            shard_number, row = self._index[key]
        except KeyError:
            raise KeyError(f"key {key!r} not found in feature store {self.folder}") from None
        table = self._shards[shard_number].table
        result: dict[str, Any] = {}
        for name, spec in self._schema.items():
            column = table.column(name)
            result[name] = self._cell(column, row, spec)
        return result

    def get_batch(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Return the fields of ``keys`` stacked along a new first axis (strings as an object array)."""
        items = [self.get(key) for key in keys]
        batch: dict[str, np.ndarray] = {}
        for name, spec in self.schema.items():
            values = [item[name] for item in items]
            if spec.dtype == "str":
                batch[name] = np.array(values, dtype=object)
            elif values:
                batch[name] = np.stack([np.asarray(v, dtype=spec.dtype) for v in values])
            else:
                batch[name] = np.zeros((0,) + spec.shape, dtype=spec.dtype)
        return batch

    @staticmethod
    def _cell(column: pa.ChunkedArray, row: int, spec: FieldSpec) -> Any:
        # Shards are written as one record batch, so the column has a single chunk.
        chunk = column.chunk(0)
        if spec.dtype == "str":
            return chunk[row].as_py()
        if not spec.shape:
            return chunk[row].as_py()
        size = int(np.prod(spec.shape))
        values = chunk.values.to_numpy(zero_copy_only=True)
        start = (chunk.offset + row) * size
        return values[start : start + size].reshape(spec.shape)

    def refresh(self) -> None:
        """Reload the shard list and index, to see writes made since this store was opened."""
        self._schema = self._shards = self._index = None
        self._ensure_open()

    # -- writing ---------------------------------------------------------------------
    def write(self, records: list[Mapping[str, Any]]) -> Path | None:
        """Append ``records`` as one new shard; return its path, or None for no records."""
        if not records:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._locked():
            stored_schema = self._read_schema_file()
            schema, columns = self._columns(records, stored_schema)
            if stored_schema is None:
                atomic_write_text(
                    self.folder / SCHEMA_FILE,
                    json.dumps(
                        {"format_version": STORE_FORMAT_VERSION, "fields": {n: s.to_json() for n, s in schema.items()}},
                        indent=1,
                        sort_keys=True,
                    )
                    + "\n",
                )
            shard_dir = self.folder / SHARD_DIR
            shard_dir.mkdir(parents=True, exist_ok=True)
            numbers = [int(m.group(1)) for p in shard_dir.iterdir() if (m := SHARD_PATTERN.match(p.name))]
            path = shard_dir / f"shard-{max(numbers, default=0) + 1:06d}.arrow"
            arrow_schema = pa.schema(
                [pa.field(KEY_FIELD, pa.string(), nullable=False)]
                + [pa.field(name, _arrow_type(spec), nullable=False) for name, spec in schema.items()],
                metadata={b"newslxmert.fields": json.dumps({n: s.to_json() for n, s in schema.items()}).encode()},
            )
            table = pa.Table.from_arrays(columns, schema=arrow_schema)
            self._write_shard_atomically(path, table)
            self._schema = self._shards = self._index = None
            self._ensure_open(write_index=True)
        return path

    def _columns(
        self, records: list[Mapping[str, Any]], stored: dict[str, FieldSpec] | None
    ) -> tuple[dict[str, FieldSpec], list[pa.Array]]:
        schema: dict[str, FieldSpec] | None = dict(stored) if stored is not None else None
        keys: list[str] = []
        values: dict[str, list[Any]] = {}
        for record in records:
            key = record.get(KEY_FIELD)
            if not isinstance(key, str) or not key:
                raise FeatureStoreError(f"record has key {key!r}; every record needs a non-empty string 'key'")
            fields = {name: value for name, value in record.items() if name != KEY_FIELD}
            specs = {}
            for name, value in fields.items():
                specs[name], fields[name] = _field_spec(key, name, value)
            if schema is None:
                schema = dict(sorted(specs.items()))
            if set(specs) != set(schema):
                missing = sorted(set(schema) - set(specs))
                extra = sorted(set(specs) - set(schema))
                raise FeatureStoreError(
                    f"record {key!r}: fields differ from the store schema in {self.folder} (missing {missing}, extra {extra})"
                )
            for name, spec in schema.items():
                if specs[name] != spec:
                    raise FeatureStoreError(
                        f"record {key!r}: field {name!r} has dtype {specs[name].dtype} shape {specs[name].shape}, "
                        f"but the store in {self.folder} contains dtype {spec.dtype} shape {spec.shape}"
                    )
                values.setdefault(name, []).append(fields[name])
            keys.append(key)
        columns = [pa.array(keys, type=pa.string())] + [_column(spec, values[name]) for name, spec in schema.items()]
        return schema, columns

    def _write_shard_atomically(self, path: Path, table: pa.Table) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            # Locked until renamed, so model.storage.remove_stale_temporaries skips it.
            fcntl.flock(fd, fcntl.LOCK_EX)
            with pa.OSFile(tmp_name, "wb") as sink:
                with ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table, max_chunksize=max(1, table.num_rows))
            os.fsync(fd)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    # -- opening ---------------------------------------------------------------------
    def _read_schema_file(self) -> dict[str, FieldSpec] | None:
        path = self.folder / SCHEMA_FILE
        if not path.exists():
            return None
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
            return {name: FieldSpec.from_json(spec) for name, spec in content["fields"].items()}
        except (ValueError, KeyError, TypeError) as error:
            raise FeatureStoreError(f"{path}: invalid feature store schema ({error}); delete the store folder and rebuild it")

    def _shard_paths(self) -> list[Path]:
        shard_dir = self.folder / SHARD_DIR
        if not shard_dir.exists():
            return []
        found = [(int(m.group(1)), p) for p in shard_dir.iterdir() if (m := SHARD_PATTERN.match(p.name))]
        return [path for _, path in sorted(found)]

    def _ensure_open(self, write_index: bool = False) -> None:
        if self._index is not None:
            return
        # A concurrent compact() may delete shards between listing and opening them; the
        # listing is then taken again.
        for attempt in range(5):
            try:
                shards = [self._open_shard(path) for path in self._shard_paths()]
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        self._schema = self._read_schema_file() or {}
        for shard in shards:
            table = shard.table
            for name, spec in self._schema.items():
                if name not in table.column_names or table.schema.field(name).type != _arrow_type(spec):
                    raise FeatureStoreError(
                        f"{self.folder / SHARD_DIR / shard.name}: field {name!r} does not match {self.folder / SCHEMA_FILE}"
                    )
        self._shards = shards
        self._index = self._load_or_build_index(shards, write_index)

    @staticmethod
    def _open_shard(path: Path) -> _Shard:
        try:
            # The table's buffers keep the mapping alive after the file handle is closed,
            # so a store with thousands of shards does not hold thousands of descriptors.
            with pa.memory_map(str(path), "r") as source:
                table = ipc.open_file(source).read_all()
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as error:
            raise FeatureStoreError(
                f"{path}: unreadable feature store shard ({error}); delete this shard and rerun the stage that wrote it"
            ) from None
        return _Shard(path.name, table)

    def _load_or_build_index(self, shards: list[_Shard], write_index: bool) -> dict[str, tuple[int, int]]:
        names = [shard.name for shard in shards]
        index_path = self.folder / INDEX_FILE
        if index_path.exists():
            try:
                with pa.memory_map(str(index_path), "r") as source:
                    table = ipc.open_file(source).read_all()
                covered = json.loads(table.schema.metadata[b"newslxmert.shards"].decode())
                if covered == names:
                    keys = table.column("key").to_pylist()
                    shard_numbers = table.column("shard").to_pylist()
                    rows = table.column("row").to_pylist()
                    return dict(zip(keys, zip(shard_numbers, rows)))
            except (pa.ArrowInvalid, OSError, KeyError, ValueError, TypeError):
                pass  # A stale or damaged index is rebuilt from the shards below.
        index: dict[str, tuple[int, int]] = {}
        for number, shard in enumerate(shards):
            for row, key in enumerate(shard.table.column(KEY_FIELD).to_pylist()):
                index[key] = (number, row)  # later shards and rows win
        if write_index:
            self._write_index(index, names)
        return index

    def _write_index(self, index: dict[str, tuple[int, int]], names: list[str]) -> None:
        keys = sorted(index)
        table = pa.table(
            {
                "key": pa.array(keys, type=pa.string()),
                "shard": pa.array([index[k][0] for k in keys], type=pa.int32()),
                "row": pa.array([index[k][1] for k in keys], type=pa.int64()),
            }
        ).replace_schema_metadata({b"newslxmert.shards": json.dumps(names).encode()})
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        atomic_write_bytes(self.folder / INDEX_FILE, sink.getvalue().to_pybytes())

    def compact(self) -> Path | None:
        """Rewrite every live row into one shard and delete the superseded shards."""
        with self._locked():
            self._schema = self._shards = self._index = None
            self._ensure_open()
            if len(self._shards) <= 1 and all(len(s.table) == len(self._index) for s in self._shards):
                return self.folder / SHARD_DIR / self._shards[0].name if self._shards else None
            old_paths = [self.folder / SHARD_DIR / shard.name for shard in self._shards]
            pieces = []
            for number, shard in enumerate(self._shards):
                rows = sorted(row for key, (n, row) in self._index.items() if n == number)
                if rows:
                    pieces.append(shard.table.take(pa.array(rows, type=pa.int64())))
            table = pa.concat_tables(pieces).combine_chunks()
            numbers = [int(SHARD_PATTERN.match(p.name).group(1)) for p in old_paths]
            path = self.folder / SHARD_DIR / f"shard-{max(numbers) + 1:06d}.arrow"
            self._write_shard_atomically(path, table)
            self._shards = self._index = None
            for old in old_paths:
                old.unlink()
            self._schema = self._shards = self._index = None
            self._ensure_open(write_index=True)
            return path
