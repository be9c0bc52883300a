"""Tab lifecycle steps (freeze, hibernate, restore from memory and from disk), the memory a
hibernation gives back, snapshot compression, and memory pressure onset to the first action,
against peers (reload from the URL, SIGSTOP, cgroup freezers) measured in the same run:
`fos-host bench lifecycle`, runnable from a checkout. See benchmarks/README.md.

    .venv/bin/python benchmarks/lifecycle.py [--runs N] [--onsets N] [--quick] [--json]
"""

from __future__ import annotations

import sys

from fos_host.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "lifecycle", *sys.argv[1:]]))
