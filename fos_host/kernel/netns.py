"""Network namespace: a sandbox sees only its own loopback.

Child half: `loopback_up` — one SIOCSIFFLAGS ioctl on an AF_INET socket (~0.5 ms; pyroute2
inside the child costs ~10 ms plus a 250 ms import). Must run before seccomp, which forbids
AF_INET sockets in the renderer profile.
"""

from __future__ import annotations

import fcntl
import socket
import struct

from fos_host.errors import StepError

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sh", b"lo", 0)
            flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    except OSError as e:
        raise StepError("bring loopback up", e.errno or 0) from e
