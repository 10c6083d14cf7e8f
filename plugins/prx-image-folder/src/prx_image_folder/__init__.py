"""Data source ``image_folder``: a folder of images with a caption sidecar (reference.md §3, §4).

Images anywhere under ``root`` (jpg, jpeg, png, webp), captions in one JSONL or CSV file whose
``file`` column names each image relative to ``root``; every other column is a caption key
(``long``, ``short`` ...) that ``caption_weights`` can draw from. Aspect-ratio buckets, the
deterministic resumable order, held-out split and bad-data handling are core's
(:mod:`prx_core.data.indexed`); this package lists the folder, reads the sidecar and caches
image headers.

Importing this module is torch-free: the factory imports the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.data.source_config import IndexedSourceConfig
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_image_folder.source import ImageFolderSource

__all__ = ["INFO", "ImageFolderConfig", "prx_register_data_sources"]

INFO = PluginInfo(
    name="image_folder",
    summary="Data: a folder of images with a JSONL/CSV caption sidecar; aspect buckets, exact resume, bad-data guard",
    spec="reference.md §3 (buckets), §4 (caption length)",
    paper="https://arxiv.org/abs/2307.01952",
)

SIDECAR_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True, kw_only=True)
class ImageFolderConfig(IndexedSourceConfig):
    """The ``[data]`` table when ``use = "image_folder"`` (plus the shared keys of the base)."""

    #: The image folder (searched recursively; names starting with "." are ignored).
    root: str
    #: Caption sidecar relative to ``root``: ``.jsonl`` (objects with a ``file`` key) or ``.csv``
    #: (a ``file`` column); every other key/column holding strings is a caption key.
    captions: str = "captions.jsonl"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.root:
            raise ValueError("root must name the image folder")
        if not self.captions.endswith(SIDECAR_SUFFIXES):
            raise ValueError(f"captions must be a .jsonl or .csv file relative to root, got {self.captions!r}")


def _build(config: ImageFolderConfig, run: Any) -> ImageFolderSource:
    from prx_core.data.indexed import check_against_recipe
    from prx_image_folder.source import ImageFolderSource

    seed = config.seed if config.seed is not None else run.recipe.seed
    source = ImageFolderSource(config, seed, rank=run.rank)
    check_against_recipe(source, run.recipe)
    return source


@hookimpl
def prx_register_data_sources(registry: Any) -> None:
    registry.register("image_folder", _build, ImageFolderConfig)
