"""The benchmark scripts the GPU script runs (scripts/gpu_check.sh), each in its CPU smoke mode: GPU time is scarce, so
a script that crashes, or whose providers fail and are reported as errors, must fail here first.

Each run is a process of its own, started at collection in conftest's background queue (beside the other tests)."""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _cmd(name: str, out_dir: Path) -> list[str]:
    out = str(out_dir / f"{name}.jsonl")
    py = [sys.executable]
    return {
        # every kernel's torch baseline, the attention at two page sizes and both KV dtypes
        "kernels_torch": py + [str(BENCH / "bench_kernels.py"), "--device", "cpu", "--batch", "1", "--no-compile",
                               "--providers", "torch", "--iters", "3", "--page-sizes", "16", "64",
                               "--kv-dtypes", "bf16", "fp8", "--grids", "2", "--out", out],
        # the Triton attention (interpreted) through the same plumbing, with a split-K override
        "kernels_triton": py + [str(BENCH / "bench_kernels.py"), "--device", "cpu", "--batch", "1", "--no-compile",
                                "--kernels", "attention", "--providers", "triton", "--iters", "3",
                                "--page-sizes", "32", "--kv-dtypes", "fp8", "--attention-splits", "2", "--out", out],
        "decoder": py + [str(BENCH / "bench_decoder.py"), "--device", "cpu", "--small", "--batch", "1", "--iters", "1",
                         "--grids", "2", "--providers", "triton", "--out", out],
        "depformer": py + [str(BENCH / "bench_depformer.py"), "--device", "cpu", "--small", "--batch", "1",
                           "--iters", "1", "--providers", "ref_eager", "triton_gemv", "--grids", "2", "--out", out],
        "fp8_kv": py + [str(BENCH / "bench_fp8_kv.py"), "--preset", "tiny-stt", "--steps", "4", "--streams", "2",
                        "--output", out],
        "profile": py + [str(BENCH / "profile_step.py"), "--device", "cpu", "--preset", "tiny-stt", "--steps", "1",
                         "--top", "3"],
        "runtime_stt": py + [str(BENCH / "bench_runtime.py"), "--device", "cpu", "--preset", "tiny-stt", "--streams",
                             "2", "--frames-per-call", "1", "4", "--calls", "2", "--output", out],
        "runtime_tts": py + [str(BENCH / "bench_runtime.py"), "--device", "cpu", "--preset", "tiny-tts", "--streams",
                             "2", "--frames", "3", "--output", out],
        # the servers under load over real sockets, each started by the script in a process of its own
        "serve_stt": py + [str(BENCH / "bench_serve.py"), "stt", "--clients", "2", "--seconds", "1.5", "--drain", "30",
                           "--serve", "--preset tiny-stt --random-weights --device cpu", "--capacity",
                           "--max-clients", "2", "--output", out],
        "serve_tts": py + [str(BENCH / "bench_serve.py"), "tts", "--clients", "2", "--text", "Hello there.",
                           "--serve", "--preset tiny-tts --random-weights --device cpu", "--output", out],
    }[name]


SCRIPTS = ["kernels_torch", "kernels_triton", "decoder", "depformer", "fp8_kv", "profile", "runtime_stt", "runtime_tts",
           "serve_stt", "serve_tts"]
_ENV = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}


def background_jobs(test: str, params: dict, out_dir: Path):
    if test == "test_benchmark_script_runs_on_the_cpu":
        return [(("bench", params["name"]), _cmd(params["name"], out_dir), _ENV, 600)]
    return []


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_runs_on_the_cpu(name, background):
    rc, out, err = background(("bench", name), _cmd(name, background.dir), _ENV, 600)
    assert rc == 0, (out + err)[-4000:]
    if name == "profile":
        assert "tiny-stt batch 1:" in out and "calls per step" in out, out[-2000:]
        return
    rows = _rows(background.dir / f"{name}.jsonl")
    if name == "serve_stt":  # --capacity --max-clients 2: probes below the 2-client row if it did not keep up
        capacity = [r for r in rows if r["bench"] == "serve-stt-capacity"]
        assert len(capacity) == 1 and 0 <= capacity[0]["capacity"] <= 2 and capacity[0]["limit"] == 2, capacity
        assert (capacity[0]["capacity"] == 2) == rows[0]["keeps_up"], rows
        rows = [r for r in rows if r["bench"] == "serve-stt" and not r.get("capacity_probe")]
    assert rows and not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    keys = ("ms", "ms_per_step", "ms_per_frame", "runtime_ms", "frame_p50_ms", "ttfa_p50_ms")
    timed = [next((r[k] for k in keys if k in r), None) for r in rows]
    if name != "fp8_kv":
        assert all(t is not None and t > 0 for t in timed), timed  # nan fails too
    if name.startswith("kernels"):
        assert {r["timing"] for r in rows} == {"perf_counter"}  # no CUDA events on a CPU
    if name == "kernels_torch":
        assert {r["kernel"] for r in rows} == {"embed", "attention", "voice", "sampling", "gemv", "conv", "convtr",
                                               "rvq", "vad", "frame"}
        shapes = {r["shape"] for r in rows if r["kernel"] == "attention"}
        assert {"stt-1b", "stt-1b/fp8", "stt-1b/p64", "stt-1b/p64/fp8"} <= shapes, shapes
    if name == "kernels_triton":
        assert {(r["shape"], r["provider"]) for r in rows if r["shape"].startswith("stt-1b")} == {
            ("stt-1b/p32/fp8", "triton"), ("stt-1b/p32/fp8", "triton:s2")}
    if name == "depformer":
        assert {r["provider"] for r in rows} == {"ref_eager", "triton_gemv_interp"}
    if name == "decoder":
        assert {r["provider"] for r in rows} == {"triton_interp"}
    if name == "runtime_stt":
        assert [(r["streams"], r["frames_per_call"]) for r in rows] == [(2, 1), (2, 4)]
        assert all(r["stepper_ms"] > 0 and r["overlap_ms"] > 0 and r["rtfx"] > 0 for r in rows), rows
        assert all(abs(r["rtf"] * r["rtfx"] - 1) < 1e-9 for r in rows), rows  # of the streams' audio, not one's
    if name == "runtime_tts":
        assert [r["streams"] for r in rows] == [2] and rows[0]["frame_p99_ms"] >= rows[0]["frame_p50_ms"]
        assert rows[0]["ttfa_p50_ms"] > 0
        assert rows[0]["rtf"] == rows[0]["frame_p50_ms"] / (80.0 * 2)  # a frame's step runs both streams' 80 ms
    if name.startswith("serve"):  # every client served to the end; the server's build_info in the row
        assert [(r["clients"], r["served"], r["errors"]) for r in rows] == [(2, 2, 0)], rows
        assert rows[0]["server"]["device"] == "cpu" and rows[0]["frames"] > 0, rows
    if name == "serve_stt":  # tiny-stt has VAD heads: a Step per frame, matched to the frames sent
        assert rows[0]["lost_markers"] == 0 and rows[0]["extra_steps"] == 0, rows
        assert 0 < rows[0]["frame_p50_ms"] <= rows[0]["frame_p99_ms"] and rows[0]["marker_p50_ms"] > 0, rows


def _module(name: str, monkeypatch):
    """A benchmark script as a module of this process, for its flag checks (they run before anything is built).
    With TRITON_INTERPRET=1 as the suite runs (count_step_launches sets it on import; restored after the test)."""
    import importlib.util

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import each other as `python benchmarks/x.py` lets them
    spec = importlib.util.spec_from_file_location(f"_flags_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


BAD_FLAGS = [  # (script, argv, what the error line says after "error: ")
    ("count_mimi_ops", ["--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    ("count_mimi_ops", ["--top", "-1"], "argument --top: expected a positive integer, got '-1'"),
    ("count_mimi_ops", ["--backend", "fast"], "argument --backend: invalid choice: 'fast'"),
    ("count_mimi_ops", ["--backend", "cuda"], "argument --backend: kernel backend 'cuda' is not available on cpu"),
    ("count_step_launches", ["--layers", "0"], "argument --layers: expected a positive integer, got '0'"),
    ("count_step_launches", ["--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    ("count_step_launches", ["--preset", "stt-1b"], "argument --preset: invalid choice: 'stt-1b'"),
    ("profile_step", ["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    ("profile_step", ["--batch", "-2"], "argument --batch: expected a positive integer, got '-2'"),
    ("profile_step", ["--top", "0"], "argument --top: expected a positive integer, got '0'"),
    ("profile_step", ["--preset", "tiny"], "argument --preset: invalid choice: 'tiny'"),
    ("profile_step", ["--device", "tpu"], "argument --device: unknown device 'tpu'"),
    ("profile_step", ["--mimi", "--preset", "tiny-stt"], "argument --preset: not with --mimi"),
    ("bench_decoder", ["--layout", "stt-1b", "stt_2.6b"], "argument --layout: invalid choice: 'stt_2.6b'"),
    ("bench_decoder", ["--small", "--batch", "1", "0"], "argument --batch: expected a positive integer, got '0'"),
    ("bench_decoder", ["--small", "--iters", "0"], "argument --iters: expected a positive integer, got '0'"),
    ("bench_decoder", ["--small", "--grids", "-1"], "argument --grids: expected a positive integer, got '-1'"),
    ("bench_decoder", ["--small", "--layout", "stt-1b"], "argument --layout: not with --small"),
    ("bench_decoder", ["--device", "cpu", "--layout", "stt-1b"],
     "on cpu the decode step runs in the Triton interpreter, at the --small shapes only: TRITON_INTERPRET=1 python "
     "benchmarks/bench_decoder.py --device cpu --small"),
    ("bench_depformer", ["--small", "--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    ("bench_depformer", ["--small", "--iters", "0"], "argument --iters: expected a positive integer, got '0'"),
    ("bench_depformer", ["--small", "--grids", "0"], "argument --grids: expected a positive integer, got '0'"),
    ("bench_depformer", ["--device", "cpu"],
     "on cpu the depth transformer runs in the Triton interpreter, at the --small shapes only: TRITON_INTERPRET=1 "
     "python benchmarks/bench_depformer.py --device cpu --small"),
    ("bench_kernels", ["--page-sizes", "16", "0"], "argument --page-sizes: expected a positive integer, got '0'"),
    ("bench_kernels", ["--batch", "0"], "argument --batch: expected a positive integer, got '0'"),
    ("bench_kernels", ["--iters", "0"], "argument --iters: expected a positive integer, got '0'"),
    ("bench_kernels", ["--attention-splits", "0"], "argument --attention-splits: expected a positive integer"),
    ("bench_kernels", ["--grids", "0"], "argument --grids: expected a positive integer, got '0'"),
    ("bench_kernels", ["--reference-max-batch", "-1"], "argument --reference-max-batch: expected an integer >= 0"),
    ("bench_kernels", ["--device", "gpu"], "argument --device: unknown device 'gpu'"),
    ("bench_kernels", ["--device", "cpu", "--providers", "cuda"],
     "argument --providers: nothing to time: cuda: kernel backend 'cuda' is not available on cpu"),
    ("bench_kernels", ["--providers", "compile", "--no-compile"],
     "argument --providers: nothing to time: compile: --no-compile was given"),
    ("bench_kernels", ["--providers", "reference", "--batch", "65", "400"],
     "argument --providers: nothing to time: reference: --reference-max-batch 64 is below every --batch"),
    ("bench_serve", ["stt", "--clients", "1", "0"], "argument --clients: expected a positive integer, got '0'"),
    ("bench_serve", ["stt", "--capacity", "--max-clients", "0"], "argument --max-clients: expected a positive"),
    ("bench_serve", ["stt", "--seconds", "0"], "argument --seconds: expected a time in seconds > 0, got '0'"),
    ("bench_serve", ["stt", "--seconds", "nan"], "argument --seconds: expected a time in seconds > 0, got 'nan'"),
    ("bench_serve", ["stt", "--drain", "-1"], "argument --drain: expected a time in seconds >= 0, got '-1'"),
    ("bench_serve", ["tts", "--jitter-buffer", "inf"], "argument --jitter-buffer: expected a time in seconds >= 0"),
    ("bench_serve", ["stt", "--ramp", "nan"], "argument --ramp: expected a time in seconds >= 0, got 'nan'"),
    ("bench_serve", ["stt", "--startup-timeout", "0"], "argument --startup-timeout: expected a time in seconds > 0"),
    ("bench_serve", ["tts", "--url", "localhost:8080"], "--url 'localhost:8080': expected ws://HOST:PORT"),
    ("bench_serve", ["stt", "--output", "/"], "cannot write --output '/'"),
    ("bench_mimi", ["--batch", "1", "0"], "argument --batch: expected a positive integer, got '0'"),
    ("bench_mimi", ["--n-q", "33"], "argument --n-q: expected a codebook count in 1..32, got '33'"),
    ("bench_mimi", ["--threads", "-1"], "argument --threads: expected a positive integer, got '-1'"),
    ("bench_mimi", ["--agree-frames", "-1"], "argument --agree-frames: expected an integer >= 0, got '-1'"),
    ("bench_mimi", ["--device", "cpu", "--out", "/"], "cannot write --out '/'"),
    ("bench_runtime", ["--preset", "tiny"], "argument --preset: invalid choice: 'tiny'"),
    ("bench_runtime", ["--streams", "0"], "argument --streams: expected a positive integer, got '0'"),
    ("bench_runtime", ["--frames-per-call", "0"], "argument --frames-per-call: expected a positive integer"),
    ("bench_runtime", ["--calls", "0"], "argument --calls: expected a positive integer, got '0'"),
    ("bench_runtime", ["--frames", "0"], "argument --frames: expected a positive integer, got '0'"),
    ("bench_runtime", ["--slots", "0"], "argument --slots: expected a positive integer, got '0'"),
    ("bench_runtime", ["--streams", "1", "8", "--slots", "4"], "argument --slots: 4 slots cannot hold --streams 8"),
    ("bench_runtime", ["--device", "mps"], "argument --device: device 'mps': dsm runs on cpu or cuda"),
    ("bench_host", ["--streams", "64", "0"], "argument --streams: expected a positive integer, got '0'"),
    ("bench_host", ["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    ("bench_fp8_kv", ["--preset", "tiny"], "argument --preset: invalid choice: 'tiny'"),
    ("bench_fp8_kv", ["--preset", "tiny-stt", "--output", "/"], "cannot write --output '/'"),
]


@pytest.mark.parametrize(("script", "argv", "message"), BAD_FLAGS,
                         ids=[f"{s}{''.join(a)}" for s, a, _ in BAD_FLAGS])
def test_benchmark_script_refuses_a_bad_flag(script, argv, message, capsys, monkeypatch):
    """A bad value is one usage error naming its flag, exit 2, before any model or weight is built (they were
    tracebacks, or runs that divided by zero at the end, or a silent run of nothing)."""
    mod = _module(script, monkeypatch)
    if hasattr(mod, "append_jsonl"):  # a case that is not refused must not append to the recorded GPU results
        monkeypatch.setattr(mod, "append_jsonl", lambda *a, **k: pytest.fail(f"{script} {argv} ran and wrote rows"))
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {message}" in err and "Traceback" not in err, err


def test_count_mimi_ops_says_how_to_count_the_triton_kernels_on_a_cpu(capsys, monkeypatch):
    """--backend triton without TRITON_INTERPRET (the count runs on the CPU) was a RuntimeError from deep in Mimi;
    it is a usage error with the command that works."""
    mod = _module("count_mimi_ops", monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(SystemExit) as e:
        mod.main(["--backend", "triton"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --backend: kernel backend 'triton' is not available on cpu" in err, err
    assert "TRITON_INTERPRET=1 python benchmarks/count_mimi_ops.py --backend triton" in err, err


def test_profile_step_defaults_to_the_machines_device(monkeypatch):
    """Without --device the profile ran on cuda, a traceback on a CPU machine; it is cuda where there is one, else
    the CPU with the tiny presets (as dsm bench): checked at the first model it builds."""
    import torch

    mod = _module("profile_step", monkeypatch)
    built = []

    def random_model(cfg, device, dtype):
        built.append((torch.device(device).type, dtype, cfg))
        raise KeyboardInterrupt  # stop there: nothing is built

    monkeypatch.setattr(mod, "random_model", random_model)
    with pytest.raises(KeyboardInterrupt):
        mod.main([])
    from dsm.presets import preset_config

    gpu = torch.cuda.is_available()
    assert built == [("cuda", torch.bfloat16, preset_config("stt-1b-en_fr")) if gpu else
                     ("cpu", torch.float32, preset_config("tiny-stt"))]


@pytest.mark.parametrize("script", ["bench_decoder", "bench_depformer"])
def test_decoder_and_depformer_benchmarks_on_a_cpu_say_how_to_run_them(script, tmp_path, capsys, monkeypatch):
    """Their default device was cuda: on a CPU machine a traceback (torch not compiled with CUDA) after the imports.
    It is cuda where there is one, else the CPU, where they need the interpreter and --small (the real shapes'
    weights are GBs, interpreted) and say so; --out is checked before the run as in the other scripts."""
    import torch

    mod = _module(script, monkeypatch)

    def refused(argv) -> str:
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err

    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET")
        err = refused(["--small"])  # the default device: the CPU, without the interpreter
        assert "runs in the Triton interpreter" in err and "TRITON_INTERPRET=1 python" in err, err
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    (tmp_path / "f").write_text("")
    err = refused(["--device", "cpu", "--small", "--out", str(tmp_path / "f" / "rows.jsonl")])
    assert "error: cannot write --out" in err and not (tmp_path / "f" / "rows.jsonl").exists(), err


def test_bench_kernels_defaults_to_the_machines_device_and_checks_out(tmp_path, capsys, monkeypatch):
    """Its default device was cuda (a traceback on a CPU machine), and --out was first opened after the first
    measurement: cuda where there is one, else the CPU; an unwritable --out is a usage error before anything runs."""
    import torch

    mod = _module("bench_kernels", monkeypatch)
    seen = []

    def copy_bandwidth_gbps(device):  # the first thing the run measures
        seen.append(torch.device(device).type)
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "copy_bandwidth_gbps", copy_bandwidth_gbps)
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--out", str(tmp_path / "k.jsonl")])
    assert seen == ["cuda" if torch.cuda.is_available() else "cpu"]
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(tmp_path)])  # a directory
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: cannot write --out" in err and seen == [seen[0]], err


def test_bench_kernels_says_which_providers_it_cannot_time(tmp_path, capsys, monkeypatch):
    """--providers cuda without the extension was dropped without a word; beside a provider that runs, the run goes
    on (a GPU run whose CUDA build failed keeps its Triton rows) and says so."""
    mod = _module("bench_kernels", monkeypatch)

    def copy_bandwidth_gbps(device):  # the first measurement: stop there
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "copy_bandwidth_gbps", copy_bandwidth_gbps)
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--device", "cpu", "--providers", "torch", "cuda", "--out", str(tmp_path / "k.jsonl")])
    out = capsys.readouterr().out
    assert "# provider cuda not timed: kernel backend 'cuda' is not available on cpu" in out, out


def test_the_next_gpu_runs_steps_exist_in_the_gpu_script():
    """benchmarks/NOTES.md's command for the next GPU run names the steps to run (DSM_GPU_ONLY); a name the script
    does not have is silently never run, found out only after the device time is spent."""
    import re

    notes = (ROOT / "benchmarks" / "NOTES.md").read_text()
    names = re.search(r'DSM_GPU_ONLY="([^"]+)"', notes).group(1).replace("\\\n", " ").split()
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    steps = set(re.findall(r"(?:^|\|\|\s*|if )\s*step (\w+) \d+ \d+ ", script, re.M))
    assert len(names) > 20 and "build" in steps and "serve_stt" in steps, (names, steps)
    assert [n for n in names if n not in steps] == []


def test_every_gpu_test_file_runs_in_a_gpu_step():
    """A test file with GPU-marked tests that no step of the GPU script names (itself or its folder) is never run on
    a device: its tests skip in CI and nowhere else runs them (tests/test_mimi_graph.py's graph replays were such)."""
    import re

    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    gpu = re.compile(r"^\s*@pytest\.mark\.gpu|marks=pytest\.mark\.gpu|^pytestmark = pytest\.mark\.gpu", re.M)
    marked = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "tests").rglob("test_*.py"))
              if gpu.search(p.read_text())]
    assert len(marked) > 10, marked
    missed = [f for f in marked if f not in script and not any(f"{d} " in script or f"{d}\n" in script
                                                               for d in ("tests/kernels", "tests/model")
                                                               if f.startswith(d + "/"))]
    assert missed == []
