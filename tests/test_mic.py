"""clients.mic recording through a real PulseAudio virtual microphone into the real server.

A null sink `vsink` (16 kHz mono) whose monitor source is the default input: whatever
`paplay --device=vsink` plays is what sounddevice records. Skips where PulseAudio, its tools or
PortAudio are missing (Debian: pulseaudio pulseaudio-utils libasound2-plugins libportaudio2).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from clients.collector import FrameCollector
from clients.requests import file_requests
from serve.launch import ServerProcess
from support.serving import PY, ROOT, model_dir
from train.audio import SAMPLE_RATE, level_hops
from train.corpus import load_corpus

TOOLS = ("pulseaudio", "pactl", "paplay")


def lag_of(recording: np.ndarray, clip: np.ndarray) -> tuple[int, float]:
    """Sample offset of clip inside recording (FFT cross-correlation) and the normalised correlation there."""
    n = len(recording) + len(clip)
    size = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(recording, size) * np.conj(np.fft.rfft(clip, size)), size)[:len(recording) - len(clip) + 1]
    lag = int(np.argmax(xc))
    seg = recording[lag:lag + len(clip)]
    corr = float(np.dot(seg, clip) / (np.linalg.norm(seg) * np.linalg.norm(clip) + 1e-12))
    return lag, corr


@pytest.fixture(scope="module")
def virtual_mic(tmp_path_factory):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"PulseAudio tools missing ({', '.join(missing)}): apt-get install pulseaudio pulseaudio-utils "
                    "libasound2-plugins libportaudio2")
    import ctypes.util

    if ctypes.util.find_library("portaudio") is None:
        pytest.skip("the PortAudio library is missing (apt-get install libportaudio2)")
    d = tmp_path_factory.mktemp("pulse")
    (d / "runtime").mkdir()
    env = {**os.environ, "HOME": str(d), "PULSE_RUNTIME_PATH": str(d / "runtime"), "PULSE_STATE_PATH": str(d),
           "XDG_RUNTIME_DIR": str(d / "runtime"), "XDG_CONFIG_HOME": str(d)}
    started = subprocess.run(
        ["pulseaudio", "-n", "--daemonize=yes", "--exit-idle-time=-1", "--use-pid-file=yes",
         "-L", f"module-native-protocol-unix socket={d}/native auth-anonymous=1",
         "-L", "module-null-sink sink_name=vsink rate=16000 channels=1"],
        env=env, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        pytest.skip(f"pulseaudio does not start here: {started.stderr.strip()[-300:]}")
    daemon_pid = int((d / "runtime" / "pid").read_text().split()[0])
    env["PULSE_SERVER"] = f"unix:{d}/native"
    saved = os.environ.get("PULSE_SERVER")
    os.environ["PULSE_SERVER"] = env["PULSE_SERVER"]  # for sounddevice in this process
    try:
        subprocess.run(["pactl", "set-default-source", "vsink.monitor"], env=env, check=True, timeout=10)
        import sounddevice as sd

        sd._terminate()  # PortAudio lists devices when it starts: restart it now that the server exists
        sd._initialize()
        sd.rec(8000, samplerate=SAMPLE_RATE, channels=1, blocking=True)  # the monitor stalls right after start
        yield env
    finally:
        try:
            os.kill(daemon_pid, 15)
        except ProcessLookupError:
            pass
        if saved is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = saved


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_corpus):
    model, _ = model_dir(tmp_path_factory.getbasetemp(), small_corpus)
    srv = ServerProcess(model, log_dir=tmp_path_factory.mktemp("log")).start()
    yield srv
    srv.close()


def capture_check(env, clip: np.ndarray, tmp: Path) -> tuple[int, float, float]:
    """Play clip (after 0.1 s of silence) while recording with sounddevice in this process:
    (lag, correlation, max error)."""
    import sounddevice as sd

    clip_path = tmp / "check.wav"
    sf.write(clip_path, np.concatenate([np.zeros(1600, np.float32), clip]), SAMPLE_RATE, subtype="PCM_16")

    blocks = []
    with sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=160,
                        callback=lambda data, *_: blocks.append(data[:, 0].copy())):
        time.sleep(0.2)
        subprocess.run(["paplay", "--device=vsink", str(clip_path)], env=env, check=True, timeout=30)
        time.sleep(0.3)
    rec = np.concatenate(blocks)
    lag, corr = lag_of(rec, clip)
    return lag, corr, float(np.abs(rec[lag:lag + len(clip)] - clip).max())


def test_virtual_microphone_hears_paplay(virtual_mic, small_corpus, tmp_path):
    clip = sf.read(load_corpus(small_corpus, "test")[0].path, dtype="float32")[0]
    lag, corr, err = capture_check(virtual_mic, clip, tmp_path)
    assert corr > 0.99 and err == 0.0, (corr, err)


def test_mic_client_latents_match_streaming_the_file(virtual_mic, server, small_corpus, tmp_path):
    utts = load_corpus(small_corpus, "test")[3:5]
    clip = np.concatenate([sf.read(u.path, dtype="float32")[0] for u in utts])
    wav = tmp_path / "clip.wav"
    # PCM16 both ways makes the capture bit-exact. PulseAudio zeroes the first ~15 ms of a new
    # playback stream, so the played file starts with 0.1 s of silence.
    sf.write(wav, np.concatenate([np.zeros(1600, np.float32), clip]), SAMPLE_RATE, subtype="PCM_16")
    clip = sf.read(wav, dtype="float32")[0][1600:]
    prefix = tmp_path / "mic"
    duration = len(clip) / SAMPLE_RATE + 3.0
    mic = subprocess.Popen([PY, "-m", "clients.mic", "--server", server.address, "--duration", f"{duration:.2f}",
                            "--save", str(prefix)], cwd=ROOT, env=virtual_mic, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        first = mic.stdout.readline()
        assert first.startswith("recording from"), first + mic.stderr.read()
        time.sleep(0.5)
        subprocess.run(["paplay", "--device=vsink", str(wav)], env=virtual_mic, check=True, timeout=30)
        out, err = mic.communicate(timeout=60)
    finally:
        if mic.poll() is None:
            mic.kill()
    assert mic.returncode == 0, err
    assert f"saved {prefix}.npz" in out

    recording = sf.read(f"{prefix}.wav", dtype="float32")[0]
    assert recording.size == round(float(f"{duration:.2f}") * SAMPLE_RATE)  # --duration: exactly that much audio
    got = np.load(f"{prefix}.npz")
    np.testing.assert_array_equal(got["audio"], recording)
    lag, corr = lag_of(recording, clip)
    assert corr > 0.99, f"the file was not heard (correlation {corr:.3f})"
    np.testing.assert_allclose(recording[lag:lag + len(clip)], clip, atol=1e-6)

    # the same file, streamed, shifted by the capture offset (silence before it, as the mic heard)
    import grpc

    from clients.connection import Connection
    from protos.sim.v2 import sim_pb2_grpc as pb_grpc

    shifted = np.concatenate([np.zeros(lag, np.float32), clip])
    channel = grpc.insecure_channel(server.address)
    col = FrameCollector()
    stub = Connection(channel, pb_grpc.SimEncoderStub(channel), ()).stub
    for resp in stub.StreamEncode(file_requests(shifted, SAMPLE_RATE, 1600)):
        col.add(resp)
    channel.close()
    ref = col.arrays()
    hops = level_hops()
    for level in ("m1", "m2", "m3", "ar"):
        # frames of the file; the last two top-level frames saw the end of the file (flush vs more silence)
        n = ref[level].shape[0] - 2 * 160 // hops[level]
        first_sound = lag // hops[level]
        assert got[level].shape[0] >= ref[level].shape[0] and n > first_sound
        np.testing.assert_allclose(got[level][:n], ref[level][:n], atol=1e-4, rtol=0, err_msg=level)
    assert np.abs(got["m3"][first_sound:n]).max() > 0


def test_list_devices_shows_the_virtual_input(virtual_mic):
    proc = subprocess.run([PY, "-m", "clients.mic", "--list-devices"], cwd=ROOT, env=virtual_mic,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "default" in proc.stdout, proc.stderr


def test_monitor_alerts_on_noise_heard_by_the_microphone(virtual_mic, server, tmp_path):
    import json
    import signal

    noise = np.clip(0.8 * np.random.default_rng(7).standard_normal(12000), -1, 1).astype(np.float32)
    wav = tmp_path / "noise.wav"
    sf.write(wav, np.concatenate([np.zeros(1600, np.float32), noise]), SAMPLE_RATE, subtype="PCM_16")
    events = tmp_path / "events.jsonl"
    mon = subprocess.Popen([PY, "-m", "clients.monitor", "--server", server.address, "--mic", "--level", "m1",
                            "--window", "0.2", "--events", str(events), "--poll", "0.1"], cwd=ROOT, env=virtual_mic,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = mon.stderr.readline()
        assert "monitoring the microphone" in line, line + mon.stderr.read()
        time.sleep(0.3)
        subprocess.run(["paplay", "--device=vsink", str(wav)], env=virtual_mic, check=True, timeout=30)
        time.sleep(0.5)
    finally:
        mon.send_signal(signal.SIGTERM)  # as Ctrl-C (SIGINT may be ignored in a background CI job)
        _, err = mon.communicate(timeout=30)
    assert mon.returncode == 0, err
    ev = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["event"] for e in ev]
    assert "alert" in kinds and kinds[-1] == "end" and {e["source"] for e in ev} == {"mic"}, ev
    assert ev[-1]["alerts"] >= 1 and ev[-1]["flagged"] > 0
