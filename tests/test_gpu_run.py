"""bench/gpu_run.sh must work the first time it meets a GPU: its --dry-run (the same steps at tiny sizes on
the CPU) runs here end to end and writes everything the GPU run is meant to write."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_run.sh"


def test_dry_run_writes_the_table_three_runs_and_the_report(small_corpus, tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--corpus", str(small_corpus), str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1100)
    log = (out / "gpu_run.log").read_text() if (out / "gpu_run.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + log[-4000:]
    summary = (out / "summary.md").read_text()
    assert "FAILED" not in summary and "time box" not in summary, summary + log[-4000:]
    for step in ("throughput", "compare", "train sim", "train gim", "train cpc", "report"):
        assert f"| {step} | ok |" in summary, summary
    table = (out / "throughput.md").read_text()
    assert "| batch | clips/s |" in table and "| 2 |" in table
    assert "new / old speed (CPU time) over 1 rounds" in (out / "compare.md").read_text()
    for method in ("sim", "gim", "cpc"):
        ckpt = torch.load(out / "runs" / method / "checkpoint.pt", weights_only=True)
        assert ckpt["config"]["preset"] == "paper" and ckpt["config"]["method"] == method and ckpt["epoch"] == 1
        assert f"| {method} | {ckpt['step']} of batch 8 |" in summary
    assert "sim" in (out / "report" / "index.md").read_text() and (out / "report" / "results.json").is_file()
    assert "python" in (out / "env.txt").read_text()


def test_usage_errors_are_clear(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    no_out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert no_out.returncode == 2 and "OUT_DIR missing" in no_out.stderr
    bad_corpus = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--corpus", str(tmp_path), str(tmp_path / "o")],
                                env=env, capture_output=True, text=True, timeout=120)
    assert bad_corpus.returncode == 1 and "not a built corpus" in bad_corpus.stdout
