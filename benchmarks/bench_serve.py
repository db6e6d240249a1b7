"""Load test of `dsm serve-stt` / `dsm serve-tts` over real websockets: N clients at once, each paced like a live
user, measured from the client side. This is what a deployment's users get (sockets, the event loop and the model
loop included); `dsm bench` times the engine alone.

    python benchmarks/bench_serve.py stt --clients 1 64 256 --seconds 20   # spawns serve-stt (stt-1b on CUDA)
    python benchmarks/bench_serve.py tts --clients 1 16 64                 # spawns serve-tts (tts-1.6b on CUDA)
    python benchmarks/bench_serve.py stt --url ws://host:8080 --clients 32 # a server that is already running

Without ``--url`` the script starts the server itself (``--serve`` holds its arguments; default: the released shape
with random weights on CUDA, the tiny preset on a CPU) with ``--batch-size`` the largest client count, waits for
``/api/build_info``, and stops it with SIGTERM at the end.

STT: each client sends its audio in real time (a 1920-sample Audio message every 80 ms on a fixed schedule) with a
Marker every 12 frames, then silence until its last Marker comes back. A row gives:
* frame latency (models with VAD heads, whose server sends a Step per frame): from sending the message that
  completes a frame to receiving that frame's Step, p50/p99 over every frame of every client;
* marker latency: from sending a Marker to its echo, which includes the model's delay (stt-1b 0.5 s, 2.6b 2.5 s);
* drift: the largest growth of one client's marker latency from its first Marker to its last; a server slower than
  real time falls further behind every second. "keeps up" = every client served, no Error, every last Marker back,
  and each client's drift within 0.25 s or 2% of the audio between its first and last Marker, whichever is more
  (a short run cannot tell a server 2% too slow from one that keeps up: run --seconds 20 or more for that);
* send lateness p99: how late the load generator itself sent against its schedule. When it is large, the client
  machine is the limit, not the server.
TTS: each client sends a text as one Text message per word, then Eos (as Kyutai's client does), all clients within
--ramp seconds. A row gives time to first audio (from the first word sent) p50/p99, the frames' largest arrival gap,
and playback stalls: playback starts when the first frame arrives (plus --jitter-buffer), and a frame that arrives
after its time stalls it. "keeps up" = every client served, no Error, no stall.
Rejected connections (no free slot, HTTP errors) and Errors are counted in every row. ``--capacity`` then searches
the most clients the server keeps up with (up to its slots), a row per probe.

Rows go to stdout as a table and to --output as JSON lines, with the server's /api/build_info (device, versions,
commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import msgpack
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from dsm.bench import append_jsonl, check_output
from dsm.cli_args import positive_int, seconds
from dsm.server import ASR_PATH, TTS_PATH, audio_message

FRAME = 1920  # samples at 24 kHz
FRAME_S = 0.08
MARKER_EVERY = 12  # frames between two Markers (0.96 s)
DRIFT_FLOOR_S, DRIFT_RATE = 0.25, 0.02  # a client's allowed drift: max(floor, rate x its audio between Markers)
DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog while the orchestra tunes its strings. Streaming speech "
                "models read words as they arrive and speak them a fraction of a second later, so a listener never "
                "waits for the whole sentence.")
_AUDIO_PREFIX = audio_message(np.zeros(FRAME, dtype=np.float32))[:20]  # dsm's Audio header up to the first sample


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced signal with syllable-rate envelope, pitch glides and pauses: something for Mimi to encode."""
    g = np.random.default_rng(seed)
    t = np.arange(int(24000 * seconds)) / 24000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 24000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) * (np.sin(2 * np.pi * 0.25 * t) > -0.6)
    return (0.25 * voiced * envelope + 0.01 * g.standard_normal(t.shape)).astype(np.float32)


def _pct(xs, q) -> float | None:
    return round(float(np.percentile(xs, q)) * 1e3, 2) if len(xs) else None


# ---------------------------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Client:
    """What every client ends with: refused before its Ready (``rejected``), or an Error / a dropped connection
    after it (``error``)."""

    rejected: str | None = None
    error: str | None = None

    def failed(self, e: Exception, opened: bool) -> None:
        if opened:
            self.error = self.error or f"{type(e).__name__}: {e}"
        else:
            self.rejected = f"{type(e).__name__}: {e}"


@asynccontextmanager
async def session(url: str, headers: dict, start_at: float, client: Client):
    """Connect at loop time ``start_at`` and read the server's first message: yields the socket once it said Ready,
    None when it refused (``client.rejected``)."""
    await asyncio.sleep(max(0.0, start_at - asyncio.get_running_loop().time()))
    async with connect(url, additional_headers=headers, ping_interval=None, max_size=None) as ws:
        first = msgpack.unpackb(await ws.recv())
        if first.get("type") == "Ready":
            yield ws
        else:
            client.rejected = str(first.get("message", first))
            yield None


def _first_error(clients: list[Client]) -> str | None:
    return next((c.error or c.rejected for c in clients if c.error or c.rejected), None)


@dataclass
class STTClient(Client):
    frame_latency: list[float] = field(default_factory=list)
    marker_latency: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    words: int = 0
    open_s: float | None = None
    last_marker_back: bool = False
    extra_steps: int = 0  # Steps beyond the frames sent (a server-side silence prefix): latency unmatched


async def stt_client(url: str, headers: dict, frames: list[bytes], offset: int, n_frames: int, drain_s: float,
                     start_at: float) -> STTClient:
    """One live user: ``n_frames`` of ``frames`` from ``offset`` in real time, Markers, then silence until the last
    Marker is back (at most ``drain_s``)."""
    res, loop = STTClient(), asyncio.get_running_loop()
    t_open = max(start_at, loop.time())  # when the session starts to connect
    try:
        async with session(url, headers, start_at, res) as ws:
            if ws is None:
                return res
            res.open_s = loop.time() - t_open
            sent: list[float] = []  # send time of every frame
            markers: dict[int, float] = {}
            last_id, last_back = n_frames, asyncio.Event()
            silence = audio_message(np.zeros(FRAME, dtype=np.float32))

            async def receive():
                steps = 0
                async for raw in ws:
                    now = time.perf_counter()
                    m = msgpack.unpackb(raw)
                    kind = m.get("type")
                    if kind == "Step":
                        if steps < len(sent):
                            res.frame_latency.append(now - sent[steps])
                        else:
                            res.extra_steps += 1
                        steps += 1
                    elif kind == "Marker" and m.get("id") in markers:
                        res.marker_latency.append(now - markers[m["id"]])
                        if m["id"] == last_id:
                            res.last_marker_back = True
                            last_back.set()
                    elif kind == "Word":
                        res.words += 1
                    elif kind == "Error":
                        res.error = str(m.get("message"))
                        last_back.set()
                        return

            receiver = asyncio.create_task(receive())
            t0 = time.perf_counter()
            i = 0
            while not last_back.is_set():
                due = t0 + i * FRAME_S
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                if last_back.is_set():
                    break
                now = time.perf_counter()
                if i >= n_frames and now - t0 - n_frames * FRAME_S > drain_s:
                    break  # the last Marker is lost or far behind: the row says so
                res.lateness.append(max(0.0, now - due))
                sent.append(now)
                await ws.send(frames[(offset + i) % len(frames)] if i < n_frames else silence)
                i += 1
                if i % MARKER_EVERY == 0 or i == n_frames:
                    markers[i] = time.perf_counter()
                    await ws.send(msgpack.packb({"type": "Marker", "id": i}))
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    except (InvalidHandshake, ConnectionClosed, OSError) as e:
        res.failed(e, opened=res.open_s is not None)
    return res


def stt_row(clients: list[STTClient], n: int) -> dict:
    served = [c for c in clients if c.rejected is None]
    frame = [x for c in served for x in c.frame_latency]
    marker = [x for c in served for x in c.marker_latency]
    drifts = [(max(c.marker_latency[-1] - c.marker_latency[0], 0.0), len(c.marker_latency) - 1)
              for c in served if c.marker_latency]  # (drift, Marker intervals)
    drift = max((d for d, _ in drifts), default=None)
    drifting = sum(d > max(DRIFT_FLOOR_S, DRIFT_RATE * k * MARKER_EVERY * FRAME_S) for d, k in drifts)
    errors = sum(c.error is not None for c in served)
    lost = sum(not c.last_marker_back for c in served)
    row = {"clients": n, "served": len(served), "rejected": n - len(served), "errors": errors, "lost_markers": lost,
           "frames": sum(len(c.lateness) for c in served), "words": sum(c.words for c in served),
           "frame_p50_ms": _pct(frame, 50), "frame_p99_ms": _pct(frame, 99),
           "marker_p50_ms": _pct(marker, 50), "marker_p99_ms": _pct(marker, 99),
           "drift_max_ms": None if drift is None else round(drift * 1e3, 2),
           "open_p99_ms": _pct([c.open_s for c in served], 99),
           "lateness_p99_ms": _pct([x for c in served for x in c.lateness], 99),
           "extra_steps": sum(c.extra_steps for c in served)}  # fmt: skip
    row["keeps_up"] = bool(served and len(served) == n and not errors and not lost and drift is not None
                           and not drifting)
    if _first_error(clients):
        row["first_error"] = _first_error(clients)
    return row


async def run_stt(url: str, headers: dict, n: int, pcm: np.ndarray, seconds: float, drain_s: float,
                  ramp_s: float) -> dict:
    frames = [audio_message(pcm[i : i + FRAME]) for i in range(0, len(pcm) - FRAME + 1, FRAME)]
    n_frames = max(1, round(seconds / FRAME_S))
    start = asyncio.get_running_loop().time() + 0.05
    clients = await asyncio.gather(*(
        stt_client(url, headers, frames, (7 * c) % len(frames), n_frames, drain_s, start + ramp_s * c / n)
        for c in range(n)))  # fmt: skip
    return stt_row(clients, n)


@dataclass
class TTSClient(Client):
    frames: list[float] = field(default_factory=list)  # arrival times
    first_word: float | None = None
    texts: int = 0


async def tts_client(url: str, headers: dict, words: list[str], start_at: float) -> TTSClient:
    res = TTSClient()
    try:
        async with session(url, headers, start_at, res) as ws:
            if ws is None:
                return res
            res.first_word = time.perf_counter()
            for w in words:
                await ws.send(msgpack.packb({"type": "Text", "text": w}))
            await ws.send(msgpack.packb({"type": "Eos"}))
            async for raw in ws:  # the server closes after the last frame
                now = time.perf_counter()
                if raw[:20] == _AUDIO_PREFIX:  # dsm's Audio messages, without decoding 1920 floats
                    res.frames.append(now)
                    continue
                m = msgpack.unpackb(raw)
                if m.get("type") == "Audio":
                    res.frames.append(now)
                elif m.get("type") == "Text":
                    res.texts += 1
                elif m.get("type") == "Error":
                    res.error = str(m.get("message"))
    except (InvalidHandshake, ConnectionClosed, OSError) as e:
        res.failed(e, opened=res.first_word is not None)
    return res


def stalls(frames: list[float], jitter_s: float) -> tuple[int, float]:
    """(stalls, stalled seconds) of a playback that starts ``jitter_s`` after the first frame arrives and plays one
    frame every 80 ms, waiting whenever the next frame is not there yet."""
    if not frames:
        return 0, 0.0
    count, stalled, clock = 0, 0.0, frames[0] + jitter_s
    for t in frames:
        if t > clock:
            count, stalled, clock = count + 1, stalled + t - clock, t
        clock += FRAME_S
    return count, stalled


def tts_row(clients: list[TTSClient], n: int, jitter_s: float) -> dict:
    served = [c for c in clients if c.rejected is None]
    spoke = [c for c in served if c.frames]
    ttfa = [c.frames[0] - c.first_word for c in spoke]
    gaps = [b - a for c in spoke for a, b in zip(c.frames, c.frames[1:], strict=False)]
    st = [stalls(c.frames, jitter_s) for c in spoke]
    rtfx = [len(c.frames) * FRAME_S / (c.frames[-1] - c.first_word) for c in spoke]
    errors = sum(c.error is not None for c in served)
    row = {"clients": n, "served": len(served), "rejected": n - len(served), "errors": errors,
           "frames": sum(len(c.frames) for c in spoke), "texts": sum(c.texts for c in served),
           "ttfa_p50_ms": _pct(ttfa, 50), "ttfa_p99_ms": _pct(ttfa, 99), "gap_p99_ms": _pct(gaps, 99),
           "gap_max_ms": _pct(gaps, 100), "stalled_clients": sum(s[0] > 0 for s in st),
           "stall_max_ms": round(max((s[1] for s in st), default=0.0) * 1e3, 2),
           "rtfx_p50": round(float(np.median(rtfx)), 2) if rtfx else None}  # fmt: skip
    row["keeps_up"] = bool(len(spoke) == n and not errors and row["stalled_clients"] == 0)
    if _first_error(clients):
        row["first_error"] = _first_error(clients)
    return row


async def run_tts(url: str, headers: dict, n: int, words: list[str], jitter_s: float, ramp_s: float) -> dict:
    start = asyncio.get_running_loop().time() + 0.05
    clients = await asyncio.gather(*(tts_client(url, headers, words, start + ramp_s * c / n) for c in range(n)))
    return tts_row(clients, n, jitter_s)


# ---------------------------------------------------------------------------------------------------------------
# The server: a running one (--url) or one this script starts
# ---------------------------------------------------------------------------------------------------------------


def _http_json(base: str, path: str, timeout: float = 5.0):
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return json.loads(r.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutputError(Exception):
    """A row could not be appended to --output: the file's failure, not the server's."""


class SpawnedServer:
    """``dsm serve-KIND ARGS`` in a process of its own on a free local port, its output in a log file."""

    def __init__(self, kind: str, args: list[str], batch: int, startup_s: float):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "dsm.cli", f"serve-{kind}", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        if "--batch-size" not in args:
            cmd += ["--batch-size", str(batch)]
        self.cmd, self.startup_s = cmd, startup_s
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"dsm-serve-{kind}-", suffix=".log", delete=False)

    def __enter__(self) -> str:
        print(f"starting: {shlex.join(self.cmd)} (log: {self.log.name})", file=sys.stderr)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        base, deadline = f"http://127.0.0.1:{self.port}", time.monotonic() + self.startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n"
                                   + self._log_tail())
            try:
                _http_json(base, "/api/build_info", timeout=1.0)
                return base
            except OSError:
                if time.monotonic() > deadline:
                    self._stop()
                    raise RuntimeError(f"the server was not ready after {self.startup_s:.0f} s:\n"
                                       + self._log_tail()) from None
                time.sleep(0.2)

    def __exit__(self, exc_type, *_):
        self._stop()
        if exc_type is None or issubclass(exc_type, OutputError):
            Path(self.log.name).unlink(missing_ok=True)  # kept when the server or a client failed

    def _stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server closes its connections and stops
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _log_tail(self) -> str:
        return Path(self.log.name).read_text()[-3000:]


def wait_idle(base: str, timeout_s: float = 30.0) -> None:
    """Wait until the server's slots are all free again (closing connections from the previous row)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(int(m.get("used_slots", 0)) == 0 for m in _http_json(base, "/api/modules_info")):
            return
        time.sleep(0.2)


def endpoint(url: str, kind: str) -> tuple[str, str]:
    """(websocket URL of the endpoint, http base) from ``ws://host:port`` (or ``http://``, ``wss://``, ``https://``)
    with or without the endpoint's path."""
    parts = urlsplit(url)
    schemes = {"ws": ("ws", "http"), "http": ("ws", "http"), "wss": ("wss", "https"), "https": ("wss", "https")}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"--url {url!r}: expected ws://HOST:PORT[/path] (or wss, http, https)")
    ws, http = schemes[parts.scheme]
    path = parts.path if parts.path not in ("", "/") else (ASR_PATH if kind == "stt" else TTS_PATH)
    query = parts.query or ("format=PcmMessagePack" if kind == "tts" else "")
    return urlunsplit((ws, parts.netloc, path, query, "")), f"{http}://{parts.netloc}"


def default_serve_args(kind: str) -> list[str]:
    import torch

    cuda = torch.cuda.is_available()
    preset = {"stt": "stt-1b-en_fr" if cuda else "tiny-stt", "tts": "tts-1.6b-en_fr" if cuda else "tiny-tts"}[kind]
    return ["--preset", preset, "--random-weights"]


def _columns(kind: str) -> list[str]:
    return (["clients", "served", "errors", "frame_p50_ms", "frame_p99_ms", "marker_p50_ms", "marker_p99_ms",
             "drift_max_ms", "lateness_p99_ms", "keeps_up"] if kind == "stt" else
            ["clients", "served", "errors", "ttfa_p50_ms", "ttfa_p99_ms", "gap_p99_ms", "gap_max_ms",
             "stalled_clients", "stall_max_ms", "rtfx_p50", "keeps_up"])  # fmt: skip


def search_capacity(keeps_up, known: int, limit: int, failed: int | None = None) -> int:
    """The most clients ``n <= limit`` for which ``keeps_up(n)`` holds, ``known`` keeping up already (0: none known)
    and ``failed`` not (None: none known): doubling from ``known`` until a probe fails or reaches ``limit``, then
    bisection to within 1/16 (a probe is a whole row, seconds of real time; one already measured is not run again,
    and a second run of a failed count, on a noisy machine, could contradict its row)."""
    lo, hi = known, limit + 1 if failed is None else min(failed, limit + 1)  # lo keeps up, hi does not
    while hi > limit and lo < limit:
        n = min(max(1, 2 * lo), limit)
        lo, hi = (n, hi) if keeps_up(n) else (lo, n)
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if keeps_up(mid) else (lo, mid)
    return lo


def _line(values) -> str:
    return " ".join(f"{'-' if v is None else v!s:>15}" for v in values)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except None: those flags' help says what happens without them."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    ap.add_argument("kind", choices=["stt", "tts"])
    ap.add_argument("--clients", type=positive_int, nargs="+", default=[1, 8],
                    help="concurrent clients, one row each")
    ap.add_argument("--url", help="a running server (ws://host:port[/path]); default: start one")
    ap.add_argument("--serve", default=None, help="arguments of the server this script starts (default: the "
                    "released shape with random weights on CUDA, the tiny preset on a CPU)")
    ap.add_argument("--startup-timeout", type=seconds(zero=False), default=900.0,
                    help="seconds to wait for a started server")
    ap.add_argument("--api-key", default="public_token", help="sent as the kyutai-api-key header")
    ap.add_argument("--seconds", type=seconds(zero=False), default=10.0, help="STT: seconds of audio per client")
    ap.add_argument("--audio", help="STT: an audio file to send (looped or cut to --seconds; default: synthetic)")
    ap.add_argument("--drain", type=seconds(zero=True), default=10.0, help="STT: seconds to wait for the last Marker")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="TTS: the text each client sends")
    ap.add_argument("--jitter-buffer", type=seconds(zero=True), default=0.0,
                    help="TTS: playback starts this long after the first frame")
    ap.add_argument("--ramp", type=seconds(zero=True), default=FRAME_S,
                    help="seconds over which the clients of a row start")
    ap.add_argument("--capacity", action="store_true", help="after the rows, search the most clients the server "
                    "keeps up with (doubling from the largest row that kept up, then bisection; a row per probe)")
    ap.add_argument("--max-clients", type=positive_int, help="--capacity's bound (default: the server's slots; a "
                    "server this script starts gets this many)")
    ap.add_argument("--output", type=Path, help="append the rows to this JSON-lines file")
    args = ap.parse_args(argv)
    if args.url:
        try:
            endpoint(args.url, args.kind)
        except ValueError as e:
            ap.error(str(e))
    if args.output and (why := check_output(args.output)) is not None:  # before the server starts and the rows run
        ap.error(why)

    if args.kind == "stt":
        if args.audio:
            from dsm.audio import load_audio

            pcm = load_audio(args.audio)[0].numpy()
        else:
            pcm = speech_like(max(args.seconds, 4.0))
        pcm = np.resize(pcm, max(len(pcm), FRAME))  # loops a short file up to one frame at least
    words = args.text.split()
    headers = {"kyutai-api-key": args.api_key}

    def run_rows(url: str) -> int:
        ws_url, base = endpoint(url, args.kind)
        cols = _columns(args.kind)

        def emit(row: dict) -> None:
            if args.output:  # row by row: a server that goes away later leaves the rows measured so far
                try:
                    append_jsonl(args.output, [row])
                except OSError as e:  # not the server's failure: run_rows' OSError is a server that went away
                    raise OutputError(f"cannot append to --output {str(args.output)!r}: {e.strerror or e}") from None

        def measure(n: int, **extra) -> bool:
            wait_idle(base)
            if args.kind == "stt":
                row = asyncio.run(run_stt(ws_url, headers, n, pcm, args.seconds, args.drain, args.ramp))
                row["seconds"] = args.seconds
            else:
                row = asyncio.run(run_tts(ws_url, headers, n, words, args.jitter_buffer, args.ramp))
                row["words"] = len(words)
            row = {"bench": f"serve-{args.kind}", **row, **extra, "server": info}
            print(_line(row.get(c) for c in cols), flush=True)
            if "first_error" in row:
                print(f"clients={n}: {row['first_error']}", file=sys.stderr)
            emit(row)
            return row["keeps_up"]

        try:
            info = _http_json(base, "/api/build_info")
            print(_line(cols), flush=True)
            kept = [n for n in args.clients if measure(n)]
            if args.capacity:
                slots = sum(int(m["total_slots"]) for m in _http_json(base, "/api/modules_info")
                            if m.get("path") == urlsplit(ws_url).path)
                limit = min(args.max_clients or slots, slots)
                failed = min((n for n in args.clients if n not in kept), default=None)
                known = max((n for n in kept if failed is None or n < failed), default=0)
                n = search_capacity(lambda n: measure(n, capacity_probe=True), known, limit, failed)
                print(f"capacity: {n} clients keep up (searched up to {limit}, the server's {slots} slots)", flush=True)
                emit({"bench": f"serve-{args.kind}-capacity", "capacity": n, "limit": limit, "server": info,
                      **({"seconds": args.seconds} if args.kind == "stt" else {"words": len(words)})})
        except OSError as e:  # URLError included: the server went away, or was never there
            print(f"bench_serve: the server at {base} does not answer ({e})", file=sys.stderr)
            return 1
        return 0

    try:
        if args.url:
            return run_rows(args.url)
        serve_args = shlex.split(args.serve) if args.serve is not None else default_serve_args(args.kind)
        try:
            with SpawnedServer(args.kind, serve_args, max(*args.clients, args.max_clients or 0),
                               args.startup_timeout) as base:
                return run_rows(base.replace("http://", "ws://"))
        except RuntimeError as e:  # the server did not start: its log says why
            print(f"bench_serve: {e}", file=sys.stderr)
            return 1
    except OutputError as e:
        print(f"bench_serve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
