"""uvicorn's WebSocket protocol, with a keepalive that does not drop a client for being fast.

The server pings each client and closes the connection when the pong does not come within ``ws_ping_timeout``.
But a pong travels behind the audio the client sent before it, and the server stops reading a client that sends
faster than the engine computes (back-pressure): its pong then waits in the socket, unread, however alive the
client is, and uvicorn dropped such clients after ping interval + timeout (40 s by default) with their transcript.

Here a missing pong closes the connection only if nothing has come from the client since the ping and the server
holds none of its data unread; otherwise the deadline is re-armed.  A dead client is still found: once the engine
has caught up with what it sent, nothing new arrives and the next deadline closes it (the session's idle timeout
would too).

The client's own pings (websockets pings every 20 s and gives up 20 s later) wait behind its audio the same way,
and those only the server's reading can answer: everything the client sent before a ping must be read within the
client's timeout, at the pace the engine computes.  The kernel's buffers for the connection (several MB on Linux,
minutes of audio) would make that wait long, so a WebSocket connection's receive buffer is set to
:data:`RECEIVE_BUFFER_BYTES`; the back-pressure then holds a client's audio in the server's own bounded buffer and
in the client, whose pings go out behind at most a few seconds of it.

:func:`uvicorn_settings` gives the WebSocket settings ``voxtral serve`` runs uvicorn with.
"""

from __future__ import annotations

import socket
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

#: a WebSocket connection's kernel receive buffer: about 1.5 s of audio as base64 PCM16 in JSON
RECEIVE_BUFFER_BYTES = 64 * 1024


class PatientKeepalive(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol whose keepalive counts received data as a sign of life, on a
    connection with a small kernel receive buffer."""

    _received_at = 0.0

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._received_at = self.loop.time()
        super().data_received(data)

    def keepalive_timeout(self) -> None:
        alive = self._received_at > self.ping_sent_at or self.read_paused
        if alive and self.ping_timeout is not None and not (self.close_sent or self.transport.is_closing()):
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
            return
        super().keepalive_timeout()


def uvicorn_settings(max_message_bytes: int) -> dict[str, Any]:
    """uvicorn.Config's WebSocket settings for the app: the protocol above, and a frame limit above the app's
    message limit, so an oversized message gets the app's clear error event instead of a closed socket."""
    return {"ws": PatientKeepalive, "ws_max_size": 2 * max_message_bytes}
