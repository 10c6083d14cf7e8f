"""Data source ``webdataset``: WebDataset tar shards with random access (reference.md §3, §4).

Shards are local paths, globs, brace ranges (``shard-{00000..00099}.tar``) or http(s) URLs
(downloaded once into a cache folder). Each shard's members are indexed with :mod:`tarfile`
(offsets and sizes), so reading one sample is a seek, not a scan, and the order stays a pure
function of the step: resume is exact, mid-epoch included. Members group into samples by key
(the path up to the first dot of the file name): the image (``jpg``, ``jpeg``, ``png``, ``webp``),
captions from ``<key>.txt`` (caption key ``caption``), ``<key>.<name>.txt`` (key ``<name>``)
and the string fields of ``<key>.json``.

Importing this module is torch-free: the factory imports the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.data.source_config import IndexedSourceConfig
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_webdataset.source import WebDatasetSource

__all__ = ["INFO", "WebDatasetConfig", "prx_register_data_sources"]

INFO = PluginInfo(
    name="webdataset",
    summary="Data: WebDataset tar shards (local, globbed or downloaded), random access for exact resume, buckets",
    spec="reference.md §3 (buckets), §4 (caption length); DESIGN (data at scale)",
    paper="https://arxiv.org/abs/2307.01952",
)

_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


@dataclass(frozen=True, kw_only=True)
class WebDatasetConfig(IndexedSourceConfig):
    """The ``[data]`` table when ``use = "webdataset"`` (plus the shared keys of the base)."""

    #: Shard paths, globs, brace ranges or http(s) URLs; uncompressed ``.tar`` only.
    shards: tuple[str, ...]
    #: Where URL shards are downloaded: "auto" (the cache folder of ``index_cache = "auto"``,
    #: subfolder ``webdataset``) or a directory.
    download_dir: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.shards:
            raise ValueError("shards must list at least one shard path, glob or URL")
        for shard in self.shards:
            if not shard.strip():
                raise ValueError("shards must not contain empty strings")
            if shard.lower().endswith(_COMPRESSED):
                raise ValueError(
                    f"shard {shard!r} is compressed; random access (exact resume) needs uncompressed .tar shards"
                )
        if not self.download_dir or self.download_dir == "off":
            raise ValueError('download_dir must be "auto" or a directory')


def _build(config: WebDatasetConfig, run: Any) -> WebDatasetSource:
    from prx_core.data.indexed import check_against_recipe
    from prx_webdataset.source import WebDatasetSource

    seed = config.seed if config.seed is not None else run.recipe.seed
    source = WebDatasetSource(config, seed, rank=run.rank)
    check_against_recipe(source, run.recipe)
    return source


@hookimpl
def prx_register_data_sources(registry: Any) -> None:
    registry.register("webdataset", _build, WebDatasetConfig)
