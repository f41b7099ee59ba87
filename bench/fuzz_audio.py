"""Coverage-guided fuzzing (atheris / libFuzzer) of the paths that turn untrusted bytes into samples:
the server's audio-message decoding (serve/audio_codec.py), the clients' file loading
(clients/audio.py: any format soundfile reads, mixed down, resampled) and training's file loading
(train/audio.py).

    python bench/fuzz_audio.py -runs=3000              # bounded by iterations (CI: tests/test_fuzz_audio.py)
    python bench/fuzz_audio.py -max_total_time=600     # bounded by time
    python bench/fuzz_audio.py CRASH_FILE              # run one input again (a crash libFuzzer saved)

Any argument is passed to libFuzzer (`-help=1` lists them). It starts from small valid wav and
flac files (mono and stereo, 16 and 8 kHz, PCM16 and float) written to a temporary folder
(under $TMPDIR; libFuzzer exits without Python's clean-up, so the folder stays). Each
input's first byte picks the path; the rest is the message or the file. A path may refuse an input
only with its documented error (StreamError, AudioFileError, AudioError); any other exception,
a hang past -timeout, a crash of the process, or samples that are not finite float32 mono is a
finding: libFuzzer stops and writes the input to crash-<sha1> in the current folder.
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:
    sys.exit("error: atheris is not installed (pip install -e '.[dev]'; Linux only)")

with atheris.instrument_imports(include=["serve", "clients", "train", "protos", "soundfile", "soxr"]):
    import clients.audio
    import serve.audio_codec
    import train.audio
    from protos.sim.v2 import sim_pb2 as pb
    from serve.errors import StreamError

SAMPLE_RATE = train.audio.SAMPLE_RATE
SCRATCH = Path(tempfile.mkdtemp(prefix="fuzz_audio_"))
SUFFIXES = (".wav", ".flac", ".ogg", ".raw")


def check_samples(x: np.ndarray, what: str) -> None:
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 1 and np.isfinite(x).all()):
        raise AssertionError(f"{what}: returned {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}, "
                             "not finite float32 mono samples")


def fuzz_message(data: bytes, encoding: int) -> None:
    """One StreamEncode audio message, as the server decodes it."""
    try:
        x = serve.audio_codec.decode_audio(data, encoding)
    except StreamError:
        return
    check_samples(x, "decode_audio")
    assert len(x) * serve.audio_codec.codec.SAMPLE_DTYPES[encoding].itemsize == len(data)


def fuzz_file(data: bytes, suffix: str, which: int) -> None:
    """One audio file, through the clients' or training's loader."""
    path = SCRATCH / f"input{suffix}"
    path.write_bytes(data)
    try:
        if which == 0:
            x = clients.audio.load_audio(path, SAMPLE_RATE)
        elif which == 1:
            x = train.audio.load_audio(path)
        else:
            x = train.audio.load_audio(path, allow_resample=True, mixdown=True)
    except (clients.audio.AudioFileError, train.audio.AudioError) as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc}"
        return
    check_samples(x, ("clients.audio.load_audio", "train.audio.load_audio",
                      "train.audio.load_audio(allow_resample, mixdown)")[which])


def test_one_input(data: bytes) -> None:
    if not data:
        return
    kind, rest = data[0], data[1:]
    if kind < 64:
        fuzz_message(rest, pb.LINEAR16 if kind % 2 else pb.FLOAT32)
    else:
        fuzz_file(rest, SUFFIXES[kind % len(SUFFIXES)], kind % 3)


def write_seeds(folder: Path) -> Path:
    """Valid inputs for each path: libFuzzer mutates these (headers included) rather than start blind."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(400)).astype(np.float32)
    (folder / "msg_f32").write_bytes(bytes([0]) + x.tobytes())
    (folder / "msg_i16").write_bytes(bytes([1]) + (x * 32767).astype("<i2").tobytes())
    files = [(".wav", SAMPLE_RATE, 1, "PCM_16"), (".wav", 8000, 2, "FLOAT"), (".flac", SAMPLE_RATE, 1, "PCM_16"),
             (".flac", 22050, 2, "PCM_24"), (".wav", SAMPLE_RATE, 1, "PCM_U8")]
    for i, (suffix, rate, channels, subtype) in enumerate(files):
        f = SCRATCH / f"seed{i}{suffix}"
        sf.write(str(f), np.tile(x[:, None], (1, channels)), rate, subtype=subtype)
        for which in range(3):  # a first byte that picks this suffix and each loader
            kind = next(k for k in range(64, 256) if SUFFIXES[k % len(SUFFIXES)] == suffix and k % 3 == which)
            (folder / f"file{i}_{which}").write_bytes(bytes([kind]) + f.read_bytes())
    return folder


def main() -> None:
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus or input given: start from the seeds
        args.append(str(write_seeds(SCRATCH / "seeds")))
    if not any(a.startswith("-timeout=") for a in args):
        args.insert(1, "-timeout=20")
    if not any(a.startswith("-rss_limit_mb=") for a in args):
        # libFuzzer watches the peak RSS (getrusage), which Linux carries over from the process that
        # started this one (pytest with models loaded: gigabytes): 2 GiB above where it starts
        start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        args.insert(1, f"-rss_limit_mb={start_mb + 2048}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
