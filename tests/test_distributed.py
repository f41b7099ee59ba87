"""torchrun on CPU (gloo): a job of several processes trains what one process trains, resumes at any world
size, runs as two "machines" on loopback, and ends with a clear error when a process dies.

Every process is started with a timeout; the runs are tiny (16 clips, 32 channels, one thread each)."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from support.torchrun import ROOT, TIMEOUT, job_env, torchrun
from train.checkpoint import load
from train.distributed import shard_of
from train.sim import parse_args, train

# GIM without BatchNorm in float32: no posterior noise, no per-rank batch statistics and no bf16 rounding, so
# equal up to float32 rounding
EXACT = ["--method", "gim", "--no-batch-norm", "--autocast", "off", "--channels", "32", "--hidden", "16",
         "--threads", "1", "--max-clips", "16", "--batch-size", "8", "--lr", "3e-3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def assert_same_weights(a: Path, b: Path, moved_from: Path | None = None) -> None:
    wa, wb = load(a)["model"], load(b)["model"]
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5), (k, float((wa[k] - wb[k]).abs().max()))
    if moved_from is not None:  # the comparison means something only if training changed the weights
        w0 = load(moved_from)["model"]
        assert any(float((wa[k] - w0[k]).abs().max()) > 1e-3 for k in wa)


def test_a_batch_splits_into_contiguous_shares():
    assert [shard_of(8, r, 2).sizes for r in (0, 1)] == [(4, 4), (4, 4)]
    s = shard_of(7, 1, 3)
    assert (s.sizes, s.start, s.stop, s.total) == ((3, 2, 2), 3, 5, 7)
    assert abs(s.weight - 2 * 3 / 7) < 1e-12 and shard_of(8, 0, 2).weight == 1.0


def test_two_processes_train_what_one_trains_and_resume_at_any_world_size(small_corpus, tmp_path):
    data = ["--corpus-dir", str(small_corpus)]
    one = train(parse_args([*EXACT, *data, "--out", str(tmp_path / "one"), "--epochs", "1"]))
    two_epochs = train(parse_args([*EXACT, *data, "--out", str(tmp_path / "one2"), "--epochs", "2"]))
    start = train(parse_args([*EXACT, *data, "--out", str(tmp_path / "init"), "--epochs", "1", "--lr", "1e-12"]))

    # 2 ranks x 4 clips against 1 process x 8 clips, after the epoch's 2 steps
    ddp = tmp_path / "ddp"
    two = torchrun("--standalone", "--nproc-per-node", "2")
    done = run_job([*two, *EXACT, *data, "--out", str(ddp), "--epochs", "1"])
    assert "x 2 processes" in done.stdout and done.stdout.count("done:") == 1  # rank 0 alone reports
    assert load(ddp / "checkpoint.pt")["step"] == 2
    assert_same_weights(ddp / "checkpoint.pt", one, moved_from=start)

    # the 2-process checkpoint resumed by one process: the same as one process's two epochs
    run_job([sys.executable, "-m", "train.sim", "--resume", "--out", str(ddp), "--epochs", "2", "--threads", "1"])
    assert_same_weights(ddp / "checkpoint.pt", two_epochs)


def test_two_machines_on_loopback_with_c10d_rendezvous(small_corpus, tmp_path):
    one = train(parse_args([*EXACT, "--corpus-dir", str(small_corpus), "--out", str(tmp_path / "one"),
                            "--epochs", "1"]))
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    node = torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", endpoint, "--rdzv-id", "test-job")
    args = [*EXACT, "--corpus-dir", str(small_corpus), "--out", str(out), "--epochs", "1"]
    procs = [subprocess.Popen(node + args, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    try:
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert sum("x 2 processes" in stdout for stdout, _ in results) == 1
    assert_same_weights(out / "checkpoint.pt", one)


def children(pid: int) -> list[int]:
    """The process ids whose parent is pid (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@contextlib.contextmanager
def two_rank_job(small_corpus, tmp_path, wait_for: str):
    """A 2-rank torchrun job of 500 epochs, yielded once OUT/wait_for exists (so both ranks are in the
    training loop), with its run folder and log path; killed at the end if it is still running."""
    out = tmp_path / "job"
    log_path = tmp_path / "job.log"
    cmd = torchrun("--standalone", "--nproc-per-node", "2") + [
        *EXACT, "--corpus-dir", str(small_corpus), "--out", str(out), "--epochs", "500"]
    with log_path.open("w") as log:
        job = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (out / wait_for).exists() and time.time() < deadline and job.poll() is None:
            time.sleep(0.1)
        assert job.poll() is None, log_path.read_text()[-3000:]
        yield job, out, log_path
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=30)


def test_a_killed_process_ends_the_job_with_a_clear_error(small_corpus, tmp_path):
    with two_rank_job(small_corpus, tmp_path, wait_for="tb") as (job, _, log):  # tb: rank 0 is training
        workers = children(job.pid)
        assert len(workers) == 2, log.read_text()[-3000:]
        os.kill(max(workers), signal.SIGKILL)
        rc = job.wait(timeout=120)
    text = log.read_text()
    assert rc != 0
    assert "SIGKILL" in text and "train.sim FAILED" in text, text[-3000:]


def test_sigterm_stops_every_rank_after_the_same_batch_and_rank_0_saves(small_corpus, tmp_path):
    with two_rank_job(small_corpus, tmp_path, wait_for="checkpoint.pt") as (job, out, log):  # an epoch is done
        job.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank
        job.wait(timeout=120)
    text = log.read_text()
    assert text.count("interrupted: saved") == 2, text[-3000:]  # both ranks stopped cleanly, not killed
    saved = load(out / "checkpoint.pt")
    assert 1 <= saved["epoch"] < 500
    assert f"batch {saved['batch']}/2" in text or saved["batch"] == 0
