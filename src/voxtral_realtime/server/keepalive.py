"""uvicorn's WebSocket protocol, with a keepalive that does not drop a client for being fast.

The server pings each client and closes the connection when the pong does not come within ``ws_ping_timeout``.
But a pong travels behind the audio the client sent before it, and the server stops reading a client that sends
faster than the engine computes (back-pressure): its pong then waits in the socket, unread, however alive the
client is, and uvicorn dropped such clients after ping interval + timeout (40 s by default) with their transcript.

Here a missing pong closes the connection only if nothing has come from the client since the ping and the server
holds none of its data unread; otherwise the deadline is re-armed.  A dead client is still found: once the engine
has caught up with what it sent, nothing new arrives and the next deadline closes it (the session's idle timeout
would too).

:func:`uvicorn_settings` gives the WebSocket settings ``voxtral serve`` runs uvicorn with.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class PatientKeepalive(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol whose keepalive counts received data as a sign of life."""

    _received_at = 0.0

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
