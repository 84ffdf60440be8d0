"""The on-disk episode store: one chunked, lazily readable zarr (v3) layout for every demonstration set.

Layout of a store at ``<path>`` (conventionally named ``*.zarr``)::

    <path>/                     zarr v3 group; its attributes:
        format      = "tmrl-episodes"
        version     = 1
        keys        = {key: {"dtype": "<f4", "shape": [per-step dims...]}, ...}
        num_episodes, num_steps, chunk_rows
        fingerprint = sha256 hex digest of the content (see below)
        ...           user attributes (e.g. env, env_id, goal_indices, obs_dim, action_dim, seed, generator)
    <path>/data/<key>           (num_steps, *shape) every episode concatenated along time, chunked along
                                time in ``chunk_rows`` rows, or fewer for a large step (camera frames: a
                                power of two of rows of at most CHUNK_BYTES), so reading a window touches
                                one or two chunks and a random batch of frames decompresses little
    <path>/meta/episode_ends    (num_episodes,) int64, EXCLUSIVE end row of each episode in data/<key>;
                                episode i spans rows [episode_ends[i-1], episode_ends[i]) (start 0 for i=0)

Every array in ``data/`` has one row per environment step: ``observation[t]`` is the observation at
which ``action[t]`` was taken. A store is written atomically (into a hidden temporary sibling that is
renamed into place once complete), so a crash never leaves a half-written store at ``<path>`` and never
destroys the store it replaces before the new one is complete.

Damage: a chunk zarr cannot decode (truncated, overwritten) is a ``CorruptStoreError`` naming the store and
the array, whichever read meets it; ``load`` refuses NaN or Inf, naming the first episode holding one; and
``check`` reads a store of up to VERIFY_MAX_BYTES whole, refusing it also when a chunk file was lost or
changed (zarr reads a missing chunk as zeros): what the stages run on an existing store before any work.

Fingerprint: sha256 over, for each key in sorted order, the key name, its dtype string, its full shape
and the sha256 of its bytes (C order, little-endian, in time order), then the bytes of ``episode_ends``
as little-endian int64. It depends on content only (not on chunking, compression or paths).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

FORMAT = "tmrl-episodes"
VERSION = 1
DEFAULT_CHUNK_ROWS = 8192
CHUNK_BYTES = 256 * 1024  # a key's chunk shrinks (by halving its rows) until it holds at most this much
# EpisodeStore.check reads a store this large whole (0.03 s for 40k state steps, 0.25 s for 4k 64x64 frames)
VERIFY_MAX_BYTES = 256 * 2**20


class CorruptStoreError(ValueError):
    """An episode store's content cannot be read, is not finite, or no longer matches its fingerprint."""


@contextlib.contextmanager
def _reading(path: Path | str, key: str):
    """Turn whatever zarr or its codecs raise on a damaged chunk of ``key`` into a CorruptStoreError."""
    try:
        yield
    except Exception as err:  # e.g. RuntimeError("Zstd decompression error") for a truncated chunk
        raise CorruptStoreError(
            f"episode store {path}: cannot read its array {key!r} ({type(err).__name__}: {err}); a chunk "
            "file is truncated or overwritten: regenerate the store"
        ) from err


def key_chunk_rows(chunk_rows: int, row_bytes: int) -> int:
    """Rows per chunk of a key of ``row_bytes`` bytes a step: ``chunk_rows``, halved while the chunk exceeds
    CHUNK_BYTES and the rows stay a whole divisor of ``chunk_rows`` (so streamed writes stay aligned)."""
    rows = chunk_rows
    while rows % 2 == 0 and rows * row_bytes > CHUNK_BYTES:
        rows //= 2
    return rows


RESERVED_ATTRS = ("format", "version", "keys", "num_episodes", "num_steps", "chunk_rows", "fingerprint")


def _le(dtype: np.dtype) -> np.dtype:
    """Little-endian version of ``dtype`` (a no-op on x86): the fingerprint is defined on LE bytes."""
    return dtype.newbyteorder("<") if dtype.byteorder not in ("|", "<") else dtype


class _Fingerprint:
    """Streaming content hash; see the module docstring for the exact definition."""

    def __init__(self, specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        self.specs = specs
        self.hashes = {key: hashlib.sha256() for key in specs}

    def update(self, key: str, rows: np.ndarray) -> None:
        self.hashes[key].update(np.ascontiguousarray(rows, dtype=_le(self.specs[key][0])).tobytes())

    def hexdigest(self, num_steps: int, episode_ends: np.ndarray) -> str:
        total = hashlib.sha256(f"{FORMAT}/{VERSION}".encode())
        for key in sorted(self.specs):
            dtype, shape = self.specs[key]
            total.update(f"\0{key}\0{_le(dtype).str}\0{(num_steps, *shape)}\0".encode())
            total.update(self.hashes[key].digest())
        total.update(b"\0episode_ends\0")
        total.update(np.ascontiguousarray(episode_ends, dtype="<i8").tobytes())
        return total.hexdigest()


class _Writer:
    """Streams episodes into a fresh zarr group, writing whole chunks as soon as they fill up."""

    def __init__(self, root: Path, episode0: Mapping[str, np.ndarray], chunk_rows: int) -> None:
        self.group = zarr.open_group(str(root), mode="w-")
        self.chunk_rows = chunk_rows
        self.specs = {key: (_le(arr.dtype), tuple(arr.shape[1:])) for key, arr in episode0.items()}
        data = self.group.require_group("data")
        self.arrays = {}
        for key, (dtype, shape) in self.specs.items():
            rows = key_chunk_rows(chunk_rows, dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
            self.arrays[key] = data.create_array(key, shape=(0, *shape), chunks=(rows, *shape), dtype=dtype)
        self.pending: dict[str, list[np.ndarray]] = {key: [] for key in self.specs}
        self.pending_rows = 0
        self.written = 0  # rows already in the zarr arrays
        self.ends: list[int] = []
        self.fingerprint = _Fingerprint(self.specs)

    def check(self, index: int, episode: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate episode ``index`` against episode 0's keys, dtypes and per-step shapes."""
        if set(episode) != set(self.specs):
            raise ValueError(
                f"episode {index}: keys {sorted(episode)} differ from episode 0's keys {sorted(self.specs)}"
            )
        arrays = {key: np.asarray(value) for key, value in episode.items()}
        _episode_length(index, arrays)
        for key, arr in arrays.items():
            dtype, shape = self.specs[key]
            if tuple(arr.shape[1:]) != shape:
                raise ValueError(
                    f"episode {index}: key {key!r} has per-step shape {tuple(arr.shape[1:])}, "
                    f"expected {shape} (from episode 0)"
                )
            if _le(arr.dtype) != dtype:
                raise ValueError(
                    f"episode {index}: key {key!r} has dtype {arr.dtype}, expected {dtype} (episode 0)"
                )
        return arrays

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        length = len(next(iter(arrays.values())))
        for key, arr in arrays.items():
            self.pending[key].append(arr)
            self.fingerprint.update(key, arr)
        self.pending_rows += length
        self.ends.append(self.written + self.pending_rows)
        if self.pending_rows >= self.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        # Write only whole chunks while streaming (a partial chunk would be re-encoded on every append);
        # the remainder stays buffered until the next flush or the end.
        rows = self.pending_rows if final else (self.pending_rows // self.chunk_rows) * self.chunk_rows
        if rows == 0:
            return
        for key, parts in self.pending.items():
            block = np.concatenate(parts, axis=0)  # (pending_rows, *shape)
            arr = self.arrays[key]
            arr.resize((self.written + rows, *arr.shape[1:]))
            arr[self.written : self.written + rows] = block[:rows]
            self.pending[key] = [block[rows:]] if rows < len(block) else []
        self.written += rows
        self.pending_rows -= rows

    def finish(self, attrs: Mapping[str, Any]) -> None:
        self._flush(final=True)
        ends = np.asarray(self.ends, dtype=np.int64)
        self.group.require_group("meta").create_array(
            "episode_ends", shape=ends.shape, chunks=(max(len(ends), 1),), dtype="<i8"
        )[:] = ends
        keys = {key: {"dtype": dtype.str, "shape": list(shape)} for key, (dtype, shape) in self.specs.items()}
        fingerprint = self.fingerprint.hexdigest(self.written, ends)
        self.group.attrs.update(
            {
                **attrs,
                "format": FORMAT,
                "version": VERSION,
                "keys": keys,
                "num_episodes": len(ends),
                "num_steps": self.written,
                "chunk_rows": self.chunk_rows,
                "fingerprint": fingerprint,
            }
        )


def _episode_length(index: int, arrays: Mapping[str, np.ndarray]) -> int:
    lengths = {key: (arr.shape[0] if arr.ndim else -1) for key, arr in arrays.items()}
    if any(n <= 0 for n in lengths.values()) or len(set(lengths.values())) != 1:
        raise ValueError(
            f"episode {index}: every key needs the same number (> 0) of steps along axis 0, got {lengths}"
        )
    return next(iter(lengths.values()))


def _check_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(set(attrs) & set(RESERVED_ATTRS))
    if clash:
        raise ValueError(f"attrs {clash} are reserved by the episode store format {RESERVED_ATTRS}")
    for key, value in attrs.items():
        try:
            json.dumps(value)
        except TypeError as err:
            raise ValueError(f"attrs[{key!r}] = {value!r} is not JSON-serializable: {err}") from None
    return dict(attrs)


def _is_store(path: Path) -> bool:
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except Exception:  # anything zarr cannot open as a group is not a store
        return False


def write_episodes(
    path: str | Path,
    episodes: Iterable[Mapping[str, np.ndarray]],
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> EpisodeStore:
    """Write ``episodes`` (each ``{key: (T, *shape) array}``) as an episode store at ``path``, atomically.

    Episodes are streamed: only the current partial chunk is buffered. All episodes must share keys,
    dtypes and per-step shapes. ``attrs`` (JSON-serializable) are stored beside the format's own attrs.
    An existing ``path`` is refused unless ``overwrite=True``, and even then only if it is an episode
    store or an empty directory (so a typo cannot delete an unrelated directory).
    """
    path = Path(path)
    user_attrs = _check_attrs(attrs or {})
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be > 0, got {chunk_rows}")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"episode store {path} already exists; pass overwrite=True to replace it")
        if not (_is_store(path) or (path.is_dir() and not any(path.iterdir()))):
            raise FileExistsError(f"refusing to overwrite {path}: it exists and is not a tmrl episode store")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    try:
        writer = None
        for index, episode in enumerate(episodes):
            if writer is None:
                arrays0 = {key: np.asarray(value) for key, value in episode.items()}
                if not arrays0:
                    raise ValueError("episode 0 has no keys")
                for key in arrays0:
                    if not key or "/" in key or key.startswith("."):
                        raise ValueError(
                            f"episode 0: invalid key {key!r} (non-empty, no '/', no leading '.')"
                        )
                _episode_length(0, arrays0)
                writer = _Writer(tmp, arrays0, chunk_rows)
            writer.add(writer.check(index, episode))
        if writer is None:
            raise ValueError(f"no episodes to write to {path}")
        writer.finish(user_attrs)
        _swap_into_place(tmp, path, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EpisodeStore.open(path)


def _swap_into_place(tmp: Path, path: Path, tag: str) -> None:
    """Rename the complete ``tmp`` store to ``path``; an old store is moved aside first, deleted last."""
    if not path.exists():
        tmp.rename(path)
        return
    old = path.parent / f".{path.name}.old-{tag}"
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)  # put the previous store back
        raise
    shutil.rmtree(old, ignore_errors=True)


class EpisodeStore:
    """Read access to an episode store (layout in the module docstring); open with :meth:`open`."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self._group = group
        self._attrs = dict(group.attrs)
        with _reading(path, "meta/episode_ends"):
            self._ends = np.asarray(group["meta/episode_ends"][:], dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path) -> EpisodeStore:
        """Open the store at ``path``, checking format, version and that every array is present."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"episode store {path} does not exist")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as err:
            raise ValueError(f"{path} is not a tmrl episode store (not a zarr group: {err})") from None
        attrs = group.attrs
        if attrs.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a tmrl episode store: attrs 'format' is {attrs.get('format')!r}, "
                f"expected {FORMAT!r}"
            )
        if attrs.get("version") != VERSION:
            raise ValueError(
                f"{path}: episode store version {attrs.get('version')!r}, this code reads {VERSION}"
            )
        if "meta/episode_ends" not in group:
            raise ValueError(f"{path}: episode store has no 'meta/episode_ends' array")
        num_steps = attrs["num_steps"]
        for key, spec in attrs["keys"].items():
            if f"data/{key}" not in group:
                raise ValueError(f"{path}: episode store lists key {key!r} but has no 'data/{key}' array")
            shape = tuple(group[f"data/{key}"].shape)
            if shape != (num_steps, *spec["shape"]):
                raise ValueError(
                    f"{path}: 'data/{key}' has shape {shape}, expected {(num_steps, *spec['shape'])}"
                )
        store = cls(path, group)
        ends = store._ends
        if (
            len(ends) != attrs["num_episodes"]
            or (len(ends) and ends[-1] != num_steps)
            or np.any(np.diff(ends) <= 0)
        ):
            raise ValueError(f"{path}: 'meta/episode_ends' is inconsistent with num_steps={num_steps}")
        return store

    @property
    def keys(self) -> list[str]:
        """Per-step keys stored under ``data/``."""
        return list(self._attrs["keys"])

    @property
    def episode_ends(self) -> np.ndarray:
        """(num_episodes,) int64 exclusive end row of each episode (a copy)."""
        return self._ends.copy()

    @property
    def episode_starts(self) -> np.ndarray:
        """(num_episodes,) int64 first row of each episode."""
        return np.concatenate([[0], self._ends[:-1]]).astype(np.int64)

    @property
    def num_episodes(self) -> int:
        """Number of episodes."""
        return int(self._attrs["num_episodes"])

    @property
    def num_steps(self) -> int:
        """Total number of steps (rows) over all episodes."""
        return int(self._attrs["num_steps"])

    @property
    def attrs(self) -> dict[str, Any]:
        """All group attributes: the format's own (``keys``, ``fingerprint``...) and the user's (a copy)."""
        return json.loads(json.dumps(self._attrs))

    @property
    def fingerprint(self) -> str:
        """The content fingerprint recorded at write time (sha256 hex)."""
        return str(self._attrs["fingerprint"])

    def array(self, key: str) -> zarr.Array:
        """The lazy (num_steps, *shape) zarr array of ``key``; slicing reads only the chunks it needs."""
        if key not in self._attrs["keys"]:
            raise KeyError(f"{self.path}: no key {key!r} in episode store; keys are {self.keys}")
        return self._group[f"data/{key}"]

    @property
    def nbytes(self) -> int:
        """Size of the content, uncompressed."""
        specs = self._attrs["keys"].values()
        return sum(self.num_steps * np.dtype(s["dtype"]).itemsize * int(np.prod(s["shape"])) for s in specs)

    def load(self, key: str) -> np.ndarray:
        """All rows of ``key`` in memory, (num_steps, *shape); refused if a float array holds NaN or Inf."""
        array = self.array(key)
        with _reading(self.path, key):
            rows = np.asarray(array[:])
        self._check_finite(key, rows)
        return rows

    def _check_finite(self, key: str, rows: np.ndarray, first_row: int = 0) -> None:
        """Refuse ``rows`` (of ``key``, from store row ``first_row`` on) if they hold NaN or Inf."""
        if rows.dtype.kind != "f" or np.isfinite(rows).all():
            return
        row = first_row + int(np.argmin(np.isfinite(rows).reshape(len(rows), -1).all(axis=1)))
        episode = int(np.searchsorted(self._ends, row, side="right"))
        raise CorruptStoreError(
            f"episode store {self.path}: its array {key!r} holds NaN or Inf, first in episode {episode} "
            f"(row {row}); demonstrations must be finite: fix or regenerate them"
        )

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """Episode ``i`` (negative indices count from the end) as ``{key: (T_i, *shape) array}``."""
        n = self.num_episodes
        if not -n <= i < n:
            raise IndexError(f"{self.path}: episode index {i} out of range for {n} episodes")
        i %= n
        start, end = (int(self._ends[i - 1]) if i else 0), int(self._ends[i])
        out = {}
        for key in self.keys:
            array = self.array(key)
            with _reading(self.path, key):
                out[key] = np.asarray(array[start:end])
        return out

    def verify(self) -> bool:
        """Recompute the content fingerprint from the stored data; True iff it matches the recorded one.
        A chunk that cannot be decoded raises CorruptStoreError."""
        return self._digest(finite=False) == self.fingerprint

    def check(self, max_bytes: int = VERIFY_MAX_BYTES) -> EpisodeStore:
        """This store, once its content (if at most ``max_bytes``: larger ones are only checked as read)
        is read whole and found decodable, finite and matching its fingerprint.

        Raises:
            CorruptStoreError: naming the store, and the array for an undecodable or non-finite one.
        """
        if self.nbytes <= max_bytes and self._digest(finite=True) != self.fingerprint:
            raise CorruptStoreError(
                f"episode store {self.path}: its content no longer matches the fingerprint recorded when it "
                "was written (a chunk file lost or changed since): regenerate the store"
            )
        return self

    def _digest(self, finite: bool) -> str:
        """The fingerprint of the stored content, read chunk by chunk (each checked finite if ``finite``)."""
        specs = {key: (np.dtype(s["dtype"]), tuple(s["shape"])) for key, s in self._attrs["keys"].items()}
        fingerprint = _Fingerprint(specs)
        chunk = int(self._attrs.get("chunk_rows", DEFAULT_CHUNK_ROWS))
        for key in specs:
            array = self.array(key)
            for start in range(0, self.num_steps, chunk):
                with _reading(self.path, key):
                    rows = np.asarray(array[start : start + chunk])
                if finite:
                    self._check_finite(key, rows, start)
                fingerprint.update(key, rows)
        return fingerprint.hexdigest(self.num_steps, self._ends)

    def __len__(self) -> int:
        return self.num_episodes

    def __repr__(self) -> str:
        return (
            f"EpisodeStore({str(self.path)!r}, episodes={self.num_episodes}, steps={self.num_steps}, "
            f"keys={self.keys})"
        )


class StoreRows:
    """One array of an episode store, read by rows: held in memory, or opened lazily by EACH process (a
    forked DataLoader worker opens its own zarr handle; pickling drops the handle, so a spawned worker
    reopens the store). What the point-cloud and image datasets read their large per-step arrays through.
    """

    def __init__(self, path: str, key: str, memory: np.ndarray | None = None) -> None:
        self.path, self.key = path, key
        self._memory = memory
        self._lazy: zarr.Array | None = None
        self._pid = -1

    @property
    def array(self) -> zarr.Array | np.ndarray:
        """The in-memory array, or the zarr array opened by THIS process."""
        if self._memory is not None:
            return self._memory
        if self._lazy is None or self._pid != os.getpid():
            self._lazy, self._pid = EpisodeStore.open(self.path).array(self.key), os.getpid()
        return self._lazy

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted, unique store rows) in ONE read."""
        array = self.array
        if isinstance(array, np.ndarray):
            return array[rows]
        with _reading(self.path, self.key):
            return np.asarray(array.oindex[rows])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_lazy"], state["_pid"] = None, -1
        return state
