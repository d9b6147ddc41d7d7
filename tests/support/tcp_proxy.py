"""An asyncio TCP proxy that tests can cut (simulated network failure) and restore."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["TcpProxy"]

_CHUNK = 64 * 1024
_UPSTREAM_CONNECT_TIMEOUT = 5.0


def _abort(writer: asyncio.StreamWriter) -> None:
    """Drop a connection at once with a TCP RST, as a network failure would look."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes one way until EOF, then pass the EOF on (half-close)."""
    while True:
        data = await reader.read(_CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if not writer.transport.is_closing() and writer.can_write_eof():
        writer.write_eof()


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target_host:target_port`` until told otherwise.

    ``cut()`` resets every proxied connection (both sides) and makes new ones fail fast;
    ``restore()`` resumes proxying. Use from one event loop; ``close()`` when done.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._cut = False
        self._closed = False
        self._handlers: set[asyncio.Task[None]] = set()
        self._open = 0
        self.accepted = 0  # connections ever accepted (including refused ones)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "cut" if self._cut else "open"
        return (
            f"TcpProxy(127.0.0.1:{self._port} -> {self.target_host}:{self.target_port}, "
            f"{state}, open_connections={self._open})"
        )

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("TcpProxy already started")
        if self._closed:
            raise RuntimeError("TcpProxy is closed")
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._port = self._server.sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("TcpProxy not started")
        return self._port

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def open_connections(self) -> int:
        """Connections currently proxied end to end."""
        return self._open

    async def cut(self) -> None:
        """Reset all proxied connections now; refuse (accept-and-reset) new ones."""
        self._cut = True
        await self._kill_all()

    async def restore(self) -> None:
        """Resume proxying new connections."""
        if self._closed:
            raise RuntimeError("TcpProxy is closed")
        self._cut = False

    async def close(self) -> None:
        """Stop listening and reset everything; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._cut = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._kill_all()
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _kill_all(self) -> None:
        # Yield once so handlers of just-accepted sockets get to register (they will then
        # see the cut flag themselves, but this keeps the counters exact on return).
        await asyncio.sleep(0)
        current = asyncio.current_task()
        handlers = [t for t in self._handlers if t is not current]
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)

    def _refusing(self) -> bool:
        return self._cut or self._closed

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        upstream_writer: asyncio.StreamWriter | None = None
        graceful = False
        counted = False
        try:
            if self._refusing():
                return
            upstream_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                _UPSTREAM_CONNECT_TIMEOUT,
            )
            upstream_writer = upstream
            if self._refusing():  # cut() while we were connecting upstream
                return
            self._open += 1
            counted = True
            pumps = [
                asyncio.create_task(_pump(client_reader, upstream)),
                asyncio.create_task(_pump(upstream_reader, client_writer)),
            ]
            try:
                done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
                # Both directions reached EOF cleanly: flush and close politely.
                graceful = len(done) == len(pumps) and not any(
                    t.cancelled() or t.exception() is not None for t in done
                )
            finally:
                for pump in pumps:
                    pump.cancel()
                # Retrieve every outcome so nothing is logged as "never retrieved".
                await asyncio.gather(*pumps, return_exceptions=True)
        except asyncio.CancelledError:
            # cut() or close(): the connection is reset below; end this task quietly.
            pass
        except Exception:
            # Upstream unreachable, connection reset, ...: the client just sees a reset.
            pass
        finally:
            if counted:
                self._open -= 1
            for writer in (client_writer, upstream_writer):
                if writer is None:
                    continue
                if graceful:
                    writer.close()
                else:
                    _abort(writer)
            self._handlers.discard(task)
