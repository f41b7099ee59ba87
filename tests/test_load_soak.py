"""Short CI versions of bench/load.py and bench/soak.py, on the tests' small model and corpus: the
same checks as the long runs (docs/reliability.md), with smaller counts and durations."""
from __future__ import annotations

import json
import subprocess

from support.serving import PY, ROOT

# Over 30 s windows of the 30-minute soak (docs/reliability.md) RSS slopes reached 17 MiB/min at the 99th
# percentile (a sawtooth: the never-reading clients' buffers come and go), so a short run can only catch
# gross leaks: one of more than 25 MiB a minute (e.g. keeping each stream's audio, 3 s at 64 KB/s, at
# over two streams a second). The 30-minute run is the real leak check.
CI_RSS_SLOPE_MIB_PER_MIN = 25.0


def bench(script: str, model, corpus, tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    res = subprocess.run([PY, f"bench/{script}", "--model", str(model[0]), "--checkpoint", str(model[1]),
                          "--corpus", str(corpus), "--cache", str(tmp_path), "--json", str(out), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.is_file(), res.stdout + res.stderr
    result = json.loads(out.read_text())
    assert res.returncode == (0 if result["pass"] else 1)
    return result | {"log": res.stdout + res.stderr}


def test_load_every_frame_once_in_order_and_equal_to_offline(model, small_corpus, tmp_path):
    r = bench("load.py", model, small_corpus, tmp_path, "--slow", "40", "--fast", "2", "--procs", "2", "--hold", "6",
              "--ramp", "1", "--over", "3")
    assert r["streams_held_at_once"] == 42 and r["codes"] == {"OK": 42}, r["log"]
    assert r["frames_checked"] > 0 and r["lost"] == r["duplicated"] == r["gaps"] == r["wrong"] == r["extra"] == 0
    assert r["over_limit"] == {"RESOURCE_EXHAUSTED": 3}
    assert r["pass"], r["log"]


def test_soak_has_no_unexpected_errors_and_no_gross_leak(model, small_corpus, tmp_path):
    r = bench("soak.py", model, small_corpus, tmp_path, "--minutes", "0.75", "--every", "3", "--warmup", "15",
              "--max-rss-slope", str(CI_RSS_SLOPE_MIB_PER_MIN))
    assert not r["unexpected"], r["log"]
    kinds = {k.split()[0] for k in r["outcomes"]}
    assert {"stream", "info", "decode", "bad-config", "nan"} <= kinds, r["outcomes"]
    assert r["slopes"]["rss_mib_per_min"] <= CI_RSS_SLOPE_MIB_PER_MIN, r["log"]
    assert r["pass"]
