"""The ``dsm`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from dsm import __version__
from dsm.checkpoint import load_lm_state_dict, resolve_checkpoint
from dsm.cli import build_parser, main, subcommands
from dsm.cli_args import add_checkpoint_args, checkpoint_from_args
from dsm.config import parse_config
from dsm.presets import preset_config


def test_random_checkpoint_end_to_end(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["random-checkpoint", "--preset", "tiny-tts", str(out), "--seed", "3", "--dtype", "float32",
                 "--no-mimi"]) == 0
    printed = capsys.readouterr().out
    assert "config.json" in printed and "dsm_tts_tiny.safetensors" in printed
    assert json.loads((out / "config.json").read_text()) == preset_config("tiny-tts")
    cfg = parse_config(preset_config("tiny-tts"))
    state = load_lm_state_dict(out / cfg.moshi_name, cfg, dtype=torch.float32)
    assert len(state) == 226
    # The same checkpoint through the moshi oracle (strict load).
    from moshi.models.loaders import CheckpointInfo

    info = CheckpointInfo.from_hf_repo("x/y", moshi_weights=out / cfg.moshi_name, mimi_weights=out / "none",
                                       tokenizer=out / cfg.tokenizer_name, config_path=out / "config.json")
    info.get_moshi(device="cpu", dtype=torch.float32)
    # Resolution fails clearly without the Mimi file, and the CLI helper goes through the same path.
    parser = argparse.ArgumentParser()
    add_checkpoint_args(parser)
    args = parser.parse_args(["--checkpoint", str(out)])
    with pytest.raises(ValueError, match="Mimi weights file named by"):
        checkpoint_from_args(args)
    (out / cfg.mimi_name).write_bytes(b"stand-in")
    assert checkpoint_from_args(args).lm_weights == resolve_checkpoint(out).lm_weights


def test_random_checkpoint_refuses_an_empty_out_dir_and_a_seed_past_int64(tmp_path, capsys, monkeypatch):
    """`dsm random-checkpoint --preset P ""` (an unset $OUT) wrote the checkpoint into the current directory and
    listed every file there as written; a seed past int64 was a torch traceback after OUT_DIR was made."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for argv in (["random-checkpoint", "--preset", "tiny-stt", ""],
                 ["random-checkpoint", "--preset", "tiny-stt", "out", "--seed", str(2**64)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and list(tmp_path.iterdir()) == [tmp_path / "notes.txt"]
    assert "expected a directory, got an empty name" in capsys.readouterr().err
    assert main(["random-checkpoint", "--preset", "tiny-stt", ".", "--no-mimi", "--no-tokenizer"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["config.json", "model.safetensors"]  # what it wrote, not notes.txt


def test_checkpoint_args_are_exclusive_and_required():
    parser = argparse.ArgumentParser()
    add_checkpoint_args(parser)
    args = parser.parse_args(["--hf-repo", "kyutai/stt-1b-en_fr", "--revision", "main"])
    assert (args.checkpoint, args.hf_repo, args.revision) == (None, "kyutai/stt-1b-en_fr", "main")
    with pytest.raises(SystemExit):
        parser.parse_args(["--hf-repo", "a/b", "--checkpoint", "x"])
    with pytest.raises(SystemExit):
        parser.parse_args([])


@pytest.mark.parametrize("command", ["transcribe", "eval-stt", "serve-stt", "serve-tts", "speak"])
def test_model_flags_that_do_not_go_together_are_usage_errors(command, tmp_path, capsys, monkeypatch):
    """`serve-tts --checkpoint DIR --preset P --random-weights` served random weights, ignoring the checkpoint (and
    `--checkpoint DIR --preset P` ignored the preset); elsewhere such mixes were refused with exit status 1, where
    argparse's usage errors give 2. Every command now takes exactly one model source, and refuses others with 2
    before it reads any model file."""
    import dsm.checkpoint
    import dsm.cli_args

    def no_model(*a, **kw):
        raise AssertionError("a model was read")

    monkeypatch.setattr(dsm.checkpoint, "ensure_random_checkpoint", no_model)
    monkeypatch.setattr(dsm.cli_args, "resolve_checkpoint", no_model)
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "text": "hi"}\n')
    preset = "tiny-tts" if command in ("serve-tts", "speak") else "tiny-stt"
    first = {"transcribe": ["a.wav", "-o", str(tmp_path)], "eval-stt": [str(tmp_path / "m.jsonl")], "serve-stt": [],
             "serve-tts": [], "speak": ["hi", "-o", str(tmp_path / "x.wav")]}[command]
    for flags, said in [
        (["--checkpoint", str(tmp_path), "--preset", preset, "--random-weights"], "(got --checkpoint and --preset)"),
        (["--hf-repo", "a/b", "--preset", preset], "(got --hf-repo and --preset)"),
        (["--preset", preset], f"--preset {preset} needs --random-weights"),
        (["--random-weights"], "give exactly one of"),
        (["--checkpoint", str(tmp_path), "--random-weights"], "--random-weights goes with --preset NAME"),
        ([], "give exactly one of --checkpoint DIR, --hf-repo REPO or --preset NAME --random-weights"),
    ]:
        assert main([command, *first, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"dsm {command}: error: ") and said in err and err.count("\n") == 1, (flags, err)


def test_serve_tts_condition_pages_below_one_name_the_flag(capsys):
    """`serve-tts --condition-pages -1` loaded the model, then said "cross_pages must be >= 2", a name the command
    line does not have."""
    for value in ("-1", "0"):
        with pytest.raises(SystemExit) as e:
            main(["serve-tts", "--preset", "tiny-tts", "--random-weights", "--condition-pages", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --condition-pages: expected a positive integer" in err


def test_bad_preset_and_no_command(capsys):
    with pytest.raises(SystemExit):
        main(["random-checkpoint", "--preset", "nope", "out"])
    assert "invalid choice" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize("arg,value,pattern", [("--batch-size", "0", "positive integer"),
                                               ("--device", "foo", "unknown device"),
                                               ("--device", "cuda:99", "CUDA")])
def test_transcribe_rejects_bad_arguments_before_loading(capsys, arg, value, pattern):
    # argparse errors (exit 2), not a ValueError/AssertionError traceback after the model has been loaded
    with pytest.raises(SystemExit) as e:
        main(["transcribe", "a.wav", "--preset", "tiny-stt", "--random-weights", arg, value])
    assert e.value.code == 2 and pattern in capsys.readouterr().err


def test_transcribe_output_dir_must_be_a_directory(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert main(["transcribe", "a.wav", "--preset", "tiny-stt", "--random-weights", "-o", str(tmp_path / "f")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"dsm {__version__}" in out and f"torch {torch.__version__}" in out
    assert "kernel backends on cpu: reference" in out
    assert "small-batch GEMV kernels: up to 4 rows" in out and "programmatic dependent launch: off" in out
    if torch.version.cuda is None:  # it said "cuda None"
        assert f"torch {torch.__version__} (a CPU-only build)" in out and "None" not in out, out


def test_info_hints_the_interpreter_and_a_closed_stdout_is_one_line():
    """On a CPU without TRITON_INTERPRET, `dsm info` says how to get the triton backend; `dsm info | head -0` (its
    stdout closed before it writes) is one line on stderr and exit 1, not a BrokenPipeError traceback."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "dsm.cli", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.close()  # before the child has imported torch, long before it prints
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err, err
    assert err == "dsm info: error: stdout was closed before all the output was written (broken pipe)\n", err
    out = subprocess.run([sys.executable, "-m", "dsm.cli", "info"], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    assert "kernel backends on cpu: reference (TRITON_INTERPRET=1 adds triton" in out, out


def test_info_and_validate_kernels_without_triton():
    """The README's CPU install has no Triton (the CPU torch wheel does not bring it): `dsm info` says so instead of
    failing on an import, and `validate-kernels` says to install it (TRITON_INTERPRET=1 alone cannot help)."""
    import subprocess

    hide = "import sys; sys.modules['triton'] = None; from dsm.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    info = subprocess.run([sys.executable, "-c", hide, "info"], capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0 and "triton: not installed" in info.stdout, info.stdout + info.stderr
    val = subprocess.run([sys.executable, "-c", hide, "validate-kernels", "--device", "cpu"], capture_output=True,
                         text=True, env={**env, "TRITON_INTERPRET": "1"}, timeout=120)
    assert val.returncode == 1 and "pip install 'dsm[triton]'" in val.stderr, val.stderr


def _validate_kernels_cmd(out_dir) -> list[str]:
    return [sys.executable, "-m", "dsm.cli", "validate-kernels", "--quick", "--device", "cpu", "--json",
            str(out_dir / "v.json")]


def background_jobs(test, params, out_dir):
    """``dsm validate-kernels --quick`` (~12 s of the interpreter) as a process of its own, started at collection in
    conftest's background queue, so that it runs beside the other tests instead of in turn."""
    if test == "test_validate_kernels_passes_under_the_interpreter":
        return [("validate-kernels --quick", _validate_kernels_cmd(out_dir))]
    return []


def test_validate_kernels_passes_under_the_interpreter(background):
    # tests run with TRITON_INTERPRET=1, so the Triton backend is checked on the CPU
    import json

    tmp_path = background.dir
    rc, out, err = background("validate-kernels --quick", _validate_kernels_cmd(tmp_path))
    assert rc == 0, (out + err)[-4000:]
    last = out.strip().splitlines()[-1]  # "n/n passed"
    n, total = last.split()[0].split("/")
    assert "triton" in out and n == total and int(total) >= 12, last
    doc = json.loads((tmp_path / "v.json").read_text())
    assert doc["validated_on"] == "cpu" and doc["torch"] == torch.__version__ and len(doc["rows"]) == int(total)
    assert all(r["ok"] and r["err"] <= r["bound"] for r in doc["rows"])


def test_validate_kernels_without_a_fast_backend_says_why(capsys, monkeypatch):
    import dsm_kernels

    monkeypatch.setattr(dsm_kernels, "available_backends", lambda device=None: ["reference"])
    monkeypatch.setattr("dsm_kernels.validate.available_backends", lambda device=None: ["reference"])
    assert main(["validate-kernels", "--quick", "--device", "cpu"]) == 1
    assert "no fast kernel backend on cpu" in capsys.readouterr().err


def test_subcommand_table():
    names = set(subcommands())
    assert {"random-checkpoint", "info", "validate-kernels"} <= names
    help_text = build_parser().format_help()
    for name in names:
        assert name in help_text


def test_device_argument_is_checked_up_front():
    from dsm.cli_args import parse_device

    assert parse_device("cpu") == torch.device("cpu") and parse_device("cpu:0") == torch.device("cpu:0")
    for bad, msg in [("foo", "unknown device"), ("meta", "cpu or cuda"), ("cpu:1", "one CPU device")] + (
        [] if torch.cuda.is_available() else [("cuda", "CUDA is not available"), ("cuda:3", "CUDA is not available")]
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse_device(bad)


def test_random_checkpoint_write_failures_leave_no_checkpoint(tmp_path):
    """A write failing half-way (here a file-size limit; a full disk alike): one line naming the file that failed,
    exit 1, no .partial file and no config.json, so the directory is not taken for a checkpoint (config.json came
    first and the .partial stayed; a failed Mimi write was a SafetensorError traceback)."""
    import subprocess

    whole = tmp_path / "whole"
    assert main(["random-checkpoint", "--preset", "tiny-stt", str(whole), "--no-tokenizer", "--no-mimi"]) == 0
    cfg = json.loads((whole / "config.json").read_text())
    lm_bytes = (whole / cfg["moshi_name"]).stat().st_size
    for limit, failing in ((lm_bytes // 2, cfg["moshi_name"]), (lm_bytes + 1024, cfg["mimi_name"])):
        out = tmp_path / f"limit{limit}"
        code = ("import resource, sys, torch, dsm.mimi; "
                f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY)); "
                "dsm.mimi.random_mimi_state_dict = lambda seed: {'x': torch.zeros(1 << 23)}; "  # 32 MB: past the limit
                "from dsm.cli import main; sys.exit(main(sys.argv[1:]))")
        run = subprocess.run([sys.executable, "-c", code, "random-checkpoint", "--preset", "tiny-stt", str(out),
                              "--no-tokenizer"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith(f"dsm random-checkpoint: error: {out / failing}: cannot write"), run.stderr
        assert not (out / "config.json").exists() and not list(out.glob("*.partial")), list(out.iterdir())


def test_a_stale_random_checkpoint_in_the_cache_is_replaced(tmp_path, monkeypatch):
    """A cache entry without config.json (left by a crash) made every --random-weights run fail with a 'Directory
    not empty' traceback."""
    from dsm.checkpoint import ensure_random_checkpoint, random_checkpoint_dir

    monkeypatch.setenv("DSM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("dsm.mimi.random_mimi_state_dict", lambda seed: {"x": torch.zeros(4)})  # not read here
    stale = random_checkpoint_dir("tiny-stt")
    stale.mkdir(parents=True)
    (stale / "model.safetensors.partial").write_bytes(b"half")
    assert ensure_random_checkpoint("tiny-stt") == stale and (stale / "config.json").is_file()
    assert not (stale / "model.safetensors.partial").exists()


def test_random_checkpoint_unwritable_out_dir(tmp_path, capsys):
    """OUT_DIR that is a file, or below one: one line naming it, exit 1 (was a FileExistsError traceback)."""
    (tmp_path / "f").write_text("")
    for out in (tmp_path / "f", tmp_path / "f" / "sub"):
        assert main(["random-checkpoint", "--preset", "tiny-stt", str(out), "--no-mimi", "--no-tokenizer"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"dsm random-checkpoint: error: {out}: cannot write") and err.count("\n") == 1, err


def test_eval_stt_unwritable_output_and_failures_are_one_clear_line(tmp_path, capsys):
    """An unwritable --output is refused before the model is loaded (was a traceback after the whole evaluation);
    when every file fails, the error says why (the per-file errors were dropped)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "missing.wav", "text": "hello"}) + "\n")
    assert main(["eval-stt", str(manifest), "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsm eval-stt: error: cannot write --output") and err.count("\n") == 1, err
    assert main(["eval-stt", str(manifest), "--preset", "tiny-stt", "--random-weights", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no utterance could be scored" in err and "1 failed, the first:" in err and "missing.wav" in err, err


def test_eval_stt_tsv_third_column_is_refused(tmp_path):
    """A TSV with a third column (a duration) took its header for an entry and scored the column as words of every
    reference."""
    from dsm.eval_stt import ManifestError, read_manifest

    manifest = tmp_path / "m.tsv"
    manifest.write_text("audio\ttext\tduration\na.wav\thello world\t1.0\n")
    with pytest.raises(ManifestError, match=r"m.tsv:1: expected 'audio<TAB>text', found 3 tab-separated columns"):
        read_manifest(manifest)


def test_eval_stt_typographic_apostrophes(tmp_path):
    """A reference typeset with U+2019 ("don\u2019t" -> "don t") scored two errors a contraction against a
    hypothesis with "'" ("do not")."""
    from dsm.eval_stt import english_normalizer, normalized

    norm = english_normalizer()
    for curly in ("don\u2019t", "don\u02bct", "I\u2019m \u2018here\u2019"):
        assert normalized(norm, curly) == normalized(norm, curly.replace("\u2019", "'").replace("\u02bc", "'")
                                                      .replace("\u2018", "'")), curly
    assert normalized(norm, "Don\u2019t go\u200b!") == "do not go"


def test_outputs_are_checked_first_and_replaced_whole(tmp_path, capsys, monkeypatch):
    """validate-kernels --json to a path it cannot write is refused before the run (was a traceback after it); a
    write that fails at the end (a full disk) leaves the previous file whole; eval-stt refuses to write over its
    manifest; a manifest's header may follow blank lines, and its entry "-" is a file beside it, not stdin."""
    import dsm.bench
    from dsm.eval_stt import read_manifest

    assert main(["validate-kernels", "--quick", "--device", "cpu", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsm validate-kernels: error: cannot write --json") and err.count("\n") == 1, err
    old = tmp_path / "old.json"
    old.write_text('{"previous": 1}\n')

    def full(self, text, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(old), "write_text", full)
    with pytest.raises(OSError):
        dsm.bench.write_replacing(old, "{}")
    monkeypatch.undo()
    assert old.read_text() == '{"previous": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]
    dsm.bench.write_replacing(old, "{}\n")
    assert old.read_text() == "{}\n"

    manifest = tmp_path / "m.tsv"
    manifest.write_text("\naudio\ttext\n-\thello\n")
    assert read_manifest(manifest) == [(tmp_path / "-", "hello")]
    assert main(["eval-stt", str(manifest), "--preset", "tiny-stt", "--random-weights", "--output",
                 str(manifest)]) == 2
    assert "is the manifest or one of its audio files" in capsys.readouterr().err
    assert manifest.read_text() == "\naudio\ttext\n-\thello\n"


def test_ctrl_c_and_out_of_memory_are_one_line(capsys, monkeypatch):
    """Ctrl-C during a command (a long `dsm speak`): 'interrupted' and the shell's 130, not a traceback."""
    import dsm.server

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsm.server, "cmd_serve_stt", interrupted)
    assert main(["serve-stt", "--preset", "tiny-stt", "--random-weights"]) == 130
    assert capsys.readouterr().err == "dsm serve-stt: interrupted\n"

    def huge(args):  # a config's context of 10^12 positions was a MemoryError traceback
        raise MemoryError()

    monkeypatch.setattr(dsm.server, "cmd_serve_stt", huge)
    assert main(["serve-stt", "--preset", "tiny-stt", "--random-weights"]) == 1
    assert capsys.readouterr().err == ("dsm serve-stt: error: out of memory (MemoryError); use a smaller batch, or "
                                       "check the sizes in the model's config\n")


def test_batch_invariant_flag_reaches_both_runtimes(monkeypatch):
    """``--batch-invariant`` (serve-stt, serve-tts, transcribe) makes every step run every slot."""
    import dsm.server as server
    from dsm.stt import runtime_from_args

    p = build_parser()
    stt = p.parse_args(["serve-stt", "--preset", "tiny-stt", "--random-weights", "--batch-size", "3", "--device", "cpu",
                        "--batch-invariant"])
    rt = runtime_from_args(stt)
    assert rt.options.batch_invariant and rt.stepper.engine.buckets == (3,) and rt.stepper.mimi_buckets == (3,)
    plain = runtime_from_args(p.parse_args(["transcribe", "a.wav", "--preset", "tiny-stt", "--random-weights",
                                            "--batch-size", "3", "--device", "cpu"]))
    assert not plain.options.batch_invariant and plain.stepper.engine.buckets == (1, 2, 3)
    served = []
    monkeypatch.setattr(server, "_run", lambda srv, *a: served.append(srv) or 0)
    tts = p.parse_args(["serve-tts", "--preset", "tiny-tts", "--random-weights", "--batch-size", "3", "--device",
                        "cpu", "--batch-invariant"])
    assert tts.func(tts) == 0
    rt = served[0].rt
    assert rt.config.batch_invariant and rt.stepper.engine.buckets == (3,) and rt.mimi_buckets == (3,)
    assert rt.config.pcm_limit == 0.99 and rt.config.text_rules == "server"  # moshi-server's peak and text rules


def test_serve_tts_refuses_a_voice_pool_no_stream_fits_in_before_serving(monkeypatch, capsys):
    """``--condition-pages 3``: every stream needs 5 voice pages and the null page; the server used to start and then
    fail every client's step (1011). It is one line at startup now, and the server never runs."""
    import dsm.server as server

    monkeypatch.setattr(server, "_run", lambda *a: pytest.fail("the server started"))
    args = build_parser().parse_args(["serve-tts", "--preset", "tiny-tts", "--random-weights", "--device", "cpu",
                                      "--condition-pages", "3"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsm serve-tts: error: cross_pages (TTS: condition_pages) = 3 cannot hold one stream"), err
    assert "at least 6" in err
