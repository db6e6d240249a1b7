"""`dsm bench` runs end to end on a CPU preset and appends a result row with the environment."""

import json

from dsm.cli import main


def test_bench_cli_smoke(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    rc = main(["bench", "--preset", "tiny-stt", "--batch", "1,2", "--steps", "2", "--warmup", "0", "--no-mimi",
               "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "rtf" in text and "rtfx" in text and "capacity" in text
    row = json.loads(out.read_text().splitlines()[-1])
    assert {"device", "torch", "commit"} <= set(row)
    systems = {(r["system"], r["batch"]) for r in row["rows"]}
    assert {("dsm", 1), ("dsm", 2), ("moshi", 1), ("moshi", 2)} <= systems
    for r in row["rows"]:
        assert r["p50_ms"] > 0 and r["rtfx"] > 0
