"""prx: a small pluggy trainer for text-to-image diffusion transformers.

Importing this package is cheap on purpose (no torch): `prx-run plugins` and recipe checks
must answer quickly. The hook markers are re-exported so a plugin needs one import::

    from prx_core import hookimpl
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "prx"
ENTRY_POINT_GROUP = "prx"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["ENTRY_POINT_GROUP", "PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
