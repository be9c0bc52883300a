"""Open-tab latency (warm pool, zygote, cold) and the memory of 200 tabs of fos-host against
peers (a multiprocessing forkserver, an exec'd python), measured side by side in one run:
`fos-host bench tabs`, runnable from a checkout. See benchmarks/README.md.

    .venv/bin/python benchmarks/tabs.py [--runs N] [--rounds N] [--quick] [--json]
"""

from __future__ import annotations

import sys

from fos_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "tabs", *sys.argv[1:]]))
