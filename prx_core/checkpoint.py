"""Full-state, crash-safe checkpoints without unsafe deserialisation.

Why this module exists
----------------------
Resuming a diffusion-transformer run bit-for-bit needs far more than model weights: optimizer moments,
scheduler counters, RNG states, data-loader positions, EMA copies.  The usual answer is ``torch.save`` of a
big nested object, whose format can execute arbitrary code when loaded.  Here we split every
state into two halves instead:

* a **skeleton**: the nested structure with every tensor replaced by a reference, encoded as strict JSON
  (no ``NaN`` literals, so any JSON parser can read it);
* a flat ``{key: tensor}`` mapping stored with ``safetensors``, which is a plain header + raw bytes format.

Neither half can run code when read, so a checkpoint from an untrusted source is at worst *wrong*, never
*dangerous*.

Off the critical path
---------------------
Every byte is hashed (sha256) as it is written, so the manifest's digests cost no second read of
a 15 GB checkpoint. ``save(..., background=True)`` copies the tensors to the CPU and hands the
writing, fsync, commit and pruning to a thread; :meth:`CheckpointManager.wait` (called by the next
save) joins it and raises its error, if any. A failed write (e.g. ``ENOSPC``) removes its partial
temp directory, so the previous checkpoint stays the newest valid one and the space is freed.

Crash safety
------------
A checkpoint directory becomes visible under its final name only through a single ``os.rename`` that
happens after every byte (including a ``manifest.json`` of sha256 digests and a ``COMMIT`` marker) has been
fsynced.  A crash at any earlier moment leaves only a hidden ``.tmp-*`` directory, which readers ignore and
the next successful save deletes.  Older checkpoints are pruned only *after* the new one is durable, so at
every instant at least one complete checkpoint exists on disk.  Because disks and copies can still rot after
the fact, :meth:`CheckpointManager.latest_valid` re-hashes files and falls back to an older checkpoint when
the newest one is damaged.

The manager assumes a single writer per checkpoint root (in distributed training, rank 0 saves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import torch
from safetensors.torch import load_file

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "flatten_state",
    "load_part",
    "resolve_checkpoint",
    "save_part",
    "unflatten_state",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Skeleton encoding
# --------------------------------------------------------------------------------------------------------

# Markers are single-key JSON objects.  A user dict that happens to use one of these names as a key is
# encoded through the ``__dict__`` pair-list form, so decoding is never ambiguous.
_TENSOR: Final = "__tensor__"
_TUPLE: Final = "__tuple__"
_DICT: Final = "__dict__"
_FLOAT: Final = "__float__"
_DTYPE: Final = "__dtype__"
_SIZE: Final = "__size__"
_MARKERS: Final = frozenset({_TENSOR, _TUPLE, _DICT, _FLOAT, _DTYPE, _SIZE})

# Non-finite floats are the only Python floats strict JSON cannot express.
_NONFINITE_NAMES: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

_SKELETON_FORMAT: Final = "prx-state"
_MANIFEST_FORMAT: Final = "prx-checkpoint"
_FORMAT_VERSION: Final = 1


def _encode_float(value: float) -> Any:
    """Encode a float so that strict JSON (``allow_nan=False``) can hold it and it round-trips exactly."""
    value = float(value)  # drop float subclasses (e.g. numpy.float64): JSON only knows plain floats
    if math.isnan(value):
        return {_FLOAT: "nan"}
    if math.isinf(value):
        return {_FLOAT: "inf" if value > 0 else "-inf"}
    # Finite floats are written with repr(), which Python parses back to the identical double.
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    # str(torch.float32) == "torch.float32"; the bare attribute name is what we look up on load.
    return str(dtype).removeprefix("torch.")


def _decode_dtype(name: Any) -> torch.dtype:
    # getattr on the torch module, restricted to real dtype objects, so the name is never run as code.
    candidate = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(candidate, torch.dtype):
        raise ValueError(f"unknown torch dtype in skeleton: {name!r}")
    return candidate


def _child_path(parent: str, key: object) -> str:
    return f"{parent}.{key}" if parent else str(key)


class _Flattener:
    """Walks a nested state once, collecting tensors under unique dotted keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        # (device, storage pointer) of every tensor already collected; safetensors refuses to save two
        # entries that share storage, so a second tensor on a seen storage is cloned.
        self._storages: set[tuple[str, int]] = set()

    def _unique_key(self, path: str) -> str:
        # Dotted paths can collide ({"a.b": x} vs {"a": {"b": y}}, or int key 0 vs str key "0"); the key
        # is only a label because the skeleton stores it verbatim, so a suffix is enough to disambiguate.
        base = path or "tensor"
        key = base
        counter = 1
        while key in self.tensors:
            key = f"{base}#{counter}"
            counter += 1
        return key

    def _add_tensor(self, value: torch.Tensor, path: str) -> dict[str, str]:
        if value.layout != torch.strided:
            raise TypeError(f"state at {path or '<root>'!r}: only dense tensors are supported, got {value.layout}")
        if value.is_meta:
            raise TypeError(f"state at {path or '<root>'!r}: meta tensors hold no data and cannot be saved")
        # detach(): autograd history is irrelevant to a checkpoint and safetensors wants plain tensors.
        tensor = value.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()  # always allocates fresh storage, so it can never be shared
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage in self._storages:
            # Views / tied weights: store an independent copy, both because safetensors rejects shared
            # storage and because the load side would not recreate the aliasing anyway.
            tensor = tensor.clone()
            storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        self._storages.add(storage)
        key = self._unique_key(path)
        self.tensors[key] = tensor
        return {_TENSOR: key}

    def encode(self, value: Any, path: str) -> Any:
        # Order matters: bool is an int subclass, torch.Size is a tuple subclass.
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return _encode_float(value)
        if isinstance(value, str):
            return str(value)
        if isinstance(value, torch.Tensor):
            return self._add_tensor(value, path)
        if isinstance(value, torch.dtype):
            return {_DTYPE: _dtype_name(value)}
        if isinstance(value, torch.Size):
            return {_SIZE: [int(d) for d in value]}
        if isinstance(value, tuple):
            return {_TUPLE: [self.encode(item, _child_path(path, i)) for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(item, _child_path(path, i)) for i, item in enumerate(value)]
        if isinstance(value, dict):
            return self._encode_dict(value, path)
        raise TypeError(
            f"state at {path or '<root>'!r} has unsupported type {type(value).__qualname__}; supported: "
            "dict, list, tuple, int, float, bool, None, str, torch.Tensor, torch.dtype, torch.Size"
        )

    def _encode_dict(self, value: dict[Any, Any], path: str) -> Any:
        if all(isinstance(k, str) for k in value) and not _MARKERS.intersection(value):
            # Common case (model state dicts, configs): keep it a readable JSON object.
            return {k: self.encode(v, _child_path(path, k)) for k, v in value.items()}
        # Non-str keys (optimizer state uses int param ids) would be stringified by JSON and not come back
        # as ints, so store an ordered list of [key, value] pairs with the key type preserved.
        pairs = [[_encode_key(k, path), self.encode(v, _child_path(path, k))] for k, v in value.items()]
        return {_DICT: pairs}


def _encode_key(key: Any, path: str) -> Any:
    """Encode a dict key: only immutable scalars (and tuples of them) — a tensor key would be hashed by id."""
    if key is None or isinstance(key, bool | str):
        return key
    if isinstance(key, int):
        return int(key)
    if isinstance(key, float):
        return _encode_float(key)
    if isinstance(key, tuple) and not isinstance(key, torch.Size):
        return {_TUPLE: [_encode_key(k, path) for k in key]}
    raise TypeError(
        f"dict at {path or '<root>'!r} has a key of unsupported type {type(key).__qualname__}: {key!r}; "
        "keys must be str, int, float, bool, None or tuples of those"
    )


def flatten_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``state`` into a JSON-serialisable skeleton and a flat ``{key: tensor}`` mapping.

    Supported leaves: ``None``, ``bool``, ``int``, ``float`` (including nan/inf), ``str``, ``torch.Tensor``,
    ``torch.dtype`` and ``torch.Size``; containers: ``dict`` (any key of str/int/float/bool/None/tuple),
    ``list`` and ``tuple``.  Subclasses of these (``OrderedDict``, named tuples, ``IntEnum``) are accepted
    but come back as the plain base type, which is all ``load_state_dict``-style consumers need.

    Tensors are detached and made contiguous with their dtype kept; tensors that share storage with an
    earlier one are cloned, so the result is always accepted by ``safetensors.torch.save_file``.  The
    returned tensors may alias the originals, so save them before mutating the state further.

    Raises:
        TypeError: naming the dotted path of the first unsupported value.
    """
    flattener = _Flattener()
    skeleton = flattener.encode(state, "")
    return skeleton, flattener.tensors


def _decode_float(value: Any) -> float:
    if isinstance(value, str) and value in _NONFINITE_NAMES:
        return _NONFINITE_NAMES[value]
    raise ValueError(f"invalid {_FLOAT} value in skeleton: {value!r}")


def _expect_list(value: Any, marker: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{marker} in skeleton must hold a list, got {type(value).__qualname__}")
    return value


def _decode_key(key: Any) -> Any:
    if isinstance(key, dict):
        if set(key) == {_TUPLE}:
            return tuple(_decode_key(k) for k in _expect_list(key[_TUPLE], _TUPLE))
        if set(key) == {_FLOAT}:
            return _decode_float(key[_FLOAT])
        raise ValueError(f"invalid dict key in skeleton: {key!r}")
    if isinstance(key, list):
        raise ValueError(f"invalid dict key in skeleton: {key!r}")
    return key


def _decode(node: Any, tensors: Mapping[str, torch.Tensor], used: set[str]) -> Any:
    if node is None or isinstance(node, bool | int | float | str):
        return node
    if isinstance(node, list):
        return [_decode(item, tensors, used) for item in node]
    if not isinstance(node, dict):
        raise ValueError(f"skeleton contains a non-JSON value of type {type(node).__qualname__}")
    marker = _MARKERS.intersection(node)
    if not marker:
        return {k: _decode(v, tensors, used) for k, v in node.items()}
    if len(node) != 1:
        # The encoder never mixes a marker with other keys, so this skeleton was not produced by it.
        raise ValueError(f"skeleton object mixes marker key(s) {sorted(marker)} with other keys")
    (name,) = marker
    payload = node[name]
    if name == _TENSOR:
        if not isinstance(payload, str):
            raise ValueError(f"{_TENSOR} reference must be a string, got {payload!r}")
        if payload not in tensors:
            raise ValueError(f"skeleton references tensor {payload!r}, which is missing from the tensor file")
        used.add(payload)
        return tensors[payload]
    if name == _TUPLE:
        return tuple(_decode(item, tensors, used) for item in _expect_list(payload, _TUPLE))
    if name == _DICT:
        result: dict[Any, Any] = {}
        for pair in _expect_list(payload, _DICT):
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"{_DICT} entries must be [key, value] pairs, got {pair!r}")
            result[_decode_key(pair[0])] = _decode(pair[1], tensors, used)
        return result
    if name == _FLOAT:
        return _decode_float(payload)
    if name == _DTYPE:
        return _decode_dtype(payload)
    # Only _SIZE is left.
    dims = _expect_list(payload, _SIZE)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"{_SIZE} must hold a list of ints, got {dims!r}")
    return torch.Size(dims)


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the nested state from :func:`flatten_state` output (its exact inverse, up to subclasses).

    Tensors are inserted as-is (no copy), so they live on whatever device ``tensors`` is on.

    Raises:
        ValueError: if the skeleton is malformed or references a tensor absent from ``tensors``.
    """
    return _decode(skeleton, tensors, set())


# --------------------------------------------------------------------------------------------------------
# Single part on disk
# --------------------------------------------------------------------------------------------------------

_PART_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MANIFEST: Final = "manifest.json"
_COMMIT: Final = "COMMIT"
# Names a part may not take because the manager owns files with these stems.
_RESERVED_PART_NAMES: Final = frozenset({"manifest", _COMMIT})


def _check_part_name(name: str) -> None:
    # Part names become file names: forbid separators, "..", and hidden names so a part can never write
    # outside its directory or collide with the manager's own files.
    if not isinstance(name, str) or not _PART_NAME_RE.fullmatch(name) or name in _RESERVED_PART_NAMES:
        raise ValueError(
            f"invalid checkpoint part name {name!r}: use letters, digits, '_', '-', '.', not starting with "
            f"'.' or '-', and not one of {sorted(_RESERVED_PART_NAMES)}"
        )


def _device_arg(device: str | torch.device) -> str:
    # safetensors takes a device string ("cpu", "cuda:0"); str(torch.device) yields exactly that.
    return str(device)


class _HashingWriter:
    """A binary file that hashes (sha256) and counts the bytes as they are written, then fsyncs.

    The manifest's digests come from here, so a save never reads its own files back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[bytes] = _open_for_write(path)
        self._sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._handle.write(data)
        self._sha256.update(data)  # releases the GIL on large buffers: training threads keep running
        self.size += len(data)

    def close(self) -> dict[str, Any]:
        """Flush, fsync and close; the manifest entry ``{"sha256", "size"}`` of what was written."""
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        finally:
            self._handle.close()
        return {"sha256": self._sha256.hexdigest(), "size": self.size}

    def abort(self) -> None:
        try:
            self._handle.close()
        except OSError:
            pass  # the write already failed; the caller reports that error


def _open_for_write(path: Path) -> IO[bytes]:
    """Every checkpoint file is opened here (tests substitute a writer that fails, e.g. with ENOSPC)."""
    return path.open("wb")


def _write_file(path: Path, chunks: Any) -> dict[str, Any]:
    writer = _HashingWriter(path)
    try:
        for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


#: safetensors' dtype names (the format's spec), for the tensor files written here.
_SAFETENSORS_DTYPES: Final = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _safetensors_chunks(tensors: Mapping[str, torch.Tensor]) -> Any:
    """The bytes of a safetensors file holding ``tensors`` (CPU, contiguous), streamed tensor by tensor.

    The layout is the format's: an 8-byte little-endian header length, a JSON header of dtype, shape
    and byte offsets padded with spaces to a multiple of 8, then the raw little-endian data.
    ``safetensors.torch.load_file`` reads it. Written here rather than by ``save_file`` so the
    bytes can be hashed as they go out, without holding a second copy of the file in memory.
    """
    header: dict[str, Any] = {}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {key!r} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    yield struct.pack("<Q", len(encoded)) + encoded
    for tensor in tensors.values():
        if tensor.numel():
            yield tensor.reshape(-1).view(torch.uint8).numpy().data  # a memoryview: no copy


@dataclass
class _PreparedPart:
    name: str
    skeleton: Any
    tensors: dict[str, torch.Tensor]


def _prepare_part(name: str, state: Any, snapshot: bool) -> _PreparedPart:
    """Flatten ``state``, with every tensor on the CPU; ``snapshot`` copies even CPU tensors, so
    training may change the originals while a background thread writes."""
    _check_part_name(name)
    skeleton, tensors = flatten_state(state)
    cpu = {k: (t.to("cpu", copy=True) if snapshot else t.cpu()) for k, t in tensors.items()}
    return _PreparedPart(name, skeleton, cpu)


def _write_part(directory: Path, part: _PreparedPart) -> dict[str, dict[str, Any]]:
    """Write a prepared part; returns the manifest entries of the files written."""
    files: dict[str, dict[str, Any]] = {}
    tensor_file = f"{part.name}.safetensors" if part.tensors else None
    if tensor_file is not None:
        files[tensor_file] = _write_file(directory / tensor_file, _safetensors_chunks(part.tensors))
    document = {
        "format": _SKELETON_FORMAT,
        "version": _FORMAT_VERSION,
        "tensors_file": tensor_file,
        "skeleton": part.skeleton,
    }
    text = json.dumps(document, allow_nan=False, indent=1).encode("utf-8")
    files[f"{part.name}.json"] = _write_file(directory / f"{part.name}.json", [text])
    return files


def save_part(directory: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``<name>.json`` (skeleton) plus ``<name>.safetensors`` when it holds tensors.

    The JSON is written with ``allow_nan=False`` so the file is strict JSON. Files are fsynced;
    :class:`CheckpointManager` also records their digests, computed while writing.
    """
    _write_part(Path(directory), _prepare_part(name, state, snapshot=False))


def _read_json(path: Path) -> Any:
    # parse_constant rejects NaN/Infinity literals, which our writer never emits.
    def _reject(literal: str) -> Any:
        raise ValueError(f"{path}: non-standard JSON constant {literal!r}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject)


def load_part(directory: Path, name: str, device: str | torch.device = "cpu") -> Any:
    """Read back a part written by :func:`save_part`, placing tensors on ``device``.

    Raises:
        ValueError: if the JSON is not a prx state document or does not match its tensor file.
        FileNotFoundError: if a file is missing.
    """
    _check_part_name(name)
    directory = Path(directory)
    json_path = directory / f"{name}.json"
    document = _read_json(json_path)
    if not isinstance(document, dict) or document.get("format") != _SKELETON_FORMAT:
        raise ValueError(f"{json_path} is not a {_SKELETON_FORMAT} document")
    if document.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{json_path} has unsupported version {document.get('version')!r}")
    tensor_file = document.get("tensors_file")
    tensors: dict[str, torch.Tensor] = {}
    if tensor_file is not None:
        # Only the file name we would have written is accepted, so a tampered JSON cannot point elsewhere.
        if tensor_file != f"{name}.safetensors":
            raise ValueError(f"{json_path} references unexpected tensor file {tensor_file!r}")
        tensors = load_file(str(directory / tensor_file), device=_device_arg(device))
    used: set[str] = set()
    state = _decode(document.get("skeleton"), tensors, used)
    unused = set(tensors) - used
    if unused:
        raise ValueError(f"{directory / str(tensor_file)} holds tensors the skeleton never uses: {sorted(unused)}")
    return state


# --------------------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the path and the reason."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint directory and the training step it holds."""

    path: Path
    step: int


_STEP_DIR_RE: Final = re.compile(r"step_(\d{8,})")
_TMP_PREFIX: Final = ".tmp-"


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_path(path: Path) -> None:
    """fsync a file or directory so that its contents (or entries) survive power loss."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir() and os.name != "posix":
            return  # Windows cannot open directories; its rename durability is out of our hands.
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_durable(path: Path, data: bytes) -> None:
    _write_file(path, [data])


def _write_commit_marker(directory: Path, manifest_sha256: str) -> None:
    """Write ``COMMIT`` last: its presence means everything else was already durable.

    It holds the manifest's digest so that a damaged manifest is detected too.  Kept as a separate function
    so tests can simulate a crash at exactly this point.
    """
    _write_durable(directory / _COMMIT, (manifest_sha256 + "\n").encode("ascii"))


class CheckpointManager:
    """Atomic save, verification, fallback and pruning of ``<root>/step_XXXXXXXX`` checkpoints.

    ``root`` is normally ``<run_dir>/checkpoints``; it is created lazily on the first save so that read-only
    uses (``resolve_checkpoint``) never create directories.
    """

    def __init__(self, root: Path, keep_last: int = 2) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(
                f"keep_last must be an int >= 1 (pruning to zero would delete the checkpoint "
                f"just written), got {keep_last!r}"
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self._writer: threading.Thread | None = None
        self._pending: CheckpointInfo | None = None
        self._error: BaseException | None = None
        #: Seconds the last save took from its call to its commit, and how long its caller was blocked.
        self.write_seconds = 0.0
        self.blocking_seconds = 0.0

    # -- saving -------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        parts: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        background: bool = False,
    ) -> CheckpointInfo:
        """Write ``parts`` (name -> nested state) and ``meta`` as the checkpoint for ``step``, atomically.

        Either the complete checkpoint appears under ``step_XXXXXXXX`` or, after a crash, nothing but a hidden
        temp dir does.  Re-saving an existing step replaces it.  Pruning happens only after the commit.

        ``background``: copy the tensors to the CPU now, then write, fsync, commit and prune in a
        thread, so training goes on meanwhile; the returned checkpoint exists once :meth:`wait`
        returns. A save first waits for the previous one. A failed background write (a full disk)
        leaves the earlier checkpoints as they were, and :meth:`wait` raises its error.
        """
        self.wait()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not isinstance(parts, Mapping):
            raise TypeError(f"parts must be a mapping of part name -> state, got {type(parts).__qualname__}")
        for name in parts:
            _check_part_name(name)
        meta_skeleton, meta_tensors = flatten_state(dict(meta) if meta is not None else {})
        if meta_tensors:
            # Meta lives in the manifest and should stay small and human-readable; tensors go in parts.
            raise ValueError(f"meta must not contain tensors (found {sorted(meta_tensors)}); put them in a part")

        newer = [info for info in self.committed() if info.step > step]
        if newer:
            logger.warning(
                "saving step %d while newer checkpoints exist (%s); latest_valid() will still prefer them",
                step,
                ", ".join(str(info.path) for info in newer),
            )
        started = time.perf_counter()
        prepared = [_prepare_part(name, state, snapshot=background) for name, state in parts.items()]
        info = CheckpointInfo(path=self.root / _step_dir_name(step), step=step)
        if not background:
            self._write(info, prepared, meta_skeleton, started)
            return info
        self.blocking_seconds = time.perf_counter() - started

        def write() -> None:
            try:
                self._write(info, prepared, meta_skeleton, started)
            except BaseException as err:  # noqa: BLE001 - handed to wait(), which raises it
                self._error = err

        # Not a daemon: an interpreter that exits (or a run that crashes) finishes the write first.
        self._writer = threading.Thread(target=write, name=f"checkpoint-{step}")
        self._pending = info
        self._writer.start()
        return info

    def wait(self) -> CheckpointInfo | None:
        """Block until a background save is committed and return it (None if none was pending);
        raise its error if it failed."""
        writer, self._writer = self._writer, None
        pending, self._pending = self._pending, None
        if writer is not None:
            writer.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        return pending

    @property
    def pending(self) -> bool:
        """Whether a background save is still being written."""
        return self._writer is not None and self._writer.is_alive()

    def _write(self, info: CheckpointInfo, prepared: list[_PreparedPart], meta_skeleton: Any, started: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        final = info.path
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)  # leftover of an earlier failed save by a process with our pid
        try:
            tmp.mkdir()
            files: dict[str, dict[str, Any]] = {}
            for part in prepared:
                files.update(_write_part(tmp, part))
            manifest = {
                "format": _MANIFEST_FORMAT,
                "version": _FORMAT_VERSION,
                "step": info.step,
                "parts": [part.name for part in prepared],
                "meta": meta_skeleton,
                "files": dict(sorted(files.items())),
            }
            manifest_bytes = json.dumps(manifest, allow_nan=False, indent=1, sort_keys=True).encode("utf-8")
            _write_durable(tmp / _MANIFEST, manifest_bytes)
            _write_commit_marker(tmp, hashlib.sha256(manifest_bytes).hexdigest())
            _fsync_path(tmp)
        except BaseException:
            # A full disk (ENOSPC) or any other failure before the commit: the half-written copy
            # goes, so it frees its space and the earlier checkpoints stay the newest valid ones.
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        aside: Path | None = None
        if final.exists():
            # rename() cannot replace a non-empty directory, so move the old one out of the way under a
            # hidden .tmp- name (invisible to readers, cleaned up by the next save should we crash here).
            aside = self.root / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
            if aside.exists():
                shutil.rmtree(aside)
            os.rename(final, aside)
        os.rename(tmp, final)
        _fsync_path(self.root)
        self.write_seconds = time.perf_counter() - started
        logger.info("committed checkpoint %s in %.1f s", final, self.write_seconds)

        # Everything below is housekeeping on a durable checkpoint.  A failure (e.g. a permission error on
        # an old directory) must not make the caller believe the save failed, so it is logged, not raised;
        # whatever is left over is retried by the next save.
        try:
            if aside is not None:
                shutil.rmtree(aside)
            self._remove_stale_tmp()
            self._prune(keep=info)
        except OSError:
            logger.warning("checkpoint %s committed, but cleaning up old checkpoints failed", final, exc_info=True)

    def _remove_stale_tmp(self) -> None:
        # Single-writer assumption: any .tmp-* besides the one we just renamed is debris from a crash.
        for entry in self.root.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                logger.info("removing stale temporary checkpoint directory %s", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _prune(self, keep: CheckpointInfo) -> None:
        committed = self.committed()
        excess = len(committed) - self.keep_last
        # Oldest first, but never the checkpoint just written (it may be older than others when a run was
        # resumed from an earlier step).
        victims = [info for info in committed if info.path != keep.path][: max(excess, 0)]
        for info in victims:
            # Rename first so a crash mid-delete leaves a hidden .tmp- dir, never a half-deleted step dir
            # that still carries its COMMIT marker.
            doomed = self.root / f"{_TMP_PREFIX}pruned-{info.path.name}-{os.getpid()}"
            os.rename(info.path, doomed)
            shutil.rmtree(doomed)
            logger.info("pruned checkpoint %s", info.path)
        if victims:
            _fsync_path(self.root)

    # -- reading ------------------------------------------------------------------------------------------

    def committed(self) -> list[CheckpointInfo]:
        """All ``step_XXXXXXXX`` dirs that carry a ``COMMIT`` marker, ascending by step (not yet verified)."""
        if not self.root.is_dir():
            return []
        found: list[CheckpointInfo] = []
        for entry in self.root.iterdir():
            match = _STEP_DIR_RE.fullmatch(entry.name)
            if match and entry.is_dir() and (entry / _COMMIT).is_file():
                found.append(CheckpointInfo(path=entry, step=int(match.group(1))))
        found.sort(key=lambda info: info.step)
        return found

    def verify(self, info: CheckpointInfo) -> str | None:
        """Return ``None`` if every file matches the manifest, else a human-readable reason."""
        return _verify_dir(info)

    def latest_valid(self) -> CheckpointInfo | None:
        """Newest committed checkpoint that verifies, warning about each newer one that does not."""
        for info in reversed(self.committed()):
            reason = self.verify(info)
            if reason is None:
                return info
            logger.warning("checkpoint %s is invalid (%s); falling back to an older one", info.path, reason)
        return None

    def load(
        self, info: CheckpointInfo, device: str | torch.device = "cpu", verify: bool = True
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Verify (unless the caller already did, ``verify=False``), then return ``(parts, meta)``
        with tensors on ``device``.

        Raises:
            CheckpointError: naming the path and reason when the checkpoint is incomplete or corrupt.
        """
        reason = self.verify(info) if verify else None
        if reason is not None:
            raise CheckpointError(f"checkpoint {info.path} is invalid: {reason}")
        manifest = _read_json(info.path / _MANIFEST)
        try:
            parts = {name: load_part(info.path, name, device) for name in manifest["parts"]}
            meta = unflatten_state(manifest["meta"], {})
        except (ValueError, TypeError, KeyError, OSError) as exc:
            # Hashes matched, so this means the checkpoint was written wrongly or by another version.
            raise CheckpointError(f"checkpoint {info.path} could not be decoded: {exc}") from exc
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {info.path} has non-dict meta of type {type(meta).__qualname__}")
        return parts, meta


def _verify_dir(info: CheckpointInfo) -> str | None:
    path = info.path
    commit = path / _COMMIT
    manifest_path = path / _MANIFEST
    if not commit.is_file():
        return "missing COMMIT marker (save never finished)"
    if not manifest_path.is_file():
        return "missing manifest.json"
    try:
        expected_manifest_sha = commit.read_text(encoding="ascii").strip()
        if _file_digest(manifest_path) != expected_manifest_sha:
            return "manifest.json does not match the digest recorded in COMMIT"
        manifest = _read_json(manifest_path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"cannot read manifest: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        return "manifest.json is not a prx checkpoint manifest"
    if manifest.get("version") != _FORMAT_VERSION:
        return f"unsupported manifest version {manifest.get('version')!r}"
    if manifest.get("step") != info.step:
        return f"manifest step {manifest.get('step')!r} does not match directory step {info.step}"
    files = manifest.get("files")
    parts = manifest.get("parts")
    if not isinstance(files, dict) or not isinstance(parts, list):
        return "manifest lacks a valid 'files' or 'parts' entry"
    for name in parts:
        if f"{name}.json" not in files:
            return f"part {name!r} has no file listed in the manifest"
    for rel, entry in files.items():
        # Manifest entries are plain names written by save(); reject anything that could escape the dir.
        if not isinstance(rel, str) or "/" in rel or "\\" in rel or rel in {"", ".", ".."}:
            return f"manifest lists an invalid file name {rel!r}"
        if not isinstance(entry, dict):
            return f"manifest entry for {rel} is malformed"
        file = path / rel
        if not file.is_file():
            return f"missing file {file}"
        size = file.stat().st_size
        if size != entry.get("size"):
            return f"size mismatch for {file}: expected {entry.get('size')}, found {size}"
        try:
            digest = _file_digest(file)
        except OSError as exc:
            return f"cannot read {file}: {exc}"
        if digest != entry.get("sha256"):
            return f"sha256 mismatch for {file}"
    return None


def resolve_checkpoint(path_or_root: Path) -> CheckpointInfo:
    """Turn a user-supplied path into a verified checkpoint.

    Accepts a ``step_XXXXXXXX`` directory (verified as-is, no fallback: the user asked for that one), a
    checkpoints root, or a run directory containing ``checkpoints/`` (newest valid checkpoint, with fallback).

    Raises:
        CheckpointError: if the path does not exist or holds no valid checkpoint.
    """
    path = Path(path_or_root)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    match = _STEP_DIR_RE.fullmatch(path.name)
    if match and path.is_dir():
        info = CheckpointInfo(path=path, step=int(match.group(1)))
        reason = _verify_dir(info)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path} is invalid: {reason}")
        return info
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = CheckpointManager(root).latest_valid()
    if latest is None:
        raise CheckpointError(f"no valid committed checkpoint found under {root}")
    return latest
