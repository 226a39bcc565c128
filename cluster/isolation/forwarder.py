"""A TCP forwarder: accept on a host socket, pipe each connection to a socket from ``connect``.

``ringserve serve`` listens on the host and connects inside the namespace (see
:meth:`cluster.isolation.netns.NetNamespace.connector`), so only the API port is reachable.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable

from cluster.isolation import IsolationError

BUFFER_BYTES = 64 * 1024


class _Pipe:
    """One forwarded connection: two sockets, two pump directions, closed when both are done."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._running = 2
        self._reset = False

    def abort(self) -> None:
        """Stop both directions now: both peers see the connection end at once (the server a
        client disconnect, so generation is cancelled); the final close sends a reset."""
        with self._lock:
            self._reset = True
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv on it
            except OSError:
                pass

    def pump_done(self) -> bool:
        """One direction finished; the second to finish closes both sockets. True when closed."""
        with self._lock:
            self._running -= 1
            if self._running:
                return False
            reset = self._reset
        for sock in (self.client, self.upstream):
            if reset:  # RST instead of FIN: the other side must not take it for a clean end
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            sock.close()
        return True


class LoopbackForwarder:
    """Accept TCP connections on ``listener``; pipe each one to a socket made by ``connect``.

    Bytes are relayed as they arrive (at most :data:`BUFFER_BYTES` in flight per direction; a
    slow reader slows its writer), so SSE streams flow token by token. A half-close (EOF one
    way) is passed on with ``shutdown(SHUT_WR)`` while the other way keeps flowing; an error on
    either side resets both. If ``connect`` fails the client's connection is simply closed.
    """

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self._listener = listener
        self._connect = connect
        self._stopping = threading.Event()
        self._pipes: set[_Pipe] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="ringserve-forwarder",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._listener.settimeout(0.2)  # accept() wakes up to notice close()
        self._thread.start()

    def close(self) -> None:
        """Stop listening (the port is free once this returns) and reset open connections."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            pipes = list(self._pipes)
        for pipe in pipes:
            pipe.abort()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: let connections finish rather than spin
                continue
            client.settimeout(None)
            threading.Thread(target=self._serve_connection, args=(client,),
                             name="ringserve-forward-conn", daemon=True).start()

    def _serve_connection(self, client: socket.socket) -> None:
        try:
            upstream = self._connect()
        except Exception:  # noqa: BLE001 - not up yet, going away, pool shut down: socket closed
            client.close()
            return
        for sock in (client, upstream):
            _no_delay(sock)
        pipe = _Pipe(client, upstream)
        with self._lock:
            if self._stopping.is_set():
                pipe.abort()
            self._pipes.add(pipe)
        threading.Thread(target=self._pump, args=(pipe, upstream, client),
                         name="ringserve-forward-down", daemon=True).start()
        self._pump(pipe, client, upstream)

    def _pump(self, pipe: _Pipe, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(BUFFER_BYTES)
                if not data:
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on; the other way keeps going
        except OSError:
            pipe.abort()
        if pipe.pump_done():
            with self._lock:
                self._pipes.discard(pipe)


def _no_delay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; IsolationError (one line) when it is taken."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise IsolationError(f"cannot resolve --host {host}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise IsolationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
