"""A free TCP port for a test's process group or rendezvous.

The kernel picks it (bind to port 0), so tests running at once (pytest-xdist workers, two CI runs on
one machine) do not pick the same one, as ports derived from a pid or counted from a base could."""

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
