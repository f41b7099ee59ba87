"""Faults in files: a checkpoint write killed (SIGKILL) or out of disk keeps the last good checkpoint
and --resume works (bench/checkpoint_faults.py, a short run); a damaged ONNX file, manifest or
checkpoint is refused with a message naming the file."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from support.serving import PY, ROOT


def run(*args, timeout=300):
    return subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_sigkill_during_saves_and_a_full_disk_keep_the_last_good_checkpoint(small_corpus, tmp_path):
    res = run("bench/checkpoint_faults.py", "--trials", "3", "--resume-every", "3", "--full-disk", "--cache", tmp_path,
              "--corpus", small_corpus, "--json", tmp_path / "r.json", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    s = out["summary"]
    assert s["trials"] == s["loaded"] == s["ok"] == 3 and s["resumes"] == s["resumes_ok"] == 1
    disk = out["full_disk"]
    assert disk["ok"] and disk["returncode"] == 2 and "could not be written" in disk["message"]
    assert "previous checkpoint.pt is kept" in disk["message"] and disk["leftovers"] == 0


def damage(model_dir, tmp_path, how: str):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    manifest = d / "manifest.json"
    if how == "truncated-onnx":
        data = (d / "step.onnx").read_bytes()
        (d / "step.onnx").write_bytes(data[: len(data) // 2])
        return d, "step.onnx"
    if how == "altered-onnx":
        data = bytearray((d / "flush.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / "flush.onnx").write_bytes(bytes(data))
        return d, "flush.onnx"
    if how == "truncated-manifest":
        manifest.write_text(manifest.read_text()[:200])
        return d, "manifest.json"
    m = json.loads(manifest.read_text())  # altered-manifest: a listed hash no longer matches its file
    m["files"]["step.onnx"]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    return d, "step.onnx"


@pytest.mark.parametrize("how", ["truncated-onnx", "altered-onnx", "truncated-manifest", "altered-manifest"])
def test_the_server_refuses_a_damaged_model_naming_the_file(model, tmp_path, how):
    d, name = damage(model[0], tmp_path, how)
    res = run("-m", "serve", "--model", d, "--port", "0", timeout=120)
    assert res.returncode == 2, res.stderr
    assert name in res.stderr and "Traceback" not in res.stderr
    if how != "truncated-manifest":
        assert "sha256" in res.stderr


def test_a_truncated_checkpoint_is_refused_by_resume_and_export(model, tmp_path):
    ckpt = model[1]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = ckpt.read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    res = run("-m", "train.sim", "--resume", "--out", run_dir, "--threads", "1")
    assert res.returncode == 2 and "checkpoint.pt" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = run("-m", "export.onnx", run_dir / "checkpoint.pt", "--out", tmp_path / "export")
    assert res.returncode != 0 and "checkpoint.pt" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "export" / "manifest.json").exists()


def test_a_save_removes_what_a_save_killed_mid_write_left(tmp_path):
    from train.checkpoint import save_atomic

    target = tmp_path / "checkpoint.pt"
    left = tmp_path / "checkpoint.pt.abc123.tmp"  # what SIGKILL during torch.save leaves behind
    left.write_bytes(b"half a checkpoint")
    other = tmp_path / "decoder.pt.xyz.tmp"  # another file's temporary is not ours to remove
    other.write_bytes(b"x")
    save_atomic({"step": 1}, target)
    assert target.is_file() and not left.exists() and other.exists()
