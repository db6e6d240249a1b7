"""``dsm serve-stt``: moshi-server's streaming ASR websocket (DSM-SPEC §9.1-9.2) over one :class:`~dsm.stt.STTRuntime`,
so existing clients (the DSM scripts, unmute) keep working.

``GET /api/asr-streaming`` upgraded to a websocket; auth by header ``kyutai-api-key`` or query ``?auth_id=`` (the
header wins) against the configured ids, else HTTP 401. Messages are MessagePack maps tagged by ``"type"``:

* client -> server: ``Audio {pcm: [f32]}`` (24 kHz mono, any length), ``Marker {id}``; text frames are ignored.
* server -> client: ``Ready``; ``Word {text, start_time}``; ``EndWord {stop_time}``; ``Step {step_idx, prs,
  buffered_pcm}`` (models with VAD heads); ``Marker {id}``; ``Error {message}``.

All connections share one runtime: each takes a stream slot (``Error "no free channels"`` when none is left), one
model loop steps every stream that has a full frame, and a connection's bad input (NaN, wrong types) gets an
``Error`` for that connection alone. Word times follow the server rule (Rust alignment and timestamps, §5.3).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgpack
import numpy as np

from .audio import AudioError
from .stt import EndWord, Marker, NoFreeSlotError, STTRuntime, STTStream, VADStep, Word

ASR_PATH = "/api/asr-streaming"
log = logging.getLogger("dsm.server")


def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_single_float=False)


def event_message(event, buffered_pcm: int) -> dict | None:
    """The wire message of an STT event (None for events the protocol does not carry)."""
    if isinstance(event, Word):
        return {"type": "Word", "text": event.text, "start_time": float(event.start_time)}
    if isinstance(event, EndWord):
        return {"type": "EndWord", "stop_time": float(event.stop_time)}
    if isinstance(event, VADStep):
        return {"type": "Step", "step_idx": event.step_idx, "prs": [float(p) for p in event.probs],
                "buffered_pcm": buffered_pcm}
    if isinstance(event, Marker):
        return {"type": "Marker", "id": event.id}
    return None


class ASRServer:
    """The ASR endpoint over ``runtime``. Use :meth:`serve` (an async context manager) or ``dsm serve-stt``."""

    def __init__(self, runtime: STTRuntime, api_keys: Iterable[str] = ("public_token",)):
        if runtime.options.alignment != "rust" or runtime.options.timestamps != "rust":
            log.warning("moshi-server clients expect alignment='rust' and timestamps='rust'")
        self.rt = runtime
        self.api_keys = set(api_keys)
        self.connections: dict[STTStream, object] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    # ---- HTTP layer
    def _process_request(self, connection, request):
        url = urlsplit(request.path)
        if url.path != ASR_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"unknown path {url.path!r}; the ASR is at {ASR_PATH}\n")
        key = request.headers.get("kyutai-api-key") or (parse_qs(url.query).get("auth_id") or [None])[0]
        if key not in self.api_keys:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or unknown kyutai-api-key / auth_id\n")
        return None

    async def serve(self, host: str = "0.0.0.0", port: int = 8080):
        """``async with server.serve(host, port) as ws_server:`` runs the endpoint and the model loop."""
        from websockets.asyncio.server import serve

        self._loop_task = asyncio.create_task(self._model_loop())
        return _Serving(serve(self._handler, host, port, process_request=self._process_request, max_size=2**24),
                        self._loop_task)

    # ---- one connection
    async def _handler(self, ws) -> None:
        try:
            stream = self.rt.open_stream(name=f"ws-{id(ws):x}")
        except NoFreeSlotError:
            await ws.send(pack({"type": "Error", "message": "no free channels"}))
            await ws.close()
            return
        self.connections[stream] = ws
        try:
            await ws.send(pack({"type": "Ready"}))
            async for raw in ws:
                if isinstance(raw, str):
                    continue  # text frames are ignored by the ASR
                error = self._on_message(stream, raw)
                if error:
                    await ws.send(pack({"type": "Error", "message": error}))
                self._wake.set()
        finally:
            del self.connections[stream]
            stream.close()

    def _on_message(self, stream: STTStream, raw: bytes) -> str | None:
        try:
            msg = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            return f"not a MessagePack message: {e}"
        kind = msg.get("type") if isinstance(msg, dict) else None
        try:
            if kind == "Audio":
                pcm = np.asarray(msg.get("pcm", []), dtype=np.float32)
                if pcm.ndim != 1:
                    return f"Audio.pcm must be a flat list of floats, got shape {pcm.shape}"
                stream.push(pcm, process=False)
            elif kind == "Marker":
                stream.marker(int(msg["id"]))
            elif kind == "OggOpus":
                return "OggOpus input is not supported by dsm: send Audio messages (24 kHz float PCM)"
            else:
                return f"unknown message type {kind!r} (expected Audio or Marker)"
        except (AudioError, TypeError, ValueError, KeyError) as e:
            return f"bad {kind} message: {e}"
        return None

    # ---- the model loop: one step for every stream with a full frame, then each connection's events
    async def _model_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                stepped = self.rt.step()
                await self._send_events()
                if not stepped:
                    break
                await asyncio.sleep(0)  # let connections queue audio between steps

    async def _send_events(self) -> None:
        for stream, ws in list(self.connections.items()):
            for event in stream.events():
                msg = event_message(event, len(stream.queue))
                if msg is not None:
                    try:
                        await ws.send(pack(msg))
                    except Exception:  # the connection is going away; its handler cleans up
                        break


class _Serving:
    def __init__(self, server_cm, loop_task):
        self.server_cm, self.loop_task = server_cm, loop_task

    async def __aenter__(self):
        return await self.server_cm.__aenter__()

    async def __aexit__(self, *exc):
        self.loop_task.cancel()
        return await self.server_cm.__aexit__(*exc)


def setup_serve_stt_parser(p) -> None:
    from .stt import add_model_args

    add_model_args(p)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted kyutai-api-key / auth_id values (default: public_token)")
    p.set_defaults(func=cmd_serve_stt, alignment="rust", timestamps="rust")


def cmd_serve_stt(args) -> int:
    from .stt import runtime_from_args

    rt = runtime_from_args(args)
    server = ASRServer(rt, args.api_key or ["public_token"])

    async def main():
        async with await server.serve(args.host, args.port):
            print(f"dsm: ASR websocket on ws://{args.host}:{args.port}{ASR_PATH} ({rt.max_streams} slots)", flush=True)
            await asyncio.Future()

    asyncio.run(main())
    return 0
