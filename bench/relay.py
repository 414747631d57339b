"""A loopback TCP relay that adds a round-trip time and a bandwidth cap, and counts bytes.

This machine has no kernel netem, so the far regions' latency is emulated in user space: every
chunk read on one side is written to the other half an RTT later (order kept), and each
direction of each connection is paced to the cap. Bounded: it serves until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

CHUNK = 64 << 10


@dataclass
class Counters:
    """Bytes relayed, per direction, over every connection."""

    up: int = 0  # client to server
    down: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> tuple[int, int, int]:
        """The counts so far, and start again from zero."""
        with self.lock:
            counts = (self.up, self.down, self.connections)
            self.up = self.down = self.connections = 0
            return counts


class Relay:
    """One listening address that forwards to a target with a delay and a cap."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], rtt_ms: float, bytes_per_s: float) -> None:
        self.listen, self.target = listen, target
        self.one_way = rtt_ms / 2000
        self.rate = bytes_per_s
        self.counters = Counters()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Begin listening."""
        self.server = await asyncio.start_server(self._serve, *self.listen)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        with self.counters.lock:
            self.counters.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, server_w, "up"), self._pipe(server_r, client_w, "down"))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            sent_until = time.monotonic()
            while True:
                due, data = await queue.get()
                if not data:
                    break
                # The cap: this chunk leaves no earlier than the previous one finished.
                sent_until = max(sent_until, due) + len(data) / self.rate
                await asyncio.sleep(max(0.0, sent_until - time.monotonic()))
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(CHUNK):
                with self.counters.lock:
                    setattr(self.counters, direction, getattr(self.counters, direction) + len(data))
                await queue.put((time.monotonic() + self.one_way, data))
        except (ConnectionError, OSError):
            pass
        await queue.put((time.monotonic() + self.one_way, b""))
        with contextlib.suppress(ConnectionError, OSError):
            await delivering


class RelayThread:
    """Relays served by an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.relays: list[Relay] = []

    def add(self, relay: Relay) -> Relay:
        """Start a relay on the background loop."""
        asyncio.run_coroutine_threadsafe(relay.start(), self.loop).result(timeout=10)
        self.relays.append(relay)
        return relay

    def stop(self) -> None:
        """Stop every relay and the loop."""

        async def close() -> None:
            for relay in self.relays:
                if relay.server is not None:
                    relay.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
