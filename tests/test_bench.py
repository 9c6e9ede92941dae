import json

from rcod_core.tools.cli import main


def test_rcod_bench_tiny_writes_both_implementations(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--family", "tiny", "--size", "64", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["impl"]: r for r in data["results"]}
    assert set(rows) == {"baseline", "ours"}
    for r in rows.values():
        assert set(r["stages"]) == {"clip", "vae_enc", "unet", "vae_dec"}
        assert all(r["stages"][s]["median_ms"] > 0 for s in r["stages"]) and r["e2e"]["median_ms"] > 0
    # the same weights: merged LoRA (ours) vs unmerged peft LoRA (baseline) agree
    assert rows["ours"]["max_abs_diff_vs_baseline"] < 1e-4
    assert data["speedups"] and "speed-up = baseline e2e / ours e2e" in capsys.readouterr().out
