"""The port a command serves on, checked before it starts anything (`vlmrec serve`, `vlmrec ui`).

check_port("127.0.0.1", 8000, free=True)     # ValueError naming --port, or None
"""

from __future__ import annotations

import socket


def check_port(host: str, port: int, free: bool, flag: str = "--port") -> None:
    """ValueError naming the flag (--port) when it is out of range or (`free`) host:port cannot be bound
    because another server holds it: the server this command starts (Serve's proxy, the demo page) would
    fail in its own process, with its traceback."""
    if not 0 < port < 65536:
        raise ValueError(f"{flag} must be in 1..65535, got {port}")
    if not free:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ValueError(
                f"{flag}: {host}:{port} cannot be bound ({err.strerror}): is another server on it?"
            ) from None
