"""Accuracy cost of the fp8 (e4m3) KV cache: greedy-token agreement of an fp8-KV engine with a bf16-KV engine.

Same random-weight model, same random inputs, greedy decoding (``use_sampling=False``), ``streams`` slots, ``steps``
frames (several context wraps). Two numbers per model:

* ``free_running``: both engines consume their own tokens; fraction of (step, stream, token) positions that agree,
  and the first step where any token differs (errors compound after a divergence).
* ``teacher_forced``: the fp8 engine is fed the bf16 engine's text/audio tokens (``on_text`` hook and
  ``depformer_replace_tokens``), so every step compares the argmax under the same history; text and audio (the
  depformer's codebooks, TTS) are reported separately.

The same numbers for a bf16 KV cache against an fp32 one, both under the same weights in fp32 (``bf16_vs_fp32_*``;
with a bf16 LM the K/V are bf16 values already, which fp32 storage holds exactly), give the scale: random weights
have small logit margins, so greedy tokens flip under small roundings, and fp8's cost is read against bf16's own.

STT-like models take random audio codes as inputs; TTS-like models run the depformer. On a CPU the tiny presets are
used (``tiny-stt``, ``tiny-tts``; tiny random weights, so the numbers say little about real checkpoints), on a GPU the
released presets. A JSON row per model is appended to ``benchmarks/results/fp8_kv.jsonl``.

    python benchmarks/bench_fp8_kv.py [--preset tiny-stt --preset tiny-tts] [--steps N] [--streams B]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dsm_kernels
from dsm.bench import _random_conditions, append_jsonl, check_output, environment, random_model
from dsm.cli_args import positive_int
from dsm.engine import Engine
from dsm.presets import PRESETS, preset_config

FP8 = torch.float8_e4m3fn


def _engine(model, kv_dtype, streams):
    eng = Engine(model, max_slots=streams, buckets=(streams,), kv_dtype=kv_dtype, use_sampling=False)
    for s in range(streams):
        eng.open(conditions=_random_conditions(model, s), seed=s)
    return eng


def agreement(model, steps: int, streams: int, seed: int = 0, ref_kv: torch.dtype = torch.bfloat16,
              kv: torch.dtype = FP8) -> dict:
    """Greedy-token agreement of an engine with a ``kv`` KV cache against one with ``ref_kv``."""
    cfg, dq = model.cfg, model.cfg.dep_q
    n_in = cfg.num_codebooks - dq - 1
    dev = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    inputs = torch.randint(0, cfg.card, (steps, streams, n_in), generator=g).to(dev) if n_in else None
    ref, free, forced = (_engine(model, dt, streams) for dt in (ref_kv, kv, kv))
    same = total = text_ok = audio_ok = audio_n = 0
    first_div = None
    for t in range(steps):
        inp = inputs[t] if inputs is not None else None
        seen = {}

        def keep(name, d=seen):
            return lambda x: d.__setitem__(name, x.clone())

        ref.step(inp, on_text=keep("text"), on_audio=keep("audio") if dq else None)
        free.step(inp, on_text=keep("free_text"), on_audio=keep("free_audio") if dq else None)
        frame = [seen["text"][:, None] == seen["free_text"][:, None]]
        if dq:
            frame.append(seen["audio"] == seen["free_audio"])
        eq = torch.cat(frame, dim=1)
        same, total = same + int(eq.sum()), total + eq.numel()
        if first_div is None and not bool(eq.all()):
            first_div = t

        def force(name, d=seen):  # record the tested engine's own choice, then feed it the reference's tokens
            def hook(x):
                d["forced_" + name] = x.clone()
                x.copy_(d[name])

            return hook

        forced.step(inp, on_text=force("text"), on_audio=force("audio") if dq else None)
        text_ok += int((seen["forced_text"] == seen["text"]).sum())
        if dq:
            audio_ok += int((seen["forced_audio"] == seen["audio"]).sum())
            audio_n += seen["audio"].numel()
    return {
        "free_running_agreement": same / total,
        "first_divergence_step": first_div,
        "teacher_forced_text_agreement": text_ok / (steps * streams),
        "teacher_forced_audio_agreement": audio_ok / audio_n if audio_n else None,
    }


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", action="append", choices=PRESETS,
                   help="repeatable (default GPU: the released presets; CPU: tiny-stt, tiny-tts)")
    p.add_argument("--steps", type=positive_int, default=None, help="frames per run (default: 4 context windows)")
    p.add_argument("--streams", type=positive_int, default=None, help="streams per engine (default GPU 8, CPU 4)")
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "fp8_kv.jsonl"))
    args = p.parse_args(argv)
    if (why := check_output(args.output)) is not None:  # before the run, not a traceback after its first model
        p.error(why)
    device = "cuda" if gpu else "cpu"
    presets = args.preset or (["stt-1b-en_fr", "stt-2.6b-en", "tts-1.6b-en_fr"] if gpu else ["tiny-stt", "tiny-tts"])
    streams = (8 if gpu else 4) if args.streams is None else args.streams
    env = environment()
    out = Path(args.output)
    for name in presets:
        model = random_model(preset_config(name), device, torch.bfloat16)[0]
        steps = 4 * model.cfg.context if args.steps is None else args.steps
        res = agreement(model, steps, streams)
        model.float()  # in place: the same weights in fp32, whose K/V bf16 storage does round
        base = agreement(model, steps, streams, ref_kv=torch.float32, kv=torch.bfloat16)
        res.update({f"bf16_vs_fp32_{k}": v for k, v in base.items()})
        row = {
            **env,
            "bench": "fp8_kv_agreement",
            "model": name,
            "weights": "random (dsm.bench.random_model)",
            "note": f"{device.upper()}, {name} shapes with random weights, {dsm_kernels.default_backend(device)} "
                    "kernels",
            "lm_dtype": "bfloat16 (fp32 for the bf16_vs_fp32 figures)",
            "kv_dtypes": ["bfloat16", "float8_e4m3fn"],
            "greedy": True,
            "streams": streams,
            "steps": steps,
            "context": model.cfg.context,
            **res,
        }
        print(json.dumps({k: row[k] for k in ("model", "steps", "streams", *res)}))
        append_jsonl(out, [row])
        del model
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
