"""The moshi-server compatible ASR websocket: auth, protocol, the same words as the Python API, isolation of a bad
connection, and slot exhaustion."""

from __future__ import annotations

import asyncio
import logging

import msgpack
import numpy as np
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

from dsm.checkpoint import resolve_checkpoint
from dsm.server import ASR_PATH, ASRServer
from dsm.stt import FRAME_SIZE, Marker, STTOptions, STTRuntime, Word

OPTS = STTOptions(alignment="rust", timestamps="rust")


@pytest.fixture(scope="module")
def files(tiny_stt_ckpt):
    return resolve_checkpoint(tiny_stt_ckpt)  # conftest: the tiny-stt checkpoint the STT tests also read


def _audio(seconds: float, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    t = np.arange(int(24000 * seconds)) / 24000
    return (0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * g.standard_normal(t.shape)).astype(np.float32)


def _runtime(files, slots=2):
    return STTRuntime.from_checkpoint(files, max_streams=slots, options=OPTS)


async def _client(url, pcm: np.ndarray, marker_id: int, chunk=1920, headers=None):
    """Send audio and 2 s of silence, a marker, 1 s more silence (the marker is due after the model's delay), and
    collect messages until the marker comes back."""
    msgs = []
    async with connect(url, additional_headers=headers or {"kyutai-api-key": "public_token"}) as ws:
        msgs.append(msgpack.unpackb(await ws.recv()))
        for i in range(0, len(pcm), chunk):
            await ws.send(msgpack.packb({"type": "Audio", "pcm": pcm[i : i + chunk].tolist()}))
        await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 48000}))
        await ws.send(msgpack.packb({"type": "Marker", "id": marker_id}))
        await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 24000}))
        while True:
            m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))
            msgs.append(m)
            if m["type"] in ("Marker", "Error"):
                return msgs


def _slow_runtime(files, seconds: float, slots: int = 1):
    """A runtime whose every step takes ``seconds`` longer: a slow model (a big batch, a loaded device)."""
    import time

    rt = _runtime(files, slots=slots)
    real_step = rt.step

    def slow_step(*a, **kw):
        n = real_step(*a, **kw)
        time.sleep(seconds)
        return n

    rt.step = slow_step
    return rt


def _serve(rt, coro_fn, server_cls=ASRServer, **attrs):
    """Run ``coro_fn(url)`` against an ASR server over ``rt`` (``attrs``: server settings, e.g. its limits)."""

    async def main():
        server = server_cls(rt)
        for k, v in attrs.items():
            setattr(server, k, v)
        async with await server.serve("127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            return await coro_fn(f"ws://127.0.0.1:{port}{ASR_PATH}")

    return asyncio.run(main())


@pytest.mark.parametrize("overlap", [False, True], ids=["cpu_calls", "overlapped_calls"])
def test_words_equal_the_python_api_and_streams_are_isolated(files, overlap):
    """Both model loops: calls that settle (a CPU's) and overlapped calls (a GPU's, whose events come a call late)."""
    pcm_a, pcm_b = _audio(2.0, 1), _audio(1.5, 2)

    async def clients(url):
        bad = connect(url, additional_headers={"kyutai-api-key": "public_token"})

        async def nan_client():  # a third connection sending NaN must not disturb the others
            async with bad as ws:
                await ws.recv()
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [float("nan")] * 100}))
                return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))

        return await asyncio.gather(_client(url, pcm_a, 7), _client(url, pcm_b, 8, chunk=777), nan_client())

    got_a, got_b, nan_reply = _serve(_runtime(files, slots=3), clients, overlap=overlap)
    assert got_a[0] == {"type": "Ready"} and got_a[-1] == {"type": "Marker", "id": 7}
    assert got_b[-1] == {"type": "Marker", "id": 8}
    assert nan_reply["type"] == "Error" and "nan" in nan_reply["message"].lower()

    # the same audio and marker through the Python API, one stream alone: the same words before the marker
    n_words = 0
    for pcm, got, mid in ((pcm_a, got_a, 7), (pcm_b, got_b, 8)):
        rt = _runtime(files, slots=1)
        s = rt.open_stream()
        events = s.push(pcm) + s.push(np.zeros(48000, dtype=np.float32)) + s.marker(mid)
        events += s.push(np.zeros(24000, dtype=np.float32))
        events = events[: [i for i, e in enumerate(events) if isinstance(e, Marker)][0]]
        words = [(e.text, round(e.start_time, 6)) for e in events if isinstance(e, Word)]
        wire = [(m["text"], round(m["start_time"], 6)) for m in got if m["type"] == "Word"]
        assert wire == words
        n_words += len(words)
    assert n_words >= 1  # the comparison is not vacuous
    assert any(m["type"] == "Step" and len(m["prs"]) == 4 for m in got_a)  # tiny-stt has 4 VAD heads


def test_auth_and_path(files):
    """As moshi-server: a kyutai-api-key header that is there wins over ?auth_id=, even empty; a repeated header counts
    by its first value (it was a 500 and a traceback)."""
    from websockets.datastructures import Headers

    def twice(first, second):
        return {"additional_headers": Headers([("kyutai-api-key", first), ("kyutai-api-key", second)])}

    async def attempts(url):
        out = []
        for u, kw in ((url, {"additional_headers": {"kyutai-api-key": "wrong"}}), (url, {}),
                      (url + "?auth_id=public_token", {"additional_headers": {"kyutai-api-key": "wrong"}}),
                      (url + "?auth_id=public_token", {"additional_headers": {"kyutai-api-key": ""}}),
                      (url, twice("x", "public_token")), (url, twice("public_token", "x"))):
            try:
                async with connect(u, **kw) as ws:
                    out.append(msgpack.unpackb(await ws.recv())["type"])
            except InvalidStatus as e:
                out.append(e.response.status_code)
        async with connect(url + "?auth_id=public_token") as ws:  # the query form works too
            out.append(msgpack.unpackb(await ws.recv())["type"])
        try:
            async with connect(url.replace(ASR_PATH, "/api/nope"), additional_headers={"kyutai-api-key": "x"}):
                pass
        except InvalidStatus as e:
            out.append(e.response.status_code)
        return out

    assert _serve(_runtime(files), attempts) == [401, 401, 401, 401, 401, "Ready", "Ready", 404]


def test_no_free_channels(files):
    async def two(url):
        hdr = {"kyutai-api-key": "public_token"}
        async with connect(url, additional_headers=hdr) as first:
            assert msgpack.unpackb(await first.recv())["type"] == "Ready"
            async with connect(url, additional_headers=hdr) as second:
                reply = msgpack.unpackb(await second.recv())
            await first.send(msgpack.packb({"type": "Nope"}))
            bad_type = msgpack.unpackb(await first.recv())
            return reply, bad_type

    reply, bad_type = _serve(_runtime(files, slots=1), two)
    assert reply == {"type": "Error", "message": "no free channels"}
    assert bad_type["type"] == "Error" and "Nope" in bad_type["message"]


def test_abrupt_disconnect_frees_the_slot_quietly(files, caplog):
    """A client gone without a close frame: its slot is reused, and no 'connection handler failed' traceback."""
    rt = _runtime(files, slots=1)

    async def drops(url):
        for _ in range(2):  # the second connection gets the slot the first one left
            ws = await connect(url, additional_headers={"kyutai-api-key": "public_token"})
            assert msgpack.unpackb(await ws.recv())["type"] == "Ready"
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.1] * 5000}))
            await ws.send(b"\xc1")  # not MessagePack, and its error has no text of its own
            reply = msgpack.unpackb(await ws.recv())
            while reply["type"] == "Step":  # the audio's VAD steps may come first
                reply = msgpack.unpackb(await ws.recv())
            assert reply["type"] == "Error" and "FormatError" in reply["message"]
            ws.transport.abort()
            for _ in range(200):
                if rt.free_slots:
                    break
                await asyncio.sleep(0.01)
        return rt.free_slots

    with caplog.at_level(logging.INFO):
        assert _serve(rt, drops) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_steps_run_on_the_model_thread_and_the_loop_stays_responsive(files):
    """A slow step (a big batch, a cold GPU) must not stall the websocket I/O: pings are answered and other
    connections' messages are read while it runs."""
    import threading
    import time

    rt = _runtime(files, slots=2)
    real_step, threads = rt.step, set()

    def slow_step(*a, **kw):
        n = real_step(*a, **kw)
        if n:
            threads.add(threading.current_thread().name)
            time.sleep(0.6)
        return n

    rt.step = slow_step

    async def clients(url):
        hdr = {"kyutai-api-key": "public_token"}
        async with connect(url, additional_headers=hdr) as a, connect(url, additional_headers=hdr) as b:
            await a.recv(), await b.recv()
            await a.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920 * 4}))  # four slow steps
            await asyncio.sleep(0.1)  # the first step is running
            t0 = time.perf_counter()
            await asyncio.wait_for(await b.ping(), 5)
            pong = time.perf_counter() - t0
            await b.send(msgpack.packb({"type": "Nope"}))  # read and answered while a's steps run
            reply = msgpack.unpackb(await asyncio.wait_for(b.recv(), 5))
            answered = time.perf_counter() - t0
            await asyncio.wait_for(a.recv(), 10)  # a's first step's output: that step has run
            return pong, reply, answered

    pong, reply, answered = _serve(rt, clients)
    assert threads and all(name.startswith("dsm-model") for name in threads), threads
    assert pong < 0.2, f"ping answered after {pong:.3f} s: the step blocked the event loop"
    assert reply["type"] == "Error"
    # waited for at most the step in flight (0.6 s and its compute, on a busy 2-core runner), not for all four (2.4 s)
    assert answered < 1.8, answered


def test_a_client_ahead_of_the_model_is_read_at_once_and_its_leaving_seen_at_once(files):
    """A client that sends audio faster than the steps run: its messages are taken in as they arrive (not one per
    step, which left them in the socket's buffers, where they held back the pings and the client's close), so the
    audio waiting shows in Step.buffered_pcm, and a client that drops its connection frees its slot at once, its
    audio not transcribed."""
    import time

    rt = _slow_runtime(files, 0.3)
    n_msgs = 40  # 3.2 s of audio, 12 s of steps

    async def client(url):
        ws = await connect(url, additional_headers={"kyutai-api-key": "public_token"})
        assert msgpack.unpackb(await ws.recv())["type"] == "Ready"
        pcm = _audio(n_msgs * 0.08, 5)
        for i in range(n_msgs):
            await ws.send(msgpack.packb({"type": "Audio", "pcm": pcm[i * 1920 : (i + 1) * 1920].tolist()}))
        await asyncio.sleep(1.0)
        buffered = [m["buffered_pcm"] for m in [msgpack.unpackb(await ws.recv()) for _ in range(3)]]
        steps_before = rt.total_steps
        ws.transport.abort()
        t0 = time.perf_counter()
        while not rt.free_slots:
            await asyncio.sleep(0.01)
        return buffered, time.perf_counter() - t0, rt.total_steps - steps_before

    buffered, freed_after, steps = _serve(rt, client)
    assert max(buffered) >= (n_msgs - 10) * 1920, buffered  # one message a step: at most ~4 frames waiting
    assert freed_after < 2.0 and steps <= 3, (freed_after, steps)  # one message a step: ~10 s and ~30 steps


def test_shutdown_waits_for_the_step_in_flight(files):
    """Stopping the server mid-step: the model loop is cancelled, but it keeps the runtime's lock until the step on
    the model thread is over, so the handlers closing their streams never touch the runtime during it."""
    import time

    rt = _runtime(files, slots=1)
    real_step, real_open, in_step, closes = rt.step, rt.open_stream, [False], []

    def slow_step(*a, **kw):
        in_step[0] = True
        try:
            n = real_step(*a, **kw)
            time.sleep(0.5)
            return n
        finally:
            in_step[0] = False

    def open_stream(*a, **kw):
        s = real_open(*a, **kw)
        real_close = s.close
        s.close = lambda: closes.append(in_step[0]) or real_close()
        return s

    rt.step, rt.open_stream = slow_step, open_stream

    async def main():
        server = ASRServer(rt)
        async with await server.serve("127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            ws = await connect(f"ws://127.0.0.1:{port}{ASR_PATH}?auth_id=public_token")
            await ws.recv()
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920 * 4}))
            for _ in range(100):  # until the first step runs
                if in_step[0]:
                    break
                await asyncio.sleep(0.01)
            assert in_step[0]
        await ws.wait_closed()
        return ws.close_code

    assert asyncio.run(main()) == 1001
    assert closes == [False]  # the stream was closed after the step, not during it


class _UnreadClient:
    """A connection whose client stops reading after the first message: every later send waits forever."""

    request = None

    def __init__(self, messages):
        self.inbox, self.sent, self.close_code = asyncio.Queue(), 0, None
        for m in messages:
            self.inbox.put_nowait(m)

    async def send(self, data):
        self.sent += 1
        if self.sent > 1:
            await asyncio.Event().wait()

    async def close(self, code=1000, reason=""):
        self.close_code = code
        self.inbox.put_nowait(None)

    async def wait_closed(self):
        await asyncio.Event().wait()

    async def recv(self):
        item = await self.inbox.get()
        if item is None:
            raise ConnectionClosedOK(None, None)
        return item


@pytest.mark.parametrize("limit", [None, 3000])
def test_a_client_that_stops_reading_delays_only_itself(files, limit):
    """Its output piles up in its own outbox (the model loop never waits on its socket), so another client gets its
    words in time; past the outbox limit it is closed with 1008 and its slot is freed."""
    rt = _runtime(files, slots=2)
    audio = msgpack.packb({"type": "Audio", "pcm": _audio(2.0, 3).tolist()})

    async def main():
        server = ASRServer(rt)
        if limit:
            server.outbox_bytes = limit
        async with await server.serve("127.0.0.1", 0) as ws_server:
            port = ws_server.sockets[0].getsockname()[1]
            stuck = _UnreadClient([audio] * 3)
            handler = asyncio.create_task(server._handler(stuck))
            got = await asyncio.wait_for(_client(f"ws://127.0.0.1:{port}{ASR_PATH}", _audio(1.0, 4), 9), 60)
            if limit:
                await asyncio.wait_for(handler, 10)
            else:
                handler.cancel()
            return got, stuck

    got, stuck = asyncio.run(main())
    assert got[-1] == {"type": "Marker", "id": 9} and stuck.sent >= 2
    if limit:
        assert stuck.close_code == 1008 and rt.free_slots == 2


@pytest.mark.parametrize(("device", "expected"), [("cpu", []), ("cuda", []), ("cuda:1", [torch.device("cuda:1")])])
def test_model_thread_takes_the_runtime_device(monkeypatch, device, expected):
    """The model thread's current CUDA device is the runtime's (it is per thread); an unindexed "cuda" is left to
    the default, since torch.cuda.set_device refuses it (and a failing initializer breaks the thread pool)."""
    import types

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)

    server = ASRServer.__new__(ASRServer)  # only the runtime's device is read
    server.rt = types.SimpleNamespace(device=torch.device(device))
    server._thread_init()
    assert calls == expected


def test_input_limits_marker_ids_and_the_global_step_counter(files):
    """Audio beyond the buffer limit is not dropped: the connection is just not read until the model catches up,
    so the words equal the unlimited server's; a Marker id that is not an int64 is an Error; Step.step_idx is the
    server's step counter (a later client does not start at 1); a client that sends no audio is closed."""

    async def first_client(url):
        return await _client(url, _audio(2.0, 1), 7, chunk=48000)  # 2 s per message, limit 0.1 s

    async def later_client(url):
        await _client(url, _audio(0.5, 2), 1)  # runs some steps first
        async with connect(url, additional_headers={"kyutai-api-key": "public_token"}) as ws:
            await ws.recv()
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}))
            for mid in (float("inf"), 1.5, 2**63):
                await ws.send(msgpack.packb({"type": "Marker", "id": mid}))
            msgs = [msgpack.unpackb(await ws.recv()) for _ in range(4)]  # 3 errors and a Step, in any order
            replies = [m for m in msgs if m["type"] != "Step"]
            m = next(m for m in msgs if m["type"] == "Step")
        idle = await connect(url, additional_headers={"kyutai-api-key": "public_token"})
        await idle.recv()
        await asyncio.wait_for(idle.wait_closed(), 10)
        return replies, m["step_idx"], idle.close_code

    words = [[(m["text"], m["start_time"]) for m in got if m["type"] == "Word"]
             for got in (_serve(_runtime(files), first_client, max_buffered_s=0.1),
                         _serve(_runtime(files), first_client))]
    assert words[0] == words[1] and words[0]
    replies, step_idx, code = _serve(_runtime(files), later_client, audio_timeout_s=3.0)
    assert all(r["type"] == "Error" and "int64" in r["message"] for r in replies)
    assert step_idx > 10 and code == 1008


def _get(url: str) -> tuple[int, str, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def test_info_endpoints_and_metrics(files):
    """moshi-server's unauthenticated GETs: build info, slots in use (live), and Prometheus metrics that count
    connections, refusals and steps."""
    import json

    import dsm

    async def session(url):
        base = url.replace("ws://", "http://").replace(ASR_PATH, "")
        info = await asyncio.to_thread(_get, base + "/api/build_info")
        before = await asyncio.to_thread(_get, base + "/api/modules_info")
        hdr = {"kyutai-api-key": "public_token"}
        async with connect(url, additional_headers=hdr) as ws:
            assert msgpack.unpackb(await ws.recv())["type"] == "Ready"
            during = await asyncio.to_thread(_get, base + "/api/modules_info")
            async with connect(url, additional_headers=hdr) as refused:  # the only slot is taken
                assert msgpack.unpackb(await refused.recv())["type"] == "Error"
            await ws.send(msgpack.packb({"type": "Audio", "pcm": _audio(0.5, 3).tolist()}))
            await ws.send(msgpack.packb({"type": "Marker", "id": 1}))
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 24000}))
            while msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60))["type"] != "Marker":
                pass
            metrics_open = await asyncio.to_thread(_get, base + "/metrics")
        await asyncio.sleep(0.2)  # the handler frees the slot after the close
        after = await asyncio.to_thread(_get, base + "/api/modules_info")
        unknown = await asyncio.to_thread(_get, base + "/api/nope")
        return info, before, during, metrics_open, after, unknown

    info, before, during, metrics, after, unknown = _serve(_runtime(files, slots=1), session)
    status, ctype, body = info
    assert status == 200 and ctype == "application/json"
    bi = json.loads(body)
    assert bi["version"] == dsm.__version__ and bi["torch"] == torch.__version__ and bi["device"] == "cpu"
    assert bi["kernel_backend"] == "reference"
    slots = [json.loads(b)[0] for _, _, b in (before, during, after)]
    assert slots[0] == {"type": "batched_asr", "path": ASR_PATH, "used_slots": "0", "total_slots": "1"}
    assert [s["used_slots"] for s in slots] == ["0", "1", "0"]
    status, ctype, body = metrics
    assert status == 200 and ctype.startswith("text/plain")
    m = _samples(body)
    assert m["asr_connect_total"] == 1 and m["asr_refused_total"] == 1 and m["asr_failed_steps_total"] == 0
    assert m["asr_open_channels"] == 1 and m["asr_used_slots"] == 1 and m["asr_total_slots"] == 1
    assert m["asr_steps_total"] >= 7 and m["asr_model_step_duration_seconds_count"] == m["asr_steps_total"]
    assert unknown[0] == 404


def test_message_parsing(files, recwarn):
    """Each client message is read into (type, value, error) on the event loop, before any runtime work: the ones a
    stream would refuse later still reach it (an infinite sample is named by the stream), without numpy warnings."""
    parse = ASRServer._parse
    assert parse(msgpack.packb({"type": "Audio"}))[2] == "Audio message without pcm"
    kind, pcm, error = parse(msgpack.packb({"type": "Audio", "pcm": [0.5, 1e300]}))
    assert kind == "Audio" and error is None and pcm.dtype == np.float32 and np.isinf(pcm[1])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "shape" in parse(msgpack.packb({"type": "Audio", "pcm": [[0.1], [0.2]]}))[2]
    assert parse(msgpack.packb({"type": "Marker", "id": 3})) == ("Marker", 3, None)
    assert "int64" in parse(msgpack.packb({"type": "Marker"}))[2]
    assert parse(b"\xc1")[2] == "not a MessagePack message (FormatError)"
    assert "OggOpus" in parse(msgpack.packb({"type": "OggOpus", "data": [1]}))[2]
    # Read into Python objects, a large message held the event loop from every connection (~1.4 s for 16 MiB):
    # over 256 KiB only an Audio message read straight from its bytes is taken.
    mixed = msgpack.packb({"type": "Audio", "pcm": [0, 0.5] * 40000})  # ints among the floats: msgpack reads it
    assert parse(mixed)[2] == (f"message of {len(mixed)} bytes refused: only an Audio message whose samples are all "
                               "float32 or all float64 may be over 262144 bytes (send it in parts)")
    assert parse(msgpack.packb({"type": "Audio", "pcm": [0.5] * 80000}))[0:3:2] == ("Audio", None)
    assert parse(msgpack.packb({"type": "Audio", "pcm": [0, 0.5] * 10000}))[0:3:2] == ("Audio", None)

    from dsm.server import _ASRConnection

    rt = _runtime(files, slots=1)
    conn = _ASRConnection(rt.open_stream())
    conn.received = 2
    assert "inf" in ASRServer._apply(conn, "Audio", pcm).lower() and conn.applied == 2 and conn.waiting() == 0
    conn.received += 100
    assert ASRServer._apply(conn, "Audio", np.zeros(100, np.float32)) is None and conn.waiting() == 100  # queued


def test_audio_messages_read_from_their_bytes_equal_msgpack():
    """The fast reading of Audio messages gives msgpack's samples for every array length encoding and both float
    encodings, and leaves every other message to msgpack (None): other key orders or keys, ints among the floats,
    trailing bytes, an empty list."""
    from dsm.server import _audio_samples

    g = np.random.default_rng(0)
    for n in (1, 15, 16, 1920, 70000):  # fixarray, array16, array32
        x = g.standard_normal(n) * 0.3
        for single in (False, True):
            raw = msgpack.packb({"type": "Audio", "pcm": x.tolist()}, use_single_float=single)
            got = _audio_samples(raw)
            assert got is not None and got.dtype == np.float32
            assert np.array_equal(got, np.asarray(msgpack.unpackb(raw)["pcm"], dtype=np.float32))
    huge = _audio_samples(msgpack.packb({"type": "Audio", "pcm": [0.5, 1e300, float("nan")]}))
    assert huge[0] == 0.5 and np.isinf(huge[1]) and np.isnan(huge[2])  # refused later by the stream, by name
    for msg in ({"pcm": [0.5, 0.25], "type": "Audio"}, {"type": "Audio", "pcm": [0.5, 0.25], "x": 1},
                {"type": "Audio", "pcm": [0.5, 0, 0.25]}, {"type": "Audio", "pcm": []},
                {"type": "Audio", "pcm": [[0.5]]}, {"type": "Marker", "id": 3}):
        assert _audio_samples(msgpack.packb(msg)) is None, msg
    raw = msgpack.packb({"type": "Audio", "pcm": [0.5, 0.25]})
    assert _audio_samples(raw + b"\x00") is None and _audio_samples(raw[:-1]) is None
    assert ASRServer._parse(raw + b"\x00")[2].startswith("not a MessagePack message")


def test_a_message_that_fails_to_apply_is_that_connections_error(files, caplog):
    """A message whose change raises where nothing expected it (here a stream's push, patched to fail) is an Error
    for its connection; the step runs and the other connection is served."""
    rt = _runtime(files, slots=2)

    async def clients(url):
        hdr = {"kyutai-api-key": "public_token"}
        async with connect(url, additional_headers=hdr) as bad:
            await bad.recv()
            stream = next(s for s in rt.slots if s is not None)
            stream.push = lambda *a, **kw: 1 / 0
            await bad.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}))
            reply = msgpack.unpackb(await asyncio.wait_for(bad.recv(), 30))
            good = await _client(url, _audio(0.5, 6), 4)
            return reply, good

    with caplog.at_level(logging.ERROR):
        reply, good = _serve(rt, clients)
    assert reply["type"] == "Error" and "ZeroDivisionError" in reply["message"], reply
    assert good[-1] == {"type": "Marker", "id": 4}


def test_sample_and_probability_arrays_go_out_as_float32():
    """As moshi-server (DSM-SPEC §9.1): PCM and VAD probabilities as msgpack float32, times as float64. The Audio
    message built with numpy is byte for byte msgpack's, for every array-length encoding."""
    from dsm.server import audio_message, event_message, pack
    from dsm.stt import VADStep

    g = np.random.default_rng(1)
    for n in (0, 1, 15, 16, 1920, 70000):
        x = g.standard_normal(n).astype(np.float32)
        assert audio_message(x) == msgpack.packb({"type": "Audio", "pcm": x.tolist()}, use_single_float=True), n
    step = event_message(VADStep("s", 3, (0.25, 0.5, 0.75, 1.0), False), 1920, 7)
    raw = pack(step, single_float=step["type"] == "Step")
    assert raw.count(b"\xca") == 4 and b"\xcb" not in raw and msgpack.unpackb(raw)["prs"] == [0.25, 0.5, 0.75, 1.0]
    word = pack(event_message(Word("s", "hi", 0.1, (5,)), 0))
    assert b"\xcb" in word and msgpack.unpackb(word)["start_time"] == 0.1


def test_errors_come_back_in_message_order_and_pcm_must_be_numbers(files):
    """A connection's Errors follow its messages' order, whether found on reading (bad MessagePack, a Marker id) or
    on applying (NaN samples, refused by the stream); pcm values that are not numbers are refused by name."""

    async def client(url):
        async with connect(url, additional_headers={"kyutai-api-key": "public_token"}) as ws:
            await ws.recv()
            for msg in ({"type": "Audio", "pcm": [float("nan")] * 10}, b"\xc1", {"type": "Marker", "id": "x"},
                        {"type": "Audio", "pcm": [None, 1.0]}, {"type": "Audio", "pcm": ["0.5"]},
                        {"type": "Audio", "pcm": [True]}):
                await ws.send(msg if isinstance(msg, bytes) else msgpack.packb(msg))
            return [msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))["message"] for _ in range(6)]

    got = _serve(_runtime(files), client)
    assert "NaN" in got[0] and "FormatError" in got[1] and "int64" in got[2], got
    assert all("must be a list of numbers" in m for m in got[3:]), got


def test_the_audio_timeout_does_not_count_the_time_the_server_left_the_socket_unread(files):
    """A client far enough ahead that the server stops reading it (max_buffered_s) is not closed for 'no audio'
    when the model catches up: its messages waited in the socket, not at the client."""

    rt = _slow_runtime(files, 0.15)

    async def client(url):
        return await _client(url, _audio(1.5, 8), 5, chunk=36000)  # one message: ~2.5 s of steps to drain

    got = _serve(rt, client, max_buffered_s=0.2, audio_timeout_s=1.0)
    assert got[-1] == {"type": "Marker", "id": 5}, got[-3:]


def test_shutdown_reads_past_the_audio_of_a_client_far_ahead(files):
    """A client so far ahead that the server left its socket unread: at shutdown the rest of its audio is read (and
    dropped) so that its close reply, behind it, is reached at once; before, the shutdown waited for websockets'
    close timeout (10 s) on it."""
    import time

    rt = _slow_runtime(files, 0.3)

    async def main():
        server = ASRServer(rt)
        server.max_buffered_s = 0.1
        async with await server.serve("127.0.0.1", 0) as ws_server:
            url = f"ws://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}{ASR_PATH}?auth_id=public_token"
            ws = await connect(url)
            await ws.recv()
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 72000}))  # 3 s: ~11 s of steps
            for _ in range(60):  # more than websockets' queue of 16 messages: the rest waits in the socket
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}))
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
        took = time.perf_counter() - t0
        await ws.wait_closed()
        return took, ws.close_code

    took, code = asyncio.run(main())
    assert code == 1001 and took < 5.0, (took, code)


def test_a_failed_step_closes_a_client_far_ahead_at_once(files):
    """A step fails while a client is so far ahead that the server left its socket unread: its 1011 close reply
    waits behind its audio, and no step comes to drain that (the loop waits for work). The rest of its audio is now
    read and dropped, as at shutdown; before, the close took websockets' close timeout (10 s) and held the slot."""
    import time

    rt = _slow_runtime(files, 0.3)
    real, calls, failed_at = rt.step, [0], []

    def step(*a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            failed_at.append(time.perf_counter())
            raise RuntimeError("injected step failure")
        return real(*a, **kw)

    rt.step = step

    async def client(url):
        async with connect(url + "?auth_id=public_token") as ws:
            await ws.recv()
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 72000}))
            for _ in range(60):  # more than websockets' queue of 16 messages: the rest waits in the socket
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 1920}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed:
                pass
            took = time.perf_counter() - failed_at[0]
        while rt.free_slots == 0 and time.perf_counter() - failed_at[0] < 30:
            await asyncio.sleep(0.05)
        return took, ws.close_code, time.perf_counter() - failed_at[0]

    took, code, freed = _serve(rt, client, max_buffered_s=0.1)
    assert code == 1011 and took < 5.0 and freed < 5.0, (took, code, freed)


def test_a_message_not_applied_yet_keeps_its_connection_from_idling(files):
    """The no-audio close waits for a connection's messages still in the inbox: their Errors were posted behind the
    close, and never sent (an unknown message type sent in the last step before the timeout)."""
    from dsm.server import _ASRConnection

    rt = _runtime(files, slots=1)
    server = ASRServer(rt)
    conn = _ASRConnection(rt.open_stream())
    assert not server._busy(conn)
    server._submit(conn, lambda: "unknown message type")
    assert server._busy(conn)
    conn.received = FRAME_SIZE  # a frame parsed, not applied yet
    server._inbox.clear()
    assert server._busy(conn)


def test_a_client_whose_audio_is_still_running_is_not_idle(files):
    """The no-audio timeout closes idle clients only: one that sent its audio and waits for its results while a slow
    model still runs it gets every step, and is closed for silence only once its audio has run."""

    rt = _slow_runtime(files, 0.15)

    async def client(url):
        async with connect(url + "?auth_id=public_token") as ws:
            await ws.recv()
            await ws.send(msgpack.packb({"type": "Audio", "pcm": _audio(1.6, 9).tolist()}))  # 20 frames: ~3 s
            steps = 0
            try:
                while True:
                    steps += msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))["type"] == "Step"
            except ConnectionClosed:  # 1008: a ConnectionClosedError
                pass
            return steps, ws.close_code

    steps, code = _serve(rt, client, audio_timeout_s=1.0)
    assert steps == 20 and code == 1008, (steps, code)


def test_a_refused_client_that_already_left_is_no_error(files, caplog):
    """No free slot: the "no free channels" Error goes to a client that may have closed already; that is no
    handler failure (it logged a traceback)."""
    from websockets.exceptions import ConnectionClosedOK

    rt = _runtime(files, slots=1)
    rt.open_stream()  # the only slot

    class LeftAlready:
        async def send(self, data):
            raise ConnectionClosedOK(None, None)

        async def close(self):
            raise AssertionError("not reached")

    server = ASRServer(rt)
    with caplog.at_level(logging.ERROR):
        asyncio.run(server._handler(LeftAlready()))
    assert server.metrics.refused._value.get() == 1 and not caplog.records


def test_markers_not_yet_echoed_are_bounded(files, monkeypatch):
    """A client asking markers faster than they come due grew its stream's list without bound; past the limit a
    Marker is an Error, and the markers taken are still echoed."""
    import dsm.server as server_mod
    from dsm.server import _ASRConnection

    monkeypatch.setattr(server_mod, "MAX_PENDING_MARKERS", 2)
    rt = _runtime(files, slots=1)
    conn = _ASRConnection(rt.open_stream())
    conn.stream.push(np.zeros(FRAME_SIZE, np.float32), process=False)
    assert [ASRServer._apply(conn, "Marker", i) for i in range(2)] == [None, None]
    error = ASRServer._apply(conn, "Marker", 2)
    assert error.startswith("Marker refused: the stream already holds 2 markers not yet echoed"), error
    assert conn.stream.pending_markers == 2
    events = conn.stream.flush()
    assert [e.id for e in events if isinstance(e, Marker)] == [0, 1]


def test_a_flood_of_small_messages_is_read_a_step_at_a_time(files):
    """A client sending thousands of tiny Audio messages: at most MAX_QUEUED_MESSAGES of them wait to be applied
    before its socket is left unread until a step (each applied message costs the model thread, which every stream
    shares), and none is lost."""
    from dsm.server import MAX_QUEUED_MESSAGES

    sizes, servers = [], []

    class Recording(ASRServer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            servers.append(self)

        def _apply_and_step(self, inbox, loop):
            sizes.append(len(inbox))
            return super()._apply_and_step(inbox, loop)

    async def flood(url):
        async with connect(url, additional_headers={"kyutai-api-key": "public_token"}) as ws:
            await ws.recv()
            for _ in range(2000):
                await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.01] * 12}))
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 48000}))
            await ws.send(msgpack.packb({"type": "Marker", "id": 9}))
            await ws.send(msgpack.packb({"type": "Audio", "pcm": [0.0] * 24000}))
            while (m := msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60)))["type"] not in ("Marker", "Error"):
                pass
            return m

    last = _serve(_slow_runtime(files, 0.02), flood, server_cls=Recording)
    assert last == {"type": "Marker", "id": 9} and servers[0]._queued == {}
    assert MAX_QUEUED_MESSAGES // 2 <= max(sizes) <= MAX_QUEUED_MESSAGES and sum(sizes) == 2003, sizes


@pytest.mark.parametrize("command", ["serve-stt", "serve-tts"])
def test_a_taken_address_is_one_line_naming_the_command(command, capsys):
    """The messages of `_run` said "dsm:", naming no command (as every other command's do)."""
    import errno

    from dsm import server

    class Endpoint:
        path = ASR_PATH

        async def serve(self, host, port):
            raise OSError(errno.EADDRINUSE, "Address already in use")

    endpoint = Endpoint()
    endpoint.command = command
    assert server._run(endpoint, "127.0.0.1", 8080, "x") == 1
    assert capsys.readouterr().err == f"dsm {command}: error: cannot serve on 127.0.0.1:8080: Address already in use\n"
    assert ASRServer.command == "serve-stt" and server.TTSServer.command == "serve-tts"
