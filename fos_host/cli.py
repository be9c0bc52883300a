"""fos-host: the command line.

    fos-host exec [options] -- CMD ARG...    run CMD in a sandbox, exit with its status
    fos-host demo                            sandbox a workload, print its isolation report
    fos-host doctor [--json]                 what this machine's kernel allows, and fixes
    fos-host seccomp dump PROFILE            the compiled filter, readable (PFC)
    fos-host bench spawn [--json]            spawn latency and memory against peers
    fos-host bench ipc [--json]              IPC round trips and transfers against peers

Every error is one line on stderr; bad flags, policies and missing kernel features exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import NoReturn

from fos_host.errors import ConfigError, FosError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fos-host", description="The process host of the fOS browser.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ex = sub.add_parser("exec", help="run a command in a sandbox")
    ex.add_argument(
        "--profile",
        default="renderer",
        help="seccomp profile: renderer, network, storage, none, or a .policy file",
    )
    ex.add_argument("--memory", help="memory limit, e.g. 64M (OOM kill above it)")
    ex.add_argument("--pids", type=int, help="most processes and threads at once")
    ex.add_argument("--cpu-weight", type=int, help="cpu weight 1..10000 (100 = default)")
    ex.add_argument("--ro-bind", action="append", default=[], metavar="SRC[:DST]")
    ex.add_argument("--bind", action="append", default=[], metavar="SRC[:DST]")
    ex.add_argument("--tmpfs", action="append", default=[], metavar="DST")
    ex.add_argument("--net", choices=("none", "host"), default="none")
    ex.add_argument("--hostname", default="fos-sandbox")
    ex.add_argument("--setenv", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument(
        "--no-runtime",
        action="store_true",
        help="do not bind /usr and the Python runtime read-only",
    )
    ex.add_argument(
        "--seccomp-learn",
        action="store_true",
        help="allow everything, then print what the profile would have refused",
    )
    ex.add_argument("--json", action="store_true", help="the outcome as JSON on stderr")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARG...")

    sub.add_parser("demo", help="sandbox a workload and print its isolation report")

    doc = sub.add_parser("doctor", help="check what this machine's kernel allows")
    doc.add_argument("--json", action="store_true")

    sc = sub.add_parser("seccomp", help="seccomp policies")
    scs = sc.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dump = scs.add_parser("dump", help="print a profile's compiled filter (PFC)")
    dump.add_argument("profile")

    bench = sub.add_parser(
        "bench",
        help="benchmarks against peers, measured in the same run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples (what is measured: benchmarks/README.md):\n"
        "  fos-host bench spawn --runs 200\n"
        "  fos-host bench ipc --json     # ~20 s; one JSON object\n"
        "  fos-host bench ipc --quick    # a few calls, to see it works",
    )
    bench.add_argument("what", choices=("spawn", "ipc"))
    bench.add_argument("--json", action="store_true")
    bench.add_argument(
        "--runs",
        type=int,
        help="spawn: runs per method; ipc: calls per method, size and placement in each round",
    )
    bench.add_argument("--rounds", type=int, help="ipc: rounds, the methods interleaved in each")
    bench.add_argument("--quick", action="store_true", help="ipc: a few calls, to see it works")
    return p


def _cmd_exec(a: argparse.Namespace) -> int:
    from fos_host.kernel.cgroup import format_size
    from fos_host.sandbox.jail import Jail
    from fos_host.sandbox.sandbox import Spawner

    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not argv:
        raise ConfigError("fos-host exec: no command given (fos-host exec [options] -- CMD ...)")
    jail = Jail(a.profile).net(a.net).hostname(a.hostname)
    jail.runtime = not a.no_runtime
    if a.memory:
        jail.memory(a.memory)
    if a.pids is not None:
        jail.pids(a.pids)
    if a.cpu_weight is not None:
        jail.cpu_weight(a.cpu_weight)
    for spec, writable in [(s, False) for s in a.ro_bind] + [(s, True) for s in a.bind]:
        src, _, dst = spec.partition(":")
        (jail.bind if writable else jail.ro_bind)(src, dst or None)
    for t in a.tmpfs:
        jail.tmpfs(t)
    for kv in a.setenv:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise ConfigError(f"--setenv wants KEY=VALUE, not {kv!r}")
        jail.env(key, value)
    if a.seccomp_learn:
        if a.profile == "none":
            raise ConfigError("--seccomp-learn needs a profile to compare against")
        jail.seccomp_learn()

    signal.signal(signal.SIGTERM, _interrupt)
    with Spawner() as sp, sp.spawn(jail, argv=argv) as sb:
        try:
            status = sb.wait()
        except KeyboardInterrupt:
            sb.kill()
            status = sb.wait()
        refused = sb.learner.refused() if sb.learner else None
    normal = status.signal is None and not status.oom_kills
    if not normal:
        print(f"fos-host: sandbox {status.describe()}", file=sys.stderr)
    if refused is not None:
        names = ", ".join(refused) if refused else "nothing"
        print(
            f"fos-host: seccomp learn: profile {a.profile} would have refused: {names}",
            file=sys.stderr,
        )
    if a.json:
        out = {
            "returncode": status.returncode,
            "exit": status.code,
            "signal": signal.Signals(status.signal).name if status.signal else None,
            "reason": status.describe(),
            "oom_kills": status.oom_kills,
            "memory_limit": status.memory_limit,
            "memory_limit_text": format_size(status.memory_limit) if status.memory_limit else None,
            "seccomp_syscall": status.seccomp_syscall,
            "refused": refused,
            "host_uid": sb.host_uid,
        }
        print(json.dumps(out), file=sys.stderr)
    return status.returncode


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_doctor(a: argparse.Namespace) -> int:
    from fos_host import doctor

    checks = doctor.run_checks()
    print(doctor.to_json(checks) if a.json else doctor.render_table(checks))
    return 0


def _cmd_seccomp(a: argparse.Namespace) -> int:
    from fos_host.kernel import seccomp
    from fos_host.sandbox.seccomp_policy import load_policy

    sys.stdout.write(seccomp.dump_pfc(load_policy(a.profile)))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from fos_host.demo import run_demo

    return run_demo()


def _cmd_bench(a: argparse.Namespace) -> int:
    if a.what == "ipc":
        from fos_host.bench_ipc import run_ipc_bench

        return run_ipc_bench(runs=a.runs, rounds=a.rounds, quick=a.quick, as_json=a.json)
    if a.rounds is not None or a.quick:
        raise ConfigError("--rounds and --quick are options of bench ipc")
    from fos_host.bench import run_spawn_bench

    return run_spawn_bench(runs=200 if a.runs is None else a.runs, as_json=a.json)


COMMANDS = {
    "exec": _cmd_exec,
    "doctor": _cmd_doctor,
    "seccomp": _cmd_seccomp,
    "demo": _cmd_demo,
    "bench": _cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    try:
        a = _parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if a.verbose else logging.WARNING,
            format="fos-host: %(levelname)s %(name)s: %(message)s",
        )
        return COMMANDS[a.command](a)
    except FosError as e:
        print(f"fos-host: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
