"""IPC round trips and 64 MiB transfers of fos-host against peers (multiprocessing.Pipe, raw
sockets), measured side by side in one run: `fos-host bench ipc`, runnable from a checkout.
See benchmarks/README.md.

    .venv/bin/python benchmarks/ipc.py [--runs N] [--rounds N] [--quick] [--json]
"""

from __future__ import annotations

import sys

from fos_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "ipc", *sys.argv[1:]]))
