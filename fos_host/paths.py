"""Where the project's data files live: `seccomp/` policies and `cgroups/` profiles.

They sit at the top of the source tree (the product runs from its checkout, an editable
install, or the container image, which copies the tree). `FOS_HOST_DATA` overrides the
top directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir(kind: str) -> Path:
    """The directory holding the data files of `kind` ("seccomp" or "cgroups")."""
    top = os.environ.get("FOS_HOST_DATA")
    base = Path(top) if top else Path(__file__).resolve().parent.parent
    return base / kind
