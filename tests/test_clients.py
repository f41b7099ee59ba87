"""The command-line clients against the real server: clients.stream and clients.monitor."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from clients.collector import flagged_stretches
from clients.monitor import DirectoryWatcher, RollingRate, stop_on_signals
from clients.view import level_meter, ood_timeline, sparkline
from serve.launch import ServerProcess, metric_value
from support.serving import PY, ROOT, offline, wait_for
from train.corpus import load_corpus


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = ServerProcess(model[0], log_dir=tmp_path_factory.mktemp("log")).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def files(small_corpus, tmp_path_factory):
    """A speech file (two test words) and a loud white-noise file, 16 kHz PCM16."""
    d = tmp_path_factory.mktemp("audio")
    utts = load_corpus(small_corpus, "test")[:2]
    speech = np.concatenate([sf.read(u.path, dtype="float32")[0] for u in utts])
    noise = np.clip(0.8 * np.random.default_rng(5).standard_normal(16000), -1, 1).astype(np.float32)
    sf.write(d / "speech.wav", speech, 16000, subtype="PCM_16")
    sf.write(d / "noise.wav", noise, 16000, subtype="PCM_16")
    return d / "speech.wav", d / "noise.wav"


def cli(module, *args, timeout=120):
    return subprocess.run([PY, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_stream_cli_saves_train_encode_arrays(server, model, files, tmp_path):
    speech = files[0]
    ref = cli("train.encode", speech, "--checkpoint", model[1], "--out", tmp_path / "offline.npz")
    assert ref.returncode == 0, ref.stderr
    proc = cli("clients.stream", speech, "--server", server.address, "--out", tmp_path / "s.npz", "--chunk-samples", 333)
    assert proc.returncode == 0, proc.stderr
    got, want = np.load(tmp_path / "s.npz"), np.load(tmp_path / "offline.npz")
    for name in ("m1", "m2", "m3", "ar", "kl_m1", "kl_m2", "kl_m3"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-5, err_msg=name)
    assert got["p_value"].shape == got["ood"].shape == (want["m3"].shape[0],)
    assert got["ood"].dtype == bool and np.all((got["p_value"] > 0) & (got["p_value"] <= 1))
    np.testing.assert_array_equal(got["p_value"], got["p_value_m3"])
    for level in ("m1", "m2", "m3", "ar"):
        assert got[f"p_value_{level}"].shape == got[f"ood_{level}"].shape == (want[level].shape[0],)
    assert re.search(rf"OOD \(m3\): \d+ of {want['m3'].shape[0]} frames flagged", proc.stdout)
    assert "timeline" in proc.stdout and f"saved {tmp_path / 's.npz'}" in proc.stdout


def test_stream_cli_realtime_linear16_and_levels(server, model, files, tmp_path):
    proc = cli("clients.stream", files[0], "--server", server.address, "--out", tmp_path / "r.npz", "--realtime",
               "--encoding", "linear16", "--levels", "m3,ar", "--logvar")
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "r.npz")
    assert {"m3", "ar", "logvar_m3", "kl_m3", "p_value", "ood"} <= set(got.files) and "m1" not in got.files
    audio = sf.read(files[0], dtype="float32")[0]  # a PCM16 file: linear16 on the wire is exact
    np.testing.assert_allclose(got["m3"], offline(model[1], audio)["m3"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("args,code,text", [
    (["/nonexistent.wav", "--out", "x.npz"], 2, "cannot read audio"),
    (["{speech}", "--out", "x.npz", "--server", "127.0.0.1:1", "--timeout", "1"], 2, "cannot reach the server"),
    (["{speech}", "--out", "x.npz", "--levels", "m7"], 2, "--levels m7: the served model (sim) has levels"),
    (["{empty}", "--out", "x.npz"], 2, "contains no audio samples"),
    (["{speech}", "--out", "x.npz", "--chunk-samples", "0"], 2, "--chunk-samples"),
])
def test_stream_cli_errors(server, files, tmp_path, args, code, text):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    args = [a.format(speech=files[0], empty=empty) for a in args]
    if "--server" not in args:
        args += ["--server", server.address]
    proc = subprocess.run([PY, "-m", "clients.stream", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == code, proc.stderr
    assert "error:" in proc.stderr and text in proc.stderr and "Traceback" not in proc.stderr


def test_stream_cli_warns_about_a_truncated_file_and_saves_float16(server, files, tmp_path):
    whole = files[0].read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[:len(whole) // 2])  # the header still promises the whole file
    proc = cli("clients.stream", cut, "--server", server.address, "--out", tmp_path / "h.npz", "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "truncated" in proc.stderr and "(50 %)" in proc.stderr
    assert re.search(r"writing about \d+\.\d MB", proc.stderr) and re.search(r"saved .*h\.npz \(\d+\.\d MB\)",
                                                                             proc.stdout)
    got = np.load(tmp_path / "h.npz")
    assert got["m1"].dtype == np.float16 and got["window_m3"].dtype == np.float16 and got["ood"].dtype == bool
    assert cli("clients.stream", files[0], "--server", server.address, "--out", tmp_path / "f.npz").returncode == 0
    want = np.load(tmp_path / "f.npz")
    n = got["m3"].shape[0]
    assert 0.4 < n / want["m3"].shape[0] < 0.6  # half the audio
    # float16 keeps about 3 significant digits of the float32 latents (the last frames saw the cut)
    np.testing.assert_allclose(got["m3"][:n - 3].astype(np.float32), want["m3"][:n - 3], rtol=2e-3, atol=2e-3)


def test_stream_cli_saves_the_frames_before_the_server_ends_the_stream(model, files, tmp_path):
    srv = ServerProcess(model[0], "--max-stream-seconds", "0.5", log_dir=tmp_path).start()
    try:
        proc = cli("clients.stream", files[0], "--server", srv.address, "--out", tmp_path / "cut.npz",
                   "--chunk-samples", 800, "--realtime")  # frames come back before the limit is reached
    finally:
        srv.close()
    assert proc.returncode == 1
    assert "OUT_OF_RANGE" in proc.stderr and "the stream was cut short" in proc.stderr
    got = np.load(tmp_path / "cut.npz")
    full = sf.read(files[0])[0].size
    assert 0 < got["m3"].shape[0] <= 51 and got["m3"].shape[0] < full // 160  # at most the first 0.5 s
    assert got["ood"].shape == (got["m3"].shape[0],) and got["m1"].shape[0] > 0


def test_npz_stream_writes_what_numpy_savez_writes(tmp_path):
    from clients.npz_stream import NpzStream

    rng = np.random.default_rng(2)
    parts = {"m1": [rng.standard_normal((n, 5)).astype(np.float32) for n in (3, 0, 7)],
             "ood_m1": [rng.random(n) > 0.5 for n in (3, 0, 7)], "kl_m1": [rng.random(n) for n in (3, 0, 7)]}
    sink = NpzStream(tmp_path / "a.npz")
    for i in range(3):
        for name, p in parts.items():
            sink.append(name, p[i])
    assert sink.bytes_written == 10 * 5 * 4 + 10 + 10 * 4
    sink.close({"ood": np.ones(4, bool)})
    np.savez(tmp_path / "b.npz", **{k: np.concatenate(v) for k, v in parts.items()}, ood=np.ones(4, bool))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in b.files:
        want = b[name].astype(np.float32) if b[name].dtype == np.float64 else b[name]
        np.testing.assert_array_equal(a[name], want)
        assert a[name].dtype == want.dtype
    assert not any(p.name.startswith((".a.npz", "a.npz.")) for p in tmp_path.iterdir())  # no temporary files left
    s = NpzStream(tmp_path / "c.npz")
    s.append("x", np.zeros((2, 3)))
    with pytest.raises(ValueError):
        s.append("x", np.zeros((2, 4)))
    s.discard()


def events_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_monitor_once_exit_status_and_events(server, files, tmp_path):
    speech, noise = files
    ok = cli("clients.monitor", "--server", server.address, "--once", "--level", "m1", speech)
    assert ok.returncode == 0, ok.stderr
    ev = events_of(ok.stdout)
    assert [e["event"] for e in ev] == ["end"] and ev[0]["source"] == str(speech) and ev[0]["alerts"] == 0
    assert ev[0]["frames"] > 0
    alert = cli("clients.monitor", "--server", server.address, "--once", "--level", "m1", "--window", "0.2",
                "--events", tmp_path / "ev.jsonl", speech, noise)
    assert alert.returncode == 1, alert.stderr
    ev = events_of((tmp_path / "ev.jsonl").read_text())
    by_source = {}
    for e in ev:
        by_source.setdefault(e["source"], []).append(e)
    assert [e["event"] for e in by_source[str(speech)]] == ["end"]
    noise_events = by_source[str(noise)]
    assert noise_events[0]["event"] == "alert" and noise_events[0]["rate"] >= 0.2 and noise_events[0]["level"] == "m1"
    assert noise_events[-1]["event"] == "end" and noise_events[-1]["alerts"] >= 1
    assert noise_events[-1]["flagged"] > 0 and "wall" in noise_events[0]


def test_monitor_once_failures_and_usage(server, files, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    proc = cli("clients.monitor", "--server", server.address, "--once", bad)
    assert proc.returncode == 3
    assert events_of(proc.stdout)[0]["event"] == "error" and "cannot read audio" in proc.stdout
    proc = cli("clients.monitor", "--server", server.address)
    assert proc.returncode == 2 and "nothing to monitor" in proc.stderr


def test_monitor_watches_a_directory_and_exports_counters(server, files, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    events = tmp_path / "events.jsonl"
    proc = subprocess.Popen([PY, "-m", "clients.monitor", "--server", server.address, "--watch", str(incoming),
                             "--poll", "0.2", "--level", "m1", "--window", "0.2", "--events", str(events),
                             "--metrics-port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/metrics", line).group(1))
        (incoming / "noise.wav").write_bytes(files[1].read_bytes())
        (incoming / "notes.txt").write_text("not audio: ignored")
        wait_for(lambda: events.exists() and any(e["event"] == "end" for e in events_of(events.read_text())),
                 timeout=30, what="the watched file to be processed")
        ev = events_of(events.read_text())
        assert [e["event"] for e in ev][0] == "alert" and {e["source"] for e in ev} == {str(incoming / "noise.wav")}
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert metric_value(text, "sim_monitor_alerts_total") >= 1
        assert metric_value(text, "sim_monitor_frames_total") == ev[-1]["frames"]
        assert metric_value(text, "sim_monitor_flagged_frames_total") == ev[-1]["flagged"]
        assert metric_value(text, "sim_monitor_sources_total", outcome="ok") == 1
    finally:
        proc.send_signal(signal.SIGTERM)  # a service manager's stop; Ctrl-C takes the same path (test_mic)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_clients_take_the_levels_from_the_served_model(exported, files, tmp_path):
    """A CPC model has only m3 and ar (Info says so): a level it lacks is a usage error naming the
    model's levels, before any audio is sent; a level it has works."""
    srv = ServerProcess(exported("cpc"), log_dir=tmp_path).start()
    try:
        proc = cli("clients.monitor", "--server", srv.address, "--once", "--level", "m1", files[0])
        assert proc.returncode == 2, proc.stderr
        assert "error: --level m1: the served model (cpc) has levels m3, ar" in proc.stderr
        proc = cli("clients.mic", "--server", srv.address, "--view-level", "m1", "--duration", "1")
        assert proc.returncode == 2 and "--view-level m1: the served model (cpc) has levels m3, ar" in proc.stderr
        ok = cli("clients.monitor", "--server", srv.address, "--once", "--level", "ar", files[0])
        assert ok.returncode == 0, ok.stderr
        assert [e["event"] for e in events_of(ok.stdout)] == ["end"] and events_of(ok.stdout)[0]["frames"] > 0
        got = cli("clients.stream", files[0], "--server", srv.address, "--out", tmp_path / "cpc.npz")
        assert got.returncode == 0, got.stderr
        assert {"m3", "ar"} <= set(np.load(tmp_path / "cpc.npz").files) and "m1" not in np.load(tmp_path / "cpc.npz")
    finally:
        srv.close()


def test_sigterm_and_ctrl_c_stop_the_monitor_unless_sigint_was_ignored():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        stop_on_signals()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # started as a shell's background job
        stop_on_signals()
        signal.raise_signal(signal.SIGINT)  # still ignored: nothing raised
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_rolling_rate_crossings():
    r = RollingRate(window=4, alert_rate=0.5, min_frames=2)
    out = [r.push(f) for f in [False, False, True, True, True, False, False, False, True]]
    assert out == [None, None, None, "alert", None, None, None, "clear", None]
    assert r.max_rate == 0.75


def test_text_helpers():
    assert flagged_stretches(np.array([0, 1, 1, 0, 0, 1], bool), 0.01) == [(0.01, 0.03), (0.05, 0.06)]
    assert flagged_stretches(np.zeros(5, bool), 0.01) == []
    assert sparkline([0, 1, 2], 0, 2) == "▁▅█"
    assert ood_timeline(np.array([0, 0, 0, 0, 0, 1, 0, 1, 1], bool), 3) == ".!#"
    assert level_meter(-30.0, width=10).startswith("[#####.....]")


def test_directory_watcher_waits_for_stable_size(tmp_path):
    w = DirectoryWatcher(tmp_path)
    f = tmp_path / "a.wav"
    f.write_bytes(b"x" * 10)
    assert w.poll() == []  # first sight: size not yet known to be stable
    assert w.poll() == [f]
    assert w.poll() == []  # reported once
