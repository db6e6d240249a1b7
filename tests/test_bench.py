"""`dsm bench` runs end to end on a CPU preset and appends a result row with the environment."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dsm.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """A benchmark script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_cli_smoke(tmp_path, capsys, monkeypatch):
    from dsm import bench

    out, pages = tmp_path / "bench.jsonl", []
    real = bench._engine_for

    def engine_for(*args, **kw):
        eng = real(*args, **kw)
        pages.append(eng.state.kv.page_size)
        return eng

    monkeypatch.setattr(bench, "_engine_for", engine_for)
    rc = main(["bench", "--preset", "tiny-stt", "--batch", "1,2", "--steps", "2", "--warmup", "0", "--no-mimi",
               "--page-size", "8", "--output", str(out)])
    assert rc == 0
    assert pages == [8, 8]  # every engine the run built has the asked page size
    text = capsys.readouterr().out
    assert "rtf" in text and "rtfx" in text and "capacity" in text
    row = json.loads(out.read_text().splitlines()[-1])
    assert {"device", "torch", "commit"} <= set(row) and row["backend"] == "reference"  # a CPU's default
    assert row["page_size"] == 8
    systems = {(r["system"], r["batch"]) for r in row["rows"]}
    assert {("dsm", 1), ("dsm", 2), ("moshi", 1), ("moshi", 2)} <= systems
    for r in row["rows"]:
        assert r["p50_ms"] > 0 and r["rtfx"] > 0
    assert "moshi rows: LMGen step only" in text and "moshi is not installed" not in text


def test_bench_without_moshi_says_so_once(tmp_path, capsys, monkeypatch):
    """The README's install has no moshi: one line says there are no reference rows, and the table does not
    describe moshi rows it does not have."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "moshi" else real(name, *a))
    rc = main(["bench", "--preset", "tiny-stt", "--batch", "1", "--steps", "1", "--warmup", "0", "--no-mimi",
               "--output", str(tmp_path / "bench.jsonl")])
    text = capsys.readouterr().out
    assert rc == 0 and text.count("moshi is not installed") == 1 and "moshi rows:" not in text
    row = json.loads((tmp_path / "bench.jsonl").read_text())
    assert {r["system"] for r in row["rows"]} == {"dsm"}


@pytest.mark.parametrize(("flag", "value"), [("--batch", "0"), ("--batch", "1,,2"), ("--batch", "abc"),
                                             ("--steps", "0"), ("--steps", "-1"), ("--warmup", "-3"),
                                             ("--page-size", "0"),
                                             ("--frame-ms", "0"), ("--frame-ms", "nan")])
def test_bench_rejects_bad_counts(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "tiny-stt", flag, value])
    assert e.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err


def test_bench_preset_and_checkpoint_are_exclusive(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny-stt", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "r")]) == 2
    assert "not both" in capsys.readouterr().err
    # a checkpoint's own weights are benchmarked: --random-weights beside it was ignored without a word
    assert main(["bench", "--checkpoint", str(tmp_path), "--random-weights", "--output", str(tmp_path / "r")]) == 2
    assert "--random-weights goes with --preset" in capsys.readouterr().err


def test_bench_refuses_a_backend_the_device_lacks(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny-stt", "--backend", "cuda", "--device", "cpu",
                 "--output", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "kernel backend 'cuda' is not available on cpu" in capsys.readouterr().err


def test_search_capacity_finds_the_largest_fitting_batch():
    from dsm.bench import search_capacity

    for true_cap, start, limit in ((700, 64, 2000), (37, 1, 1000), (5000, 256, 1408), (0, 8, 100), (1, 1, 10)):
        calls: list[int] = []

        def measure(n, cap=true_cap, calls=calls):
            calls.append(n)
            return 10.0 + 70.0 * n / cap if cap else 1e9  # 80 ms exactly at the true capacity

        n, seen = search_capacity(measure, start, limit, 80.0, max_probes=16)
        expected = min(true_cap, limit)
        assert n <= expected and n >= expected - max(1, expected // 32), (true_cap, n)
        assert all(seen[k] <= 80.0 for k in seen if k <= n)
        assert len(calls) == len(set(calls)) <= 16  # each batch measured once


def test_time_to_first_audio_times_the_spec_sequence_on_one_warm_engine(monkeypatch, mimi_sd):
    """Every run: open the streams, 16 text-only steps (depth transformer skipped), max_delay + 1 full steps, one
    Mimi decode, close; one engine for all runs, its pages returned, and each run starting from fresh state."""
    import math

    import torch

    from dsm import bench
    from dsm.engine import Engine
    from dsm.generate import Generator
    from dsm.mimi import Mimi
    from dsm.presets import preset_config

    model, _ = bench.random_model(preset_config("tiny-tts"), torch.device("cpu"), torch.float32)
    mimi = Mimi(mimi_sd)  # conftest: random_mimi_state_dict(0)
    log, engines, pcm = [], set(), []

    def wrap(cls, name, record):
        real = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            record(self, args, kwargs, out)
            return out

        monkeypatch.setattr(cls, name, wrapper)

    wrap(Engine, "open", lambda eng, a, k, out: (engines.add(eng), log.append("open")))
    wrap(Engine, "close", lambda eng, a, k, out: log.append(("close", eng.pool.used)))
    wrap(Engine, "step", lambda eng, a, k, out: log.append(
        "full" if k.get("depformer_replace_tokens") is None else "text"))
    wrap(Generator, "depformer", lambda gen, a, k, out: log.append("depformer"))
    wrap(Mimi, "decode_step", lambda m, a, k, out: (log.append("decode"), pcm.append(out.clone())))

    # Each run asks for voices no earlier run used (so it computes their K/V); here they are mapped back onto the
    # first run's, so that every run must decode the same first frame.
    voices, real_conditions, real_cross_kv, cross_kv_calls = [], bench._random_conditions, model.cross_kv, []
    monkeypatch.setattr(bench, "_random_conditions", lambda m, s: (voices.append(s), real_conditions(m, s % 1000))[1])
    monkeypatch.setattr(model, "cross_kv", lambda src: (cross_kv_calls.append(1), real_cross_kv(src))[1])
    batch, runs, max_delay = 2, 2, model.cfg.max_delay
    warm, cold = bench.time_to_first_audio(model, mimi, batch, bench._timer(torch.device("cpu")), runs=runs)

    assert all(math.isfinite(t) and t > 0 for t in (warm, cold))
    assert len(engines) == 1  # built once, reused by every run
    eng = engines.pop()
    assert eng.pool.used == 0 and not eng.slots
    one_run = (["open"] * batch + ["text"] * 16 + ["depformer", "full"] * (max_delay + 1) + ["decode"]
               + [("close", mark) for mark in (1, 0)])
    assert log == one_run * (1 + runs)
    voices = voices[-batch * (1 + runs):]  # those of the runs (the engine's pool sizing asked for some first)
    assert len(set(voices)) == len(voices) == batch * (1 + runs)
    assert len(cross_kv_calls) == batch  # later runs found the (mapped) voices' pages in the engine's pool
    # Same seeds, same slots: a run that starts from fresh engine rows and Mimi state decodes the same first frame.
    assert pcm[0].abs().sum() > 0
    assert all(torch.equal(p, pcm[0]) for p in pcm[1:])


def test_format_ttfa_prints_warm_and_cold():
    from dsm.bench import BenchRow, format_ttfa

    row = BenchRow("dsm", "tts-1.6b-en_fr", 1, 1.0, 1.0, 0.0, 1.0, 1.0,
                   extra={"ttfa_ms": 50.12, "ttfa_cold_ms": 84.04})
    assert format_ttfa([row]) == ("tts-1.6b-en_fr: time to first audio at batch 1: 50.1 ms "
                                  "(warm engine; 84.0 ms cold: the first run, one-time setup and any graph capture "
                                  "included)")
    assert format_ttfa([BenchRow("dsm", "stt", 1, 1.0, 1.0, 0.0, 1.0, 1.0)]) == ""


def _bench_mimi_job(out_dir):
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "bench_mimi.py"), "--device", "cpu", "--batch", "1", "--steps",
           "1", "--warmup", "1", "--no-moshi", "--agree-frames", "2", "--threads", "1", "--out",
           str(out_dir / "mimi.jsonl")]  # fmt: skip
    return "bench_mimi.py smoke", cmd, {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, 600


def background_jobs(test, params, out_dir):
    """bench_mimi.py's smoke run (a process of its own anyway, ~6 s) starts at collection in conftest's background
    queue and runs beside the other tests."""
    return [_bench_mimi_job(out_dir)] if test == "test_bench_mimi_smoke" else []


def test_bench_mimi_smoke(background):
    """benchmarks/bench_mimi.py runs end to end on the CPU (the GPU script's Mimi step): timings, the code agreement
    check, and its JSON row."""
    tmp_path = background.dir
    out = tmp_path / "mimi.jsonl"
    rc, stdout, stderr = background(*_bench_mimi_job(tmp_path))
    assert rc == 0, stderr[-2000:]
    assert "codes equal to the CPU fp32 reference over 2 frames, ours: 100.00%" in stdout
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["rows"][0]["ours"]["encode_ms"] > 0 and row["agreement"]["reference_backend"]["codes"] == 1.0


def test_bench_mimi_variant_restores_switches(monkeypatch):
    import os

    import torch

    mod = _script("bench_mimi")
    monkeypatch.delenv("DSM_GEMV", raising=False)
    monkeypatch.setenv("DSM_CONV_IGEMM", "1")
    tf32 = torch.backends.cudnn.allow_tf32
    with mod.variant("nogemv") as backend:
        assert os.environ["DSM_GEMV"] == "0" and not torch.backends.cudnn.allow_tf32 and backend is None
    with mod.variant("tf32"):
        assert "DSM_GEMV" not in os.environ and torch.backends.cudnn.allow_tf32
        assert os.environ["DSM_CONV_IGEMM"] == "0"  # cuDNN's convolutions, in TF32
    with mod.variant("cudnn"):
        assert os.environ["DSM_CONV_IGEMM"] == "0" and not torch.backends.cudnn.allow_tf32
    with mod.variant("triton") as backend:
        assert backend == "triton"
    assert "DSM_GEMV" not in os.environ and torch.backends.cudnn.allow_tf32 == tf32
    assert os.environ["DSM_CONV_IGEMM"] == "1"
    assert mod.speech_like(3).shape == (1, 1, 3 * 1920)


def test_rtf_and_rtfx_are_reciprocal_at_every_batch():
    """rtf = compute / audio and rtfx = audio / compute over the same audio (batch x 80 ms per step): rtf was one
    step over one stream's 80 ms, so rtf x rtfx came out as the batch size, not 1. Both systems, same arithmetic."""
    import torch

    from dsm import bench
    from dsm.presets import preset_config

    model, _ = bench.random_model(preset_config("tiny-stt"), torch.device("cpu"), torch.float32)

    def timer(fn):  # every step takes 40 ms
        fn()
        return 40.0

    for batch in (1, 4):
        rows = [bench.bench_dsm(model, None, batch, 1, 0, timer), bench.bench_moshi(model, batch, 1, 0, timer)]
        for r in rows:
            assert r.p50_ms == 40.0
            assert r.rtfx == pytest.approx(batch * 80.0 / 40.0), r
            assert r.rtf == pytest.approx(40.0 / (batch * 80.0)), r
    assert bench._rates(0.0, 2) == (0.0, float("inf"))  # a zero-time step divides by nothing


def test_bench_json_row_is_strict_json(tmp_path):
    """NaN/Infinity (an infinite rtfx, say) are not JSON: the row writes them as null."""
    from dsm.bench import BenchRow, append_results

    row = BenchRow("dsm", "m", 1, 0.0, float("nan"), 0.0, 0.0, float("inf"), extra={"ttfa_ms": float("-inf")})
    out = tmp_path / "r" / "bench.jsonl"
    append_results(out, [row], {"device": "cpu"}, {"capacity": {"m": {"streams": 0}}})

    def no_constants(name):
        raise AssertionError(f"{name} in a JSON row")

    got = json.loads(out.read_text(), parse_constant=no_constants)
    assert got["rows"][0]["rtfx"] is None and got["rows"][0]["p99_ms"] is None
    assert got["rows"][0]["extra"]["ttfa_ms"] is None and got["rows"][0]["p50_ms"] == 0.0


def test_environment_names_the_measured_device_and_versions(monkeypatch):
    """A `--device cpu` run on a GPU machine was recorded under the GPU's name; the row also names the versions of
    dsm, the moshi reference and python."""
    import platform

    import torch

    from dsm import __version__
    from dsm.bench import environment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert environment(torch.device("cpu"))["device"] != "Fake GPU"
    assert environment("cuda")["device"] == "Fake GPU"
    assert environment()["device"] == "Fake GPU"
    env = environment(torch.device("cpu"))
    assert env["dsm"] == __version__ and env["python"] == platform.python_version() and env["moshi"]
    assert {"torch", "triton", "commit", "time"} <= set(env)


def test_the_commit_is_dsm_checkouts_never_a_repository_around_an_installed_copy(tmp_path, monkeypatch):
    """dsm installed (not editable) into a venv inside the user's own git project recorded that project's HEAD as
    the commit measured; a checkout with edits not committed was recorded under its HEAD as if clean."""
    import subprocess

    from dsm import bench

    def git(*cmd, cwd):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *cmd], cwd=cwd, check=True,
                       capture_output=True)

    monkeypatch.delenv("DSM_COMMIT", raising=False)
    project = tmp_path / "project"  # the user's repository, dsm inside its venv (ignored or not, it is not dsm's)
    installed = project / ".venv" / "lib" / "site-packages" / "dsm"
    installed.mkdir(parents=True)
    (installed / "bench.py").write_text("")
    git("init", "-q", cwd=project)
    git("add", "-A", cwd=project)
    git("commit", "-qm", "x", cwd=project)
    monkeypatch.setattr(bench, "__file__", str(installed / "bench.py"))
    assert bench.git_commit() == "unknown"

    checkout = tmp_path / "dsm-checkout"  # a dsm checkout: its HEAD, and whether its tracked files were changed
    (checkout / "dsm").mkdir(parents=True)
    (checkout / "dsm" / "bench.py").write_text("a\n")
    git("init", "-q", cwd=checkout)
    git("add", "-A", cwd=checkout)
    git("commit", "-qm", "x", cwd=checkout)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True,
                          check=True).stdout.strip()
    monkeypatch.setattr(bench, "__file__", str(checkout / "dsm" / "bench.py"))
    assert bench.git_commit() == head
    (checkout / "untracked.txt").write_text("")  # results or notes lying around change no code
    assert bench.git_commit() == head
    (checkout / "dsm" / "bench.py").write_text("b\n")
    assert bench.git_commit() == f"{head}-dirty"
    monkeypatch.setenv("DSM_COMMIT", "abc1234")
    assert bench.git_commit() == "abc1234"


def test_search_capacity_is_not_cut_short_while_doubling():
    """From batch 1 (`--batch 1 --capacity`) with a limit of 1400 and a true capacity of 700, the default probe
    budget ran out while every probe still fitted and 128 was reported as the capacity."""
    from dsm.bench import search_capacity

    calls: list[int] = []

    def measure(n):
        calls.append(n)
        return 10.0 + 70.0 * n / 700

    n, seen = search_capacity(measure, 1, 1400, 80.0)
    assert 700 - 700 // 32 <= n <= 700, (n, calls)
    assert any(ms > 80.0 for ms in seen.values())  # the search saw a batch miss the budget
    assert len(calls) == len(set(calls)) <= 11 + 8  # doubling 1..1024, then at most max_probes bisection steps
    # The limit reached with every batch fitting: the limit, without probing past it.
    assert search_capacity(lambda n: 1.0, 3, 40, 80.0) == (40, {3: 1.0, 6: 1.0, 12: 1.0, 24: 1.0, 40: 1.0})
    # Batch 1 already over budget: 0, after measuring batch 1 once.
    assert search_capacity(lambda n: 100.0, 1, 64, 80.0) == (0, {1: 100.0})
    # Non-monotonic timings: whatever is returned is a measured batch that fitted.
    times = {1: 50.0, 2: 90.0, 4: 70.0}
    n, seen = search_capacity(lambda n: times.get(n, 200.0), 1, 64, 80.0)
    assert n == 1 and seen[n] <= 80.0


def test_a_batch_out_of_device_memory_ends_its_probe_not_the_run(tmp_path, capsys, monkeypatch):
    """A capacity probe (or an asked batch) that runs out of device memory counts as missing the budget, with the
    error in its row: the search goes on below it, and the run still prints its table and appends its JSON line."""
    import torch

    from dsm import bench

    real, asked = bench.bench_dsm, []

    def bench_dsm(model, mimi, batch, *args, **kw):
        asked.append(batch)
        if batch > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, mimi, batch, *args, **kw)

    monkeypatch.setattr(bench, "bench_dsm", bench_dsm)
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--preset", "tiny-stt", "--batch", "1,8", "--steps", "1", "--warmup", "0", "--no-mimi",
                 "--no-reference", "--capacity", "--frame-ms", "1e6", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "out of device memory" in text and "tiny-stt: capacity 5 streams" in text, text
    row = json.loads(out.read_text())
    oom = [r for r in row["rows"] if r["batch"] > 5]
    assert oom and all(r["p50_ms"] is None and "out of device memory" in r["extra"]["error"] for r in oom)
    assert max(asked) > 5 and 5 in asked


def test_the_reference_out_of_memory_ends_its_row_not_the_run(tmp_path, capsys, monkeypatch):
    """moshi's run at a batch past the machine gets the row dsm's gets (a CPU's allocator fails with a RuntimeError
    of its own); any other error of it still stops the run."""
    from dsm import bench

    def oom(model, batch, *args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 8 GB")

    monkeypatch.setattr(bench, "bench_moshi", oom)
    out = tmp_path / "r.jsonl"
    argv = ["bench", "--preset", "tiny-stt", "--batch", "1", "--steps", "1", "--warmup", "0", "--no-mimi", "--output",
            str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["system"] for r in rows] == ["dsm", "moshi"] and rows[0]["p50_ms"] is not None
    assert rows[1]["p50_ms"] is None and "can't allocate memory" in rows[1]["extra"]["error"]

    def broken(model, batch, *args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(bench, "bench_moshi", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(argv)


def test_checking_an_output_leaves_nothing_behind(tmp_path):
    """check_output makes the folders it tries, then removes them with the file (a run refused later left them)."""
    from dsm.bench import check_output

    assert check_output(tmp_path / "a" / "b" / "r.jsonl") is None and list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("kept")
    assert "Not a directory" in check_output(tmp_path / "f" / "x" / "r.jsonl")
    assert check_output(tmp_path / "f") is None and (tmp_path / "f").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_checking_an_output_keeps_a_symlink_to_a_file_not_made_yet(tmp_path):
    """`--output link.jsonl`, a link to a results file not written yet: the check deleted the link and left an empty
    file at its target, so the run then wrote a plain file in the link's place."""
    from dsm.bench import check_output

    (tmp_path / "link.jsonl").symlink_to(tmp_path / "results" / "bench.jsonl")
    assert check_output(tmp_path / "link.jsonl") is None
    assert (tmp_path / "link.jsonl").is_symlink() and [p.name for p in tmp_path.iterdir()] == ["link.jsonl"]


def test_a_replaced_output_is_written_through_its_symlink(tmp_path):
    """`validate-kernels --json link.json` / `eval-stt --output link.json`: the new file took the link's place, and
    the file it pointed to kept its old content."""
    from dsm.bench import write_replacing

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "v.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "results" / "v.json")
    write_replacing(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "results" / "v.json").read_text() == "new"


def test_a_cpu_capacity_is_never_below_a_measured_fit(tmp_path, capsys, monkeypatch):
    """On a CPU the capacity search has no KV bound: its bound (64) reported 64 streams after batch 100 fit, and
    called itself a KV-memory limit."""
    from dsm import bench

    def bench_dsm(model, mimi, batch, *args, **kw):  # a step of 1 ms a stream, measured instantly
        return bench.BenchRow("dsm", "", batch, float(batch), float(batch), 0.0, *bench._rates(float(batch), batch))

    monkeypatch.setattr(bench, "bench_dsm", bench_dsm)
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--preset", "tiny-stt", "--batch", "100", "--no-mimi", "--no-reference", "--capacity",
                 "--frame-ms", "150", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny-stt: capacity 100 streams" in text and "searched up to 100 on a CPU" in text, text
    assert json.loads(out.read_text())["capacity"]["tiny-stt"]["kv_limit"] is None


def test_a_cpu_capacity_search_where_no_measured_batch_fits(tmp_path, capsys, monkeypatch):
    """`dsm bench --capacity` on a slow (or busy) CPU, batch 1 over the frame: a TypeError traceback at the end of
    the run, and no row written."""
    from dsm import bench

    def bench_dsm(model, mimi, batch, *args, **kw):  # every batch misses the 80 ms frame
        return bench.BenchRow("dsm", "", batch, 100.0, 100.0, 0.0, *bench._rates(100.0, batch))

    monkeypatch.setattr(bench, "bench_dsm", bench_dsm)
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--preset", "tiny-stt", "--batch", "1", "--no-mimi", "--no-reference", "--capacity",
                 "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny-stt: capacity 0 streams" in text
    assert json.loads(out.read_text())["capacity"]["tiny-stt"]["streams"] == 0
    # the final table tells the probe of batch 1 from the asked batch 1
    table = [line for line in text.split("system  model")[-1].splitlines() if line.startswith("dsm ")]
    assert len(table) == 2 and not table[0].endswith("(capacity probe)") and table[1].endswith("(capacity probe)")


def test_bench_rejects_duplicate_batches(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "tiny-stt", "--batch", "1,2,1", "--steps", "1", "--warmup", "0", "--no-mimi",
              "--no-reference", "--output", str(tmp_path / "r.jsonl")])
    assert e.value.code == 2 and "argument --batch: expected distinct batch sizes" in capsys.readouterr().err


def test_bench_unwritable_output_fails_before_running(tmp_path, capsys, monkeypatch):
    """--output that is a directory, or below a file: one error line before any model is built (was a traceback
    after the whole benchmark); and no file is left behind by the check itself."""
    from dsm import bench

    def never(*a, **k):
        raise AssertionError("the benchmark ran before --output was checked")

    monkeypatch.setattr(bench, "bench_dsm", never)
    monkeypatch.setattr(bench, "random_model", never)
    (tmp_path / "f").write_text("")
    for out in (tmp_path, tmp_path / "f" / "bench.jsonl"):
        assert main(["bench", "--preset", "tiny-stt", "--no-mimi", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dsm bench: error: cannot write --output") and err.count("\n") == 1, err
    assert bench.check_output(tmp_path / "new" / "bench.jsonl") is None
    assert not (tmp_path / "new" / "bench.jsonl").exists()


def _instant_bench_dsm(monkeypatch):
    """``dsm.bench.bench_dsm`` as a 1 ms step a stream, measured instantly (for the tests of the run around it)."""
    from dsm import bench

    def bench_dsm(model, mimi, batch, *args, **kw):
        return bench.BenchRow("dsm", "", batch, float(batch), float(batch), 0.0, *bench._rates(float(batch), batch))

    monkeypatch.setattr(bench, "bench_dsm", bench_dsm)


def test_bench_refuses_a_preset_given_twice(tmp_path, capsys, monkeypatch):
    """--preset is repeatable for several presets; the same one twice measured it twice and mixed both runs' rows in
    one capacity (rows are told apart by model name): one error line before any model is built."""
    from dsm import bench

    def never(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(bench, "random_model", never)
    assert main(["bench", "--preset", "tiny-stt", "--preset", "tiny-tts", "--preset", "tiny-stt",
                 "--output", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == "dsm bench: error: argument --preset: tiny-stt given twice (give each preset once)\n", err
    assert not (tmp_path / "r.jsonl").exists()


def test_bench_without_mimi_builds_none_and_says_lm_only(tmp_path, capsys, monkeypatch):
    """--no-mimi: no Mimi is built (its random weights' calibration alone took ~1.5 s a model) and the KV capacity
    line does not claim Mimi's state is included (it was, of a Mimi the run did not use)."""
    import dsm.mimi

    def never(*a, **k):
        raise AssertionError("Mimi was built under --no-mimi")

    monkeypatch.setattr(dsm.mimi, "random_mimi_state_dict", never)
    _instant_bench_dsm(monkeypatch)
    assert main(["bench", "--preset", "tiny-stt", "--batch", "1", "--no-mimi", "--no-reference",
                 "--output", str(tmp_path / "r.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "Mimi's state included" not in text and "LM only: --no-mimi" in text, text


def test_bench_no_mimi_runs_a_checkpoint_without_mimi_weights(tmp_path, capsys, monkeypatch):
    """A checkpoint written without Mimi weights (or a tokenizer, which bench never reads) benchmarks its LM under
    --no-mimi; without --no-mimi the missing file is still one error line."""
    import torch

    from dsm.checkpoint import write_random_checkpoint

    ckpt = write_random_checkpoint("tiny-stt", tmp_path / "ckpt", dtype=torch.float32, mimi=False, tokenizer=False)
    _instant_bench_dsm(monkeypatch)
    out = tmp_path / "r.jsonl"
    argv = ["bench", "--checkpoint", str(ckpt), "--batch", "1", "--no-reference", "--output", str(out)]
    assert main([*argv, "--no-mimi"]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["mimi"] is False
    capsys.readouterr()
    assert main(argv) == 1
    assert "Mimi weights file named by" in capsys.readouterr().err


def test_append_jsonl_leaves_no_half_row(tmp_path, monkeypatch):
    """A results append that fails part-way (a full disk) is cut back to the file's previous rows: a reader never
    finds half a row; the error still reaches the caller."""
    import errno
    import os

    from dsm import bench

    out = tmp_path / "r.jsonl"
    bench.append_jsonl(out, [{"a": 1}])
    before, ino, real_write, calls = out.read_bytes(), out.stat().st_ino, os.write, []

    def write(fd, data):  # the results file takes half the bytes, then the disk is full
        if os.fstat(fd).st_ino != ino:
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(data[: len(data) // 2]))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space left"):
        bench.append_jsonl(out, [{"b": float("nan"), "c": "x" * 100}])
    monkeypatch.undo()
    assert len(calls) == 2 and out.read_bytes() == before
    bench.append_jsonl(out, [{"b": float("nan")}, {"c": 2}])  # strict JSON lines, whole
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"a": 1}, {"b": None}, {"c": 2}]


def test_append_jsonl_cut_back_keeps_another_writers_rows(tmp_path, monkeypatch):
    """A writer whose append fails part-way cuts the file back to where it found it: a second writer appending in
    the meantime lost its row (it was cut away with the half row). The second writer now waits for the first."""
    import errno
    import os
    import threading

    from dsm import bench

    out = tmp_path / "r.jsonl"
    bench.append_jsonl(out, [{"a": 1}])
    real_write, first = os.write, threading.current_thread()
    second = threading.Thread(target=bench.append_jsonl, args=(out, [{"b": 2}]))

    def write(fd, data):  # the first writer: half its row, then the other writer runs, then the disk is full
        if threading.current_thread() is not first:
            return real_write(fd, data)
        if second.ident is None:
            second.start()
            second.join(0.5)  # it finishes here unless it waits for this writer
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError, match="No space left"):
        bench.append_jsonl(out, [{"c": "x" * 100}])
    second.join()
    assert [json.loads(x) for x in out.read_text().splitlines()] == [{"a": 1}, {"b": 2}]


def test_bench_output_failing_after_the_run_is_one_error_line(tmp_path, capsys, monkeypatch):
    """--output checked before the run can still fail to take the row after it (the disk filled): an error line
    naming --output, exit 1, the table printed (it was a traceback)."""
    import errno

    from dsm import bench

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    _instant_bench_dsm(monkeypatch)
    monkeypatch.setattr(bench, "append_jsonl", full)
    out = tmp_path / "r.jsonl"
    assert main(["bench", "--preset", "tiny-stt", "--batch", "1", "--no-mimi", "--no-reference",
                 "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert "rtfx" in captured.out and "appended to" not in captured.out
    assert captured.err.endswith(f"\ndsm bench: error: cannot append to --output {str(out)!r}: No space left on "
                                 "device\n"), captured.err  # after tqdm's bar


def test_step_p99_is_the_whole_steps_tail(monkeypatch, mimi_sd):
    """The row's p99 is the p99 of whole steps (Mimi then LM), not the LM's p99 plus Mimi's median: steps where both
    are slow count once, whole. Fake costs: LM 10 ms (40 every 4th call), Mimi 5 ms (25 every 4th call)."""
    import torch

    from dsm import bench
    from dsm.engine import Engine
    from dsm.mimi import Mimi
    from dsm.presets import preset_config

    model, _ = bench.random_model(preset_config("tiny-stt"), torch.device("cpu"), torch.float32)
    mimi = Mimi(mimi_sd)  # conftest: random_mimi_state_dict(0)
    calls = {"lm": 0, "mimi": 0}

    def counted(real, key):
        def wrapper(self, *a, **k):
            calls[key] += 1
            return real(self, *a, **k)

        return wrapper

    monkeypatch.setattr(Engine, "step", counted(Engine.step, "lm"))
    monkeypatch.setattr(Mimi, "encode_step", counted(Mimi.encode_step, "mimi"))

    def timer(fn):
        before = dict(calls)
        fn()
        ms = 0.0
        for key, base, spike in (("lm", 10.0, 40.0), ("mimi", 5.0, 25.0)):
            for n in range(before[key] + 1, calls[key] + 1):
                ms += spike if n % 4 == 0 else base
        return ms

    row = bench.bench_dsm(model, mimi, 1, 8, 0, timer)
    assert row.extra["lm_p50_ms"] == 10.0 and row.mimi_ms == 5.0
    assert row.p50_ms == 15.0 and row.p99_ms == 65.0, row  # was 40 + 5


def test_bench_tts_streams_have_their_own_voices_and_share_the_padding():
    """The benchmark's TTS streams each open a voice of their own in the first speaker slot (the DSM scripts'
    layout): their condition pages are one each plus the 4 shared padding pages, and the row reports them."""
    import torch

    from dsm import bench
    from dsm.presets import preset_config

    model, _ = bench.random_model(preset_config("tiny-tts"), torch.device("cpu"), torch.float32)
    row = bench.bench_dsm(model, None, 3, 1, 0, bench._timer(torch.device("cpu")))
    assert row.extra["condition_pages"] == 4 + 3
    assert row.extra["condition_kv_mb"] > 0
    assert "voice K/V at batch 3: 7 pages" in bench.format_condition_pages([row])
    assert bench._condition_layout(model) == (1, 4, 125)
    # the capacity estimate counts each stream's own voice page: 2 x layers x 125 rows x dim x 2 bytes more
    cfg = model.cfg
    self_kv = 2 * cfg.num_layers * 16 * cfg.num_heads * cfg.head_dim * 2
    voice = 2 * cfg.num_layers * 125 * cfg.dim * 2
    free = 10**9
    assert bench.kv_capacity(cfg, torch.bfloat16, free, 0, reserve_bytes=0) == free // self_kv
    assert bench.kv_capacity(cfg, torch.bfloat16, free, 0, reserve_bytes=0, condition_rows=125) == \
        free // (self_kv + voice)


def test_bench_host_runs_both_runtimes_on_stand_ins(tmp_path, tiny_stt_ckpt, one_thread, monkeypatch):
    """benchmarks/bench_host.py: the runtimes' host work per step with stand-in model steps; the TTS steps it times
    decode audio for every stream (the stand-in Mimi is called)."""

    import torch

    from dsm.checkpoint import resolve_checkpoint, write_random_checkpoint
    from dsm.tts import TTSRuntime

    mod = _script("bench_host")
    assert mod.stt_host_ms(resolve_checkpoint(tiny_stt_ckpt), 3, 2) > 0
    from dsm.stt import STTStream

    pushed = []  # the serve-stt row pushes one frame a stream a step, and steps them
    real_push = STTStream.push
    monkeypatch.setattr(STTStream, "push", lambda self, pcm, *a, **kw: pushed.append(len(pcm)) or real_push(
        self, pcm, *a, **kw))
    assert mod.asr_server_host_ms(resolve_checkpoint(tiny_stt_ckpt), 3, 2) > 0
    assert pushed == [1920] * 3 * 5  # 3 streams, 3 warm-up steps and 2 timed
    decoded = []
    real = TTSRuntime._decode
    monkeypatch.setattr(TTSRuntime, "_decode", lambda self, rows, frames: decoded.append(len(rows)) or real(
        self, rows, frames))
    tts = write_random_checkpoint("tiny-tts", tmp_path / "tts", seed=0, dtype=torch.float32)
    assert mod.tts_host_ms(resolve_checkpoint(tts), 3, 2) > 0
    assert decoded[-2:] == [3, 3], decoded
    import dsm.server

    built = []  # the serve-tts row builds every stream's Audio message of the timed steps
    real_audio = dsm.server.audio_message
    monkeypatch.setattr(dsm.server, "audio_message", lambda pcm: built.append(pcm.shape[0]) or real_audio(pcm))
    assert mod.tts_server_host_ms(resolve_checkpoint(tts), 3, 2) > 0
    assert built[-6:] == [1920] * 6, built
    # Engine.step alone, its graph path with the replays stubbed: the model runs once (the stub's first call)
    from dsm.generate import Generator

    forwards, real_forward = [], Generator.forward
    monkeypatch.setattr(Generator, "forward", lambda self, *a: forwards.append(1) or real_forward(self, *a))
    for files in (resolve_checkpoint(tiny_stt_ckpt), resolve_checkpoint(tts)):
        forwards.clear()
        assert mod.engine_host_ms(files, 2, 3) > 0
        assert len(forwards) == 1, len(forwards)


def test_bench_serve_playback_stalls_and_verdicts():
    """benchmarks/bench_serve.py's measures (its runs against real servers are in test_benchmark_scripts.py): a frame
    arriving after its playback time stalls the playback, which then resumes from that frame; a row keeps up only when
    every client was served without an Error, (STT) every last Marker came back and the latency did not grow."""
    mod = _script("bench_serve")
    assert mod.stalls([1.0, 1.08, 1.16, 1.24], 0.0) == (0, 0.0)  # on time, to the frame
    count, stalled = mod.stalls([1.0, 1.08, 1.30, 1.38, 1.60], 0.0)  # 1.30 is due 1.16; then 1.60 is due 1.46
    assert count == 2 and stalled == pytest.approx(0.14 + 0.14)
    assert mod.stalls([1.0, 1.08, 1.30], 0.2) == (0, 0.0)  # a jitter buffer absorbs it
    assert mod.stalls([], 0.0) == (0, 0.0)

    def stt(markers, **kw):
        return mod.STTClient(frame_latency=[0.05, 0.07], marker_latency=markers, lateness=[0.0, 0.001],
                             open_s=0.01, last_marker_back=True, **kw)

    row = mod.stt_row([stt([0.55, 0.56]), stt([0.55, 0.60])], 2)
    assert row["keeps_up"] and row["drift_max_ms"] == pytest.approx(50.0) and row["frames"] == 4
    assert not mod.stt_row([stt([0.55, 1.2]), stt([0.55, 0.6])], 2)["keeps_up"]  # one client falls behind
    assert not mod.stt_row([stt([0.55, 0.7, 0.85])], 1)["keeps_up"]  # 0.3 s over 1.9 s of audio: slower than real time
    assert mod.stt_row([stt([0.55] + [0.56] * 19 + [0.85])], 1)["keeps_up"]  # 0.3 s over 19 s: within 2%
    assert not mod.stt_row([stt([0.55, 0.56]), stt([0.55], error="ConnectionClosedError")], 2)["keeps_up"]
    lost_client = stt([0.55, 0.56])
    lost_client.last_marker_back = False
    assert not mod.stt_row([stt([0.55, 0.56]), lost_client], 2)["keeps_up"]
    rejected = mod.stt_row([stt([0.55, 0.56]), mod.STTClient(rejected="no free channels")], 2)
    assert not rejected["keeps_up"] and rejected["rejected"] == 1 and rejected["first_error"] == "no free channels"
    tts = [mod.TTSClient(frames=[1.2, 1.28, 1.36], first_word=1.0), mod.TTSClient(frames=[1.3, 1.5], first_word=1.0)]
    row = mod.tts_row(tts, 2, 0.0)
    assert row["stalled_clients"] == 1 and not row["keeps_up"] and row["ttfa_p50_ms"] == pytest.approx(250.0)
    assert mod.tts_row(tts[:1], 1, 0.0)["keeps_up"]
    assert not mod.tts_row([mod.TTSClient(first_word=1.0)], 1, 0.0)["keeps_up"]  # no audio at all
    assert mod.endpoint("ws://h:1", "tts") == ("ws://h:1/api/tts_streaming?format=PcmMessagePack", "http://h:1")
    assert mod.endpoint("wss://h:1/api/asr-streaming", "stt") == ("wss://h:1/api/asr-streaming", "https://h:1")
    assert mod.endpoint("http://h:1", "stt") == ("ws://h:1/api/asr-streaming", "http://h:1")
    for bad in ("ftp://h:1", "ws://", "h:1"):
        with pytest.raises(ValueError, match="expected ws://HOST:PORT"):
            mod.endpoint(bad, "stt")


def test_bench_serve_capacity_search():
    """--capacity: doubling from the largest row that kept up, then bisection to within 1/16, never past the slots;
    every probe is a whole row (seconds of real time), so no count is probed twice."""
    search = _script("bench_serve").search_capacity
    for true_cap, known, limit in ((700, 256, 1024), (700, 0, 1024), (5, 1, 8), (0, 0, 64), (64, 64, 64),
                                   (3000, 1, 1024), (1, 0, 1)):
        probed = []

        def keeps_up(n, cap=true_cap, probed=probed):
            probed.append(n)
            return n <= cap

        got = search(keeps_up, known, limit)
        assert min(true_cap, limit) - max(1, got // 16) <= got <= min(true_cap, limit), (true_cap, known, got)
        assert len(probed) == len(set(probed)) and all(1 <= n <= limit for n in probed), probed
    assert search(lambda n: n <= 700, 256, 1024) >= 660
    # a count whose row already failed is not probed again (on a noisy CPU a rerun kept up: capacity above a failed
    # row, the suite's flake), nor anything above it
    probed = []
    assert search(lambda n: probed.append(n) or True, 1, 8, failed=2) == 1 and probed == []
    assert search(lambda n: probed.append(n) or n <= 5, 4, 64, failed=8) in (5, 6, 7) and max(probed) < 8


def test_bench_serve_says_when_the_server_does_not_answer(tmp_path, capsys):
    """No server at --url: one line naming it, exit 1, no traceback (and no row)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rows.jsonl"
    rc = _script("bench_serve").main(["stt", "--url", f"ws://127.0.0.1:{port}", "--clients", "1", "--output",
                                      str(out)])
    assert rc == 1 and f"the server at http://127.0.0.1:{port} does not answer" in capsys.readouterr().err
    assert not out.exists() or not out.read_text()


def test_bench_serve_blames_a_failed_output_on_the_output(tmp_path, capsys, monkeypatch):
    """A row that cannot be appended to --output (here: it became a directory after the check) is an error naming
    --output, exit 1; it was caught with the server's errors and reported as "the server ... does not answer"."""
    mod = _script("bench_serve")
    out = tmp_path / "rows.jsonl"

    async def run_stt(*args):  # a row measured; meanwhile --output went bad
        out.mkdir()
        return {"clients": 1, "keeps_up": True}

    monkeypatch.setattr(mod, "_http_json", lambda base, path, timeout=5.0: {"device": "cpu"})
    monkeypatch.setattr(mod, "wait_idle", lambda base: None)
    monkeypatch.setattr(mod, "run_stt", run_stt)
    rc = mod.main(["stt", "--url", "ws://127.0.0.1:9", "--clients", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"bench_serve: error: cannot append to --output {str(out)!r}: Is a directory" in err, err
    assert "does not answer" not in err


def test_tts_time_to_first_audio_runs_after_the_batch_engine_is_freed(monkeypatch, mimi_sd):
    """bench_dsm times a TTS batch's first audio on an engine of its own: the batch's engine must be gone first, or
    a capacity probe near the memory limit holds two full KV pools and reports out of memory for a batch that fits."""
    import gc
    import weakref

    import torch

    from dsm import bench
    from dsm.engine import Engine
    from dsm.mimi import Mimi
    from dsm.presets import preset_config

    model, _ = bench.random_model(preset_config("tiny-tts"), torch.device("cpu"), torch.float32)
    engines = []
    real_init = Engine.__init__

    def tracked(self, *a, **kw):
        real_init(self, *a, **kw)
        engines.append(weakref.ref(self))

    monkeypatch.setattr(Engine, "__init__", tracked)
    alive_at_ttfa = []

    def ttfa(*a, **kw):
        gc.collect()
        alive_at_ttfa.append(sum(r() is not None for r in engines))
        return 1.0, 2.0

    monkeypatch.setattr(bench, "time_to_first_audio", ttfa)
    row = bench.bench_dsm(model, Mimi(mimi_sd), 2, 2, 1, lambda fn: (fn(), 1.0)[1])
    assert row.extra["ttfa_ms"] == 1.0 and alive_at_ttfa == [0]


def test_a_cuda_device_must_be_the_current_one(monkeypatch):
    """Triton launches and CUDA-graph captures go to the current CUDA device, whatever their tensors' device: an
    Engine or a Mimi graph on cuda:1 while cuda:0 is current would capture empty graphs whose replays do nothing.
    `--device cuda:N` makes N current; the engine and Mimi refuse a mismatch with the fix in the message."""
    import torch

    import dsm.cli
    from dsm.cli_args import device_or_default, select_device
    from dsm.cuda_graphs import check_current_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match=r"cuda:1 but the current CUDA device is cuda:0: call "
                                           r"torch.cuda.set_device\(1\)"):
        check_current_device(torch.device("cuda:1"), "Engine's model")
    for ok in ("cuda", "cuda:0", "cpu"):
        check_current_device(ok, "x")
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    for device in (None, torch.device("cpu"), torch.device("cuda"), torch.device("cuda:1")):
        select_device(device)
    assert selected == [torch.device("cuda:1")]
    selected.clear()  # the benchmark scripts' path (profile_step --device cuda:1 timed cuda:0's launches)
    assert device_or_default(torch.device("cuda:1")) == torch.device("cuda:1") and selected == [torch.device("cuda:1")]

    class Selected(Exception):
        pass

    def stop(device):
        raise Selected(device)

    monkeypatch.setattr(dsm.cli, "select_device", stop)  # every command goes through it before running
    with pytest.raises(Selected, match="cpu"):
        main(["bench", "--device", "cpu"])


@pytest.mark.parametrize("name", ["bench_decoder", "bench_depformer", "bench_fp8_kv", "bench_runtime"])
def test_benchmark_help_describes_the_script_in_whole_sentences(name, capsys, monkeypatch):
    """`bench_decoder.py --help` and `bench_depformer.py --help` described the script with its docstring's first
    line, cut mid-sentence ("... (``dsm_kernels.decoder_step``: every")."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # bench_decoder imports bench_depformer
    mod = _script(name)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    described = " ".join(capsys.readouterr().out.split())
    assert " ".join(mod.__doc__.split("\n\n")[0].split()) in described


def test_bench_serve_help_shows_no_none_default(capsys):
    """Flags without a default said so twice: "...; default: start one (default: None)"."""
    mod = _script("bench_serve")
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: [1, 8])" in out, out
