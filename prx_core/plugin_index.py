"""The plugin packages published from the prx repository: entry name -> distribution.

A recipe that names an entry (``[router] use = "tread"``, ``[plugins.ema]``) which no installed
package provides is refused with the ``pip install`` line of the package that provides it, when it
is one of these. Installed plugins are found through their entry points (:mod:`prx_core.plugins`);
this table covers the ones that are not installed. It is generated from ``plugins/*/pyproject.toml``
(their ``[project.entry-points.prx]``) by ``python -m prx_core.plugin_index plugins``, and
``tests/unit/test_recipe_sources.py`` checks that it matches them.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

KNOWN_PLUGIN_DISTRIBUTIONS: dict[str, str] = {
    "aim": "prx-aim",
    "cmmd": "prx-cmmd",
    "contrastive_fm": "prx-contrastive-fm",
    "dc_ae": "prx-dc-ae",
    "dino_mmd": "prx-dino-mmd",
    "ema": "prx-ema",
    "fid": "prx-fid",
    "flux2_ae": "prx-flux2-ae",
    "flux_vae": "prx-flux-vae",
    "image_folder": "prx-image-folder",
    "irepa": "prx-irepa",
    "lpips": "prx-lpips",
    "minilm": "prx-minilm",
    "muon": "prx-muon",
    "perceptual_dino": "prx-perceptual-dino",
    "qwen3vl": "prx-qwen3vl",
    "repa": "prx-repa",
    "repa_e_vae": "prx-repa-e-vae",
    "resolution_aware": "prx-resolution-aware",
    "shapes_adherence": "prx-shapes-adherence",
    "sprint": "prx-sprint",
    "t5gemma": "prx-t5gemma",
    "tread": "prx-tread",
    "webdataset": "prx-webdataset",
    "x_prediction": "prx-x-prediction",
}


def scan(plugins_dir: Path) -> dict[str, str]:
    """Entry name -> distribution, read from every ``<plugins_dir>/*/pyproject.toml``."""
    found: dict[str, str] = {}
    for path in sorted(plugins_dir.glob("*/pyproject.toml")):
        project = tomllib.loads(path.read_text(encoding="utf-8"))["project"]
        for name in project.get("entry-points", {}).get("prx", {}):
            found[name] = project["name"]
    return dict(sorted(found.items()))


def main(argv: list[str]) -> int:
    """Print the table for ``plugins_dir`` (paste it above)."""
    plugins_dir = Path(argv[0] if argv else "plugins")
    rows = "".join(f'    "{name}": "{dist}",\n' for name, dist in scan(plugins_dir).items())
    sys.stdout.write("KNOWN_PLUGIN_DISTRIBUTIONS: dict[str, str] = {\n" + rows + "}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
