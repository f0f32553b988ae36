"""``proxy.supervisor.listen_sockets``: one listening socket per worker on one port."""

from __future__ import annotations

import select
import socket

import pytest

from proxy.supervisor import listen_sockets


def test_each_worker_gets_its_own_socket_and_connections_are_spread() -> None:
    sockets = listen_sockets("127.0.0.1", 0, 128, 2)
    clients: list[socket.socket] = []
    try:
        assert len({s.fileno() for s in sockets}) == 2
        port = sockets[0].getsockname()[1]
        assert sockets[1].getsockname()[1] == port
        assert all(s.get_inheritable() for s in sockets)
        for _ in range(40):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        accepted = [0, 0]
        while sum(accepted) < 40:
            ready, _, _ = select.select(sockets, [], [], 2)
            assert ready, f"only {sum(accepted)} of 40 connections arrived"
            for sock in ready:
                conn, _ = sock.accept()
                conn.close()
                accepted[sockets.index(sock)] += 1
        # By a hash of the addresses: each gets some (all 40 on one: 2 in 10^12).
        assert min(accepted) > 0
    finally:
        for sock in clients + sockets:
            sock.close()


def test_one_worker_has_one_socket() -> None:
    sockets = listen_sockets("127.0.0.1", 0, 16, 1)
    try:
        assert len(sockets) == 1
        assert sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sockets[0].close()


def test_a_port_another_instance_listens_on_is_refused_not_shared() -> None:
    first = listen_sockets("127.0.0.1", 0, 16, 2)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            listen_sockets("127.0.0.1", port, 16, 2)
    finally:
        for sock in first:
            sock.close()
    again = listen_sockets("127.0.0.1", port, 16, 2)  # free again: it binds
    for sock in again:
        sock.close()
