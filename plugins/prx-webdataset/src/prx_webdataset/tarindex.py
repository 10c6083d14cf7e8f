"""Random access into uncompressed tar shards: member offsets, sample grouping, windowed reads."""

from __future__ import annotations

import io
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

#: Image extensions, in the order one is picked when a sample has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: ``<key>.txt`` holds the caption under this key.
PLAIN_CAPTION_KEY = "caption"

#: (offset of the member's data in the shard, size in bytes)
Span = tuple[int, int]


@dataclass
class TarSample:
    """One sample's members inside a shard."""

    key: str
    image: Span | None = None
    image_ext: str = ""
    #: Caption key -> span of a ``.txt`` member.
    texts: dict[str, Span] = field(default_factory=dict)
    json: Span | None = None


def split_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member: the extension starts at the first dot of the file name.

    ``a/b/img_001.long.txt`` -> ``("a/b/img_001", "long.txt")``, as WebDataset groups members.
    """
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def index_tar(path: Path) -> tuple[list[TarSample], list[str]]:
    """Samples with an image (in member order) and the keys of samples without one.

    Reads only the 512-byte headers (tarfile seeks over member data), so indexing a shard costs
    one pass over its headers, not its bytes. Raises ValueError for a compressed or broken tar.
    """
    samples: dict[str, TarSample] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if posixpath.basename(member.name).startswith("."):
                    continue  # hidden files, such as the "._name.jpg" resource forks macOS adds
                key, ext = split_name(member.name)
                if not ext:
                    continue
                sample = samples.setdefault(key, TarSample(key))
                span = (member.offset_data, member.size)
                if ext in IMAGE_EXTENSIONS:
                    better = sample.image is None or IMAGE_EXTENSIONS.index(ext) < IMAGE_EXTENSIONS.index(
                        sample.image_ext
                    )
                    if better:
                        sample.image, sample.image_ext = span, ext
                elif ext == "txt":
                    sample.texts[PLAIN_CAPTION_KEY] = span
                elif ext.endswith(".txt"):
                    sample.texts[ext.removesuffix(".txt")] = span
                elif ext == "json":
                    sample.json = span
    except tarfile.ReadError as err:
        raise ValueError(
            f"webdataset: {path} is not an uncompressed tar ({err}); random access needs plain .tar shards"
        ) from None
    with_image = [s for s in samples.values() if s.image is not None]
    without = [s.key for s in samples.values() if s.image is None]
    return with_image, without


def read_span(path: Path, span: Span) -> bytes:
    """The bytes of one member (``os.pread``: no shared file position, safe across threads)."""
    offset, size = span
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        done = 0
        while done < size:
            block = os.pread(fd, size - done, offset + done)
            if not block:
                raise OSError(f"{path}: member at {offset} ends after {done} of {size} bytes")
            parts.append(block)
            done += len(block)
        return b"".join(parts)
    finally:
        os.close(fd)


class MemberFile(io.RawIOBase):
    """A read-only, seekable file over one member, for reading an image header without the rest."""

    def __init__(self, path: Path, span: Span) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._start, self._size = span
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._start + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_member(path: Path, span: Span) -> io.BufferedReader:
    """A buffered binary file over one member (close it when done)."""
    return io.BufferedReader(MemberFile(path, span), buffer_size=1 << 16)
