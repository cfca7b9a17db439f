"""A vLLM stand-in for machines without GPUs: vLLM's HTTP API, metric names and KV-event wire
format, with step timing from the shared engine model (``slomesh.engine``).

Run it with ``python -m slomesh.emulator --port 8000 --gpu-type H100`` (or ``slomesh emulator``),
or in-process with :class:`EmulatorServer`.
"""

from slomesh.emulator.kv_events import ZmqKvEventPublisher, encode_batch, encode_event
from slomesh.emulator.runner import EngineRunner, RequestStream, TokenEvent
from slomesh.emulator.server import EmulatorConfig, EmulatorServer, build_app
from slomesh.emulator.tokenizer import WordTokenizer

__all__ = [
    "EmulatorConfig",
    "EmulatorServer",
    "EngineRunner",
    "RequestStream",
    "TokenEvent",
    "WordTokenizer",
    "ZmqKvEventPublisher",
    "build_app",
    "encode_batch",
    "encode_event",
]
