"""Spawn latency and idle memory of fos-host against peers (bwrap, multiprocessing), measured
side by side in one run: `fos-host bench spawn`, runnable from a checkout. See
benchmarks/README.md.

    .venv/bin/python benchmarks/spawn.py [--runs N] [--json]
"""

from __future__ import annotations

import sys

from fos_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "spawn", *sys.argv[1:]]))
