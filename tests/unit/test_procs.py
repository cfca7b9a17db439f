from __future__ import annotations

import socket

from slomesh.procs import free_ports


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
