"""Training checkpoints under faults: SIGKILL at random moments while a checkpoint is being written,
then the last good checkpoint loads and `train.sim --resume` continues; and a full disk during a save.

    python bench/checkpoint_faults.py [--trials 50] [--resume-every 10] [--json OUT]

Trains a tiny SIM run for one epoch (real synthesised corpus) into --cache/run. Each trial starts a
process that saves that run's checkpoint over and over exactly as training does
(train.checkpoint.save_atomic: temporary file, fsync, rename), printing each save it completed,
and kills it with SIGKILL after a random 0-1 s. Then checkpoint.pt must load, and be the last save
reported or the one in flight (a save whose rename landed just before the kill). A kill that
landed mid-write leaves a temporary file behind (counted, then removed). Every --resume-every
trials, and after the last, `python -m train.sim --resume` must train one more epoch from it.
--full-disk runs one save under a file-size limit (RLIMIT_FSIZE, smaller than the checkpoint):
train.sim must exit 2 with an error naming the file, and the previous checkpoint must still load.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ["--channels", "32", "--hidden", "16", "--threads", "1", "--max-clips", "16", "--batch-size", "4"]


def train_cmd(run: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "train.sim", "--out", str(run), *TINY, *args]


def prepare_run(cache: Path, corpus: Path | None) -> Path:
    """A tiny SIM run trained for one epoch, in cache/run (reused)."""
    run = cache / "run"
    if not (run / "checkpoint.pt").is_file():
        if corpus is None:
            sys.path.insert(0, str(ROOT / "bench"))
            from serve_capacity import bench_corpus

            corpus = bench_corpus(cache)
        subprocess.run(train_cmd(run, "--corpus-dir", str(corpus), "--epochs", "1"), cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
    return run


def child(run: Path) -> None:
    """Save the run's checkpoint forever (step + 1 each time), printing each completed save."""
    from train.checkpoint import load, save_atomic

    path = run / "checkpoint.pt"
    ckpt = load(path)
    print("ready", flush=True)
    while True:
        ckpt["step"] += 1
        save_atomic(ckpt, path)
        print(ckpt["step"], flush=True)


def kill_trial(run: Path, rng: random.Random) -> dict:
    from train.checkpoint import CheckpointError, load

    path = run / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    wait = rng.uniform(0.0, 1.0)
    time.sleep(wait)
    proc.send_signal(signal.SIGKILL)
    done = [int(x) for x in proc.stdout.read().split()]
    proc.wait()
    try:
        step = load(path)["step"]
        loaded, error = True, ""
    except CheckpointError as exc:
        step, loaded, error = None, False, str(exc)
    leftovers = list(run.glob("checkpoint.pt.*.tmp"))
    for f in leftovers:
        f.unlink()
    last = done[-1] if done else None
    ok = loaded and (last is None or step in (last, last + 1))
    return {"after_s": round(wait, 3), "saves": len(done), "loaded": loaded, "step": step, "last_reported": last,
            "mid_write": bool(leftovers), "ok": ok, "error": error}


def resume_check(run: Path) -> dict:
    from train.checkpoint import load

    before = load(run / "checkpoint.pt")["epoch"]
    res = subprocess.run(train_cmd(run, "--resume", "--epochs", str(before + 1)), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    after = load(run / "checkpoint.pt")["epoch"] if res.returncode == 0 else None
    return {"epoch_before": before, "epoch_after": after, "ok": res.returncode == 0 and after == before + 1,
            "stderr": res.stderr[-500:] if res.returncode else ""}


def full_disk_check(run: Path) -> dict:
    """--resume for one more epoch with files limited to half the checkpoint's size."""
    from train.checkpoint import load

    path = run / "checkpoint.pt"
    before = load(path)
    limit = path.stat().st_size // 2

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(train_cmd(run, "--resume", "--epochs", str(before["epoch"] + 1)), cwd=ROOT,
                         capture_output=True, text=True, timeout=600, preexec_fn=limited)
    after = load(path)
    clear = res.returncode == 2 and str(path) in res.stderr and "Traceback" not in res.stderr
    kept = after["epoch"] == before["epoch"] and after["step"] == before["step"]
    return {"limit_bytes": limit, "returncode": res.returncode, "message": res.stderr.strip()[-300:],
            "clear_error": clear, "previous_kept": kept, "leftovers": len(list(run.glob("checkpoint.pt.*.tmp"))),
            "ok": clear and kept}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50, help="SIGKILL trials (default %(default)s)")
    ap.add_argument("--resume-every", type=int, default=10,
                    help="run --resume after every N trials (default %(default)s)")
    ap.add_argument("--full-disk", action="store_true", help="also the full-disk check")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "checkpoint_faults"), help="where the tiny run lives")
    ap.add_argument("--corpus", help="corpus folder for the tiny run (default: a small one built in --cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(Path(args.child))
        return 0
    run = prepare_run(Path(args.cache), Path(args.corpus) if args.corpus else None)
    rng = random.Random(args.seed)
    trials, resumes = [], []
    t0 = time.monotonic()
    for i in range(1, args.trials + 1):
        trials.append(kill_trial(run, rng))
        t = trials[-1]
        print(f"trial {i}: killed after {t['after_s']:.2f} s, {t['saves']} saves done, "
              f"{'mid-write, ' if t['mid_write'] else ''}checkpoint {'loads' if t['loaded'] else 'BROKEN'} "
              f"(step {t['step']}, last reported {t['last_reported']})", flush=True)
        if i % args.resume_every == 0 or i == args.trials:
            resumes.append(resume_check(run))
            r = resumes[-1]
            print(f"  --resume: epoch {r['epoch_before']} -> {r['epoch_after']} {'ok' if r['ok'] else 'FAILED'}",
                  flush=True)
    disk = full_disk_check(run) if args.full_disk else None
    if disk is not None:
        print(f"full disk: exit {disk['returncode']}, previous kept: {disk['previous_kept']}; {disk['message']}")
    summary = {"trials": len(trials), "loaded": sum(t["loaded"] for t in trials),
               "ok": sum(t["ok"] for t in trials), "mid_write": sum(t["mid_write"] for t in trials),
               "resumes": len(resumes), "resumes_ok": sum(r["ok"] for r in resumes),
               "full_disk_ok": None if disk is None else disk["ok"], "seconds": round(time.monotonic() - t0, 1)}
    print(f"\n{summary['ok']}/{summary['trials']} kills left a checkpoint that loads and is the newest save "
          f"({summary['mid_write']} landed mid-write); --resume ok {summary['resumes_ok']}/{summary['resumes']}"
          + ("" if disk is None else f"; full disk: {'ok' if disk['ok'] else 'FAILED'}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "trials": trials, "resumes": resumes,
                                               "full_disk": disk}, indent=1))
    good = (summary["ok"] == summary["trials"] and summary["resumes_ok"] == summary["resumes"]
            and (disk is None or disk["ok"]))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
