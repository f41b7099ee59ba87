"""The coverage-guided fuzz target for audio decoding and file loading (bench/fuzz_audio.py), run
for a bounded number of inputs; and the inputs it (or its checks) found, kept as regression tests."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import soundfile as sf

from clients.audio import AudioFileError
from clients.audio import load_audio as client_load
from support.serving import PY, ROOT
from train.audio import AudioError
from train.audio import load_audio as train_load

RUNS = 3000  # about 6 s on the 2-core development VM; longer runs: -max_total_time=SECONDS


def test_fuzz_target_finds_nothing_in_a_bounded_run(tmp_path):
    pytest.importorskip("atheris", reason="atheris is in the dev extra (Linux): pip install -e '.[dev]'")
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its scratch files and seeds: removed with tmp_path
    run = subprocess.run([PY, str(ROOT / "bench" / "fuzz_audio.py"), f"-runs={RUNS}", "-seed=1"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert f"Done {RUNS} runs" in out
    assert not list(tmp_path.glob("crash-*")), out[-4000:]


def absurd_float_wav(path, rate: int):
    """Finite float32 samples at the edge of the float32 range, alternating in sign."""
    x = np.full(400, 3.0e38, np.float32)
    x[::2] = -3.0e38
    sf.write(str(path), x, rate, subtype="FLOAT")
    return path


def test_samples_that_overflow_when_resampled_are_refused_naming_the_file(tmp_path):
    # found by the fuzz target's check: clients.audio.load_audio returned NaN after resampling
    path = absurd_float_wav(tmp_path / "absurd.wav", 8000)
    with pytest.raises(AudioFileError, match=r"absurd\.wav: samples far outside \[-1, 1\] overflow when resampled"):
        client_load(path, 16000)
    with pytest.raises(AudioError, match=r"absurd\.wav: contains NaN or infinite"):
        train_load(path, allow_resample=True)
    # at the model's rate nothing is resampled: the finite samples come back as they are
    same = client_load(absurd_float_wav(tmp_path / "absurd16k.wav", 16000), 16000)
    assert np.isfinite(same).all() and np.abs(same).max() == np.float32(3.0e38)


@pytest.mark.parametrize("data", [b"", b"RIFF", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC" + bytes(40),
                                  bytes(range(256))], ids=["empty", "riff", "wav-header-only", "flac-header", "noise"])
def test_damaged_files_are_refused_naming_the_file(tmp_path, data):
    path = tmp_path / "damaged.wav"
    path.write_bytes(data)
    with pytest.raises(AudioFileError, match="damaged.wav"):
        client_load(path, 16000)
    with pytest.raises(AudioError, match="damaged.wav"):
        train_load(path)
