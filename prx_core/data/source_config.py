"""The options every indexed image source shares (``image_folder``, ``webdataset``).

Torch-free on purpose: a plugin's ``Config`` subclasses :class:`IndexedSourceConfig`, and plugin
modules are imported by ``prx-run plugins`` and recipe checks, which must stay fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: reference.md §3's baseline resolution.
DEFAULT_SIZE = 256


@dataclass(frozen=True)
class IndexedSourceConfig:
    """Bucketing, captions and bad-data limits; the ``[data]`` keys both sources accept."""

    #: Nominal side (px): buckets hold about (size / 32)² patches of 32 px (reference.md §3).
    size: int = DEFAULT_SIZE
    #: Aspect-ratio buckets (w/h in [0.5, 2]); false: every image is a square ``size`` center crop.
    buckets: bool = True
    #: Caption key -> sampling weight, drawn per sample (reference.md §4, caption length).
    caption_weights: dict[str, float] = field(default_factory=lambda: {"caption": 1.0})
    #: Items reserved for evaluation and sample grids (chosen by a hash of their name, never trained).
    held_out: int = 64
    #: Shorter side below this (px) is skipped as ``tiny``.
    min_side: int = 64
    #: More pixels than this (from the header, before decoding) is skipped as ``huge``.
    max_pixels: int = 4096 * 4096 * 4
    #: Stop with an error once more than this fraction of the items seen was skipped.
    max_skip_ratio: float = 0.05
    #: ... but only after this many items, so one bad file early on does not stop a run.
    min_seen: int = 100
    #: Captions longer than this (characters) are truncated and counted as ``overlong``.
    max_caption_chars: int = 2000
    #: Where the index (image sizes, tar offsets) is cached: "auto" (``$PRX_CACHE_DIR``, else
    #: ``$XDG_CACHE_HOME/prx`` or ``~/.cache/prx``), "off", or a directory.
    index_cache: str = "auto"
    #: Threads decoding images in parallel (Pillow releases the GIL); 0: min(8, CPU count).
    decode_threads: int = 0
    #: Decode the next micro-batch in those threads while the current one trains (one extra
    #: micro-batch of decoded images in memory); the batches are the same either way.
    read_ahead: bool = True
    #: None: the recipe's seed, so changing ``seed`` changes the data order (reference.md §7.6).
    seed: int | None = None

    def __post_init__(self) -> None:
        from prx_core.data.captions import validate_caption_weights

        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.buckets and self.size % 32:
            raise ValueError(f"size must be a multiple of 32 when buckets = true, got {self.size}")
        validate_caption_weights(self.caption_weights)
        if self.held_out < 0:
            raise ValueError(f"held_out must be >= 0, got {self.held_out}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_pixels < self.min_side * self.min_side:
            raise ValueError(f"max_pixels ({self.max_pixels}) must be >= min_side² ({self.min_side**2})")
        if not (math.isfinite(self.max_skip_ratio) and 0.0 <= self.max_skip_ratio <= 1.0):
            raise ValueError(f"max_skip_ratio must be in [0, 1], got {self.max_skip_ratio}")
        if self.min_seen < 1:
            raise ValueError(f"min_seen must be >= 1, got {self.min_seen}")
        if self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars must be >= 1, got {self.max_caption_chars}")
        if not self.index_cache:
            raise ValueError('index_cache must be "auto", "off" or a directory')
        if self.decode_threads < 0:
            raise ValueError(f"decode_threads must be >= 0, got {self.decode_threads}")
