"""A loopback TCP proxy between a gRPC client and the server, for faults a clean client never makes.

    proxy = TcpProxy(server.address).start()     # connect clients to proxy.address
    proxy.reset()       # every connection: RST to the server (SO_LINGER 0), as if the client vanished
    proxy.blackhole()   # stop forwarding and keep the sockets open: a half-open connection
    proxy.close()
"""
from __future__ import annotations

import socket
import struct
import threading


class TcpProxy:
    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._forwarding.wait()  # blackholed: hold the bytes, the sockets stay open
            if self._closed:
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def reset(self) -> None:
        """Abort every connection: the server side gets a TCP RST, not a FIN or an HTTP/2 goodbye."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, server in pairs:
            for s in (server, client):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()

    def blackhole(self) -> None:
        """Stop forwarding in both directions without closing anything: to the server the peer is
        silent, like a machine that lost power or a network path that dropped."""
        self._forwarding.clear()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                s.close()
