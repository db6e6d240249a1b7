"""``dsm bench``: per-step latency and capacity of the engine, with the moshi reference timed beside it.

For each batch size the engine runs ``batch`` streams on random weights at the model's real shapes (or a given
checkpoint). A step is one 80 ms frame for every stream: Mimi encode + LM step (STT), or LM step + depth transformer
+ Mimi decode (TTS). Reported: p50/p99 step latency, ``rtf = compute / audio`` and ``rtfx = audio / compute``
(aggregate: audio = batch x 80 ms per step, so rtf = 1 / rtfx at every batch), and capacity = the largest
measured batch whose p50 step fits in 80 ms.
TTS models also get their time to first audio (:func:`time_to_first_audio`): warm, on an engine whose graphs are
captured, and cold, the first run on a new engine.
Times are CUDA-event medians after warm-up on a GPU, wall-clock on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

import dsm_kernels

from .memory import first_line, out_of_memory

FRAME_S = 0.08


@dataclass
class BenchRow:
    system: str  # "dsm" or "moshi"
    model: str
    batch: int
    p50_ms: float
    p99_ms: float
    mimi_ms: float
    rtf: float
    rtfx: float
    extra: dict = field(default_factory=dict)


def random_model(cfg_dict: dict, device, dtype: torch.dtype, seed: int = 0):
    """An :class:`LMModel` with random weights generated directly on ``device`` (no checkpoint on disk)."""
    from .checkpoint import expected_lm_tensors, random_init_value
    from .config import parse_config
    from .model import LMModel

    cfg = parse_config(cfg_dict)
    gen = torch.Generator(device=device).manual_seed(seed)
    layer_scale = cfg.lm.layer_scale if cfg.lm.layer_scale is not None else 0.1
    state = {name: random_init_value(name, shape, gen, layer_scale).to(dt)
             for name, (shape, dt) in expected_lm_tensors(cfg, dtype).items()}
    with torch.device("meta"):
        model = LMModel(cfg.lm)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of one call: CUDA events on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    return run


def _time_calls(fn, warmup: int, steps: int, timer, progress=None) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        ms = timer(fn)
        if i >= warmup:
            times.append(ms)
        if progress is not None:
            progress.update(1)
    return times


def _rates(step_ms: float, batch: int) -> tuple[float, float]:
    """``(rtf, rtfx)`` of one step of ``step_ms`` serving ``batch`` streams: both over the same aggregate audio
    (``batch`` x 80 ms), so ``rtf = 1 / rtfx`` (rtf once divided by one stream's 80 ms only: batch x too large)."""
    audio_ms = batch * FRAME_S * 1e3
    return step_ms / audio_ms, (audio_ms / step_ms if step_ms > 0 else math.inf)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def _random_conditions(model, stream: int = 0, batch: int = 1):
    """Condition values of ``batch`` streams, each with a voice of its own (drawn from ``stream + b``): the released
    layout of the DSM scripts, one voice in the first of 5 speaker slots and the learnt padding in the others (a
    tensor condition of another width: 10 positions, 5 of them padding). Host tensors, as the TTS runtime passes
    them, so the engine shares the padding pages but no voice page."""
    from .conditioning import TensorInput
    from .tts import MAX_SPEAKERS, VOICE_FRAMES

    if model.condition_provider is None:
        return None
    conds = {}
    for name, cond in model.condition_provider.conditioners.items():
        c = cond.cfg
        if c.type == "tensor":
            length, real = (MAX_SPEAKERS * VOICE_FRAMES, VOICE_FRAMES) if c.dim == 512 else (10, 5)
            t = torch.zeros(batch, length, c.dim)
            for b in range(batch):
                t[b, :real] = torch.randn(real, c.dim, generator=torch.Generator().manual_seed(stream + b))
            mask = torch.zeros(batch, length, dtype=torch.bool)
            mask[:, :real] = True
            conds[name] = TensorInput(t, mask)
        else:
            conds[name] = [c.possible_values[min(1, len(c.possible_values) - 1)]] * batch
    return conds


KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def kv_capacity(model_cfg, kv_dtype: torch.dtype, memory_bytes: int, weights_bytes: int, *,
                reserve_bytes: int = 8 * 2**30, page_size: int = 16, condition_rows: int = 0,
                condition_dtype: torch.dtype = torch.bfloat16, mimi_bytes: int = 0) -> int:
    """Streams whose full-context KV (and ``mimi_bytes`` of Mimi state each) fit in ``memory_bytes - weights_bytes -
    reserve_bytes``.

    Per stream: a ring of ``ceil(context / page_size)`` pages x ``page_size`` rows x (K and V) x layers x KV heads x
    head_dim x element size (1 byte for fp8, 2 for bf16), plus the cross-attention K/V of ``condition_rows``
    condition positions of its own (in ``condition_dtype``; shared pages are not counted). ``reserve_bytes``
    (default 8 GiB) stands for activations, CUDA graphs, Mimi's weights and the allocator's slack; the depformer's
    per-step cache is small and not counted."""
    from .kv_cache import pages_per_slot

    rows = pages_per_slot(model_cfg.context, page_size) * page_size
    elem = torch.empty((), dtype=kv_dtype).element_size()
    per_stream = 2 * model_cfg.num_layers * rows * (model_cfg.num_heads // model_cfg.kv_repeat) * model_cfg.head_dim
    per_stream *= elem
    if model_cfg.cross_attention:
        cond_elem = torch.empty((), dtype=condition_dtype).element_size()
        per_stream += 2 * model_cfg.num_layers * condition_rows * model_cfg.dim * cond_elem
    per_stream += mimi_bytes
    free = memory_bytes - weights_bytes - reserve_bytes
    return max(0, free // per_stream)


def _mimi_sides(cfg) -> dict[str, bool]:
    """The side of Mimi a stream of a model with config ``cfg`` holds, as the runtimes hold it: the encoder for STT
    (audio input streams), the decoder for TTS (``init_state`` / ``stream_state_bytes`` keywords)."""
    stt = cfg.num_codebooks - cfg.dep_q - 1 > 0
    return {"encoder": stt, "decoder": not stt}


def _mimi_stream_bytes(model, mimi) -> int:
    """Mimi state a stream of ``model`` holds on the device (see :func:`_mimi_sides`)."""
    return 0 if mimi is None else mimi.stream_state_bytes(**_mimi_sides(model.cfg))


def _condition_layout(model) -> tuple[int, int, int]:
    """(pages of its own, shared pages, page size) of a benchmark stream's condition K/V: with
    :func:`_random_conditions`' layout, the voice's page is its own and the padding pages are shared."""
    from .conditioning import cross_length, cross_page_keys
    from .kv_cache import cross_page_size

    if not model.cfg.cross_attention:
        return 0, 0, 0
    prov, fuser = model.condition_provider, model.cfg.fuser
    page = cross_page_size(cross_length(prov, fuser, _random_conditions(model, 0)))
    a, b = (cross_page_keys(prov, fuser, _random_conditions(model, s), page) for s in (0, 1))
    own = sum(x != y for x, y in zip(a, b, strict=True))
    return own, len(a) - own, page


def _engine_for(model, batch: int, **kw):
    """An engine for ``batch`` benchmark streams whose condition pool holds just what they use (the default pool
    holds 5 distinct voices a stream: 5x the condition memory)."""
    from .engine import Engine

    own, shared, _ = _condition_layout(model)
    cross_pages = batch * own + shared + 1 if own + shared else None
    return Engine(model, max_slots=batch, buckets=(batch,), cross_pages=cross_pages, **kw)


def bench_dsm(model, mimi, batch: int, steps: int, warmup: int, timer, progress=None, **engine_kw) -> BenchRow:
    """Time ``steps`` engine steps with ``batch`` open streams (all active every step), Mimi alone (encode of one
    frame for STT, decode for TTS), and then both in turn, as a server runs them: the row's p50/p99 are those of the
    whole step, the LM and Mimi medians are kept for the breakdown. ``engine_kw`` (``kv_dtype``, ``backend``,
    ``page_size``) go to the :class:`~dsm.engine.Engine`.
    TTS models with Mimi also get ``extra["ttfa_ms"]`` (warm) and ``extra["ttfa_cold_ms"]``: see
    :func:`time_to_first_audio`."""
    from .mimi import cuda_graphed

    cfg = model.cfg
    eng = _engine_for(model, batch, temp=0.8, temp_text=0.7, **engine_kw)
    for b in range(batch):
        eng.open(conditions=_random_conditions(model, b))
    n_in = cfg.num_codebooks - cfg.dep_q - 1
    dev = eng.device
    inputs = torch.randint(0, cfg.card, (batch, n_in), device=dev) if n_in else None
    # the path each runtime steps: STT without hooks (one graph), TTS with its state machine's text hook between the
    # phases (here one that changes nothing)
    hooks = {"on_text": lambda tokens: None} if cfg.dep_q else {}
    lm_times = _time_calls(lambda: eng.step(inputs, **hooks), warmup, steps, timer, progress)
    mimi_times = []
    if mimi is not None:
        state = mimi.init_state(batch, **_mimi_sides(cfg))
        pcm = (0.1 * torch.randn(batch, 1, 1920, device=dev)).clamp(-1, 1)
        codes = torch.randint(0, 2048, (batch, 32, 1), device=dev)
        step = (lambda: mimi.encode_step(pcm, state)) if n_in else (lambda: mimi.decode_step(codes, state))
        if eng.cuda_graphs:  # as the engine's step: one graph per batch size
            step = cuda_graphed(step)
        mimi_times = _time_calls(step, warmup, max(3, steps // 2), timer)
        # the whole step's tail, not the LM's p99 plus Mimi's median
        step_times = _time_calls(lambda: (step(), eng.step(inputs, **hooks)), 1, steps, timer)
    else:
        step_times = lm_times
    lm50, mimi50 = _percentile(lm_times, 50), (_percentile(mimi_times, 50) if mimi_times else 0.0)
    total = _percentile(step_times, 50)
    extra = {"lm_p50_ms": lm50, "lm_p99_ms": _percentile(lm_times, 99)}
    if eng.cross_pool is not None:  # the condition K/V the streams hold (shared pages counted once)
        page_bytes = 2 * eng.state.cross.k[:, 0].numel() * eng.state.cross.k.element_size()
        extra["condition_pages"] = eng.cross_pool.used
        extra["condition_kv_mb"] = eng.cross_pool.used * page_bytes / 1e6
    if cfg.dep_q and mimi is not None:  # on an engine and a Mimi state of its own: free this batch's first (a
        del eng, step, state  # capacity probe near the memory limit would run out with both held)
        _release(dev)
        extra["ttfa_ms"], extra["ttfa_cold_ms"] = time_to_first_audio(model, mimi, batch, timer, **engine_kw)
    return BenchRow("dsm", "", batch, total, _percentile(step_times, 99), mimi50, *_rates(total, batch),
                    extra=extra)


def _or_oom(system: str, batch: int, device, run) -> BenchRow | None:
    """``run()``'s row, or, where the device runs out of memory, a row of ``system`` that misses every budget and
    says so: a batch too large for the device (a capacity probe on a larger GPU, a reserve too small for Mimi's
    activations) ends its own measurement, not the run, whose rows reach the JSON line only at its end."""
    try:
        return run()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        error = f"out of device memory: {first_line(e)[:200]}"
    _release(device)  # after the except block: its traceback held the step's tensors
    return BenchRow(system, "", batch, math.inf, math.inf, math.nan, math.inf, 0.0, extra={"error": error})


def _bench_or_oom(model, mimi, batch: int, steps: int, warmup: int, timer, progress=None, **engine_kw) -> BenchRow:
    """:func:`bench_dsm`, or its row of :func:`_or_oom` where the device runs out of memory."""
    return _or_oom("dsm", batch, next(model.parameters()).device,
                   partial(bench_dsm, model, mimi, batch, steps, warmup, timer, progress, **engine_kw))


def time_to_first_audio(model, mimi, batch: int, timer, delay_steps: int = 16, runs: int = 5,
                        **engine_kw) -> tuple[float, float]:
    """TTS time to first audio (DSM-SPEC §6.8) of ``batch`` streams starting together, in ms: ``(warm, cold)``.

    One run, timed from first text to first PCM: open the ``batch`` streams with their conditions (voices no
    earlier run used, so this computes their cross-attention K/V) and reset their Mimi rows, ``delay_steps``
    text-only steps (depth transformer skipped, audio forced to -1), ``max_delay + 1`` full steps, then the Mimi
    decode of the first frame (replayed from a CUDA graph on a GPU, as the TTS runtime does; eager on a CPU).
    Closing the streams is not timed.

    The engine and the Mimi decode are built once, untimed, and kept across runs as a server keeps them: ``cold``
    is the first run (eager first calls and graph captures included), ``warm`` the median of the ``runs`` after it,
    where every graph replays. The TTS runtime's host hooks (text state machine) are not run, but the steps run the
    phase graphs they would run between (a text hook that changes nothing).
    """
    from .mimi_graph import GraphedMimiStep

    cfg = model.cfg
    eng = _engine_for(model, batch, temp=0.6, temp_text=0.6, **engine_kw)
    silent = torch.full((batch, cfg.dep_q), -1, dtype=torch.long, device=eng.device)
    state = mimi.init_state(batch, encoder=False)
    decode = GraphedMimiStep(mimi.decode_step, state)
    every_row = torch.ones(batch, dtype=torch.bool, device=mimi.device)

    def run(conds):
        for c in conds:
            eng.open(conditions=c)
        state.reset(every_row)  # new streams start from a fresh Mimi state, not the last run's
        for _ in range(delay_steps):
            eng.step(depformer_replace_tokens=silent)
        for _ in range(cfg.max_delay + 1):
            out = eng.step(on_text=lambda tokens: None)
        decode(out.tokens[:, 1:, None].clamp(min=0))

    times = []
    with torch.no_grad():
        for r in range(1 + runs):  # new voices each run: the engine computes their K/V, no cached page is reused
            conds = [_random_conditions(model, 1000 * r + b) for b in range(batch)]
            times.append(timer(lambda conds=conds: run(conds)))
            for slot in list(eng.slots):  # returns the streams' KV pages to the pool
                eng.close(slot)
            if eng.device.type == "cuda":
                torch.cuda.synchronize()  # nothing queued may delay the next run's start event
    return _percentile(times[1:], 50), times[0]


def bench_moshi(model, batch: int, steps: int, warmup: int, timer, progress=None) -> BenchRow | None:
    """The moshi reference LMGen on the same weights and shapes (LM step only), or None if moshi is missing."""
    try:
        from moshi.models import lm as moshi_lm
        from moshi.models import loaders
    except ImportError:
        return None
    from .config import lm_to_dict

    kwargs = lm_to_dict(model.cfg)
    if not kwargs.get("conditioners"):
        kwargs.pop("conditioners", None)
        kwargs.pop("fuser", None)
    dev = next(model.parameters()).device
    dtype = next(model.transformer.parameters()).dtype
    ref = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device=dev, dtype=dtype)
    ref.load_state_dict(model.state_dict(), strict=True)  # our names are the released ones; moshi maps them
    cond_tensors = None
    if ref.condition_provider is not None:
        from moshi.conditioners import ConditionAttributes, TensorCondition

        attrs = []
        for b in range(batch):  # the streams of bench_dsm
            conds = _random_conditions(model, b)
            text = {k: v[0] for k, v in conds.items() if isinstance(v, list)}
            tensor = {k: TensorCondition(v.tensor.to(dev), v.mask.to(dev)) for k, v in conds.items()
                      if not isinstance(v, list)}
            attrs.append(ConditionAttributes(text=text, tensor=tensor))
        cond_tensors = ref.condition_provider.prepare_and_provide(attrs)
    gen = moshi_lm.LMGen(ref, temp=0.8, temp_text=0.7, condition_tensors=cond_tensors)
    n_in = model.cfg.num_codebooks - model.cfg.dep_q - 1
    inputs = torch.zeros(batch, n_in, 1, dtype=torch.long, device=dev)
    with gen.streaming(batch):
        times = _time_calls(lambda: gen.step(inputs), warmup, steps, timer, progress)
    p50 = _percentile(times, 50)
    return BenchRow("moshi", "", batch, p50, _percentile(times, 99), 0.0, *_rates(p50, batch))


def git_commit() -> str:
    """The commit measured: ``DSM_COMMIT`` when set (a copied tree's git metadata can be stale, as on the lent GPU
    machines), else the HEAD of the dsm checkout this module runs from, with ``-dirty`` when its tracked files
    differ from that commit, else "unknown". An installed copy is not in a dsm checkout: a repository around its
    site-packages (a project's venv) is another project's, whose commit says nothing of dsm's code."""
    if os.environ.get("DSM_COMMIT"):
        return os.environ["DSM_COMMIT"]
    package = Path(__file__).resolve().parent

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=package, check=False).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != package.parent:
            return "unknown"
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:  # no git
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def environment(device: torch.device | str | None = None) -> dict:
    """Device, versions and commit of a measurement. ``device``: the one measured on (default: the GPU if any) — a
    ``--device cpu`` run on a GPU machine must not be recorded under the GPU's name."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = platform.processor() or "cpu"
    commit = git_commit()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        moshi_version = version("moshi")  # the reference timed beside
    except PackageNotFoundError:
        moshi_version = None
    return {"device": dev, "torch": torch.__version__, "triton": triton_version, "dsm": __version__,
            "moshi": moshi_version, "python": platform.python_version(), "commit": commit,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _release(device: torch.device) -> None:
    """Free the last engine's KV pool and graphs before the next one (closures make cycles: collect them)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def search_capacity(measure: Callable[[int], float], start: int, limit: int, budget_ms: float,
                    max_probes: int = 8) -> tuple[int, dict[int, float]]:
    """Largest batch ``n <= limit`` whose ``measure(n)`` (a step time in ms, growing with n) fits ``budget_ms``:
    double from ``start`` until a batch misses the budget or ``limit`` is reached, then bisect (at most
    ``max_probes`` more). Returns ``(n, {batch: ms measured})``; n = 0 when even batch 1 misses."""
    seen: dict[int, float] = {}

    def fits(n: int) -> bool:
        if n not in seen:
            seen[n] = measure(n)
        return seen[n] <= budget_ms

    lo, hi = 0, None  # lo fits (0: nothing yet), hi misses
    n = max(1, min(start, limit))
    # Doubling is bounded by the limit (log2(limit / start) + 1 probes), not by max_probes: cut short, it reported
    # its last fitting batch as the capacity (128 from start 1) with no batch ever missing the budget.
    while hi is None:
        if fits(n):
            lo = n
            if n >= limit:
                break
            n = min(2 * n, limit)
        else:
            hi = n
    bisect_until = len(seen) + max_probes
    while hi is not None and hi - lo > max(1, lo // 32) and len(seen) < bisect_until:  # ~3% resolution
        mid = (lo + hi) // 2
        if mid <= 0:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, seen


def capacity(rows: list[BenchRow], budget_ms: float = FRAME_S * 1e3) -> int:
    """Largest measured batch whose p50 step (Mimi included) fits in ``budget_ms`` (one 80 ms frame)."""
    ok = [r.batch for r in rows if r.p50_ms <= budget_ms]
    return max(ok) if ok else 0


def format_ttfa(rows: list[BenchRow]) -> str:
    """One line per row with a TTS time to first audio: the warm-engine figure, and the cold one beside it."""
    lines = []
    for r in rows:
        if "ttfa_ms" not in r.extra or r.extra.get("capacity_probe"):
            continue
        cold = r.extra.get("ttfa_cold_ms")
        note = "warm engine" + (f"; {cold:.1f} ms cold: the first run, one-time setup and any graph capture "
                                "included" if cold is not None else "")
        lines.append(f"{r.model}: time to first audio at batch {r.batch}: {r.extra['ttfa_ms']:.1f} ms ({note})")
    return "\n".join(lines)


def format_condition_pages(rows: list[BenchRow]) -> str:
    """One line per row with condition pages: the voice K/V its streams held, shared pages counted once."""
    return "\n".join(f"{r.model}: voice K/V at batch {r.batch}: {r.extra['condition_pages']} pages, "
                     f"{r.extra['condition_kv_mb']:.1f} MB (a voice page per stream, the padding pages shared)"
                     for r in rows if "condition_pages" in r.extra and not r.extra.get("capacity_probe"))


def format_table(rows: list[BenchRow]) -> str:
    """p50/p99: whole step (LM + Mimi for dsm); lm p50: the LM step alone (what the moshi rows time)."""
    head = (f"{'system':<7} {'model':<16} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'lm p50':>9} {'mimi ms':>8} "
            f"{'rtf':>8} {'rtfx':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lm = r.extra.get("lm_p50_ms", r.p50_ms)
        lines.append(f"{r.system:<7} {r.model:<16} {r.batch:>5} {r.p50_ms:>9.2f} {r.p99_ms:>9.2f} {lm:>9.2f} "
                     f"{r.mimi_ms:>8.2f} {r.rtf:>8.3g} {r.rtfx:>9.4g}"  # significant digits: rtf ~1e-4 at batch 256
                     + (f"  ({r.extra['error']})" if "error" in r.extra else "")
                     # told apart from the asked batches' rows, which may have the same batch
                     + ("  (capacity probe)" if r.extra.get("capacity_probe") else ""))
    if any(r.system == "moshi" for r in rows):
        lines.append("moshi rows: LMGen step only (no Mimi); dsm p50/p99 include Mimi (column 'mimi ms').")
    lines.append("rtf: step time / audio time of the batch (batch x 80 ms); rtfx = 1 / rtf; under 1 / over 1: "
                 "faster than real time.")
    return "\n".join(lines)


def strict_json(v):
    """``v`` with every non-finite float as None: strict JSON has no NaN/Infinity (json.dumps writes them)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [strict_json(x) for x in v]
    return v


def check_output(path: str | Path, flag: str = "--output") -> str | None:
    """Why ``path`` cannot be appended to (checked before the benchmark runs, not after it), or None. Leaves no
    new file or folder behind (the run makes them when it writes)."""
    # The file the run will append to: through a symlink, its target (unlinking a dangling link's name removed the
    # user's link, and left the target it created)
    target = Path(path).resolve()
    existed = target.exists()
    made = [p for p in target.parents if not p.exists()]  # deepest first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.open("a").close()
    except OSError as e:
        return f"cannot write {flag} {str(path)!r}: {e.strerror or e}"
    finally:
        for p in ([] if existed else [target]) + made:
            with contextlib.suppress(OSError):  # what was never made (a parent that is a file) is not there
                p.unlink() if p is target else p.rmdir()
    return None


def write_replacing(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed over it once complete: a write that
    fails (a full disk) leaves the previous file whole, never a truncated one. A symlink's target is replaced, not
    the link."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``path`` as strict JSON lines (a non-finite float is null), whole or not at all: one
    append of complete lines, and a write that fails part-way (a full disk) is cut back to the file's previous end,
    so that a reader of the file never finds half a row. Writers in other processes (two benchmarks sharing a results
    file) wait on a lock: a cut-back must not take their rows with it. OSError when the append fails."""
    data = memoryview("".join(json.dumps(strict_json(r), allow_nan=False) + "\n" for r in rows).encode())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
        end = os.fstat(fd).st_size
        try:
            while data:  # a regular file takes it in one write unless the disk fills
                data = data[os.write(fd, data):]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


def append_results(path: str | Path, rows: list[BenchRow], env: dict, extra: dict) -> None:
    append_jsonl(path, [{**env, **extra, "rows": [asdict(r) for r in rows]}])


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str):
    """``text`` as ``kind`` if ``ok`` accepts it, else an argparse error saying what was ``expected``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):  # NaN fails every comparison, so `ok`
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _batches(text: str) -> list[int]:
    expected = f"comma-separated positive integers in {text!r}"
    batches = [_number(b, int, lambda n: n >= 1, expected) for b in text.split(",")]
    if len(set(batches)) != len(batches):  # would measure, print and record the same batch twice
        raise argparse.ArgumentTypeError(f"expected distinct batch sizes, got {text!r}")
    return batches


def _warmup(text: str) -> int:
    return _number(text, int, lambda n: n >= 0, "an integer >= 0")


def _frame_ms(text: str) -> float:
    return _number(text, float, lambda x: 0 < x < math.inf, "a time in ms > 0")


def setup_parser(p) -> None:
    from .cli_args import parse_device, parse_dtype, positive_int
    from .presets import PRESETS

    p.add_argument("--preset", action="append", choices=PRESETS,
                   help="model preset with random weights, repeatable for several presets, each once (default: the "
                        "three released models on a GPU, tiny-stt and tiny-tts on a CPU)")
    p.add_argument("--checkpoint", metavar="DIR", help="benchmark this checkpoint instead of presets")
    p.add_argument("--hf-repo", metavar="REPO", help="benchmark this hub checkpoint instead of presets")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for --hf-repo")
    p.add_argument("--random-weights", action="store_true",
                   help="accepted as in the other commands: presets always have random weights")
    p.add_argument("--batch", type=_batches, default=None,
                   help="comma-separated batch sizes (default GPU 1,8,64,256; CPU 1,2)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per batch (default GPU 50, CPU 4)")
    p.add_argument("--warmup", type=_warmup, default=None, help="warm-up steps (default GPU 10, CPU 2)")
    p.add_argument("--device", type=parse_device, default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="LM dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), default=None,
                   help="KV cache dtype (default: the LM dtype); fp8 = e4m3, saturating, no scale")
    p.add_argument("--backend", choices=dsm_kernels.BACKENDS, default=None,
                   help="kernel backend of the engine (default: the fastest available; e.g. triton for an A/B "
                        "against the CUDA kernels)")
    p.add_argument("--page-size", type=positive_int, default=16,
                   help="KV cache page size in positions (default 16; a slot's ring is ceil(context / page_size) "
                        "pages, so larger pages waste up to a page a stream)")
    p.add_argument("--no-mimi", dest="mimi", action="store_false",
                   help="LM only, without Mimi encode/decode (a checkpoint needs no Mimi weights then)")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="do not time moshi beside")
    p.add_argument("--capacity", action="store_true",
                   help="also search the most concurrent streams whose p50 step (Mimi included) fits one frame "
                        "(doubling from the largest batch that fits, then bisection; bounded by the KV memory)")
    p.add_argument("--frame-ms", type=_frame_ms, default=FRAME_S * 1e3, help="step budget for --capacity (default 80)")
    p.add_argument("--output", default="benchmarks/results/bench.jsonl",
                   help="JSON lines file to append to (default: %(default)s)")
    p.set_defaults(func=run_cli)


def _capacity_search(model, mimi, name, rows, args, engine_kw, timer, weights, bar) -> tuple[int, int]:
    """Search the capacity of one model; probes are appended to ``rows`` (``extra["capacity_probe"]``)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        own, _, page = _condition_layout(model)
        limit = kv_capacity(model.cfg, engine_kw["kv_dtype"] or next(model.parameters()).dtype, memory, weights,
                            page_size=engine_kw["page_size"], mimi_bytes=_mimi_stream_bytes(model, mimi),
                            condition_rows=own * page, condition_dtype=next(model.transformer.parameters()).dtype)
    fitting = [r.batch for r in rows if r.model == name and r.system == "dsm" and r.p50_ms <= args.frame_ms]
    if device.type != "cuda":  # no KV bound worked out on a CPU: a search bound, never below a measured fit
        limit = max([64, *fitting])  # (max(64, *[]) is max(64): a TypeError when no measured batch fits)
    steps = 10 if device.type == "cuda" else 2

    def measure(n: int) -> float:
        r = _bench_or_oom(model, mimi, n, steps, 2, timer, **engine_kw)
        r.model, r.extra["capacity_probe"] = name, True
        rows.append(r)
        bar.write(format_table([r]).splitlines()[2])
        _release(device)
        return r.p50_ms

    n, _ = search_capacity(measure, max(fitting, default=1), max(1, limit), args.frame_ms)
    return n, limit


def run_cli(args) -> int:
    from tqdm import tqdm

    from .cli_args import device_or_default
    from .mimi import Mimi, random_mimi_state_dict
    from .model import default_dtype
    from .presets import preset_config

    device = device_or_default(args.device)
    gpu = device.type == "cuda"
    dtype = args.dtype or default_dtype(device)
    batches = args.batch or ([1, 8, 64, 256] if gpu else [1, 2])
    steps = args.steps or (50 if gpu else 4)  # parsed as >= 1
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    timer = _timer(device)
    models: list[tuple[str, Callable[[], tuple]]] = []
    if (args.checkpoint or args.hf_repo) and args.preset:
        print("dsm bench: error: give --preset or --checkpoint/--hf-repo, not both", file=sys.stderr)
        return 2
    if (args.checkpoint or args.hf_repo) and args.random_weights:  # it was ignored: the checkpoint's weights ran
        print("dsm bench: error: --random-weights goes with --preset (a checkpoint benchmarks its own weights)",
              file=sys.stderr)
        return 2
    if args.preset and (twice := sorted({p for p in args.preset if args.preset.count(p) > 1})):
        # its rows would be measured twice and mixed in one capacity (the rows are told apart by model name)
        print(f"dsm bench: error: argument --preset: {', '.join(twice)} given twice (give each preset once)",
              file=sys.stderr)
        return 2
    if (why := check_output(args.output)) is not None:
        print(f"dsm bench: error: {why}", file=sys.stderr)
        return 2
    if args.backend and (why := dsm_kernels.backend_unavailable(args.backend, device)) is not None:
        print(f"dsm bench: error: {why}", file=sys.stderr)
        return 2
    if args.checkpoint or args.hf_repo:
        from .checkpoint import check_model_files, resolve_checkpoint
        from .model import LMModel

        # no Mimi under --no-mimi: a checkpoint without its weights benchmarks its LM, and none is fetched
        files = resolve_checkpoint(args.checkpoint, args.hf_repo, revision=args.revision, mimi=args.mimi,
                                   tokenizer=False)
        if args.mimi:
            check_model_files(files, None)  # before any weight is read: codes Mimi has
        models.append((files.source, lambda: (LMModel.from_checkpoint(files, device=device, dtype=dtype),
                                              Mimi.from_file(files.mimi_weights, device=device) if args.mimi
                                              else None)))
    else:
        names = args.preset or (["stt-1b-en_fr", "stt-2.6b-en", "tts-1.6b-en_fr"] if gpu else ["tiny-stt", "tiny-tts"])
        for name in names:
            models.append((name, lambda n=name: (random_model(preset_config(n), device, dtype)[0],
                                                 Mimi(random_mimi_state_dict(0), device=device) if args.mimi
                                                 else None)))
    kv_dtype = KV_DTYPES[args.kv_dtype] if args.kv_dtype else None
    engine_kw = {"kv_dtype": kv_dtype, "backend": args.backend, "page_size": args.page_size}
    kv_lines: list[str] = []
    rows: list[BenchRow] = []
    searched: dict[str, tuple[int, int]] = {}
    reference = args.reference and importlib.util.find_spec("moshi") is not None
    if args.reference and not reference:
        print("moshi is not installed: no reference rows (pip install --no-deps moshi==0.2.13 to time it beside)")
    total = len(models) * len(batches) * (warmup + steps) * (2 if reference else 1)
    with tqdm(total=total, desc="dsm bench", unit="step") as bar:
        for name, load in models:
            model, mimi = load()
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            own, _, page = _condition_layout(model)
            caps = {k: kv_capacity(model.cfg, dt, 80 * 10**9, weights, page_size=args.page_size,
                                   condition_rows=own * page, mimi_bytes=_mimi_stream_bytes(model, mimi),
                                   condition_dtype=next(model.transformer.parameters()).dtype)
                    for k, dt in KV_DTYPES.items()}
            state = "Mimi's state included" if mimi is not None else "LM only: --no-mimi"
            kv_lines.append(f"{name}: KV capacity on an 80 GB H100 at full context ({weights / 1e9:.2f} GB weights, "
                            f"8 GiB reserve, {state}): bf16 {caps['bf16']} streams, fp8 {caps['fp8']} streams "
                            f"(x{caps['fp8'] / max(caps['bf16'], 1):.2f})")
            for b in batches:
                r = _bench_or_oom(model, mimi, b, steps, warmup, timer, bar, **engine_kw)
                r.model = name
                rows.append(r)
                bar.write(format_table([r]).splitlines()[2])  # each row as soon as it exists
                _release(device)
                if reference:
                    ref = _or_oom("moshi", b, device, partial(bench_moshi, model, b, steps, warmup, timer, bar))
                    if ref is not None:
                        ref.model = name
                        rows.append(ref)
                        bar.write(format_table([ref]).splitlines()[2])
                    _release(device)
            if args.capacity:
                searched[name] = _capacity_search(model, mimi, name, rows, args, engine_kw, timer, weights, bar)
            del model, mimi
            _release(device)
    print(format_table(rows))
    for text in (format_ttfa(rows), format_condition_pages(rows)):
        if text:
            print(text)
    capacities = {}
    for name, _ in models:
        mine = [r for r in rows if r.model == name and r.system == "dsm"]
        if name in searched:
            n, limit = searched[name]
            capacities[name] = {"streams": n, "searched": True, "kv_limit": limit if gpu else None}
            bound = f"KV memory allows {limit}" if gpu else f"searched up to {limit} on a CPU"
            print(f"{name}: capacity {n} streams with p50 step <= {args.frame_ms:g} ms"
                  f"{', Mimi included' if args.mimi else ' (LM only)'} (searched; {bound})")
        else:
            capacities[name] = {"streams": capacity(mine, args.frame_ms), "searched": False}
            print(f"{name}: capacity {capacities[name]['streams']} streams within {args.frame_ms:g} ms per step "
                  "(largest measured batch)")
    print("\n".join(kv_lines))
    env = environment(device)
    try:
        append_results(args.output, rows, env, {"dtype": str(dtype), "kv_dtype": str(kv_dtype or dtype),
                                                "page_size": args.page_size, "steps": steps,
                                                "backend": args.backend or dsm_kernels.default_backend(device),
                                                "warmup": warmup, "mimi": args.mimi, "frame_ms": args.frame_ms,
                                                "capacity": capacities})
    except OSError as e:  # checked before the run, but the disk can fill since: the table above is the result
        print(f"dsm bench: error: cannot append to --output {args.output!r}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"appended to {args.output} ({env['device']}, torch {env['torch']}, commit {env['commit']})")
    return 0
