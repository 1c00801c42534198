"""The native-server helpers the suite and `make up` share."""

from __future__ import annotations

import socket

from deploy.local.servers import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    # Each port is closed again at once, so the kernel may well offer it again.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_free_port_is_bindable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
