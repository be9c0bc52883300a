"""fos-host: the command line.

    fos-host exec [options] -- CMD ARG...    run CMD in a sandbox, exit with its status
    fos-host demo [--once] [--tabs N] [--json]   a dozen tabs on a built-in origin server, live
    fos-host demo --sandbox-report           sandbox a workload, print its isolation report
    fos-host doctor [--json]                 what this machine's kernel allows, and fixes
    fos-host seccomp dump [--json] PROFILE   the compiled filter, readable (PFC); or as data
    fos-host bench spawn [--json]            spawn latency and memory against peers
    fos-host bench ipc [--json]              IPC round trips and transfers against peers
    fos-host bench tabs [--json]             open-tab latency and memory of 200 tabs
    fos-host bench lifecycle [--json]        freeze, hibernate, restore; pressure to action
    fos-host run [--socket PATH] [options]   the daemon: a host and its control socket
        [--dashboard ADDR:PORT] [--metrics ADDR:PORT]   its web page, JSON and Prometheus metrics
    fos-host ctl [--json] open URL | list …  control a running host
    fos-host ctl events [--no-follow]        its lifecycle events, as JSON lines
    fos-host top [--once] [--json]           its tabs, tiers, memory and pressure, live

    fos-host --version                       the version, where it runs from, which Python

Every command's --help ends with examples; every command that reports has --json.
Every error is one line on stderr; bad flags, policies and missing kernel features exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fos_host.errors import ConfigError, FosError

if TYPE_CHECKING:
    from fos_host.host.dashboard import WebServer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _version() -> str:
    """The version, the directory the package runs from and the interpreter: tells a
    checkout, a venv and the single-file binary's extraction (packaging/binary/) apart."""
    import fos_host

    where = Path(fos_host.__file__).resolve().parent
    text = f"fos-host {fos_host.__version__} ({where}; Python {platform.python_version()}, "
    return (text + f"{sys.executable})").replace("%", "%%")  # argparse %-formats it


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fos-host",
        description="The process host of the fOS browser.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples (each command's --help has more):\n"
        "  fos-host doctor                # what this machine allows\n"
        "  fos-host demo                  # tabs in sandboxed renderers, live\n"
        "  fos-host exec -- /bin/echo hi  # one command in a sandbox\n"
        "  fos-host --version",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    p.add_argument(
        "--version",
        action="version",
        version=_version(),
        help="print the version, where it runs from and the Python, then exit",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ex = sub.add_parser(
        "exec",
        help="run a command in a sandbox",
        description="Run CMD in a sandbox (namespaces, seccomp, no capabilities, a cgroup of its\n"
        "own) and exit with its status; an abnormal end is one line on stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fos-host exec -- /bin/echo hi\n"
        "  fos-host exec --memory 64M --pids 64 -- python3 -c 'print(1)'\n"
        "  fos-host exec --ro-bind /srv/data:/data --tmpfs /scratch -- ls /data\n"
        "  fos-host exec --seccomp-learn --json -- python3 -c 'import socket'",
    )
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

    demo = sub.add_parser(
        "demo",
        help="tabs on a built-in origin server in sandboxed renderers, as a live table",
        description="Starts a built-in origin server on loopback (news.fos.test, shop.fos.test,\n"
        "a.b.example.co.uk, c.example.co.uk, evil.test) and a host, opens a dozen tabs\n"
        "across those sites and shows each tab's renderer: pid, host uid, site, memory used /\n"
        "limit, state. Redrawn twice a second until Ctrl-C (or SIGTERM), which shuts\n"
        "everything down; printed once as plain text when stdout is not a terminal.\n"
        "Needs nothing outside this machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fos-host demo                     # live table; Ctrl-C stops it\n"
        "  fos-host demo --once --tabs 5     # print the table once (exit 1 if a tab failed)\n"
        "  fos-host demo --json | jq '.tabs[] | [.id, .site, .pid]'\n"
        "  fos-host demo --sandbox-report    # one sandbox seen from inside, and attacks",
    )
    demo.add_argument(
        "--once", action="store_true", help="print the table once every tab has loaded, and exit"
    )
    demo.add_argument("--tabs", type=int, metavar="N", help="tabs to open (default: 12)")
    demo.add_argument(
        "--json", action="store_true", help="print the table once, as JSON (implies --once)"
    )
    demo.add_argument(
        "--sandbox-report",
        action="store_true",
        help="instead: sandbox a workload, print what it can see and do, then attack from inside",
    )

    doc = sub.add_parser(
        "doctor",
        help="check what this machine's kernel allows",
        description="Try each feature for real (namespaces, cgroups and delegation, seccomp,\n"
        "PSI triggers, the libraries): OK, DEGRADED or MISSING, with what to do.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fos-host doctor\n"
        "  fos-host doctor --json | jq '.checks[] | select(.verdict != \"OK\")'",
    )
    doc.add_argument("--json", action="store_true", help="the kernel and the checks as JSON")

    seccomp_examples = (
        "examples:\n"
        "  fos-host seccomp dump renderer          # the filter as PFC, for review\n"
        "  fos-host seccomp dump --json network | jq '.rules[].syscall'\n"
        "  fos-host seccomp dump ./my.policy"
    )
    sc = sub.add_parser(
        "seccomp",
        help="seccomp policies",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=seccomp_examples,
    )
    scs = sc.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dump = scs.add_parser(
        "dump",
        help="print a profile's compiled filter (PFC)",
        description="Print the filter a profile compiles to as libseccomp's pseudo filter\n"
        "code (PFC), the format for review; --json gives the parsed policy as data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=seccomp_examples,
    )
    dump.add_argument("profile", help="renderer, network, storage, or a .policy file")
    dump.add_argument(
        "--json",
        action="store_true",
        help="the policy as data: default action, and each rule's syscall, action, conditions",
    )

    bench = sub.add_parser(
        "bench",
        help="benchmarks against peers, measured in the same run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples (what is measured: benchmarks/README.md):\n"
        "  fos-host bench spawn --runs 200\n"
        "  fos-host bench ipc --json     # ~20 s; one JSON object\n"
        "  fos-host bench ipc --quick    # a few calls, to see it works\n"
        "  fos-host bench tabs --quick   # a few opens and 20 tabs, in seconds\n"
        "  fos-host bench lifecycle --quick   # one sample of each page, one onset",
    )
    bench.add_argument("what", choices=("spawn", "ipc", "tabs", "lifecycle"))
    bench.add_argument("--json", action="store_true")
    bench.add_argument(
        "--runs",
        type=int,
        help="spawn: runs per method; ipc: calls per method, size and placement in each round; "
        "tabs: counted opens per setup; lifecycle: samples per page",
    )
    bench.add_argument(
        "--rounds", type=int, help="ipc, tabs: rounds, the methods interleaved in each"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="ipc, tabs, lifecycle: a few samples, to see it works",
    )
    bench.add_argument(
        "--onsets", type=int, help="lifecycle: pressure onsets (a hog started each time)"
    )
    _add_host_commands(sub)
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

    policy = load_policy(a.profile)
    if not a.json:
        sys.stdout.write(seccomp.dump_pfc(policy))
        return 0
    rules = [
        {"syscall": r.syscall, "action": r.action, "conditions": [c._asdict() for c in r.conds]}
        for r in policy.rules
    ]
    data = {"name": policy.name, "file": str(policy.path), "digest": policy.digest,
            "default": policy.default, "rules": rules}  # fmt: skip
    print(json.dumps(data, indent=2))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    if a.sandbox_report:
        if a.once or a.tabs is not None or a.json:
            raise ConfigError(
                "--once, --tabs and --json are options of the tab demo, not --sandbox-report"
            )
        from fos_host.sandbox_report import run_sandbox_report

        return run_sandbox_report()
    from fos_host.demo import run_demo

    return run_demo(tabs=a.tabs, once=a.once, as_json=a.json)


def _cmd_bench(a: argparse.Namespace) -> int:
    if a.onsets is not None and a.what != "lifecycle":
        raise ConfigError("--onsets is an option of bench lifecycle")
    if a.what == "lifecycle":
        if a.rounds is not None:
            raise ConfigError("--rounds is an option of bench ipc and bench tabs")
        from fos_host.bench_lifecycle import run_lifecycle_bench

        return run_lifecycle_bench(runs=a.runs, onsets=a.onsets, quick=a.quick, as_json=a.json)
    if a.what == "ipc":
        from fos_host.bench_ipc import run_ipc_bench

        return run_ipc_bench(runs=a.runs, rounds=a.rounds, quick=a.quick, as_json=a.json)
    if a.what == "tabs":
        from fos_host.bench_tabs import run_tabs_bench

        return run_tabs_bench(runs=a.runs, rounds=a.rounds, quick=a.quick, as_json=a.json)
    if a.rounds is not None or a.quick:
        raise ConfigError("--rounds and --quick are not options of bench spawn")
    from fos_host.bench import run_spawn_bench

    return run_spawn_bench(runs=200 if a.runs is None else a.runs, as_json=a.json)


# -- run and ctl: the daemon and its control socket (fos_host/host/control.py) ---------------

_SOCKET_HELP = (
    "the control socket (default: /run/fos-host/control.sock as root, else "
    "$XDG_RUNTIME_DIR/fos-host/control.sock or /tmp/fos-host-UID/control.sock)"
)
_CTL_ACTIONS = (  # name, positional arguments, help, example
    ("open", ("url",), "open a tab; answers once the page loaded", "open http://news.fos.test/"),
    ("navigate", ("tab", "url"), "show another URL in a tab", "navigate 1 http://shop.fos.test/"),
    ("reload", ("tab",), "load a tab again (a crashed one gets a new renderer)", "reload 1"),
    ("activate", ("tab",), "bring a tab to the front", "activate 2"),
    ("close", ("tab",), "close a tab", "close 2"),
    ("list", (), "every tab: state, tier, site, renderer pid and uid, memory", "list --json"),
    ("status", (), "the host's pid, counts and memory pressure level", "status"),
    ("screenshot", ("tab",), "what a tab shows, as PNG", "screenshot 1 -o tab1.png"),
    ("snapshot", ("tab",), "a tab's page state, from its renderer", "snapshot 1 > tab1.snap"),
    ("freeze", ("tab",), "freeze a tab's renderer (no CPU until it is activated)", "freeze 2"),
    ("hibernate", ("tab",), "snapshot a tab's renderer into memory and end it", "hibernate 2"),
    ("discard", ("tab",), "hibernate a tab and move its snapshot to disk", "discard 2"),
    ("kill", ("tab",), "end a tab's renderer without a snapshot (it reloads)", "kill 2"),
    ("pin", ("tab",), "keep a tab from being stepped down under pressure", "pin 1"),
    ("events", (), "lifecycle events as JSON lines, then new ones until Ctrl-C",
     "events --no-follow | jq .action"),
)  # fmt: skip
_STEPS = ("freeze", "hibernate", "discard", "kill")  # Control.step's actions


def _add_host_commands(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="the daemon: a host serving a control socket until SIGTERM or SIGINT",
        description="Start a host (zygote, network and storage services, warm renderers) and\n"
        "serve `fos-host ctl` on a unix socket that only this user, root and --allow-uid\n"
        "uids may use. Prints 'fos-host: ready, control socket PATH' on stderr once it\n"
        "accepts; SIGTERM or SIGINT shut everything down and remove the socket.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fos-host run\n"
        "  fos-host run --dashboard 127.0.0.1:8090    # then open http://127.0.0.1:8090/\n"
        "  fos-host run --socket /tmp/fos/control.sock --profile /tmp/fos-profile \\\n"
        "      --resolve news.fos.test=127.0.0.1:8080 --resolve-only --renderer-memory 64M",
    )
    run.add_argument("--socket", type=Path, metavar="PATH", help=_SOCKET_HELP)
    run.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="where storage lives (default: /var/lib/fos-host as root, else "
        "~/.local/share/fos-host)",
    )
    run.add_argument(
        "--resolve",
        action="append",
        default=[],
        metavar="NAME=ADDR",
        help="reach NAME at ADDR (IP or IP:PORT) without DNS; repeatable",
    )
    run.add_argument(
        "--resolve-only", action="store_true", help="names not given with --resolve fail"
    )
    run.add_argument("--renderer-memory", metavar="SIZE", help="per renderer, e.g. 64M (default)")
    run.add_argument("--warm", type=int, metavar="N", help="ready, unlocked renderers (default 2)")
    run.add_argument(
        "--tabs-per-renderer", type=int, metavar="N", help="same-site tabs sharing a renderer"
    )
    run.add_argument(
        "--process-limit", type=int, metavar="N", help="renderers at most (default: from RAM)"
    )
    run.add_argument("--viewport", metavar="WxH", help="tab size in pixels (default 800x600)")
    run.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="let this uid use the control socket too (the host's uid and root always may)",
    )
    run.add_argument(
        "--dashboard",
        metavar="ADDR:PORT",
        help="serve the dashboard page, its JSON and /metrics over HTTP (e.g. 127.0.0.1:8090; "
        "port 0: any free one, printed on stderr)",
    )
    run.add_argument(
        "--metrics", metavar="ADDR:PORT", help="serve only Prometheus /metrics over HTTP"
    )
    run.add_argument(
        "--dashboard-public",
        action="store_true",
        help="let --dashboard and --metrics bind a non-loopback address (they show the user's "
        "sites and URLs to anyone who connects)",
    )

    common = argparse.ArgumentParser(add_help=False)  # before or after the action
    common.add_argument("--socket", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                        help=_SOCKET_HELP)  # fmt: skip
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of a table")  # fmt: skip
    ctl = sub.add_parser(
        "ctl",
        parents=[common],
        help="control a running host (fos-host run)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        + "".join(f"  fos-host ctl {example}\n" for *_, example in _CTL_ACTIONS),
    )
    actions = ctl.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name, positionals, text, example in _CTL_ACTIONS:
        act = actions.add_parser(
            name,
            parents=[common],
            help=text,
            description=text[0].upper() + text[1:] + ".",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"example:\n  fos-host ctl {example}",
        )
        for positional in positionals:
            act.add_argument(positional, type=int if positional == "tab" else str)
        if name in ("screenshot", "snapshot"):
            act.add_argument(
                "-o",
                "--output",
                type=Path,
                metavar="FILE",
                help="write it here (default: stdout, when that is not a terminal)",
            )
        if name == "pin":
            act.add_argument("--off", action="store_true", help="unpin it instead")
        if name == "events":
            act.add_argument(
                "--follow",
                action=argparse.BooleanOptionalAction,
                default=True,
                help="after the kept events, wait for new ones (default); --no-follow: exit",
            )

    top = sub.add_parser(
        "top",
        help="a running host's tabs, tiers, memory, pressure level and events, live",
        description="Show a running host's tabs (tier, state, renderer pid, memory used /\n"
        "limit) under a line with the memory pressure level and its source, the tabs per\n"
        "tier, renderers, bad messages and crashes; below, the last lifecycle events.\n"
        "Redrawn every --interval seconds until Ctrl-C; printed once as plain text when\n"
        "stdout is not a terminal.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  fos-host top                  # live; Ctrl-C quits\n"
        "  fos-host top --once           # one table\n"
        "  fos-host top --json | jq .pressure.level",
    )
    top.add_argument("--socket", type=Path, metavar="PATH", help=_SOCKET_HELP)
    top.add_argument("--interval", type=float, default=1.0, metavar="S",
                     help="seconds between redraws (default 1)")  # fmt: skip
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument(
        "--json", action="store_true", help="print status, pressure, tabs and events as JSON"
    )


def _cmd_run(a: argparse.Namespace) -> int:
    import asyncio

    from fos_host.host.control import default_socket_path, run_host
    from fos_host.host.host import HostConfig
    from fos_host.kernel.cgroup import parse_size
    from fos_host.renderer.page import MAX_VIEWPORT
    from fos_host.services.network import parse_resolve

    resolve: dict[str, str] = {}
    for entry in a.resolve:
        name, eq, addr = entry.partition("=")
        if not eq:
            raise ConfigError(f"--resolve wants NAME=ADDR (a.test=127.0.0.1:8080), not {entry!r}")
        resolve[name] = addr
    parse_resolve(resolve)  # a bad address is a bad flag now, not a failed fetch later
    if a.resolve_only and not resolve:
        raise ConfigError("--resolve-only without --resolve: no name could be reached")
    counts = {"--warm": (a.warm, 0), "--tabs-per-renderer": (a.tabs_per_renderer, 1),
              "--process-limit": (a.process_limit, 1)}  # fmt: skip
    for flag, (value, least) in counts.items():
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value}: must be at least {least}")
    for uid in a.allow_uid:
        if not 0 <= uid < 2**32 - 1:
            raise ConfigError(f"--allow-uid {uid}: not a uid")
    if a.profile is not None:
        profile = a.profile
    elif os.geteuid() == 0:
        profile = Path("/var/lib/fos-host")
    else:
        profile = Path.home() / ".local/share/fos-host"
    config = HostConfig(profile=profile, resolve=resolve, resolve_only=a.resolve_only)
    if a.renderer_memory is not None:
        config.renderer_memory = parse_size(a.renderer_memory)
    if a.warm is not None:
        config.warm_renderers = a.warm
    if a.tabs_per_renderer is not None:
        config.tabs_per_renderer = a.tabs_per_renderer
    config.process_limit = a.process_limit
    if a.viewport is not None:
        w, x, h = a.viewport.partition("x")
        if not (x and w.isdigit() and h.isdigit() and 0 < int(w) <= MAX_VIEWPORT
                and 0 < int(h) <= MAX_VIEWPORT):  # fmt: skip
            raise ConfigError(f"--viewport {a.viewport}: give WIDTHxHEIGHT, each 1-{MAX_VIEWPORT}")
        config.viewport = (int(w), int(h))

    web = _web_servers(a)

    def ready(path: Path) -> None:
        for w in web:
            shown = f"dashboard {w.url}" if w.dashboard else f"metrics {w.url}metrics"
            print(f"fos-host: {shown}", file=sys.stderr, flush=True)
        print(f"fos-host: ready, control socket {path}", file=sys.stderr, flush=True)

    path = a.socket or default_socket_path()
    asyncio.run(run_host(config, path, a.allow_uid, ready, web))
    return 0


def _web_servers(a: argparse.Namespace) -> list[WebServer]:
    """The HTTP servers of `run --dashboard` and `--metrics` (host/dashboard.py), unbound."""
    from fos_host.host.dashboard import WebServer, parse_address

    if a.dashboard_public and not (a.dashboard or a.metrics):
        raise ConfigError("--dashboard-public without --dashboard or --metrics")
    web = []
    for flag, text, dashboard in (("--dashboard", a.dashboard, True),
                                  ("--metrics", a.metrics, False)):  # fmt: skip
        if text is not None:
            address = parse_address(text, flag, a.dashboard_public)
            web.append(WebServer(address, flag, dashboard=dashboard, public=a.dashboard_public))
    if len(web) == 2 and web[0].address == web[1].address and web[0].address.port:
        raise ConfigError(f"--metrics {a.metrics}: --dashboard serves /metrics there already")
    return web


def _cmd_ctl(a: argparse.Namespace) -> int:
    import asyncio

    from fos_host.host.control import connect, default_socket_path

    as_json = getattr(a, "json", False)
    out = getattr(a, "output", None)
    if a.action in ("screenshot", "snapshot"):
        if as_json and out is None:
            raise ConfigError(f"ctl {a.action} --json needs -o FILE (stdout gets the data itself)")
        if out is None and sys.stdout.isatty():
            raise ConfigError(f"ctl {a.action}: stdout is a terminal; give -o FILE or redirect it")
    path = getattr(a, "socket", None) or default_socket_path()
    if a.action == "events":
        from fos_host.top import print_events

        return print_events(path, a.follow)

    async def call() -> Any:
        async with connect(path) as control:
            if a.action == "open":
                return await control.open(a.url)
            if a.action == "navigate":
                return await control.navigate(a.tab, a.url)
            if a.action in ("reload", "activate", "close", "screenshot", "snapshot"):
                return await getattr(control, a.action)(a.tab)
            if a.action in _STEPS:
                return await control.step(a.tab, a.action)
            if a.action == "pin":
                return await control.pin(a.tab, not a.off)
            if a.action == "list":
                return await control.list()
            return await control.status()

    result = asyncio.run(call())
    if isinstance(result, bytes):
        if out is None:
            sys.stdout.buffer.write(result)
            sys.stdout.buffer.flush()
            return 0
        out.write_bytes(result)
        if as_json:
            print(json.dumps({"tab": a.tab, "file": str(out), "bytes": len(result)}))
        else:
            print(f"tab {a.tab}: {a.action}, {len(result)} bytes, written to {out}")
    elif as_json:
        done = {"closed": a.tab} if a.action == "close" else _plain(result)
        print(json.dumps(done, indent=2))
    elif a.action == "close":
        print(f"tab {a.tab} closed")
    elif a.action == "status":
        s = result
        print(f"fos-host pid {s.pid}: {s.tabs} tabs, {s.renderers} renderer processes, "
              f"{s.bad_messages} bad messages, {s.crashes} crashes, memory pressure "
              f"{s.level}")  # fmt: skip
    else:
        print(_tab_table(result if isinstance(result, list) else [result]))
    return 0


def _cmd_top(a: argparse.Namespace) -> int:
    from fos_host.host.control import default_socket_path
    from fos_host.top import run_top

    return run_top(a.socket or default_socket_path(), a.interval, a.once, a.json)


def _plain(value: Any) -> Any:
    """Dataclasses (and lists of them) as JSON-ready dicts."""
    import dataclasses

    if isinstance(value, list):
        return [_plain(v) for v in value]
    return dataclasses.asdict(value)


def _tab_table(tabs: list[Any]) -> str:
    """Tabs as a table a person reads: the active one starred, a failure's reason below."""
    from fos_host.kernel.cgroup import format_size

    if not tabs:
        return "no tabs (open one with: fos-host ctl open URL)"
    rows = [("TAB", "STATE", "TIER", "SITE", "PID", "UID", "MEMORY", "TITLE / URL")]
    for t in tabs:
        memory = ""
        if t.memory is not None:
            limit = f" / {format_size(t.memory_limit)}" if t.memory_limit else ""
            memory = format_size(t.memory) + limit
        rows.append((f"{t.id}{'*' if t.active else ''}", t.state, t.tier, t.site or "-",
                     str(t.pid or "-"), str(t.host_uid or "-"), memory or "-",
                     f"{t.title} <{t.url}>" if t.title else t.url))  # fmt: skip
        if t.reason:
            rows.append(("", "", "", "", "", "", "", f"  {t.reason}"))
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:7], widths, strict=True)) + "  " + r[7]
        for r in rows
    ).rstrip()


COMMANDS = {
    "exec": _cmd_exec,
    "doctor": _cmd_doctor,
    "seccomp": _cmd_seccomp,
    "demo": _cmd_demo,
    "bench": _cmd_bench,
    "run": _cmd_run,
    "ctl": _cmd_ctl,
    "top": _cmd_top,
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
