"""Issue 14, item 5 (done when): one byte flipped on the wire inside a restore stream, by a
loopback TCP proxy between the client and a real daemon, makes the client raise
``CorruptCheckpointError`` instead of handing back wrong weights."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ckptd.client.errors import CorruptCheckpointError
from client_support import CheckpointerFactory
from daemon_harness import start_in_process

FRAME_HEADER_BYTES = 9
DATA_FRAME = 0


class FlippingProxy:
    """Forwards one loopback TCP connection at a time; in the daemon → client direction
    it parses HTTP/2 frames and XORs one byte at ``flip_at`` bytes into the DATA payloads
    (None: forwards untouched), so the damage lands in message bytes, never in framing."""

    def __init__(self, upstream: tuple[str, int], flip_at: int | None) -> None:
        self.upstream = upstream
        self.flip_at = flip_at
        self.flipped = False
        self._connections: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._connections += [client, server]
            threading.Thread(target=_pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump_frames, args=(server, client), daemon=True).start()

    def _pump_frames(self, source: socket.socket, sink: socket.socket) -> None:
        seen = 0  # DATA payload bytes forwarded so far
        try:
            while header := _read_exactly(source, FRAME_HEADER_BYTES):
                length = int.from_bytes(header[:3], "big")
                payload = bytearray(_read_exactly(source, length))
                if header[3] == DATA_FRAME and self.flip_at is not None and not self.flipped:
                    if seen <= self.flip_at < seen + length:
                        payload[self.flip_at - seen] ^= 0x01
                        self.flipped = True
                    seen += length
                sink.sendall(header + payload)
        except OSError:
            pass
        finally:
            sink.close()

    def close(self) -> None:
        """Stops accepting and cuts the forwarded connections, so the daemon's shutdown
        does not wait out its grace period for a client behind the proxy."""
        self._listener.close()
        for connection in self._connections:
            connection.close()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        got = sock.recv(n - len(data))
        if not got:
            return b""
        data += got
    return bytes(data)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        sink.close()


@pytest.fixture
def tcp_daemon_address(tmp_path: Path) -> Iterator[str]:
    running = start_in_process(tmp_path / "storage")
    try:
        yield running.address
    finally:
        running.stop()


@pytest.mark.parametrize("flip", [False, True])
def test_a_byte_flipped_in_a_restore_stream_is_a_corrupt_checkpoint(
    tcp_daemon_address: str, make_checkpointer: CheckpointerFactory, flip: bool
) -> None:
    weights = torch.arange(2 << 20, dtype=torch.float32)  # 8 MiB, stored exactly (a base)
    saver = make_checkpointer(tcp_daemon_address, "flip", transport="grpc")
    saver.save(1, {"w": weights}).wait_durable(60)
    host, port = tcp_daemon_address.rsplit(":", 1)
    proxy = FlippingProxy((host, int(port)), flip_at=4 << 20 if flip else None)
    try:
        reader = make_checkpointer(proxy.address, "flip", transport="grpc")
        if flip:
            with pytest.raises(CorruptCheckpointError, match="checksum"):
                reader.restore(1)
            assert proxy.flipped
        else:  # the proxy itself is transparent
            assert torch.equal(reader.restore(1)["w"], weights)
    finally:
        proxy.close()
