"""`fos-host bench spawn`: spawn latency and idle memory of a sandbox, against peers, measured
side by side in one run.

Latency is the time from the spawn request to the first byte the new process writes to a
pipe (and, second, to its exit with everything cleaned up). The methods, interleaved
round-robin with the order rotated every round, so the noise of this machine hits all alike:

- fos_zygote_warm: `Spawner(zygote=True, pool=2).spawn(jail, entry="fos_host.probe:main")`
  with the jail prewarmed: a spare sandbox (forked from the zygote ahead of time into 7
  namespaces, a tmpfs root with read-only binds, a cgroup with memory and pids limits) takes
  the order, drops its capabilities, loads the renderer seccomp profile and runs the probe,
  which writes one byte. The pool is refilled in the background (the zygote works on the
  next spare while this one runs); the spawn call pays the host's share of the refill.
- fos_zygote: the same spawn with `warm=False`, after the pool has settled: the whole spawn
  sequence from the zygote (the cold path, when no spare of the shape is ready).
- fos_exec: the same jail from a `Spawner()` without zygote, exec'ing `python -S -I -c`.
  A process can hold one `Spawner` at a time (its cgroup directory is named after its pid),
  so this one lives in a forked worker process that times each run itself.
- bwrap: `bwrap --unshare-all` with the same seccomp filter (compiled BPF on a memfd),
  exec'ing the same interpreter with `-S -I -c`; through `subprocess.Popen`.
- mp_forkserver / mp_fork: a `multiprocessing` Process (context "forkserver", started with
  this module preloaded before measuring; and plain "fork") whose target sends one byte down
  a pipe.

Memory: USS (Private_Clean + Private_Dirty) and PSS from /proc/PID/smaps_rollup of an idle
Python workload — the probe "idle" forked from the zygote, against an exec'd, unsandboxed
`python -S -I -c` — read once the workload has written its byte.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from fos_host.errors import ConfigError, FosError
from fos_host.kernel import proc, seccomp
from fos_host.kernel.fds import readable
from fos_host.sandbox.jail import Jail
from fos_host.sandbox.sandbox import Spawner
from fos_host.sandbox.seccomp_policy import load_policy

PROBE_CODE = "import os; os.write(1, b'!')"
IDLE_CODE = "import os, time; os.write(1, b'!'); time.sleep(3600)"
PROFILE = "renderer"
MEMORY_LIMIT = "64M"
PIDS_LIMIT = 64
READ_TIMEOUT = 10.0  # seconds for a workload to write its byte
WORKER_TIMEOUT = 60.0
MEMORY_SAMPLES = 10
POOL = 2  # spare sandboxes kept by the warm-pool method
MAX_WARMUP = 5
MAX_FAILURES_IN_A_ROW = 5  # then a method is given up
MIB = 1 << 20

GOAL_P50_MS = 5.0
GOAL_VS_BWRAP = 4.0
GOAL_USS_MIB = 5.0  # "5 MB" of the issue; sizes in this project are binary

Sample = tuple[int, int]  # ns from the request to the first byte, to exit + cleanup
_SAMPLE = struct.Struct("=qq")


class BenchError(FosError):
    """One run of a method failed (it is counted, reported and made up for)."""


# --------------------------------------------------------------------------------------
# helpers


def real_python() -> tuple[str, str]:
    """The base interpreter (not the venv's link to it) and its prefix, both resolved."""
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)


def _first_byte(fd: int, what: str) -> None:
    if not readable([fd], READ_TIMEOUT):
        raise BenchError(f"{what}: no byte within {READ_TIMEOUT:g} s")
    if os.read(fd, 1) != b"!":
        raise BenchError(f"{what}: ended without writing its byte")


def smaps_rollup(pid: int) -> tuple[int, int]:
    """(USS, PSS) of `pid` in bytes: Private_Clean + Private_Dirty, and Pss."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"], fields["Pss"]


def reap_orphans(comm: str) -> None:
    """Reap (killing if need be) every child named `comm`.

    bwrap's pid 1 in its pid namespace outlives the bwrap we started by a moment and is then
    reparented to the nearest child subreaper — this process, which the Spawner made one.
    """
    for pid in proc.children():
        if proc.comm(pid) != comm:
            continue
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not readable([fd], 1.0):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        finally:
            os.close(fd)


def summarize(values: list[float]) -> dict[str, float]:
    """p50 (median), p90, min and max of `values` (at least one)."""
    p90 = (
        statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    )
    return {
        "p50": round(statistics.median(values), 3),
        "p90": round(p90, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _jail(fd: int) -> Jail:
    return Jail(PROFILE).memory(MEMORY_LIMIT).pids(PIDS_LIMIT).pass_fd(fd, 1)


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


# --------------------------------------------------------------------------------------
# the methods: each run returns a Sample


def _sandbox_once(sp: Spawner, what: str, **how: Any) -> Sample:
    r, w = os.pipe()
    try:
        jail = _jail(w)
        t0 = time.perf_counter_ns()
        with sp.spawn(jail, **how) as sb:
            os.close(w)
            w = -1
            try:
                _first_byte(r, what)
            except BenchError as e:
                with contextlib.suppress(TimeoutError):
                    raise BenchError(f"{e}: the sandbox {sb.wait(0.5).describe()}") from e
                raise
            t1 = time.perf_counter_ns()
            status = sb.wait(READ_TIMEOUT)
        t2 = time.perf_counter_ns()
    finally:
        _close(r, w)
    if status.returncode != 0:
        raise BenchError(f"{what}: the sandbox {status.describe()}")
    return t1 - t0, t2 - t0


def zygote_once(sp: Spawner, warm: bool) -> Sample:
    if not warm:
        sp.settle()  # no refill of the pool running in the zygote meanwhile
    what = "fos zygote" + (" warm" if warm else "")
    return _sandbox_once(sp, what, entry="fos_host.probe:main", args=("byte",), warm=warm)


def exec_once(sp: Spawner) -> Sample:
    argv = [sys.executable, "-S", "-I", "-c", PROBE_CODE]
    return _sandbox_once(sp, "fos exec", argv=argv)


class ExecWorker:
    """A forked process with a `Spawner()` of its own (no zygote) that times one exec-path
    spawn per request; requests come over a SEQPACKET socket."""

    def __init__(self) -> None:
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker
            code = 1
            try:
                self._sock.close()
                code = _serve_exec(child)
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self._sock.settimeout(WORKER_TIMEOUT)

    def run(self) -> Sample:
        try:
            self._sock.send(b"g")
            msg = self._sock.recv(4096)
        except OSError as e:
            raise BenchError(f"fos exec worker: {e}") from e
        if not msg:
            raise BenchError("fos exec worker: gone")
        if not msg.startswith(b"S"):
            raise BenchError(msg[1:].decode(errors="replace"))
        first, done = _SAMPLE.unpack(msg[1:])
        return first, done

    def close(self) -> None:
        self._sock.close()  # the worker sees EOF, closes its Spawner and exits
        os.waitpid(self.pid, 0)


def _serve_exec(sock: socket.socket) -> int:  # pragma: no cover - runs in the worker
    try:
        with Spawner() as sp:
            while sock.recv(16) == b"g":
                try:
                    msg = b"S" + _SAMPLE.pack(*exec_once(sp))
                except Exception as e:
                    msg = b"E" + (str(e) or type(e).__name__).encode(errors="replace")
                sock.send(msg)
    except Exception as e:  # no Spawner: every request gets the reason
        with contextlib.suppress(OSError):
            while sock.recv(16) == b"g":
                sock.send(b"E" + f"fos exec: {e}".encode(errors="replace"))
        return 1
    return 0


class Bwrap:
    """bubblewrap with every namespace and the same seccomp filter, exec'ing python."""

    def __init__(self, bwrap: str, bpf: bytes) -> None:
        self.bpf_fd = os.memfd_create("fos-bench-bpf", os.MFD_CLOEXEC)
        os.write(self.bpf_fd, bpf)
        python, prefix = real_python()
        self.argv = [
            bwrap,
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin",
            "--ro-bind", prefix, prefix,
            "--proc", "/proc",
            "--dev", "/dev",
            "--seccomp", str(self.bpf_fd),
            python, "-S", "-I", "-c", PROBE_CODE,
        ]  # fmt: skip

    def run(self) -> Sample:
        os.lseek(self.bpf_fd, 0, os.SEEK_SET)  # bwrap reads the filter from the fd's offset
        t0 = time.perf_counter_ns()
        p = subprocess.Popen(self.argv, stdout=subprocess.PIPE, pass_fds=(self.bpf_fd,))
        try:
            assert p.stdout is not None
            _first_byte(p.stdout.fileno(), "bwrap")
            t1 = time.perf_counter_ns()
            code = p.wait(READ_TIMEOUT)
            reap_orphans("bwrap")
            t2 = time.perf_counter_ns()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
            reap_orphans("bwrap")
        if code != 0:
            raise BenchError(f"bwrap: exited with status {code}")
        return t1 - t0, t2 - t0

    def close(self) -> None:
        os.close(self.bpf_fd)


def mp_child(conn: Connection) -> None:
    """The multiprocessing target: one byte down the pipe."""
    conn.send_bytes(b"!")


def mp_once(ctx: Any, what: str) -> Sample:
    reader, writer = ctx.Pipe(duplex=False)
    p = ctx.Process(target=mp_child, args=(writer,))
    try:
        t0 = time.perf_counter_ns()
        p.start()
        writer.close()
        if not reader.poll(READ_TIMEOUT):
            raise BenchError(f"{what}: no byte within {READ_TIMEOUT:g} s")
        try:
            reader.recv_bytes()
        except EOFError:
            raise BenchError(f"{what}: ended without writing its byte") from None
        t1 = time.perf_counter_ns()
        p.join(READ_TIMEOUT)
        t2 = time.perf_counter_ns()
    finally:
        reader.close()
        writer.close()
        if p.pid is not None and p.exitcode is None:
            p.kill()
            p.join()
    code = p.exitcode
    p.close()
    if code != 0:
        raise BenchError(f"{what}: exit code {code}")
    return t1 - t0, t2 - t0


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
    """Hide the launching script from multiprocessing for a moment.

    Every forkserver child would run __main__ again (Python 3.11's forkserver never preloads
    it), at a cost that depends on how the benchmark was started (1-5 ms here), not on the
    forkserver; the target lives in this module, which the server has preloaded.
    """
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


class Forkserver:
    """multiprocessing's forkserver, started (with the target's module preloaded) before
    measuring and stopped afterwards, with the resource tracker it starts, unless they were
    running already."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        server = getattr(multiprocessing.forkserver, "_forkserver", None)
        tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
        self._stop_server = server is not None and getattr(server, "_forkserver_pid", 1) is None
        self._stop_tracker = tracker is not None and getattr(tracker, "_pid", 1) is None
        self.ctx.set_forkserver_preload([__name__])
        multiprocessing.forkserver.ensure_running()

    def run(self) -> Sample:
        with _bare_main():
            return mp_once(self.ctx, "forkserver")

    def close(self) -> None:
        if self._stop_server:
            multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
        if self._stop_tracker:
            multiprocessing.resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------
# memory


def zygote_idle_memory(sp: Spawner) -> tuple[int, int]:
    r, w = os.pipe()
    try:
        with sp.spawn(_jail(w), entry="fos_host.probe:main", args=("idle",)) as sb:
            os.close(w)
            w = -1
            _first_byte(r, "fos zygote idle")
            return smaps_rollup(sb.pid)
    finally:
        _close(r, w)


def machine(load_before: float) -> dict[str, Any]:
    """What a report says about the machine it ran on (load: 1-minute average)."""
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load1_before": round(load_before, 2),
        "load1_after": round(os.getloadavg()[0], 2),
    }


def machine_line(m: dict[str, Any]) -> str:
    """`machine()` as a report's second line."""
    used = f" (used: {m['cpus_used']})" if "cpus_used" in m else ""
    return (
        f"Linux {m['kernel']}, {m['cpus']} CPUs{used}, Python {m['python']}, "
        f"load {m['load1_before']:.2f} -> {m['load1_after']:.2f}"
    )


def failure_lines(entries: Iterable[dict[str, Any]], what: str) -> list[str]:
    """The entries with failed `what` (runs, samples), which were repeated."""
    failed = [e for e in entries if e["failures"]]
    if not failed:
        return []
    return [f"failed {what} (repeated; not in the figures):"] + [
        f"  {e['label']}: {e['failures']}x, first: {e['error']}" for e in failed
    ]


def python_idle_memory() -> tuple[int, int]:
    python, _ = real_python()
    with subprocess.Popen([python, "-S", "-I", "-c", IDLE_CODE], stdout=subprocess.PIPE) as p:
        try:
            assert p.stdout is not None
            _first_byte(p.stdout.fileno(), "python idle")
            return smaps_rollup(p.pid)
        finally:
            p.kill()
            p.wait()


# --------------------------------------------------------------------------------------
# the run


@dataclass
class Method:
    key: str
    label: str
    run: Callable[[], Sample] | None  # None: unavailable
    why: str = ""  # why unavailable
    first: list[float] = field(default_factory=list)  # ms
    done: list[float] = field(default_factory=list)
    failures: int = 0  # runs that failed (not in the samples)
    error: str = ""  # the first failure
    in_a_row: int = 0

    @property
    def broken(self) -> bool:
        return self.run is None or self.in_a_row >= MAX_FAILURES_IN_A_ROW

    def result(self) -> dict[str, object]:
        out: dict[str, object] = {"label": self.label, "available": self.run is not None}
        if self.first:
            out["first_byte_ms"] = summarize(self.first)
            out["exit_ms"] = summarize(self.done)
        out["n"] = len(self.first)
        out["failures"] = self.failures
        if self.error:
            out["error"] = self.error
        if self.why:
            out["why"] = self.why
        return out


@dataclass
class Memory:
    key: str
    label: str
    probe: Callable[[], tuple[int, int]]
    uss: list[float] = field(default_factory=list)  # MiB
    pss: list[float] = field(default_factory=list)
    failures: int = 0
    error: str = ""
    in_a_row: int = 0

    def sample(self) -> None:
        try:
            uss, pss = self.probe()
        except (OSError, FosError, subprocess.SubprocessError, KeyError) as e:
            self.failures += 1
            self.in_a_row += 1
            self.error = self.error or str(e) or type(e).__name__
            return
        self.in_a_row = 0
        self.uss.append(uss / MIB)
        self.pss.append(pss / MIB)

    def result(self) -> dict[str, object]:
        out: dict[str, object] = {"label": self.label, "n": len(self.uss)}
        if self.uss:
            out["uss_mib"] = summarize(self.uss)
            out["pss_mib"] = summarize(self.pss)
        out["failures"] = self.failures
        if self.error:
            out["error"] = self.error
        return out


def _rounds(methods: list[Method], runs: int, record: bool) -> None:
    """Round-robin until every method has `runs` samples (or is broken); a failed run is
    counted and made up for in a later round."""
    for i in itertools.count():
        live = [m for m in methods if not m.broken and (len(m.first) if record else i) < runs]
        if not live:
            return
        k = i % len(live)
        for m in live[k:] + live[:k]:  # rotate: nobody always runs right after the same one
            assert m.run is not None
            try:
                first, done = m.run()
            except (OSError, FosError, subprocess.SubprocessError) as e:
                m.failures += 1
                m.in_a_row += 1
                m.error = m.error or str(e) or type(e).__name__
                continue
            m.in_a_row = 0
            if record:
                m.first.append(first / 1e6)
                m.done.append(done / 1e6)


def _zygote_memory(sp: Spawner) -> tuple[int, int]:
    if sp.zygote is None:
        raise BenchError("no zygote")
    return smaps_rollup(sp.zygote.pid)


def _sample_memory(sp: Spawner, samples: int) -> list[Memory]:
    """Alternate the idle workloads until each has `samples` (a failure is made up for)."""
    rows = [
        Memory(
            "fos_zygote_idle",
            "fos-host zygote child, sandboxed (probe idle)",
            lambda: zygote_idle_memory(sp),
        ),
        Memory("python_idle", "python -S -I -c, exec'd, not sandboxed", python_idle_memory),
    ]
    while live := [m for m in rows if len(m.uss) < samples and m.in_a_row < MAX_FAILURES_IN_A_ROW]:
        for m in live:
            m.sample()
    zproc = Memory(
        "zygote_process",
        "the zygote itself (once per host, shared by children)",
        lambda: _zygote_memory(sp),
    )
    zproc.sample()
    return [*rows, zproc]


def _p50(report: dict[str, Any], key: str) -> float | None:
    entry = report["spawn"].get(key, {})
    stats = entry.get("first_byte_ms")
    return stats["p50"] if stats else None


def _ratio(report: dict[str, Any], peer: str, ours: str) -> float | None:
    a, b = _p50(report, peer), _p50(report, ours)
    return round(a / b, 2) if a and b else None


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    report["ratios"] = {
        f"{peer}_over_{ours}": _ratio(report, peer, f"fos_{ours}")
        for ours in ("zygote_warm", "zygote")
        for peer in ("bwrap", "mp_forkserver", "mp_fork", "fos_exec")
    }
    uss_stats = report["memory"]["fos_zygote_idle"].get("uss_mib")
    uss = uss_stats["p50"] if uss_stats else None
    goals = []
    for ours, how in (("zygote_warm", "warm pool"), ("zygote", "cold")):
        p50 = _p50(report, f"fos_{ours}")
        vs_bwrap = report["ratios"][f"bwrap_over_{ours}"]
        goals += [
            (f"p50 to first byte, {how}", f"<= {GOAL_P50_MS:g} ms", p50, "ms", GOAL_P50_MS, "le"),
            (
                f"vs bwrap (p50), {how}",
                f">= {GOAL_VS_BWRAP:g}x",
                vs_bwrap,
                "x",
                GOAL_VS_BWRAP,
                "ge",
            ),
        ]
    goals.append(
        ("idle sandboxed USS (p50)", f"<= {GOAL_USS_MIB:g} MiB", uss, "MiB", GOAL_USS_MIB, "le")
    )
    report["goals"] = [
        {
            "goal": name,
            "target": target,
            "value": value,
            "unit": unit,
            "met": None if value is None else (value <= lim if op == "le" else value >= lim),
        }
        for name, target, value, unit, lim, op in goals
    ]
    return report


def measure(runs: int) -> dict[str, Any]:
    """Run everything; the report as a JSON-able dict (errors inside, not raised)."""
    if runs < 1:
        raise ConfigError(f"--runs must be at least 1, not {runs}")
    warmup = max(1, min(MAX_WARMUP, runs // 10))
    mem_samples = min(MEMORY_SAMPLES, runs)
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        worker = ExecWorker()  # forked first: it inherits nothing of what follows
        stack.callback(worker.close)
        sp = stack.enter_context(Spawner(zygote=True, pool=POOL))
        sp.prewarm(_jail(1))  # the passed fds are the order's, not the shape's
        methods = [
            Method("fos_zygote_warm", "fos-host zygote, warm pool", lambda: zygote_once(sp, True)),
            Method("fos_zygote", "fos-host zygote, cold", lambda: zygote_once(sp, False)),
            Method("fos_exec", "fos-host exec, python -S -I -c", worker.run),
        ]
        bwrap_path = shutil.which("bwrap")
        if bwrap_path is None:
            methods.append(Method("bwrap", "bwrap + seccomp, python -S -I -c", None, "no bwrap"))
        else:
            bw = Bwrap(bwrap_path, seccomp.compile_bpf(load_policy(PROFILE)))
            stack.callback(bw.close)
            methods.append(Method("bwrap", "bwrap + seccomp, python -S -I -c", bw.run))
        fs = Forkserver()
        stack.callback(fs.close)
        fork_ctx = multiprocessing.get_context("fork")
        methods += [
            Method("mp_forkserver", "multiprocessing forkserver", fs.run),
            Method("mp_fork", "multiprocessing fork", lambda: mp_once(fork_ctx, "fork")),
        ]
        _rounds(methods, warmup, record=False)
        _rounds(methods, runs, record=True)
        memory = _sample_memory(sp, mem_samples)
    report: dict[str, Any] = {
        "benchmark": "spawn",
        "runs": runs,
        "warmup_rounds": warmup,
        "memory_samples": mem_samples,
        "machine": machine(load_before),
        "spawn": {m.key: m.result() for m in methods},
        "memory": {m.key: m.result() for m in memory},
    }
    # A figure is missing (a method gave up, or no memory sample): the run failed. Single
    # failed runs are made up for and reported, in "failures" of each entry.
    report["failed"] = sorted(
        [m.key for m in methods if m.run is not None and len(m.first) < runs]
        + [m.key for m in memory if not m.uss]
    )
    return _goals(report)


# --------------------------------------------------------------------------------------
# output


def num(v: object, spec: str = ".2f") -> str:
    """A figure for a table: `spec`-formatted, or "-" when there is none."""
    return format(v, spec) if isinstance(v, int | float) else "-"


def goal_lines(report: dict[str, Any], goal_width: int, value_width: int) -> list[str]:
    """The end of a report: each goal MET / NOT MET, and the figures that are missing."""
    lines = ["", "goals:"]
    for g in report["goals"]:
        verdict = {True: "MET", False: "NOT MET", None: "UNKNOWN"}[g["met"]]
        value = f"{num(g['value'])} {g['unit']}" if g["value"] is not None else "-"
        lines.append(
            f"  {g['goal']:<{goal_width}}{g['target']:>12}{value:>{value_width}}   {verdict}"
        )
    if report["failed"]:
        lines += ["", f"FAILED (figures missing): {', '.join(report['failed'])}"]
    return lines


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"fos-host spawn benchmark: {report['runs']} runs per method, interleaved round-robin "
        f"after {report['warmup_rounds']} warm-up round(s)",
        machine_line(m),
        "",
        f"{'time to first byte (ms)':<34}{'p50':>8}{'p90':>8}{'min':>8}{'max':>8}"
        f"{'exit p50':>10}{'exit p90':>10}",
    ]
    for e in report["spawn"].values():
        fb = e.get("first_byte_ms")
        if fb is None:
            why = e.get("why") or e.get("error") or "no data"
            lines.append(f"{e['label']:<34}  unavailable: {why}")
            continue
        ex = e["exit_ms"]
        lines.append(
            f"{e['label']:<34}{fb['p50']:>8.2f}{fb['p90']:>8.2f}{fb['min']:>8.2f}"
            f"{fb['max']:>8.2f}{ex['p50']:>10.2f}{ex['p90']:>10.2f}"
        )
    lines += failure_lines(report["spawn"].values(), "runs")
    lines += ["", f"{'idle memory (MiB, median)':<56}{'USS':>8}{'PSS':>8}{'n':>4}"]
    for e in report["memory"].values():
        uss, pss = e.get("uss_mib"), e.get("pss_mib")
        row = f"{e['label']:<56}{num(uss and uss['p50']):>8}{num(pss and pss['p50']):>8}"
        row += f"{e['n']:>4}"
        if e["failures"]:
            row += f"  ({e['failures']} failed, first: {e['error']})"
        lines.append(row)
    r = report["ratios"]
    lines.append("")
    for ours, how in (("zygote_warm", "warm pool"), ("zygote", "cold zygote")):
        lines.append(
            f"peer p50 / {how} p50 (above 1: ours is faster): "
            + ", ".join(
                f"{name} {num(r[f'{key}_over_{ours}'])}x"
                for key, name in (
                    ("bwrap", "bwrap"),
                    ("mp_forkserver", "forkserver"),
                    ("mp_fork", "mp fork"),
                    ("fos_exec", "fos exec"),
                )
            )
        )
    lines += goal_lines(report, 32, 14)
    return "\n".join(lines)


def run_spawn_bench(runs: int = 200, as_json: bool = False) -> int:
    """Measure and print (a table, or JSON); 0 unless a measurement failed."""
    report = measure(runs)
    print(json.dumps(report, indent=2) if as_json else render(report), flush=True)
    return 1 if report["failed"] else 0
