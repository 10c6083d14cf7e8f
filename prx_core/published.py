"""Published PRX ablation results (reference.md §5), as data for the "published" column of ``prx-run report``.

A recipe names the row it reproduces with the top-level key ``reference = "<table>/<row>"`` (for
example ``reference = "latent_256/repa_dinov3"``); ``prx-run check`` rejects names that are not
here. The report shows the published numbers of that row and their difference from the same
table's published baseline, so a run at another scale (the CPU mini-study) can still be compared
on the *direction* of an effect.

The numbers come from PRX's cluster (FID / CMMD / DINO-MMD after 100k steps; batches/s on their
hardware); "–" in reference.md §5 is ``None`` here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

__all__ = ["METRICS", "PUBLISHED", "TABLES", "PublishedResult", "baseline_of", "lookup"]

#: The published metrics, named as evaluation logs them (``eval/<name>`` in metrics.jsonl).
METRICS = ("fid", "cmmd", "dino_mmd")

#: Table id -> what reference.md §5 says the table measures.
TABLES: dict[str, str] = {
    "latent_256": "256 px, FLUX VAE, 100k steps",
    "pixel_1024": "pixel space at 1024 px, x-prediction",
}


@dataclass(frozen=True)
class PublishedResult:
    """One row of a reference.md §5 table."""

    table: str
    #: The row's label as reference.md §5 writes it.
    experiment: str
    fid: float
    cmmd: float
    dino_mmd: float
    batches_per_s: float | None

    @property
    def key(self) -> str:
        return f"{self.table}/{_slug(self.experiment)}"

    def metrics(self) -> dict[str, float]:
        """``{"fid": ..., "cmmd": ..., "dino_mmd": ...}``."""
        return {"fid": self.fid, "cmmd": self.cmmd, "dino_mmd": self.dino_mmd}


def _slug(label: str) -> str:
    out = label.lower().replace("(+repa)", "").replace(".", "").replace("-", "_").strip()
    return "_".join(out.split())


_ROWS = (
    PublishedResult("latent_256", "baseline", 18.20, 0.41, 0.39, 3.95),
    PublishedResult("latent_256", "REPA DINOv2", 16.6, 0.39, 0.31, 3.66),
    PublishedResult("latent_256", "REPA DINOv3", 14.64, 0.35, 0.30, 3.46),
    PublishedResult("latent_256", "FLUX.2 AE", 12.07, 0.09, 0.08, 1.79),
    PublishedResult("latent_256", "REPA-E VAE (+REPA)", 12.08, 0.26, 0.18, 3.39),
    PublishedResult("latent_256", "contrastive FM", 20.03, 0.40, 0.36, 3.75),
    PublishedResult("latent_256", "x-prediction", 16.80, 0.54, 0.49, 3.95),
    PublishedResult("latent_256", "TREAD", 21.61, 0.55, 0.41, 4.11),
    PublishedResult("latent_256", "SPRINT", 22.56, 0.72, 0.42, 4.20),
    PublishedResult("latent_256", "short captions", 36.84, 0.98, 1.14, 3.95),
    PublishedResult("latent_256", "Muon", 15.55, 0.36, 0.35, None),
    PublishedResult("latent_256", "bf16 weights", 21.87, 0.61, 0.57, None),
    PublishedResult("pixel_1024", "baseline", 17.42, 0.71, 0.56, 1.33),
    PublishedResult("pixel_1024", "TREAD", 14.10, 0.46, 0.37, 1.64),
    PublishedResult("pixel_1024", "SPRINT", 16.90, 0.51, 0.41, 1.89),
)

#: ``"<table>/<row>"`` -> result, e.g. ``"latent_256/repa_e_vae"``, ``"pixel_1024/tread"``.
PUBLISHED: dict[str, PublishedResult] = {row.key: row for row in _ROWS}


def lookup(key: str) -> PublishedResult:
    """The published row ``key``; a KeyError names the closest known key."""
    if key in PUBLISHED:
        return PUBLISHED[key]
    close = difflib.get_close_matches(key, list(PUBLISHED), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise KeyError(f"no published result '{key}' (published rows: {', '.join(PUBLISHED)}){hint}")


def baseline_of(key: str) -> PublishedResult:
    """The baseline row of the table ``key`` belongs to."""
    return PUBLISHED[f"{lookup(key).table}/baseline"]
