"""Property-based tests (hypothesis) against one real server: random configs, encodings, chunk
sizes, random bytes as audio, NaN/Inf and absurd samples, empty and oversized messages, configs
out of order or repeated. Every stream must end OK or with one of the statuses docs/serving.md
documents for what it sent; the server must stay up and answer health checks; a witness stream
running beside the fuzzed ones throughout must keep getting exactly its solo result.

Bounded for CI: a fixed number of examples per test, each a few short streams.
"""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.collector import FrameCollector
from clients.requests import file_requests
from protos.sim.v2 import sim_pb2 as pb
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.launch import ServerProcess
from train.audio import SAMPLE_RATE, level_frames
from train.corpus import load_corpus

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra: pip install -e '.[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

S = grpc.StatusCode
MAX_MESSAGE_BYTES = 1 << 16  # the server's limit here: "huge" messages are a little above it
MAX_STREAM_SECONDS = 2.0  # so that too-long streams are cheap to make
LEVELS = ("m1", "m2", "m3", "ar")  # the test model's (a small SIM encoder)
RPC_TIMEOUT = 30.0  # a stream that takes longer has hung
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = ServerProcess(model[0], "--max-message-bytes", str(MAX_MESSAGE_BYTES),
                        "--max-stream-seconds", str(MAX_STREAM_SECONDS), "--idle-timeout", "5",
                        log_dir=tmp_path_factory.mktemp("log")).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    yield ch
    ch.close()


def collect(stub, requests) -> tuple[FrameCollector, grpc.StatusCode, str]:
    col = FrameCollector()
    try:
        for r in stub.StreamEncode(iter(requests), timeout=RPC_TIMEOUT):
            col.add(r)
    except grpc.RpcError as exc:
        return col, exc.code(), exc.details() or ""
    return col, S.OK, ""


class Witness:
    """A well-behaved client streaming the same speech over and over in its own channel while the
    fuzzing goes on; every run must equal the first (solo) one."""

    def __init__(self, address: str, speech: np.ndarray):
        self.address, self.speech = address, speech
        self.reference: dict[str, np.ndarray] | None = None
        self.runs = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> Witness:
        with grpc.insecure_channel(self.address) as ch:
            col, code, details = collect(pb_grpc.SimEncoderStub(ch), file_requests(self.speech, SAMPLE_RATE, 800))
        assert code == S.OK, details
        self.reference = col.arrays()
        self._thread.start()
        return self

    def _loop(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.SimEncoderStub(ch)
            while not self._stop.is_set():
                col, code, details = collect(stub, file_requests(self.speech, SAMPLE_RATE, 800))
                if code != S.OK:
                    self.failures.append(f"{code.name}: {details}")
                    continue
                got = col.arrays()
                for level in LEVELS:
                    if got[level].shape != self.reference[level].shape or \
                            not np.allclose(got[level], self.reference[level], atol=1e-4, rtol=0):
                        self.failures.append(f"level {level} differs from the solo run")
                self.runs += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(RPC_TIMEOUT + 5)


@pytest.fixture
def witness(server, small_corpus):
    speech = sf.read(load_corpus(small_corpus, "test")[0].path, dtype="float32")[0][: SAMPLE_RATE]
    w = Witness(server.address, speech).start()
    yield w
    w.stop()
    assert not w._thread.is_alive(), "the witness stream hung"
    assert w.failures == [], w.failures
    assert w.runs >= 1, "the witness completed no stream while the fuzzed streams ran"


def assert_server_alive(server, channel) -> None:
    assert server.proc.poll() is None, f"the server exited ({server.proc.returncode}):\n{server.log()}"
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# --- what a stream sends, and which endings the documentation allows for it ---------------------
ENCODINGS = st.sampled_from([pb.LINEAR16, pb.FLOAT32, pb.AUDIO_ENCODING_UNSPECIFIED]) | st.integers(3, 1000)
RATES = st.sampled_from([16000, 16000, 16000, 8000, 44100, 0]) | st.integers(0, 2**31 - 1)
LEVEL_LISTS = st.lists(st.sampled_from(LEVELS + ("m7", "", "M1")), max_size=5)
ODD = st.sampled_from([np.nan, np.inf, -np.inf, 3.4e38, -1e30, 1e-45, 0.0, 2.0, -1.0])


@st.composite
def float_chunks(draw) -> bytes:
    """FLOAT32 samples: speech-like noise with, sometimes, NaN, Inf or absurd values at random places."""
    n = draw(st.integers(0, 4000))
    x = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(-0.5, 0.5, n).astype(np.float32)
    for _ in range(draw(st.integers(0, 3)) if n else 0):
        x[draw(st.integers(0, n - 1))] = draw(ODD)
    return x.tobytes()


MESSAGES = st.one_of(
    st.tuples(st.just("audio"), st.binary(max_size=4000)),  # random bytes as audio, any length
    st.tuples(st.just("audio"), float_chunks()),
    st.tuples(st.just("audio"), st.integers(MAX_MESSAGE_BYTES, 3 * MAX_MESSAGE_BYTES).map(bytes)),  # too large
    st.tuples(st.just("config"), st.tuples(RATES, ENCODINGS, LEVEL_LISTS, st.booleans())),
    st.tuples(st.just("empty"), st.none()),
)


def config_message(rate, encoding, levels, logvar) -> pb.StreamEncodeRequest:
    return pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=rate, encoding=encoding, levels=levels,
                                                         return_logvar=logvar))


def build(first_config, messages) -> tuple[list[pb.StreamEncodeRequest], set[grpc.StatusCode], int | None]:
    """The requests; the statuses the stream may end with (docs/serving.md, "Errors"); the samples
    sent when the stream must end OK (None otherwise)."""
    requests, allowed = [], set()
    config, samples, suspicious = None, 0, False
    for i, (kind, value) in enumerate(([("config", first_config)] if first_config else []) + list(messages)):
        if kind == "config":
            requests.append(config_message(*value))
        elif kind == "audio":
            requests.append(pb.StreamEncodeRequest(audio=value))
        else:
            requests.append(pb.StreamEncodeRequest())
        if requests[-1].ByteSize() > MAX_MESSAGE_BYTES:
            allowed.add(S.RESOURCE_EXHAUSTED)
            if i == 0:
                break
            continue
        if i == 0:
            if kind != "config":
                allowed.add(S.INVALID_ARGUMENT)  # audio before config / an empty first message
                break
            rate, encoding, levels, _ = value
            if rate != SAMPLE_RATE or encoding not in (pb.LINEAR16, pb.FLOAT32) or \
                    any(lv not in LEVELS for lv in levels) or len(set(levels)) != len(levels):
                allowed.add(S.INVALID_ARGUMENT)
                break  # the server reads nothing after a refused config
            config = value
            continue
        if kind != "audio":
            allowed.add(S.INVALID_ARGUMENT)  # config twice, empty message
            continue
        size = 2 if config[1] == pb.LINEAR16 else 4
        if len(value) % size:
            allowed.add(S.INVALID_ARGUMENT)
            continue
        samples += len(value) // size
        if samples > MAX_STREAM_SECONDS * SAMPLE_RATE:
            allowed.add(S.OUT_OF_RANGE)
        if config[1] == pb.FLOAT32:
            x = np.frombuffer(value, np.float32)
            if not np.isfinite(x).all():
                allowed.add(S.INVALID_ARGUMENT)
            elif (np.abs(x) > 1.0).any():
                suspicious = True  # absurd but finite: refused or clipped, the server's choice
    if not allowed:
        return requests, ({S.OK, S.INVALID_ARGUMENT} if suspicious else {S.OK}), (samples if config else 0)
    return requests, allowed, None


def check_stream(channel, first_config, messages) -> None:
    requests, allowed, samples = build(first_config, messages)
    col, code, details = collect(pb_grpc.SimEncoderStub(channel), requests)
    assert code in allowed, f"ended {code.name} ({details}); allowed {sorted(c.name for c in allowed)}"
    if code != S.OK:
        assert details, "an error status without a message"
        return
    if samples is None or not requests:
        return
    levels = tuple(first_config[2]) or LEVELS
    # a stream without a sample ends with no frames (the offline encoder pads it to one)
    want = level_frames(samples) if samples else dict.fromkeys(levels, 0)
    for level in levels:
        assert col.count(level) == want[level], f"level {level}: {col.count(level)} frames for {samples} samples"
        mu = col.column(level, "mu")
        if mu is not None and S.INVALID_ARGUMENT not in allowed:  # in-range audio: finite latents
            assert np.isfinite(mu).all()


GOOD_CONFIG = st.tuples(st.just(SAMPLE_RATE), st.sampled_from([pb.LINEAR16, pb.FLOAT32]),
                        st.lists(st.sampled_from(LEVELS), unique=True, max_size=4), st.booleans())


@FUZZ
@given(config=GOOD_CONFIG, chunks=st.lists(st.integers(0, 3000), max_size=12), seed=st.integers(0, 2**32 - 1))
def test_valid_audio_any_chunking_ends_ok_with_every_frame(server, channel, witness, config, chunks, seed):
    """Good configs and in-range audio cut into random chunk sizes (zero-length ones too)."""
    rng = np.random.default_rng(seed)
    dtype = np.int16 if config[1] == pb.LINEAR16 else np.float32
    scale = 32767 if dtype is np.int16 else 0.9
    messages = [("audio", (rng.uniform(-1, 1, n) * scale).astype(dtype).tobytes()) for n in chunks]
    requests, allowed, _ = build(config, messages)
    assert allowed <= {S.OK, S.OUT_OF_RANGE}
    check_stream(channel, config, messages)
    assert_server_alive(server, channel)


@FUZZ
@given(config=GOOD_CONFIG, messages=st.lists(MESSAGES, max_size=6))
def test_hostile_messages_after_a_good_config(server, channel, witness, config, messages):
    check_stream(channel, config, messages)
    assert_server_alive(server, channel)


@FUZZ
@given(config=st.none() | st.tuples(RATES, ENCODINGS, LEVEL_LISTS, st.booleans()),
       messages=st.lists(MESSAGES, max_size=4))
def test_any_first_message(server, channel, witness, config, messages):
    """Random configs, or no config at all (audio, an empty message or nothing first)."""
    check_stream(channel, config, messages)
    assert_server_alive(server, channel)


def test_many_hostile_streams_at_once(server, channel, witness):
    """Several bad streams in flight together (threads), beside the witness."""
    bad = [
        (None, [("audio", b"\x00" * 64)]),
        ((SAMPLE_RATE, pb.FLOAT32, [], False), [("audio", np.full(800, np.nan, np.float32).tobytes())]),
        ((SAMPLE_RATE, pb.FLOAT32, [], False), [("audio", bytes(2 * MAX_MESSAGE_BYTES))]),
        ((SAMPLE_RATE, pb.LINEAR16, [], False), [("audio", b"\x01" * 4001)]),
        ((SAMPLE_RATE, pb.LINEAR16, ["m3"], False), [("audio", bytes(32000))] * 3),
        ((SAMPLE_RATE, pb.FLOAT32, [], False), [("audio", bytes(3200)), ("config", (SAMPLE_RATE, 1, [], False))]),
    ] * 3
    errors: list[BaseException] = []

    def one(args):
        try:
            check_stream(channel, *args)
        except BaseException as exc:  # collected and raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(b,)) for b in bad]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RPC_TIMEOUT + 5)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    assert errors == []
    assert_server_alive(server, channel)
