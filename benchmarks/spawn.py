"""Spawn latency and idle memory of fos-host against peers (bwrap, multiprocessing), measured
side by side in one run. The same as `fos-host bench spawn`; see benchmarks/README.md.

    .venv/bin/python benchmarks/spawn.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import sys

from fos_host.bench import run_spawn_bench
from fos_host.errors import FosError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fos-host spawn benchmark, against peers")
    p.add_argument("--runs", type=int, default=200, help="measured runs per method (200)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    a = p.parse_args(argv)
    try:
        return run_spawn_bench(runs=a.runs, as_json=a.json)
    except FosError as e:
        print(f"spawn bench: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
