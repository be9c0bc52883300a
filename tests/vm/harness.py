"""Run a focused pytest selection inside a qemu VM, on each cgroup layout, as root and rootless.

    .venv/bin/python tests/vm/harness.py [--selection FILE] [--layouts v2,hybrid,v1]
                                         [--timeout S]                      (make test-vm)

Built from Debian packages only: Debian's cloud kernel (`apt-get download`, `dpkg-deb -x`),
busybox-static for the userland, and this machine's Python with the project's dependencies.
The root image (interpreter tree with compiled bytecode, the libraries `ldd` names, the
dependencies in a venv, busybox, a passwd with an unprivileged test user) is an ext4 file made
without mounting anything (`mkfs.ext4 -d`), cached under build/vm/<key> where the key hashes
every input; a second run skips the build. Each run makes a small second disk with the
project's sources and the selection. The VM boots under TCG (KVM hangs on these machines) once
per layout (`fos.cgroup=` on the kernel command line); an initramfs loads the virtio modules
and switches to the root image; the guest script (tests/vm/guest.sh) mounts that layout (pure
cgroup2 with every controller, hybrid, or pure v1), sets up zram swap, runs the selection as
root and then as uid 1000 in a delegated cgroup, and prints `fos-host doctor --json` for
both on the serial console, which is streamed here. Kept in build/vm/run/: the console logs,
the doctor reports (the VM's and this machine's), and matrix.md, each test's outcome per
layout and user, read from the junit files the runs leave on the second disk.
The exit status is 0 when every run passed (pytest's 5, nothing collected, counts as a pass),
else the first failing boot's (1 when a VM did not report one).
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BUILD = REPO / "build" / "vm"
KERNEL_META = "linux-image-cloud-amd64"
# The cloud kernel has ext4 built in but virtio as modules; insmod order comes from each
# module's "depends=" (.modinfo), since it changes between kernel versions.
BOOT_MODULES = (
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
)
GUEST_MODULES = ("mm/zsmalloc.ko", "crypto/lzo-rle.ko", "drivers/block/zram/zram.ko")
SKIP_PACKAGES = re.compile(r"^(mypy|mypyc|ruff|pip|librt|ast_serialize|__editable__|fos_host)")
SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "__pycache__"}
MARK = "FOS-VM:"
DOCTOR = re.compile(r"FOS-VM-DOCTOR ([\w-]+): (.*)")
DEFAULT_SELECTION = HERE / "selection.txt"
LAYOUTS = ("v2", "hybrid", "v1")  # guest.sh mounts the one named by fos.cgroup=


STARTED = time.monotonic()


def log(msg: str) -> None:
    """A step, stamped with the seconds since the harness started: the build and each boot
    take minutes under TCG, and the stamps show where they go."""
    print(f"[vm {time.monotonic() - STARTED:5.0f} s] {msg}", flush=True)


def run(*argv: str | Path, **kw: object) -> str:
    cp = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if cp.returncode != 0:
        raise SystemExit(f"[vm] {' '.join(map(str, argv))} failed:\n{cp.stderr.strip()}")
    return str(cp.stdout)


# -- inputs and the cache key ------------------------------------------------------------


def kernel_package() -> tuple[str, str]:
    """The cloud kernel package the meta-package points at, and its version."""
    deps = run("apt-cache", "depends", KERNEL_META)
    names = re.findall(r"Depends: (linux-image-\S+-cloud-amd64)", deps)
    if not names:
        raise SystemExit(f"[vm] no kernel package behind {KERNEL_META}: {deps.strip()}")
    show = run("apt-cache", "show", names[0])
    return names[0], re.findall(r"^Version: (\S+)", show, re.M)[0]


def cache_key(kernel: tuple[str, str]) -> str:
    h = hashlib.sha256()
    h.update(repr(kernel).encode())
    h.update(run("dpkg-query", "-W", "busybox-static").encode())
    h.update(sys.version.encode() + sys.base_prefix.encode())
    for d in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        h.update(f"{d.metadata['Name']}=={d.version}\n".encode())
    for f in (Path(__file__), HERE / "guest.sh", HERE / "init.sh"):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# -- the build ---------------------------------------------------------------------------


def fetch_kernel(pkg: str, into: Path) -> Path:
    """Download and unpack the kernel package; returns the unpacked tree."""
    tree = into / "kernel"
    if tree.is_dir():
        return tree
    into.mkdir(parents=True, exist_ok=True)
    os.chmod(into, 0o777)  # apt's download user writes here
    log(f"downloading {pkg}")
    run("apt-get", "download", "-q", pkg, cwd=into)
    deb = next(into.glob(f"{pkg}_*.deb"))
    run("dpkg-deb", "-x", deb, into / "kernel.tmp")
    (into / "kernel.tmp").rename(tree)
    deb.unlink()
    return tree


def _copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    shutil.copytree(
        src,
        dst,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if n in skip],
        dirs_exist_ok=True,
    )


def _elf_deps(files: list[Path]) -> set[Path]:
    deps: set[Path] = set()
    for f in files:
        cp = subprocess.run(["ldd", str(f)], capture_output=True, text=True)
        for m in re.finditer(r"(/\S+) \(0x", cp.stdout):
            deps.add(Path(m.group(1)))
    return deps


def _install(path: Path, root: Path) -> None:
    """Copy `path` (dereferenced) to the same place below root."""
    dst = root / path.relative_to("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path.resolve(), dst)


def stage_root(root: Path, kernel: Path) -> None:
    for d in ("bin", "sbin", "lib", "lib64"):  # merged /usr, as Debian's
        (root / "usr" / d).mkdir(parents=True, exist_ok=True)
        (root / d).symlink_to(f"usr/{d}")
    base = Path(sys.base_prefix)
    log(f"staging the interpreter {base}")
    _copy_tree(base, root / base.relative_to("/"), SKIP_STDLIB)
    venv = root / "opt/fos/venv"
    run(sys.executable, "-m", "venv", "--without-pip", "--copies", venv)
    # The venv's interpreter must be the VM's copy of the base one, by the same absolute path.
    for exe in (venv / "bin").iterdir():
        if exe.name.startswith("python"):
            exe.unlink()
            exe.symlink_to(base / "bin" / "python3.11")
    site_dst = venv / "lib/python3.11/site-packages"
    site_src = Path(next(p for p in sys.path if p.endswith("site-packages")))
    log("staging the dependencies")
    for entry in site_src.iterdir():
        if SKIP_PACKAGES.match(entry.name) or entry.name == "__pycache__":
            continue
        if entry.is_dir():
            _copy_tree(entry, site_dst / entry.name, {"__pycache__"})
        else:
            shutil.copy2(entry, site_dst / entry.name)
    (site_dst / "fos_src.pth").write_text("/work/src\n")
    log("compiling bytecode")
    compileall.compile_dir(str(root / base.relative_to("/")), quiet=2, workers=0,
                           stripdir=str(root), prependdir="/")  # fmt: skip
    compileall.compile_dir(str(site_dst), quiet=2, workers=0, stripdir=str(root), prependdir="/")
    elves = [base / "bin/python3.11", *root.rglob("*.so"), *root.rglob("*.so.*")]
    seccomp = re.search(r"(/\S+libseccomp\.so\.2)\b", run("/sbin/ldconfig", "-p"))
    libs = _elf_deps([e for e in elves if e.is_file()])
    if seccomp:
        libs.add(Path(seccomp.group(1)))
    for lib in sorted(libs):
        _install(lib, root)
    _install(Path("/lib64/ld-linux-x86-64.so.2"), root)
    _install(Path("/sbin/ldconfig"), root)
    busybox = root / "bin/busybox"
    busybox.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", busybox)
    for applet in run("/bin/busybox", "--list").split():
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "work", "run", "root", "etc", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    # 0755, not 0700: the interpreter lives below /root (the same path as here) and the
    # unprivileged run (uid 1000) must reach it
    os.chmod(root / "root", 0o755)
    (root / "etc/ld.so.conf").write_text("/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nfos-rootless:x:1000:1000::/tmp:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nfos-rootless:x:1000:\n")
    (root / "etc/subuid").write_text("")
    run("/sbin/ldconfig", "-r", root)
    mods = next((kernel / "lib/modules").iterdir()) / "kernel"
    ordered = load_order(mods, GUEST_MODULES)
    for m in ordered:
        shutil.copy2(mods / m, root / "lib/modules" / Path(m).name)
    (root / "lib/modules/order").write_text("\n".join(Path(m).name for m in ordered) + "\n")
    guest = root / "sbin/fos-guest"
    guest.write_text(
        (HERE / "guest.sh").read_text().replace("@PYTHON@", "/opt/fos/venv/bin/python")
    )
    guest.chmod(0o755)


def make_image(src: Path, image: Path, label: str, spare_mb: int) -> None:
    size_kb = int(run("du", "-sk", src).split()[0])
    mb = size_kb // 1024 * 13 // 10 + spare_mb
    run("mkfs.ext4", "-q", "-F", "-L", label, "-d", src, image, f"{mb}M")


def load_order(mods: Path, wanted: tuple[str, ...]) -> list[str]:
    """`wanted` (paths below kernel/) ordered so that each comes after what it depends on."""
    by_name = {Path(m).stem: m for m in wanted}
    deps: dict[str, list[str]] = {}
    for name, rel in by_name.items():
        m = re.search(rb"depends=([^\0]*)", (mods / rel).read_bytes())
        deps[name] = [d for d in (m.group(1).decode().split(",") if m else []) if d]
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for d in deps.get(name, []):
            if d not in by_name:
                raise SystemExit(f"[vm] module {name} needs {d}, which is not in the list")
            visit(d)
        order.append(name)

    for name in by_name:
        visit(name)
    return [by_name[n] for n in order]


def make_initramfs(kernel: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "bin").mkdir()
        shutil.copy2("/bin/busybox", d / "bin/busybox")
        (d / "bin/sh").symlink_to("busybox")
        (d / "modules").mkdir()
        mods = next((kernel / "lib/modules").iterdir()) / "kernel"
        ordered = load_order(mods, BOOT_MODULES)
        for m in ordered:
            shutil.copy2(mods / m, d / "modules" / Path(m).name)
        order = " ".join(Path(m).name for m in ordered)
        init = d / "init"
        init.write_text((HERE / "init.sh").read_text().replace("@MODULES@", order))
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=d, capture_output=True, check=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=d, input=files, capture_output=True,
            check=True,
        )  # fmt: skip
        out.write_bytes(cpio.stdout)


def build(key: str, kernel_pkg: str) -> Path:
    """The cached build directory (vmlinuz, initrd, root.img), built if missing."""
    out = BUILD / key
    if (out / "root.img").exists():
        log(f"image {key} is cached: {out.relative_to(REPO)}")
        return out
    t0 = time.monotonic()
    kernel = fetch_kernel(kernel_pkg, BUILD / "downloads" / kernel_pkg)
    tmp = BUILD / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "root").mkdir(parents=True)
    stage_root(tmp / "root", kernel)
    log("making the root image (mkfs.ext4 -d)")
    make_image(tmp / "root", tmp / "root.img", "fosroot", 256)
    shutil.rmtree(tmp / "root")
    make_initramfs(kernel, tmp / "initrd")
    shutil.copy2(next((kernel / "boot").glob("vmlinuz-*")), tmp / "vmlinuz")
    tmp.rename(out)
    for old in BUILD.iterdir():  # one cached image is enough
        if old.is_dir() and old.name not in (key, "downloads", "run"):
            shutil.rmtree(old, ignore_errors=True)
    log(f"built {key} in {time.monotonic() - t0:.0f} s")
    return out


# -- a run -------------------------------------------------------------------------------

USERS = ("root", "rootless")
MARKS = {"passed": "pass", "skipped": "skip", "failed": "FAIL"}


def make_work_disk(selection: list[str], run_dir: Path) -> Path:
    src = run_dir / "work" / "src"
    files = run("git", "ls-files", "-co", "--exclude-standard", cwd=REPO).split("\n")
    for rel in filter(None, files):
        p = REPO / rel
        if p.is_file() and not rel.startswith(("build/", ".venv/")):
            dst = src / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
    compileall.compile_dir(str(src), quiet=2, workers=0, stripdir=str(run_dir / "work"),
                           prependdir="/work")  # fmt: skip
    (run_dir / "work/selection").write_text(" ".join(selection) + "\n")
    image = run_dir / "work.img"
    make_image(run_dir / "work", image, "foswork", 256)  # room for the memory hog's files
    return image


def boot(build_dir: Path, work: Path, layout: str, run_dir: Path, timeout: float) -> int:
    """Boot the VM with cgroup `layout` and stream its console; returns its exit word."""
    console = run_dir / f"console-{layout}.log"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-smp", "2",
        "-kernel", str(build_dir / "vmlinuz"), "-initrd", str(build_dir / "initrd"),
        "-append", f"console=ttyS0 panic=-1 quiet loglevel=3 psi=1 fos.cgroup={layout}",
        "-drive", f"file={build_dir / 'root.img'},format=raw,if=virtio,snapshot=on",
        "-drive", f"file={work},format=raw,if=virtio",
        "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
    ]  # fmt: skip
    log(f"booting (qemu, TCG) with the cgroup layout {layout}")
    rc: int | None = None
    doctor: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout
    with (
        open(console, "w") as out,
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ) as p,
    ):
        assert p.stdout is not None
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            out.write(line + "\n")
            d = DOCTOR.match(line)
            if d:  # kept in the files, not shown
                doctor.setdefault(d.group(1), []).append(d.group(2))
            else:
                print(f"  | {line}", flush=True)
            m = re.match(rf"{MARK} exit (\d+)", line)
            if m:
                rc = int(m.group(1))
            if time.monotonic() > deadline:
                log(f"timeout after {timeout:.0f} s")
                p.kill()
                break
        p.wait()
    for who, lines in doctor.items():
        (run_dir / f"doctor-vm-{who}.json").write_text("\n".join(lines) + "\n")
    took = timeout - (deadline - time.monotonic())
    log(f"{layout}: the VM reported exit {rc} after {took:.0f} s")
    return 1 if rc is None else rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--selection", type=Path, default=DEFAULT_SELECTION)
    ap.add_argument(
        "--layouts",
        default=",".join(LAYOUTS),
        help=f"cgroup layouts to boot, comma-separated (default: {','.join(LAYOUTS)})",
    )
    ap.add_argument("--timeout", type=float, default=600.0, help="per boot, seconds")
    a = ap.parse_args(argv)
    layouts = a.layouts.split(",")
    if bad := [x for x in layouts if x not in LAYOUTS]:
        ap.error(f"unknown layout {bad[0]!r}: choose from {', '.join(LAYOUTS)}")
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "cpio", "busybox"):
        if shutil.which(tool) is None and not Path(f"/bin/{tool}").exists():
            raise SystemExit(f"[vm] {tool} is missing: scripts/bootstrap installs it")
    selection = a.selection.read_text().split()
    kernel_pkg, version = kernel_package()
    key = cache_key((kernel_pkg, version))
    build_dir = build(key, kernel_pkg)
    run_dir = BUILD / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    work = make_work_disk(selection, run_dir)
    host_doctor = subprocess.run(
        [sys.executable, "-m", "fos_host.cli", "doctor", "--json"], capture_output=True, text=True
    )
    (run_dir / "doctor-host.json").write_text(host_doctor.stdout)
    results = {}
    for layout in layouts:
        results[layout] = boot(build_dir, work, layout, run_dir, a.timeout)
    log("pytest in the VM (0 = both runs passed): "
        + ", ".join(f"{k} exit {v}" for k, v in results.items()))  # fmt: skip
    cells = [f"{layout}-{user}" for layout in layouts for user in USERS]
    (run_dir / "matrix.md").write_text(matrix(read_results(work, run_dir), cells))
    kept = "matrix.md (each test's outcome per layout and user), console-<layout>.log, "
    kept += "doctor-vm-<layout>-<user>.json, doctor-host.json"
    log(f"kept in {run_dir.relative_to(REPO)}: {kept}")
    return next((rc for rc in results.values() if rc not in (0, 5)), 0)


def read_results(work: Path, run_dir: Path) -> dict[str, dict[str, str]]:
    """The junit XML files the runs left on the work disk → {cell: {test id: outcome}}."""
    out = run_dir / "results"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    # debugfs reads the ext4 image without mounting it; it reports errors on stderr only
    cp = subprocess.run(["debugfs", "-R", f"rdump /results {out}", str(work)],
                        capture_output=True, text=True)  # fmt: skip
    found: dict[str, dict[str, str]] = {}
    for xml in sorted((out / "results").glob("*.xml")):
        outcomes: dict[str, str] = {}
        for case in ElementTree.parse(xml).iter("testcase"):
            test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcome = "failed" if kinds & {"failure", "error"} else "passed"
            outcomes[test] = "skipped" if "skipped" in kinds else outcome
        found[xml.stem] = outcomes
    if not found:
        log(f"no results on the work disk: {cp.stderr.strip()}")
    return found


def matrix(found: dict[str, dict[str, str]], cells: list[str]) -> str:
    """A markdown table: one row per test, one column per layout and user."""
    tests = sorted({t for outcomes in found.values() for t in outcomes})
    lines = [
        "# Each test's outcome in the VM, per cgroup layout and user (tests/vm/harness.py)",
        "",
        "| test | " + " | ".join(cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for test in tests:
        marks = [MARKS.get(found.get(c, {}).get(test, ""), "-") for c in cells]
        lines.append(f"| {test} | " + " | ".join(marks) + " |")
    totals = []
    for c in cells:
        counts = {o: list(found.get(c, {}).values()).count(o) for o in MARKS}
        totals.append(" / ".join(str(counts[o]) for o in MARKS))
    lines.append("| passed / skipped / failed | " + " | ".join(totals) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
