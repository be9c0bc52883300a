"""Where the project's data files live: `seccomp/` policies and `cgroups/` profiles.

In a checkout (and an editable install, and the container image, which copies the tree) they
sit at the top of the source tree, beside the package. A build that carries only the package
— the single-file binary (packaging/binary/build.py) — puts them inside it, as
`fos_host/_data/`, because a site-packages directory has no "beside the package". The bundled
copy wins when present; `FOS_HOST_DATA` overrides both with another top directory.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
BUNDLED = "_data"  # the directory below the package that a packaged build fills


def data_dir(kind: str) -> Path:
    """The directory holding the data files of `kind` ("seccomp" or "cgroups")."""
    top = os.environ.get("FOS_HOST_DATA")
    if top:
        return Path(top) / kind
    bundled = _PACKAGE / BUNDLED / kind
    return bundled if bundled.is_dir() else _PACKAGE.parent / kind
