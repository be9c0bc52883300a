"""Parser of the seccomp policy files in `seccomp/` (the format is described in its README).

A policy file is read into a `Policy`: a default action and a flat tuple of `Rule`s, one per
syscall and argument condition, with every set expanded, every name checked against
libseccomp's syscall table for the native architecture and every constant resolved. The
compiler (`fos_host.kernel.seccomp`) turns a `Policy` into BPF; nothing here touches the
kernel. Every mistake in a file is a `ConfigError` whose message starts with `file:line:`.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fos_host.errors import ConfigError
from fos_host.paths import data_dir

SUFFIX = ".policy"
U32 = 0xFFFFFFFF

# Actions as they are spelled in `Rule.action` and `Policy.default`.
ALLOW = "allow"
KILL = "kill"
TRAP = "trap"
LOG = "log"
ERRNO_PREFIX = "errno:"

_REPO_ROOT = Path(__file__).resolve().parent.parent.parent

# Symbolic argument values. The values are the x86_64 Linux ABI ones, written out rather than
# taken from the `socket`/`termios` modules so that a policy means the same on every host.
CONSTANTS: dict[str, int] = {
    # socket(2) domains (arg0) and types (arg1; the low 4 bits, SOCK_TYPE_MASK, are the type)
    "AF_UNSPEC": 0,
    "AF_UNIX": 1,
    "AF_LOCAL": 1,
    "AF_INET": 2,
    "AF_INET6": 10,
    "AF_NETLINK": 16,
    "AF_PACKET": 17,
    "AF_BLUETOOTH": 31,
    "AF_ALG": 38,
    "AF_VSOCK": 40,
    "SOCK_STREAM": 1,
    "SOCK_DGRAM": 2,
    "SOCK_RAW": 3,
    "SOCK_SEQPACKET": 5,
    "SOCK_TYPE_MASK": 0xF,
    "SOCK_NONBLOCK": 0x800,
    "SOCK_CLOEXEC": 0x80000,
    # clone(2) flags (arg0). CLONE_NEWTIME (0x80) only exists for clone3/unshare: in clone's
    # arg0 the low byte is the exit signal.
    "CLONE_VM": 0x100,
    "CLONE_FS": 0x200,
    "CLONE_FILES": 0x400,
    "CLONE_SIGHAND": 0x800,
    "CLONE_PIDFD": 0x1000,
    "CLONE_PTRACE": 0x2000,
    "CLONE_VFORK": 0x4000,
    "CLONE_PARENT": 0x8000,
    "CLONE_THREAD": 0x10000,
    "CLONE_NEWNS": 0x20000,
    "CLONE_SYSVSEM": 0x40000,
    "CLONE_SETTLS": 0x80000,
    "CLONE_PARENT_SETTID": 0x100000,
    "CLONE_CHILD_CLEARTID": 0x200000,
    "CLONE_UNTRACED": 0x800000,
    "CLONE_CHILD_SETTID": 0x1000000,
    "CLONE_NEWCGROUP": 0x2000000,
    "CLONE_NEWUTS": 0x4000000,
    "CLONE_NEWIPC": 0x8000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    "CLONE_IO": 0x80000000,
    # ioctl(2) requests (arg1)
    "TCGETS": 0x5401,
    "TCSETS": 0x5402,
    "TIOCSCTTY": 0x540E,
    "TIOCGPGRP": 0x540F,
    "TIOCSPGRP": 0x5410,
    "TIOCSTI": 0x5412,
    "TIOCGWINSZ": 0x5413,
    "TIOCSWINSZ": 0x5414,
    "FIONREAD": 0x541B,
    "TIOCINQ": 0x541B,
    "TIOCLINUX": 0x541C,
    "FIONBIO": 0x5421,
    "FIONCLEX": 0x5450,
    "FIOCLEX": 0x5451,
    "FIOASYNC": 0x5452,
    # prctl(2) options (arg0)
    "PR_SET_PDEATHSIG": 1,
    "PR_GET_PDEATHSIG": 2,
    "PR_GET_DUMPABLE": 3,
    "PR_SET_DUMPABLE": 4,
    "PR_GET_KEEPCAPS": 7,
    "PR_SET_KEEPCAPS": 8,
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_GET_SECCOMP": 21,
    "PR_SET_SECCOMP": 22,
    "PR_CAPBSET_READ": 23,
    "PR_CAPBSET_DROP": 24,
    "PR_GET_SECUREBITS": 27,
    "PR_SET_SECUREBITS": 28,
    "PR_SET_TIMERSLACK": 29,
    "PR_GET_TIMERSLACK": 30,
    "PR_SET_MM": 35,
    "PR_SET_CHILD_SUBREAPER": 36,
    "PR_GET_CHILD_SUBREAPER": 37,
    "PR_SET_NO_NEW_PRIVS": 38,
    "PR_GET_NO_NEW_PRIVS": 39,
    "PR_CAP_AMBIENT": 47,
    "PR_SET_VMA": 0x53564D41,
    "PR_SET_PTRACER": 0x59616D61,
    # arch_prctl(2) codes (arg0)
    "ARCH_SET_GS": 0x1001,
    "ARCH_SET_FS": 0x1002,
    "ARCH_GET_FS": 0x1003,
    "ARCH_GET_GS": 0x1004,
    # misc
    "AT_FDCWD": -100,
}

_ACTION_WORDS = (ALLOW, KILL, TRAP, LOG, "errno")
_SET_NAME = re.compile(r"@[a-z][a-z0-9_-]*")
_SYSCALL_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_INCLUDE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]+")
_EXPR = r"[A-Za-z0-9_-]+(?:\s*\|\s*[A-Za-z0-9_-]+)*"
_COND = re.compile(rf"arg(?P<arg>\d+)\s*(?:&\s*(?P<mask>{_EXPR})\s*)?==\s*(?P<value>{_EXPR})")
_AND = re.compile(r"\s+and\s+")
_DEFAULT_LINE = re.compile(r"^\s*default\b", re.MULTILINE)


class Cond(NamedTuple):
    """`(args[arg] & mask) == value`, both within 32 bits (emitted as libseccomp MASKED_EQ)."""

    arg: int
    mask: int
    value: int


@dataclass(frozen=True)
class Rule:
    """One syscall with an action; `conds` (all must hold) are empty for an unconditional rule.

    Several rules for one syscall are alternatives (OR); they always share one action.
    """

    syscall: str
    action: str
    conds: tuple[Cond, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A parsed profile. `digest` is the sha256 of the texts of every file it was built from."""

    name: str
    path: Path
    default: str
    rules: tuple[Rule, ...]
    digest: str

    def syscalls(self, action: str | None = None) -> list[str]:
        """Sorted names of the syscalls with rules (only those with `action`, if given)."""
        return sorted({r.syscall for r in self.rules if action is None or r.action == action})


def display_path(path: Path) -> str:
    """`path` as error messages show it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(_REPO_ROOT))
    except (ValueError, OSError):
        return str(path)


def available_profiles() -> list[str]:
    """Names of the shipped profiles: the `*.policy` files with a `default` line.

    Files without one (like `sets.policy`) only define sets for others to include.
    """
    names = []
    for path in sorted(data_dir("seccomp").glob(f"*{SUFFIX}")):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        if _DEFAULT_LINE.search(text):
            names.append(path.name[: -len(SUFFIX)])
    return names


def load_policy(name_or_path: str) -> Policy:
    """Parse a profile by name ("renderer") or a policy file by path ("x/y.policy")."""
    if "/" in name_or_path or name_or_path.endswith(SUFFIX):
        path = Path(name_or_path)
    else:
        path = data_dir("seccomp") / f"{name_or_path}{SUFFIX}"
        if not _PROFILE_NAME.fullmatch(name_or_path) or not path.is_file():
            available = ", ".join(available_profiles()) or "none"
            raise ConfigError(f"unknown seccomp profile '{name_or_path}' (available: {available})")
    return _Parser().parse(path)


# --- parsing -------------------------------------------------------------------------------


@dataclass
class _Seen:
    """What the policy so far says about one syscall (for conflict checks)."""

    action: str
    where: str
    unconditional: bool
    conditional_where: str | None = None


@dataclass
class _Parser:
    sets: dict[str, list[str]] = field(default_factory=dict)
    files: list[tuple[Path, str]] = field(default_factory=list)
    included: set[Path] = field(default_factory=set)
    default: str | None = None
    rules: list[Rule] = field(default_factory=list)
    seen: dict[str, _Seen] = field(default_factory=dict)
    numbers: dict[str, int] = field(default_factory=dict)

    def parse(self, path: Path) -> Policy:
        self._read_file(path, top=True)
        if self.default is None:
            raise ConfigError(f"{display_path(path)}:1: missing 'default' line")
        digest = hashlib.sha256()
        for file_path, text in self.files:
            data = text.encode()
            digest.update(f"{file_path.name}\0{len(data)}\0".encode())
            digest.update(data)
        name = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
        return Policy(
            name=name,
            path=path,
            default=self.default,
            rules=tuple(self.rules),
            digest=digest.hexdigest(),
        )

    # files and lines

    def _read_file(self, path: Path, *, top: bool, where: str | None = None) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}cannot read {display_path(path)}: {reason}") from None
        self.included.add(path.resolve())
        self.files.append((path, text))
        shown = display_path(path)
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = " ".join(line.split("#", 1)[0].split())  # one space between words
            if line:
                self._line(path, f"{shown}:{lineno}", line, top=top)

    def _line(self, path: Path, where: str, line: str, *, top: bool) -> None:
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "include":
            self._include(path, where, rest)
        elif word == "set":
            self._set(where, rest)
        elif not top and (word == "default" or word in _ACTION_WORDS):
            raise ConfigError(
                f"{where}: '{word}' in an included file (only 'set' and 'include' lines are)"
            )
        elif word == "default":
            if self.default is not None:
                raise ConfigError(f"{where}: a second 'default' line")
            action, extra = self._action(where, rest, "default")
            if extra:
                raise ConfigError(f"{where}: unexpected '{extra}' after the default action")
            self.default = action
        elif word in _ACTION_WORDS:
            action, items = self._action(where, line, "rule")
            self._rule(where, action, items)
        else:
            raise ConfigError(f"{where}: unknown directive '{word}'")

    def _include(self, path: Path, where: str, rest: str) -> None:
        if not _INCLUDE_NAME.fullmatch(rest):
            raise ConfigError(f"{where}: 'include' takes one file name without suffix, e.g. 'sets'")
        target = path.parent / f"{rest}{SUFFIX}"
        if target.resolve() in self.included:
            return
        self._read_file(target, top=False, where=where)

    def _set(self, where: str, rest: str) -> None:
        name, colon, members = rest.partition(":")
        name = name.strip()
        if not colon or not _SET_NAME.fullmatch(name):
            raise ConfigError(f"{where}: expected 'set @name: syscall ...'")
        entries = self.sets.setdefault(name, [])
        for syscall in self._items(where, members.split()):
            if syscall not in entries:
                entries.append(syscall)

    # actions, items, conditions

    def _action(self, where: str, text: str, what: str) -> tuple[str, str]:
        """Split 'errno EPERM rest' / 'kill rest' into (action, rest)."""
        word, _, rest = text.partition(" ")
        rest = rest.strip()
        if word in (ALLOW, KILL, TRAP, LOG):
            return word, rest
        if word == "errno":
            name, _, rest = rest.partition(" ")
            if not name:
                raise ConfigError(f"{where}: 'errno' needs an errno name, e.g. 'errno EPERM'")
            if not name.isupper() or not isinstance(getattr(_errno, name, None), int):
                raise ConfigError(f"{where}: unknown errno '{name}'")
            return ERRNO_PREFIX + name, rest.strip()
        raise ConfigError(
            f"{where}: unknown {what} action '{word}' (allow, kill, trap, log, errno NAME)"
        )

    def _items(self, where: str, words: list[str]) -> Iterator[str]:
        """Expand syscall names and @sets, checking each name."""
        for word in words:
            if word.startswith("@"):
                if word not in self.sets:
                    raise ConfigError(f"{where}: unknown set '{word}'")
                yield from self.sets[word]
            else:
                self._syscall_number(where, word)
                yield word

    def _syscall_number(self, where: str, name: str) -> int:
        if name not in self.numbers:
            number = -1
            if _SYSCALL_NAME.fullmatch(name):
                import pyseccomp  # lazy: libseccomp is only needed when policies are read

                number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
            # Negative numbers are unknown names or libseccomp's pseudo-syscalls (socketcall…)
            # that do not exist on this architecture.
            if number < 0:
                raise ConfigError(f"{where}: unknown syscall '{name}'")
            self.numbers[name] = number
        return self.numbers[name]

    def _rule(self, where: str, action: str, text: str) -> None:
        names_text, sep, conds_text = _split_if(text)
        words = names_text.split()
        if not words:
            raise ConfigError(f"{where}: '{action}' needs at least one syscall or @set")
        conds: tuple[Cond, ...] = ()
        if sep:
            if not conds_text:
                raise ConfigError(f"{where}: 'if' needs a condition, e.g. 'arg0 == AF_UNIX'")
            conds = self._conditions(where, conds_text)
        for syscall in self._items(where, words):
            self._add(where, Rule(syscall, action, conds))

    def _conditions(self, where: str, text: str) -> tuple[Cond, ...]:
        conds: list[Cond] = []
        for part in _AND.split(text.strip()):
            match = _COND.fullmatch(part.strip())
            if not match:
                raise ConfigError(
                    f"{where}: bad condition '{part.strip()}' "
                    "(expected 'argN == VALUE' or 'argN & MASK == VALUE')"
                )
            arg = int(match["arg"])
            if arg > 5:
                raise ConfigError(f"{where}: arg{arg} does not exist (arg0 to arg5)")
            if any(c.arg == arg for c in conds):
                raise ConfigError(f"{where}: arg{arg} is compared twice in one rule")
            mask = U32 if match["mask"] is None else self._expr(where, match["mask"])
            value = self._expr(where, match["value"])
            if mask == 0:
                raise ConfigError(f"{where}: mask of arg{arg} is 0")
            if value & ~mask:
                raise ConfigError(
                    f"{where}: value {value:#x} has bits outside mask {mask:#x} (never matches)"
                )
            conds.append(Cond(arg, mask, value))
        return tuple(conds)

    def _expr(self, where: str, text: str) -> int:
        """NAME|NAME|0x10: a 32-bit value (negative numbers as their two's complement)."""
        result = 0
        for token in (t.strip() for t in text.split("|")):
            if token in CONSTANTS:
                number = CONSTANTS[token]
            else:
                try:
                    number = int(token, 0)
                except ValueError:
                    raise ConfigError(f"{where}: unknown constant '{token}'") from None
            if not -(2**31) <= number <= U32:
                raise ConfigError(f"{where}: {token} does not fit in 32 bits")
            result |= number & U32
        return result

    def _add(self, where: str, rule: Rule) -> None:
        seen = self.seen.get(rule.syscall)
        conditional = bool(rule.conds)
        if seen is None:
            self.seen[rule.syscall] = _Seen(
                rule.action, where, not conditional, where if conditional else None
            )
        elif seen.action != rule.action:
            raise ConfigError(
                f"{where}: syscall '{rule.syscall}' is given '{rule.action}' here "
                f"but '{seen.action}' at {seen.where}"
            )
        elif conditional and seen.unconditional:
            raise ConfigError(
                f"{where}: syscall '{rule.syscall}' has conditions here "
                f"but is unconditional at {seen.where}"
            )
        elif not conditional and seen.conditional_where is not None:
            raise ConfigError(
                f"{where}: syscall '{rule.syscall}' is unconditional here "
                f"but has conditions at {seen.conditional_where}"
            )
        if rule not in self.rules:
            self.rules.append(rule)


def _split_if(text: str) -> tuple[str, bool, str]:
    """'a b if arg0 == 1' → ('a b', True, 'arg0 == 1') (words are single-space separated)."""
    words = text.split(" ")
    if "if" in words:
        i = words.index("if")
        return " ".join(words[:i]), True, " ".join(words[i + 1 :])
    return text, False, ""
