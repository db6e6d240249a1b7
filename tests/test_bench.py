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
