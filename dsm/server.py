"""moshi-server compatible websockets (DSM-SPEC §9), so existing clients (the DSM scripts, unmute) keep working.

``dsm serve-stt``: ``GET /api/asr-streaming`` over one :class:`~dsm.stt.STTRuntime` (module ``BatchedAsr``).

* client -> server: ``Audio {pcm: [f32]}`` (24 kHz mono, any length), ``Marker {id}``; text frames are ignored.
* server -> client: ``Ready``; ``Word {text, start_time}``; ``EndWord {stop_time}``; ``Step {step_idx, prs,
  buffered_pcm}`` (models with VAD heads); ``Marker {id}``; ``Error {message}``. Word times follow the server rule
  (Rust alignment and timestamps, §5.3).

``dsm serve-tts``: ``GET /api/tts_streaming?format=PcmMessagePack|Pcm`` over one :class:`~dsm.tts.TTSRuntime`
(module ``Py``). Ogg/Opus formats (moshi-server's default) are refused with HTTP 400: dsm does not encode Opus.

* client -> server: text frames (words to speak), or ``Text {text}``, ``Eos``, ``Voice {embeddings, shape}`` (only
  before the first text; later, ignored as moshi-server does, with an ``Error`` on ``PcmMessagePack``), or the single
  byte ``0x00`` (EOS).
* server -> client (``PcmMessagePack``): ``Ready``, ``Audio {pcm: [f32 x 1920]}`` per frame, ``Text {text, start_s,
  stop_s}`` per word; ``Pcm``: raw little-endian f32 frames only. The socket closes after the last frame.

Auth: header ``kyutai-api-key`` or query ``?auth_id=`` (the header wins) against the configured ids, else HTTP 401.
Without auth, as moshi-server: ``GET /api/build_info`` (versions, device, kernel backend), ``GET /api/modules_info``
(a JSON list with this endpoint's ``type``, ``path``, ``used_slots`` and ``total_slots``) and ``GET /metrics``
(Prometheus text: connections, open channels, slots, step durations, failed steps; prefix ``asr_`` or ``tts_``).
All connections share one runtime and one model loop; a connection's bad input gets an ``Error`` for that connection
alone and never touches the other streams.

Threads: the event loop does the websocket I/O; the steps (and the CUDA graph capture before them) run on one model
thread, so a long step never stalls pings, reads or sends. A connection's messages are parsed as they arrive and
queued in the endpoint's inbox; the model loop applies the inbox to the streams before each step, on the model thread,
so a handler never waits for a step to take in a message (a client is read at network speed, and one that leaves is
seen at once, not after its buffered messages have trickled in one step at a time; a connection's Errors follow the
order of its messages). Every touch of the runtime holds
one ``asyncio.Lock`` (the model loop holds it for a step, a handler to open or close its stream). Each connection's
output goes through its own outbox, drained by its own task, so a client that reads slowly delays only itself; one
that lets more than ``OUTBOX_BYTES`` pile up is closed with code 1008. Input is bounded too: an ASR connection with
more than ``MAX_BUFFERED_S`` of audio waiting is not read until the model catches up (TCP pushes back on the client;
nothing is dropped; the ASR server therefore does not close a connection whose pongs are late, since they wait behind
its audio, and a client that far ahead must pace its audio or not time out its own pings), one that sends no audio
for ``AUDIO_TIMEOUT_S`` is closed (moshi-server's 120 s), a Marker beyond ``MAX_PENDING_MARKERS`` not yet echoed is
refused, a TTS text over ``MAX_TEXT_CHARS`` or beyond
``MAX_PENDING_WORDS`` unspoken words is refused (it is tokenized on the model thread), and the TTS ``?voice=`` query
names a voice of the voice repository only, never a local file or another repository (``VOICE_LOOKUPS`` at once).
So that one client's messages cannot stall the others' (the event loop reads them all, the model thread applies
them), a connection with ``MAX_QUEUED_MESSAGES`` messages not yet applied is not read until the next step, a TTS
message is at most ``TTS_MAX_MESSAGE_BYTES`` and is decoded on the event loop, and a message msgpack must read (any
but an Audio message whose samples share one float encoding, read straight from its bytes) is at most
``SLOW_PARSE_MAX_BYTES``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgpack
import numpy as np
import torch
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.http11 import Response
from websockets.protocol import State

from .audio import AudioError
from .engine import int64_value
from .mimi import FRAME_SIZE, SAMPLE_RATE
from .stt import EndWord, Marker, NoFreeSlotError, STTRuntime, STTStream, VADStep, Word

ASR_PATH = "/api/asr-streaming"
TTS_PATH = "/api/tts_streaming"
TTS_FORMATS = ("PcmMessagePack", "Pcm")
FRAME_RATE = 12.5
OUTBOX_BYTES = 64 * 2**20  # unsent output per connection (~5 min of PcmMessagePack audio) before it is closed
MAX_BUFFERED_S = 60.0  # ASR audio queued per connection before its socket is left unread
AUDIO_TIMEOUT_S = 120.0  # an ASR connection without an Audio message for this long is closed (moshi-server)
CLOSE_TIMEOUT_S = 10.0  # an idle ASR client has this long to take the output sent before its close
# TTS text is split and tokenized on the model thread, so one connection's text must not stall every stream's step:
MAX_TEXT_CHARS = 2**15  # characters of one text message (~5000 words, ~15 ms to tokenize)
MAX_PENDING_MARKERS = 4096  # markers an ASR stream holds not yet echoed before more are refused (bounded memory)
MAX_PENDING_WORDS = 4096  # words a TTS stream holds not yet spoken (~25 min of speech) before more text is refused
MAX_QUEUED_MESSAGES = 256  # a connection's messages not yet applied before its socket is left unread until a step
ASR_MAX_MESSAGE_BYTES = 2**24  # ~60 s of float32 Audio in one message
TTS_MAX_MESSAGE_BYTES = 2**20  # a Voice of 1 x 512 x 125 float64s is ~0.6 MiB; a text of MAX_TEXT_CHARS ~0.1 MiB
SLOW_PARSE_MAX_BYTES = 2**18  # a message msgpack reads into Python objects: ~20 ms at this size, on the event loop
VOICE_LOOKUPS = 2  # ?voice= lookups (hub downloads) at once, on the default executor's threads
VOICE_RETRY_S = 60.0  # a voice name that failed is not looked up again for this long (offline, a lookup takes ~20 s)
log = logging.getLogger("dsm.server")


def pack(msg: dict, single_float: bool = False) -> bytes:
    """A message; floats as msgpack float64 (times), or float32 with ``single_float`` (moshi-server's f32 arrays)."""
    return msgpack.packb(msg, use_single_float=single_float)


_AUDIO_HEAD = msgpack.packb({"type": "Audio"})[1:] + msgpack.packb("pcm")  # after the map's 0x82 header
# one msgpack float array item: its type code and the big-endian value (float32 / float64)
_FLOAT_ITEMS = {code: np.dtype([("code", "u1"), ("value", v)]) for code, v in ((0xCA, ">f4"), (0xCB, ">f8"))}


def audio_message(pcm: np.ndarray) -> bytes:
    """``{"type": "Audio", "pcm": [f32...]}`` with the samples as msgpack float32, as moshi-server sends them, built
    with numpy (msgpack from a list: ~40 us a 1920-sample frame, at every frame of every stream)."""
    n = pcm.shape[0]
    if n < 16:
        head = bytes([0x90 | n])
    else:
        head = b"\xdc" + n.to_bytes(2, "big") if n < 2**16 else b"\xdd" + n.to_bytes(4, "big")
    items = np.empty(n, dtype=_FLOAT_ITEMS[0xCA])
    items["code"], items["value"] = 0xCA, pcm
    return b"\x82" + _AUDIO_HEAD + head + items.tobytes()


def event_message(event, buffered_pcm: int, step_idx: int | None = None) -> dict | None:
    """The wire message of an STT event (None for events the protocol does not carry); ``step_idx`` replaces the
    stream's own step count in ``Step`` (the server sends its global counter)."""
    if isinstance(event, Word):
        return {"type": "Word", "text": event.text, "start_time": float(event.start_time)}
    if isinstance(event, EndWord):
        return {"type": "EndWord", "stop_time": float(event.stop_time)}
    if isinstance(event, VADStep):
        return {"type": "Step", "step_idx": event.step_idx if step_idx is None else step_idx,
                "prs": [float(p) for p in event.probs], "buffered_pcm": buffered_pcm}  # prs sent as f32 (see pack)
    if isinstance(event, Marker):
        return {"type": "Marker", "id": event.id}
    return None


def _describe(e: Exception) -> str:
    """An exception as a client reads it: its type, and its text where it has one (msgpack's often have none)."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _float32_list(values, what: str) -> tuple[np.ndarray | None, str | None]:
    """A message's flat list of numbers as float32 ``[N]``, or the error a client reads."""
    try:
        a = np.asarray(values)
    except (TypeError, ValueError) as e:  # ragged nested lists
        return None, f"{what} must be a flat list of numbers ({e})"
    if a.dtype.kind not in "fiu":  # None would become NaN, "0.5" and True numbers
        return None, f"{what} must be a list of numbers, got {a.dtype} values"
    if a.ndim != 1:
        return None, f"{what} must be a flat list of numbers, got shape {a.shape}"
    with np.errstate(over="ignore"):  # 1e300 -> inf, refused downstream with a clear message
        return a.astype(np.float32), None


def _unpack(raw: bytes) -> tuple[object, str | None]:
    """A client message read by msgpack into Python objects, or the error a client reads."""
    try:
        return msgpack.unpackb(raw, raw=False), None
    except (ValueError, msgpack.UnpackException) as e:
        return None, f"not a MessagePack message ({_describe(e)})"


def _guarded(change: Callable[[], str | None]) -> str | None:
    """A message's change, its failure (bad text, voice) being this connection's error alone."""
    try:
        return change()
    except Exception as e:
        return _describe(e)


def _close_reason(text: str) -> str:
    """``text`` cut to what a websocket close frame carries (123 UTF-8 bytes)."""
    raw = text.encode()
    return text if len(raw) <= 123 else raw[:120].decode(errors="ignore") + "..."


def _http(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)


def build_info(device: torch.device) -> dict:
    """What ``GET /api/build_info`` answers: the versions a bug report or a benchmark row needs (those of
    :func:`dsm.bench.environment`, under moshi-server-like names)."""
    import dsm_kernels

    from .bench import environment

    env = environment(device)
    return {"name": "dsm", "version": env["dsm"], "commit": env["commit"], "python": env["python"],
            "torch": env["torch"], "cuda": torch.version.cuda, "triton": env["triton"], "device": str(device),
            "device_name": env["device"], "kernel_backend": dsm_kernels.default_backend(device)}  # fmt: skip


class _Metrics:
    """An endpoint's Prometheus metrics, in a registry of its own (two servers in one process keep theirs apart).
    Slot and channel gauges read the endpoint's state when scraped."""

    STEP_BUCKETS = (1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 40e-3, 80e-3, 160e-3)  # 80 ms: one frame of audio

    def __init__(self, prefix: str, endpoint: _Endpoint):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.connect = Counter(f"{prefix}_connect", "Connections accepted.", registry=r)
        self.refused = Counter(f"{prefix}_refused", "Connections refused: no free slot.", registry=r)
        self.steps = Counter(f"{prefix}_steps", "Model steps that advanced at least one stream.", registry=r)
        self.failed_steps = Counter(f"{prefix}_failed_steps", "Model steps that raised (every client closed).",
                                    registry=r)  # fmt: skip
        self.step_duration = Histogram(f"{prefix}_model_step_duration_seconds", "Wall time of a model step, "
                                       "host work included.", buckets=self.STEP_BUCKETS, registry=r)  # fmt: skip
        Gauge(f"{prefix}_open_channels", "Connections open now.", registry=r).set_function(
            lambda: len(endpoint.connections))
        Gauge(f"{prefix}_used_slots", "Stream slots in use.", registry=r).set_function(endpoint.used_slots)
        Gauge(f"{prefix}_total_slots", "Stream slots.", registry=r).set_function(lambda: len(endpoint.rt.slots))

    def render(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return _http(HTTPStatus.OK, generate_latest(self.registry), CONTENT_TYPE_LATEST)


class _Outbox:
    """A connection's messages waiting to be sent, in order, by a task of its own: the model loop only posts."""

    def __init__(self, ws, limit: int):
        self.ws, self.limit, self.pending = ws, limit, 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closing: asyncio.Task | None = None  # set when the client fell too far behind
        self.shut = asyncio.Event()  # the server is closing this connection: its input is no longer run
        self.task = asyncio.create_task(self._drain())

    def post(self, data: bytes | str) -> None:
        if self.closing is not None:
            return
        if self.pending + len(data) > self.limit:  # the client does not keep up: drop it, not the server's memory
            log.warning("a client left %d bytes unread; closing it", self.pending)
            self.task.cancel()  # its send may wait on the client forever
            self.closing = asyncio.create_task(self.ws.close(1008, "dsm: the client reads its output too slowly"))
            self.shut.set()
            return
        self.pending += len(data)
        self.queue.put_nowait(data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection once everything posted before has been sent."""
        self.queue.put_nowait((code, reason))
        self.shut.set()

    async def _drain(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                if isinstance(item, tuple):
                    await self.ws.close(*item)
                    return
                self.pending -= len(item)
                await self.ws.send(item)
            except Exception:  # the connection is going away; its handler cleans up
                return


class _Endpoint:
    """One websocket endpoint over a shared runtime: HTTP checks, the connections, and the model loop that steps
    the runtime on the model thread while it has work and then sends each connection its output."""

    path = ""
    module_type = ""  # moshi-server's name for the module in /api/modules_info
    command = "serve"  # the dsm command that serves it, named in its messages
    metrics_prefix = ""
    outbox_bytes = OUTBOX_BYTES
    max_message_bytes = ASR_MAX_MESSAGE_BYTES
    ping_timeout: float | None = 20.0  # websockets' keepalive: close a connection whose pong is this late

    def __init__(self, runtime, api_keys: Iterable[str]):
        self.rt = runtime
        self.api_keys = set(api_keys)
        self.connections: dict[object, _Outbox] = {}  # connection state -> its outbox
        self.lock = asyncio.Lock()  # held by whoever touches the runtime or a stream
        self._inbox: list[tuple[object, Callable[[], str | None]]] = []  # (connection, message's change) to apply
        self._queued: dict[object, int] = {}  # connection -> its messages in the inbox or being applied (event loop)
        self._wake = asyncio.Event()
        self._stepped = asyncio.Event()  # set (and replaced) after every model step
        self._stopping = asyncio.Event()  # set when the server shuts down
        self._model_thread: ThreadPoolExecutor | None = None
        self.metrics = _Metrics(self.metrics_prefix, self)
        self._build_info = json.dumps(build_info(torch.device(runtime.device))).encode()

    def used_slots(self) -> int:
        return sum(s is not None for s in self.rt.slots)

    def module_info(self) -> dict:
        """This endpoint's entry of ``/api/modules_info`` (values are strings, as moshi-server sends them)."""
        return {"type": self.module_type, "path": self.path, "used_slots": str(self.used_slots()),
                "total_slots": str(len(self.rt.slots))}  # fmt: skip

    def _info(self, path: str) -> Response | None:
        """The unauthenticated GET endpoints, or None for another path."""
        if path == "/api/build_info":
            return _http(HTTPStatus.OK, self._build_info, "application/json")
        if path == "/api/modules_info":
            return _http(HTTPStatus.OK, json.dumps([self.module_info()]).encode(), "application/json")
        if path == "/metrics":
            return self.metrics.render()
        return None

    def _check_query(self, query: dict[str, list[str]]) -> str | None:
        return None

    def _process_request(self, connection, request):
        url = urlsplit(request.path)
        info = self._info(url.path)
        if info is not None:
            return info
        if url.path != self.path:
            return connection.respond(HTTPStatus.NOT_FOUND, f"unknown path {url.path!r}; this server is {self.path}\n")
        query = parse_qs(url.query)
        # As moshi-server: a header that is there wins, even empty, and a repeated one counts by its first value
        # (Headers.get raises on a repeated header).
        sent = request.headers.get_all("kyutai-api-key")
        key = sent[0] if sent else (query.get("auth_id") or [None])[0]
        if key not in self.api_keys:
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or unknown kyutai-api-key / auth_id\n")
        problem = self._check_query(query)
        if problem:
            return connection.respond(HTTPStatus.BAD_REQUEST, problem + "\n")
        return None

    async def serve(self, host: str = "0.0.0.0", port: int = 8080):
        """``async with await endpoint.serve(host, port) as ws_server:`` runs the endpoint and its model loop, with
        the runtime's CUDA graphs captured first (``warm_up``, on the model thread), not during the first clients'
        steps."""
        from websockets.asyncio.server import serve

        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="dsm-model", initializer=self._thread_init)
        await self._on_model_thread(self.rt.warm_up)
        task = asyncio.create_task(self._model_loop())
        return _Serving(serve(self._handler, host, port, process_request=self._process_request,
                              max_size=self.max_message_bytes,
                              ping_timeout=self.ping_timeout), task, self._model_thread, self._stopping)

    def _thread_init(self) -> None:
        device = torch.device(self.rt.device)
        if device.type == "cuda" and device.index is not None:  # the current device is per thread (set_device
            torch.cuda.set_device(device)  # refuses an unindexed "cuda", which means the current device anyway)

    async def _on_model_thread(self, fn):
        def run():
            with torch.no_grad():  # grad mode is per thread too
                return fn()

        done = asyncio.get_running_loop().run_in_executor(self._model_thread, run)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:  # (shutdown) the caller's lock must outlive the step: wait for it to end
            while not done.done():
                try:
                    await asyncio.wait({done})
                except asyncio.CancelledError:
                    continue
            raise

    async def _handler(self, ws) -> None:
        raise NotImplementedError

    def _submit(self, conn, change: Callable[[], str | None]) -> None:
        """Queue a parsed message's ``change`` to the runtime (returns an error text or None): the model loop applies
        it before its next step, in arrival order, unless ``conn`` has left by then."""
        self._inbox.append((conn, change))
        self._queued[conn] = self._queued.get(conn, 0) + 1
        self._wake.set()

    def _applied(self, inbox: list) -> None:
        """Count the messages of ``inbox`` off their connections' queues (event loop)."""
        for conn, _ in inbox:
            left = self._queued[conn] - 1
            if left:
                self._queued[conn] = left
            else:
                del self._queued[conn]

    def _held(self, conn) -> bool:
        """Whether ``conn`` is left unread until the model catches up (see :meth:`_backpressure`)."""
        return self._queued.get(conn, 0) >= MAX_QUEUED_MESSAGES

    async def _backpressure(self, ws, conn) -> bool:
        """Leave the socket unread while :meth:`_held` (the model catches up step by step), or until the connection
        closes (a shutdown must not wait on a step). Whether it waited. Unread, the socket holds the client's control
        frames too: its pings, and a clean close, are seen once the model has caught up (an abrupt disconnect at
        once)."""
        if not self._held(conn):
            return False
        closed = asyncio.ensure_future(ws.wait_closed())
        # Shutdown, or the server closing this connection (a failed step: no step may come to drain its queue): its
        # close reply must then be read, behind its input.
        stopping = asyncio.ensure_future(self._stopping.wait())
        shut = asyncio.ensure_future(self.connections[conn].shut.wait())
        try:
            while self._held(conn) and not any(f.done() for f in (closed, stopping, shut)):
                stepped = asyncio.ensure_future(self._stepped.wait())
                await asyncio.wait({stepped, closed, stopping, shut}, return_when=asyncio.FIRST_COMPLETED)
                stepped.cancel()
        finally:
            for f in (closed, stopping, shut):
                f.cancel()
        return True

    def _error(self, conn, message: str) -> None:
        """Tell ``conn`` that one of its messages was bad (an ``Error`` message)."""
        box = self.connections.get(conn)
        if box is not None:
            box.post(pack({"type": "Error", "message": message}))

    def _apply_and_step(self, inbox: list, loop: asyncio.AbstractEventLoop) -> bool:
        """Apply the queued messages of connections still open (their errors posted as they come, so a connection
        gets them in the order of its messages), then step: whether it stepped. Model thread."""
        for conn, change in inbox:
            if conn in self.connections:
                try:
                    error = change()
                except Exception as e:  # one connection's message must not fail every stream's step
                    log.exception("applying a client message failed")
                    error = f"dsm could not apply this message ({_describe(e)})"
                if error:
                    loop.call_soon_threadsafe(self._error, conn, error)
        return self._step()

    def _step(self) -> bool:
        """One runtime step if any stream can progress; False when there was nothing to do. Model thread."""
        return self.rt.step() > 0

    def _outgoing(self) -> list[tuple[object, list, bool | tuple[int, str]]]:
        """Take every connection's new output: ``(outbox, payloads, close_after)``, ``close_after`` being a bool or
        the close's ``(code, reason)``. Host work only, under the lock."""
        raise NotImplementedError

    async def _model_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                failed = False
                async with self.lock:
                    inbox, self._inbox = self._inbox, []
                    t0 = time.perf_counter()
                    try:
                        stepped = await self._on_model_thread(
                            partial(self._apply_and_step, inbox, asyncio.get_running_loop()))
                    except Exception:  # a dead loop left every client waiting forever: log, close them, keep serving
                        log.exception("model step failed; closing every connection")
                        failed, stepped = True, False
                        self.metrics.failed_steps.inc()
                    finally:
                        self._applied(inbox)
                    if stepped:
                        self.metrics.step_duration.observe(time.perf_counter() - t0)
                        self.metrics.steps.inc()
                    outgoing = [] if failed else self._outgoing()
                self._stepped.set()
                self._stepped = asyncio.Event()
                if failed:
                    for box in list(self.connections.values()):  # their handlers cancel their streams
                        box.close(1011, "dsm: model step failed (see the server log)")
                    break
                for box, payloads, close in outgoing:
                    for data in payloads:
                        box.post(data)
                    if close:  # True, or (code, reason)
                        box.close(*close) if isinstance(close, tuple) else box.close()
                if not stepped:
                    break
                await asyncio.sleep(0)  # let the outboxes and the connections run between steps


def _audio_samples(raw: bytes) -> np.ndarray | None:
    """The samples of ``{"type": "Audio", "pcm": [floats]}`` read straight from its bytes when every sample has the
    same float encoding (what moshi-server's clients send: Python's msgpack float64, Rust's float32), else None
    (then msgpack reads it). A 1920-sample message: ~50 us through msgpack and numpy, a few us here, at every
    message of every stream on the event loop."""
    if raw[:1] != b"\x82" or raw[1 : 1 + len(_AUDIO_HEAD)] != _AUDIO_HEAD:
        return None
    at = 1 + len(_AUDIO_HEAD)
    kind = raw[at] if at < len(raw) else None
    if kind is not None and 0x90 <= kind <= 0x9F:
        n, at = kind - 0x90, at + 1
    elif kind == 0xDC:
        n, at = int.from_bytes(raw[at + 1 : at + 3], "big"), at + 3
    elif kind == 0xDD:
        n, at = int.from_bytes(raw[at + 1 : at + 5], "big"), at + 5
    else:
        return None
    item = _FLOAT_ITEMS.get(raw[at]) if n and at < len(raw) else None
    if item is None or len(raw) - at != n * item.itemsize:
        return None
    items = np.frombuffer(raw, dtype=item, count=n, offset=at)
    if not (items["code"] == raw[at]).all():
        return None
    with np.errstate(over="ignore"):  # 1e300 -> inf, refused by the stream with a clear message
        return items["value"].astype(np.float32)


class _ASRConnection:
    def __init__(self, stream: STTStream):
        self.stream = stream
        self.received = 0  # Audio samples parsed (event loop) ...
        self.applied = 0  # ... and pushed to the stream (model thread): the difference waits in the inbox
        self.events: list = []  # events a message's change returned, sent with the step's

    def waiting(self) -> int:
        """Samples not stepped yet: in the inbox or in the stream's queue."""
        return self.received - self.applied + len(self.stream.queue)


class ASRServer(_Endpoint):
    """``/api/asr-streaming`` over ``runtime`` (see the module doc)."""

    path = ASR_PATH
    module_type = "batched_asr"
    command = "serve-stt"
    metrics_prefix = "asr"
    max_buffered_s = MAX_BUFFERED_S
    audio_timeout_s = AUDIO_TIMEOUT_S
    ping_timeout = None  # a connection left unread (max_buffered_s) reads its pongs late: that is no dead client

    def __init__(self, runtime: STTRuntime, api_keys: Iterable[str] = ("public_token",)):
        super().__init__(runtime, api_keys)
        # Overlapped calls pay where the device runs asynchronously. On a CPU a call computes as it is queued, so
        # overlapping only holds a frame's events back one more step under load (bench_serve.py, tiny-stt, 4 clients,
        # this CPU: frame latency p50 ~145 ms overlapped, ~85 ms not).
        self.overlap = torch.device(runtime.device).type == "cuda"
        if runtime.options.alignment != "rust" or runtime.options.timestamps != "rust":
            log.warning("moshi-server clients expect alignment='rust' and timestamps='rust'")

    async def _handler(self, ws) -> None:
        async with self.lock:
            try:
                stream = self.rt.open_stream(name=f"ws-{id(ws):x}", history=False)  # events only: bounded memory
            except NoFreeSlotError:
                stream = None
        if stream is None:
            self.metrics.refused.inc()
            try:
                await ws.send(pack({"type": "Error", "message": "no free channels"}))
                await ws.close()
            except ConnectionClosed:  # the refused client did not wait for the reason
                pass
            return
        self.metrics.connect.inc()
        conn = _ASRConnection(stream)
        box = self.connections[conn] = _Outbox(ws, self.outbox_bytes)
        loop = asyncio.get_running_loop()
        last_audio = loop.time()
        try:
            box.post(pack({"type": "Ready"}))
            while True:
                if await self._backpressure(ws, conn):
                    last_audio = loop.time()  # the socket was left unread: its silence is the server's doing
                try:
                    raw = await asyncio.wait_for(ws.recv(), last_audio + self.audio_timeout_s - loop.time())
                except TimeoutError:
                    # Under the lock: a step running now may take this stream's last frames, and its output (the
                    # last Steps and words) is posted before the model loop lets go of the lock.
                    async with self.lock:
                        busy = self._busy(conn)
                    if busy:  # not idle: its audio is still being run
                        last_audio = loop.time()
                        continue
                    reason = f"dsm: no audio for {self.audio_timeout_s:g} s"
                    box.close(1008, reason)  # after the output posted before it
                    if not (await asyncio.wait({box.task}, timeout=CLOSE_TIMEOUT_S))[0]:
                        await ws.close(1008, reason)  # a client that does not read its output
                    break
                except ConnectionClosedOK:
                    break
                if isinstance(raw, str) or self._stopping.is_set() or box.shut.is_set():
                    continue  # text frames are ignored by the ASR; closing, the rest is read only to reach the close
                kind, value, error = self._parse(raw)
                if kind == "Audio":
                    last_audio = loop.time()
                if error:  # through the inbox too, so that the Errors come back in the order of the messages
                    self._submit(conn, lambda error=error: error)
                else:
                    conn.received += value.shape[0] if kind == "Audio" else 0
                    self._submit(conn, partial(self._apply, conn, kind, value))
        except ConnectionClosed:  # gone without a close frame (network drop, killed client): the slot is freed below
            log.info("%s: connection lost", stream.name)
        finally:
            del self.connections[conn]
            box.task.cancel()
            async with self.lock:
                stream.close()

    def _busy(self, conn: _ASRConnection) -> bool:
        """Whether ``conn`` has work the model has not done: a frame of audio, frames in flight, or a message not
        applied yet (whose Error must go out before a close). Under the lock: the inbox is swapped under it."""
        return (conn.waiting() >= FRAME_SIZE or bool(conn.stream.in_flight)
                or any(c is conn for c, _ in self._inbox))

    def _held(self, conn: _ASRConnection) -> bool:
        return super()._held(conn) or conn.waiting() > self.max_buffered_s * SAMPLE_RATE

    def _step(self) -> bool:
        """A runtime call, overlapped on a GPU (``overlap``): the streams' words and events of one call are made while
        the device runs the next (a call that finds no frame hands the last ones over, so none waits for new audio).
        Model thread."""
        return self.rt.step(overlap=self.overlap) > 0

    @staticmethod
    def _parse(raw: bytes) -> tuple[str | None, object, str | None]:
        """Read one client message on the event loop: ``(type, value, error)``, the value being an Audio message's
        samples (float32 [T]) or a Marker's id."""
        pcm = _audio_samples(raw)
        if pcm is not None:
            return "Audio", pcm, None
        if len(raw) > SLOW_PARSE_MAX_BYTES:  # into Python objects, it would hold the event loop (and the GIL) from
            # every other connection for its length: ~1.4 s for 16 MiB of mixed numbers
            return None, None, (f"message of {len(raw)} bytes refused: only an Audio message whose samples are all "
                                f"float32 or all float64 may be over {SLOW_PARSE_MAX_BYTES} bytes (send it in parts)")
        msg, error = _unpack(raw)
        if error:
            return None, None, error
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "Audio":
            if "pcm" not in msg:
                return kind, None, "Audio message without pcm"
            pcm, error = _float32_list(msg["pcm"], "Audio.pcm")
            return kind, pcm, error
        if kind == "Marker":
            if (mid := int64_value(msg.get("id"))) is None:
                return kind, None, f"Marker.id must be an int64, got {msg.get('id')!r}"
            return kind, mid, None
        if kind == "OggOpus":
            return kind, None, "OggOpus input is not supported by dsm: send Audio messages (24 kHz float PCM)"
        return kind, None, f"unknown message type {kind!r} (expected Audio or Marker)"

    @staticmethod
    def _apply(conn: _ASRConnection, kind: str, value) -> str | None:
        """An Audio message's samples queued on the stream, or a Marker asked (model thread, before a step); returns
        an error text."""
        try:
            if kind == "Audio":
                conn.events += conn.stream.push(value, process=False)
            elif conn.stream.pending_markers >= MAX_PENDING_MARKERS:
                return (f"Marker refused: the stream already holds {MAX_PENDING_MARKERS} markers not yet echoed (this "
                        "server's limit); send more once some have come back")
            else:
                conn.events += conn.stream.marker(value)
        except AudioError as e:
            return f"bad Audio message: {e}"
        finally:
            conn.applied += value.shape[0] if kind == "Audio" else 0
        return None

    def _outgoing(self):
        out = []
        for conn, box in self.connections.items():  # Step.step_idx is the server-wide step counter (§9.2)
            events, conn.events = conn.events + conn.stream.events(), []
            waiting = conn.waiting()
            msgs = [event_message(e, waiting, self.rt.total_steps) for e in events]
            payloads = [pack(m, single_float=m["type"] == "Step") for m in msgs if m is not None]
            if payloads:
                out.append((box, payloads, False))
        return out


class _TTSConnection:
    def __init__(self, fmt: str, voice):
        self.fmt, self.voice = fmt, voice
        self.stream = None  # opened at the first text or EOS, so that a Voice message can come first
        self.open_failed = False  # then the connection is closed: none of its messages could be spoken
        self.words_sent = 0


class TTSServer(_Endpoint):
    """``/api/tts_streaming`` over ``runtime`` (see the module doc). ``voice``: the default voice (a name, file
    or tensor; None = the model's learnt padding), used when the query names none or an unknown one."""

    path = TTS_PATH
    module_type = "py"
    command = "serve-tts"
    metrics_prefix = "tts"
    max_message_bytes = TTS_MAX_MESSAGE_BYTES

    def __init__(self, runtime, api_keys: Iterable[str] = ("public_token",), voice=None, cfg: float | None = 2.0):
        super().__init__(runtime, api_keys)
        self.default_voice, self.cfg = voice, cfg
        self._voice_lookups = asyncio.Semaphore(VOICE_LOOKUPS)  # slow lookups never take every executor thread
        self._failed_voices: dict[str, float] = {}  # name -> when its lookup failed (the last 1024 names)
        from prometheus_client import Gauge

        r = self.metrics.registry
        Gauge("tts_queued_streams", "Streams waiting for a slot or for voice pages.", registry=r).set_function(
            lambda: len(self.rt.waiting))
        for name, doc, read in (("used", "Voice K/V pages streams hold (shared pages once).", lambda p: p.used),
                                ("cached", "Voice K/V pages kept for reuse, held by no stream.", lambda p: p.cached),
                                ("total", "Voice K/V pages of the pool.", lambda p: p.num_pages - 1)):
            Gauge(f"tts_voice_pages_{name}", doc, registry=r).set_function(
                lambda read=read: read(pool) if (pool := self._voice_pages()) is not None else 0)

    def _voice_pages(self):
        """The engine's shared voice K/V page pool (None before the first stream, or without the engine)."""
        engine = getattr(self.rt.stepper, "engine", None)
        return engine.cross_pool if engine is not None else None

    def module_info(self) -> dict:
        return {**super().module_info(), "queued": str(len(self.rt.waiting))}  # streams waiting for a slot

    def _check_query(self, query):
        fmt = (query.get("format") or ["OggOpus"])[0]
        if fmt not in TTS_FORMATS:
            return f"format={fmt} is not supported by dsm (no Opus encoder); use format=PcmMessagePack or format=Pcm"
        return None

    def _voice(self, name: str):
        """The query's voice: a name in the voice repository (moshi-server: a name in its voice folder), never a
        local path or another repository, which a client must not choose; None when it fails. Blocking (may
        download)."""
        try:
            return self.rt.voice_tensor(name, local_files=False)
        except Exception as e:  # moshi-server falls back to the default voice
            log.warning("voice %r: %s; using the default voice", name, e)
            return None

    async def _query_voice(self, name: str):
        """:meth:`_voice` off the event loop, at most ``VOICE_LOOKUPS`` at once; no lookup for no name or for a name
        that failed less than ``VOICE_RETRY_S`` ago (a connection without a voice never waits behind others')."""
        failed = self._failed_voices.get(name)
        if not name or (failed is not None and time.monotonic() - failed < VOICE_RETRY_S):
            return self.default_voice
        async with self._voice_lookups:
            voice = await asyncio.to_thread(self._voice, name)
        if voice is not None:
            return voice
        self._failed_voices.pop(name, None)  # (on the event loop: the lookups' threads never touch this dict)
        self._failed_voices[name] = time.monotonic()
        if len(self._failed_voices) > 1024:
            self._failed_voices.pop(next(iter(self._failed_voices)))
        return self.default_voice

    async def _handler(self, ws) -> None:
        query = parse_qs(urlsplit(ws.request.path).query)
        voice = await self._query_voice((query.get("voice") or [""])[0])
        conn = _TTSConnection((query.get("format") or ["OggOpus"])[0], voice)
        self.metrics.connect.inc()
        box = self.connections[conn] = _Outbox(ws, self.outbox_bytes)
        try:
            if conn.fmt == "PcmMessagePack":
                box.post(pack({"type": "Ready"}))
            while True:
                await self._backpressure(ws, conn)
                try:
                    raw = await ws.recv()
                except ConnectionClosedOK:
                    break
                # read here; applied by the model thread (texts are split and tokenized there)
                change, error = self._parse(conn, raw)
                self._submit(conn, (lambda error=error: error) if error else partial(_guarded, change))
            await ws.wait_closed()
        except ConnectionClosed:  # gone without a close frame: its stream is cancelled below
            log.info("tts connection lost")
        finally:
            self.connections.pop(conn, None)  # its messages not applied yet are dropped
            box.task.cancel()
            async with self.lock:  # the model thread may be opening its stream
                if conn.stream is not None:
                    conn.stream.cancel()  # nobody reads it any more: free its slot now
            self._wake.set()  # a queued stream can take the slot at once

    def _error(self, conn: _TTSConnection, message: str) -> None:
        box = self.connections.get(conn)
        if conn.fmt == "PcmMessagePack":
            super()._error(conn, message)
        else:  # raw PCM has no message to carry it: the close does, rather than the audio going on without the text
            log.warning("tts connection: %s", message)
            if box is not None and not conn.open_failed:
                box.close(1008, _close_reason(message))
        if conn.open_failed and box is not None:
            box.close(1011, "dsm: no stream could be opened for this connection")

    def _open(self, conn: _TTSConnection):
        if conn.open_failed:  # it is closing (1011): a later message must not open a stream that nobody reads
            raise RuntimeError("no stream could be opened for this connection")
        if conn.stream is None:
            try:
                conn.stream = self.rt.open_stream(conn.voice, cfg=self.cfg)
            except Exception:
                conn.open_failed = True
                raise
        return conn.stream

    def _push(self, conn: _TTSConnection, text: str) -> str | None:
        """Add a text message's words to the connection's stream, unless the text is over the server's limits."""
        if len(text) > MAX_TEXT_CHARS:
            return (f"text of {len(text)} characters refused: this server takes at most {MAX_TEXT_CHARS} in one "
                    "message (send it in parts)")
        stream = self._open(conn)
        if len(stream.machine.entries) >= MAX_PENDING_WORDS:
            return (f"text refused: the stream already holds {len(stream.machine.entries)} words not yet spoken (this "
                    f"server's limit is {MAX_PENDING_WORDS}); send more once it has spoken some")
        stream.push(text)
        return None

    def _parse(self, conn: _TTSConnection, raw) -> tuple[Callable[[], str | None] | None, str | None]:
        """Read one client message on the event loop (a Voice's numbers are converted here, not on the model
        thread): ``(change, error)``, the change to apply on the model thread."""
        if isinstance(raw, str):
            return partial(self._push, conn, raw), None
        if raw == b"\x00":
            return partial(self._end, conn), None
        msg, error = _unpack(raw)
        if error:
            return None, error
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "Text":
            if not isinstance(msg.get("text"), str):
                return None, f"Text.text must be a string, got {msg.get('text')!r}"
            return partial(self._push, conn, msg["text"]), None
        if kind == "Eos":
            return partial(self._end, conn), None
        if kind == "Voice":
            emb, shape = msg.get("embeddings"), msg.get("shape")
            if (not isinstance(emb, list) or not isinstance(shape, list) or len(shape) > 4
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
                    or math.prod(shape) != len(emb)):
                return None, ("Voice needs embeddings (a flat list of floats) and shape (positive ints; product = "
                              "length)")
            values, error = _float32_list(emb, "Voice.embeddings")
            if error is not None:
                return None, error
            return partial(self._set_voice, conn, torch.from_numpy(values).view(*shape)), None
        return None, f"unknown message type {kind!r} (expected Text, Eos or Voice)"

    def _end(self, conn: _TTSConnection) -> None:
        self._open(conn).end()

    def _set_voice(self, conn: _TTSConnection, embeddings: torch.Tensor) -> str | None:
        if conn.stream is not None:  # moshi-server ignores it; raw PCM has no message to say so (an error closes it)
            log.info("tts connection: a Voice after the first Text is ignored")
            return "Voice must come before the first Text; ignored" if conn.fmt == "PcmMessagePack" else None
        conn.voice = self.rt.voice_tensor(embeddings)
        return None

    def _outgoing(self):
        out = []
        for conn, box in list(self.connections.items()):
            s = conn.stream
            if s is None:
                continue
            if box.ws.state is not State.OPEN:  # closing: a client that stopped reading and closed has its close
                s.cancel()  # handshake wait behind our unsent audio (websockets' 10 s timeout); free its slot now
                self.connections.pop(conn, None)
                continue
            pcm = s.read()
            payloads = []
            for i in range(0, pcm.shape[0], 1920):
                chunk = pcm[i : i + 1920].numpy().astype("<f4")
                pcm_msg = chunk.tobytes() if conn.fmt == "Pcm" else audio_message(chunk)
                payloads.append(pcm_msg)
            words = s.transcript
            last = len(words) if s.done else len(words) - 1  # a word's stop is the next word's start
            while conn.fmt == "PcmMessagePack" and conn.words_sent < last:
                # moshi-server's times count the steps done once the step that consumed the word is: its index + 1
                text, start = words[conn.words_sent][0], words[conn.words_sent][1] + 1
                stop = words[conn.words_sent + 1][1] + 1 if conn.words_sent + 1 < len(words) else s.offset
                conn.words_sent += 1
                payloads.append(pack({"type": "Text", "text": text, "start_s": start / FRAME_RATE,
                                      "stop_s": stop / FRAME_RATE}))
            close = s.done
            if s.done and s.truncated:  # the end of the text was not spoken: say so, never a plain end
                why = (f"dsm: stopped at max_gen_length={self.rt.config.max_gen_length} steps; the rest of the text "
                       "was not spoken")
                if conn.fmt == "PcmMessagePack":
                    payloads.append(pack({"type": "Error", "message": why}))
                close = (1000, _close_reason(why))
            if s.done:
                self.connections.pop(conn, None)
            if payloads or s.done:
                out.append((box, payloads, close))
        return out


class _Serving:
    def __init__(self, server_cm, loop_task, model_thread, stopping: asyncio.Event):
        self.server_cm, self.loop_task, self.model_thread, self.stopping = server_cm, loop_task, model_thread, stopping

    async def __aenter__(self):
        return await self.server_cm.__aenter__()

    async def __aexit__(self, *exc):
        self.stopping.set()
        self.loop_task.cancel()
        try:
            return await self.server_cm.__aexit__(*exc)
        finally:
            self.model_thread.shutdown(wait=True)  # a step in flight finishes; nothing new starts


def _add_server_args(p) -> None:
    from .cli_args import port_number

    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=port_number, default=8080)
    p.add_argument("--api-key", action="append", default=None,
                   help="accepted kyutai-api-key / auth_id values (default: public_token)")


def _run(endpoint: _Endpoint, host: str, port: int, what: str) -> int:
    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):  # leaving the block closes the connections with 1001
            loop.add_signal_handler(sig, stop.set)
        async with await endpoint.serve(host, port):
            print(f"dsm {endpoint.command}: {what} on ws://{host}:{port}{endpoint.path}", flush=True)
            await stop.wait()
        print(f"dsm {endpoint.command}: stopped", flush=True)

    try:
        asyncio.run(main())
    except OSError as e:  # the address is taken, or not this machine's
        print(f"dsm {endpoint.command}: error: cannot serve on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def setup_serve_stt_parser(p) -> None:
    from .stt import add_model_args

    add_model_args(p)
    _add_server_args(p)
    p.set_defaults(func=cmd_serve_stt, alignment="rust", timestamps="rust")


def cmd_serve_stt(args) -> int:
    from .stt import runtime_from_args

    rt = runtime_from_args(args)
    return _run(ASRServer(rt, args.api_key or ["public_token"]), args.host, args.port,
                f"ASR websocket ({rt.max_streams} slots)")


def setup_serve_tts_parser(p) -> None:
    from .cli_args import (
        add_batch_invariant_arg,
        add_checkpoint_args,
        parse_device,
        parse_dtype,
        positive_int,
        temperature,
    )
    from .presets import TTS_PRESETS

    add_checkpoint_args(p, required=False)
    p.add_argument("--preset", choices=TTS_PRESETS,
                   help="with --random-weights: model preset (no download)")
    p.add_argument("--random-weights", action="store_true", help="use a cached random checkpoint of --preset")
    p.add_argument("--batch-size", type=positive_int, default=8, help="stream slots (moshi-server's DSM config: 8)")
    p.add_argument("--voice", default=None, help="default voice (file or kyutai/tts-voices name)")
    p.add_argument("--condition-pages", type=positive_int, default=None,
                   help="pages of the shared voice K/V pool, one voice slot each (default: 5 distinct voices per slot; "
                        "fewer bound the memory, and a stream that does not fit waits for one to end; at least one "
                        "stream's pages and the null page, 6 for the released TTS)")
    p.add_argument("--cfg", type=float, default=2.0, help="distilled CFG coefficient (default 2.0)")
    p.add_argument("--temp", type=temperature, default=0.6, help="sampling temperature (0 = greedy; default 0.6)")
    p.add_argument("--device", type=parse_device, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="LM dtype (default: bf16 on cuda, fp32 on cpu)")
    add_batch_invariant_arg(p)
    _add_server_args(p)
    p.set_defaults(func=cmd_serve_tts)


def cmd_serve_tts(args) -> int:
    from .cli_args import device_or_default, model_files_from_args
    from .tts import TTSConfig, TTSRuntime, random_voice

    files = model_files_from_args(args)
    device = device_or_default(args.device)
    try:  # bad settings are found before the server starts, not by its first clients
        rt = TTSRuntime.from_checkpoint(files, device=device, dtype=args.dtype,
                                        config=TTSConfig(max_batch=args.batch_size, temp=args.temp, max_break_s=10.0,
                                                         text_rules="server", pcm_limit=0.99,
                                                         condition_pages=args.condition_pages,
                                                         batch_invariant=args.batch_invariant))
        rt.check_cfg(args.cfg)
        voice = args.voice
        if voice is None and args.random_weights and rt.multi_speaker:
            voice = random_voice(0, rt.voice_dim)
        default = rt.voice_tensor(voice) if voice is not None else None  # a tensor has no truth value
    except ValueError as e:  # VoiceError included
        print(f"dsm serve-tts: error: {e}", file=sys.stderr)
        return 1
    server = TTSServer(rt, args.api_key or ["public_token"], voice=default, cfg=args.cfg)
    return _run(server, args.host, args.port, f"TTS websocket ({args.batch_size} slots)")
