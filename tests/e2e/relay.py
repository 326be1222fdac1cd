"""A TCP relay for the fault tests: sits between a client and the API server and can go silent.

TLS passes through untouched (the relay never reads what it forwards), so a kubeconfig only needs the
relay's address as its server: the API server's certificate covers 127.0.0.1.

`blackhole()` is the fault that freezes a client with no timeouts or keepalive: every connection open at
that moment stays open but goes silent in both directions for good (as behind a NAT or firewall that
dropped its state), and connections accepted while black-holed are held open with nothing forwarded.
`forward()` lets new connections through again; the silenced ones never come back, so only a client
that gives up on them (a read timeout, keepalive) recovers. `cut()` closes every connection at once.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType

_CHUNK = 65536
_TICK = 0.2  # how often an idle pump looks at its flags


class _Pipe:
    """One client connection and its upstream, pumped by two threads until either side closes."""

    def __init__(self, relay: Relay, client: socket.socket, upstream: socket.socket | None) -> None:
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.silent = upstream is None
        self.closed = threading.Event()
        self._done = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.upstream is None:
            return  # accepted while black-holed: held open, never forwarded
        for src, dst, name in ((self.client, self.upstream, "up"), (self.upstream, self.client, "down")):
            threading.Thread(target=self._pump, args=(src, dst), name=f"relay-{name}", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                if self.silent:
                    self.closed.wait(_TICK)  # read nothing: the peer's data piles up in its buffers
                    continue
                readable, _, _ = select.select([src], [], [], _TICK)
                if not readable or self.silent:
                    continue
                data = src.recv(_CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # half-close: pass the EOF on
                    break
                dst.sendall(data)
        except OSError:
            self.close()
        finally:
            with self._lock:
                self._done += 1
                both = self._done == 2
            if both:
                self.close()

    def close(self) -> None:
        self.closed.set()
        for s in (self.client, self.upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self.relay._forget(self)


class Relay:
    """Listens on 127.0.0.1 (a free port unless given) and relays each connection to `upstream`."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream
        self._server = socket.create_server((host, port))
        self._server.settimeout(_TICK)
        self.address: tuple[str, int] = self._server.getsockname()[:2]
        self._pipes: set[_Pipe] = set()
        self._lock = threading.Lock()
        self._blackholed = False
        self._stop = threading.Event()
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="relay-accept", daemon=True)

    @property
    def url(self) -> str:
        return f"https://{self.address[0]}:{self.address[1]}"

    def start(self) -> Relay:
        self._thread.start()
        return self

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # The faults -----------------------------------------------------------------------------------

    def blackhole(self) -> int:
        """Silence every open connection for good, and forward nothing on new ones; returns how many
        connections were open."""
        with self._lock:
            self._blackholed = True
            pipes = list(self._pipes)
        for p in pipes:
            p.silent = True
        return len(pipes)

    def forward(self) -> None:
        """New connections are relayed again; the ones already silenced stay silent."""
        with self._lock:
            self._blackholed = False

    def cut(self) -> int:
        """Close every connection now (both sides see it); returns how many there were."""
        with self._lock:
            pipes = list(self._pipes)
        for p in pipes:
            p.close()
        return len(pipes)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pipes)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()
        self.cut()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # Plumbing -------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setblocking(True)
            self.accepted += 1
            with self._lock:
                blackholed = self._blackholed
            upstream = None
            if not blackholed:
                try:
                    upstream = socket.create_connection(self.upstream, timeout=10)
                    upstream.settimeout(None)
                except OSError:
                    client.close()  # upstream down: the client sees a closed connection, as it would
                    continue
            pipe = _Pipe(self, client, upstream)
            with self._lock:
                self._pipes.add(pipe)
            pipe.start()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)
