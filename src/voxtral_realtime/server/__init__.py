"""``voxtral serve``: the model behind HTTP and WebSocket, for many users at once.

* :mod:`.app`: the FastAPI application (:func:`create_app`): REST transcriptions, models, health, metrics, the
  browser page (``web/``);
* :mod:`.realtime`: the ``/v1/realtime`` WebSocket protocol (vLLM's, plus word events);
* :mod:`.state`: the event-loop side: limits, stream slots, outgoing queues, metrics, API keys;
* :mod:`.worker`: the one thread that owns the batched engine and runs every stream's audio through it;
* :mod:`.replicas`: several servers behind one address on Ray Serve.

Importing it does no work: the model is loaded in the application's lifespan hook.
"""

from .app import create_app

__all__ = ["create_app"]
