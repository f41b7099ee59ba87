"""The synthesised corpus: determinism, disjoint splits, and labels that agree with the audio."""
from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from train.audio import CROP_SAMPLES, SAMPLE_RATE
from train.corpus import (
    ALL_WORDS,
    SYLLABLES,
    TEST_VOICE,
    VOWELS,
    CorpusError,
    build_corpus,
    corpus_info,
    default_corpus_dir,
    ensure_corpus,
    load_corpus,
    main,
    word_split,
)
from train.espeak import EspeakError


def test_constants():
    assert VOWELS == ("a", "i", "u")
    assert SYLLABLES == ("ba", "bi", "bu", "da", "di", "du", "ga", "gi", "gu")
    assert len(ALL_WORDS) == len(set(ALL_WORDS)) == 729
    assert ALL_WORDS[0] == "bababa" and ALL_WORDS[-1] == "gugugu" and "gigabu" in ALL_WORDS


def test_word_split_is_disjoint_complete_and_seeded():
    train, test = word_split(0)
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(ALL_WORDS)
    assert (len(train), len(test)) == (583, 146)
    assert word_split(0) == (train, test)
    assert word_split(1)[1] != test


def test_same_seed_gives_byte_identical_corpus(tmp_path):
    words = ["gigabu", "dubida", "bagudi", word_split(0)[1][0]]
    a = build_corpus(tmp_path / "a", seed=3, words=words, voices=["sw"], progress=False)
    b = build_corpus(tmp_path / "b", seed=3, words=words, voices=["sw"], progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 + len(load_corpus(a))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    # another seed draws other pitches/speeds (and another split), hence other audio
    c = build_corpus(tmp_path / "c", seed=4, words=words, voices=["sw"], progress=False)
    assert (a / "manifest.jsonl").read_bytes() != (c / "manifest.jsonl").read_bytes()
    assert not list(tmp_path.glob(".*tmp*")), "temporary build folders must not remain"


def test_splits_hold_no_common_word_and_the_test_voice_is_held_out(small_corpus):
    utts = load_corpus(small_corpus)
    by_split = {s: [u for u in utts if u.split == s] for s in ("train", "test", "test_voice")}
    assert {s: len(v) for s, v in by_split.items()} == {"train": 40, "test": 20, "test_voice": 10}
    assert load_corpus(small_corpus, "test") == by_split["test"]
    train_words = {u.word for u in by_split["train"]}
    test_words = {u.word for u in by_split["test"]}
    assert train_words and test_words and not train_words & test_words
    assert {u.word for u in by_split["test_voice"]} == test_words
    train_voices = {u.voice for u in by_split["train"]}
    assert train_voices == {"sw", "id+f3"}
    assert {u.voice for u in by_split["test_voice"]} == {TEST_VOICE}
    assert TEST_VOICE not in train_voices | {u.voice for u in by_split["test"]}
    assert set(word_split(0)[0]) >= train_words
    info = corpus_info(small_corpus)
    assert info["seed"] == 0 and info["counts"] == {"train": 40, "test": 20, "test_voice": 10}
    assert info["espeak_version"].startswith("1.")


def test_labels_and_bounds_are_consistent_with_the_files(small_corpus):
    for u in load_corpus(small_corpus):
        assert u.path.is_absolute() and u.path.parent == small_corpus / "wavs"
        assert "".join(u.syllables) == u.word and u.vowels == tuple(s[1] for s in u.syllables)
        info = sf.info(str(u.path))
        assert (info.samplerate, info.channels, info.frames) == (SAMPLE_RATE, 1, u.n_samples)
        starts = [s for s, _ in u.bounds]
        assert 0 < starts[0] and all(s < e for s, e in u.bounds)
        assert u.bounds[0][1] == u.bounds[1][0] and u.bounds[1][1] == u.bounds[2][0]  # contiguous
        assert u.bounds[2][1] <= min(u.n_samples, CROP_SAMPLES)  # the word fits the training crop
        assert all(e - s > 0.06 * SAMPLE_RATE for s, e in u.bounds)  # every syllable lasts > 60 ms
        assert 35 <= u.pitch <= 65 and 175 <= u.speed <= 215


# --- the vowel of each labelled syllable is audible as that vowel --------------------------------------

# Reference (F1, F2) in Hz; the measured formants of each syllable's vowel part must be nearest to its label.
REFERENCE_FORMANTS = {"a": (790, 1230), "i": (275, 2220), "u": (312, 800)}


def _lpc(x: np.ndarray, order: int) -> np.ndarray:
    r = np.correlate(x, x, "full")[len(x) - 1 : len(x) + order]
    toeplitz = np.array([[r[abs(i - j)] for j in range(order)] for i in range(order)])
    a = np.linalg.solve(toeplitz + 1e-9 * r[0] * np.eye(order), r[1 : order + 1])
    return np.concatenate([[1.0], -a])


def _two_formants(frame: np.ndarray) -> np.ndarray:
    """(F1, F2) in Hz of one 25 ms frame, from the roots of an order-18 LPC polynomial."""
    x = np.append(frame[0], frame[1:] - 0.97 * frame[:-1]) * np.hamming(len(frame))
    roots = np.roots(_lpc(x.astype(np.float64), 18))
    roots = roots[roots.imag > 0]
    freq = np.angle(roots) * SAMPLE_RATE / (2 * np.pi)
    bandwidth = -SAMPLE_RATE / np.pi * np.log(np.abs(roots))
    freq = np.sort(freq[(freq > 150) & (bandwidth < 800)])
    return freq[:2] if len(freq) >= 2 else np.full(2, np.nan)


def _vowel_formants(audio: np.ndarray, start: int, end: int) -> np.ndarray:
    """Median (F1, F2) over the vowel part of a syllable: its second half (the stop comes first)."""
    seg = audio[start + (end - start) // 2 : end - (end - start) // 10]
    frames = [_two_formants(seg[i : i + 400]) for i in range(0, len(seg) - 400, 160)]
    return np.nanmedian(np.array(frames), axis=0) if frames else np.full(2, np.nan)


def _nearest_vowel(f: np.ndarray) -> str:
    return min(REFERENCE_FORMANTS, key=lambda v: float(np.sum((np.log(f) - np.log(REFERENCE_FORMANTS[v])) ** 2)))


def test_each_labelled_vowel_sounds_like_that_vowel(small_corpus):
    per_voice: dict[str, dict[str, list[np.ndarray]]] = {}
    hits = total = 0
    for u in load_corpus(small_corpus):
        audio, _ = sf.read(str(u.path), dtype="float32")
        for (s, e), vowel in zip(u.bounds, u.vowels):
            f = _vowel_formants(audio, s, e)
            per_voice.setdefault(u.voice, {}).setdefault(vowel, []).append(f)
            hits += _nearest_vowel(f) == vowel
            total += 1
    assert total == 70 * 3 and hits / total > 0.95, f"{hits}/{total} syllables sound like their label"
    for voice, by_vowel in per_voice.items():
        f1 = {v: np.nanmedian([f[0] for f in fs]) for v, fs in by_vowel.items()}
        f2 = {v: np.nanmedian([f[1] for f in fs]) for v, fs in by_vowel.items()}
        assert f1["a"] > max(f1["i"], f1["u"]) + 200, (voice, f1)  # open vowel: high F1
        assert f2["i"] > f2["a"] + 400 and f2["a"] > f2["u"] + 50, (voice, f2)  # front i, back u


def test_syllable_bounds_sit_at_the_consonant_onsets(small_corpus):
    """Silence before the first bound; at each inner bound the vowel stops and a stop closure begins:
    10-20 ms before the bound is loud, 5-25 ms after it is quiet (a bound 20 ms off fails this)."""
    ok = total = 0
    for u in load_corpus(small_corpus):
        audio, _ = sf.read(str(u.path), dtype="float32")
        word_rms = np.sqrt(np.mean(audio[u.bounds[0][0] : u.bounds[2][1]] ** 2))
        assert np.sqrt(np.mean(audio[: u.bounds[0][0]] ** 2)) < 0.02 * word_rms, u.id
        for s, _ in u.bounds[1:]:
            before = np.sqrt(np.mean(audio[s - 320 : s - 160] ** 2))
            after = np.sqrt(np.mean(audio[s + 80 : s + 400] ** 2))
            ok += after < 0.5 * before
            total += 1
    assert ok / total > 0.95, f"{ok}/{total} inner bounds at a vowel-to-closure transition"


# --- loading, reuse and errors --------------------------------------------------------------------


@pytest.fixture
def corpus_copy(small_corpus, tmp_path) -> Path:
    return Path(shutil.copytree(small_corpus, tmp_path / "copy"))


def test_load_corpus_reports_missing_and_corrupt_corpora(corpus_copy, tmp_path):
    with pytest.raises(CorpusError, match="no corpus at .*nowhere"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_corpus(corpus_copy, "dev")
    victim = load_corpus(corpus_copy, "test")[3].path
    victim.unlink()
    with pytest.raises(CorpusError, match=f"{victim.name}.*missing"):
        load_corpus(corpus_copy)
    manifest = corpus_copy / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:5] + ["{not json"] + lines[6:]) + "\n")
    with pytest.raises(CorpusError, match="manifest.jsonl:6: bad record"):
        load_corpus(corpus_copy)
    (corpus_copy / "corpus.json").unlink()
    with pytest.raises(CorpusError, match="corpus.json is missing"):
        load_corpus(corpus_copy)


def test_ensure_corpus_reuses_an_existing_corpus(corpus_copy, monkeypatch, tmp_path):
    stamp = (corpus_copy / "corpus.json").stat().st_mtime_ns
    assert ensure_corpus(corpus_copy, seed=0, progress=False) == corpus_copy
    assert (corpus_copy / "corpus.json").stat().st_mtime_ns == stamp
    with pytest.raises(CorpusError, match="seed 0, not 1"):
        ensure_corpus(corpus_copy, seed=1, progress=False)
    monkeypatch.setenv("SIM_CACHE_DIR", str(tmp_path / "cache"))
    assert default_corpus_dir() == tmp_path / "cache" / "corpus-v1-seed0"
    assert default_corpus_dir(7).name == "corpus-v1-seed7"
    shutil.copytree(corpus_copy, default_corpus_dir())
    assert ensure_corpus(progress=False) == default_corpus_dir()
    monkeypatch.delenv("SIM_CACHE_DIR")
    assert default_corpus_dir() == Path.home() / ".cache" / "sim-service" / "corpus-v1-seed0"


def test_build_refuses_bad_requests_and_leaves_nothing_behind(small_corpus, tmp_path):
    with pytest.raises(FileExistsError):
        build_corpus(small_corpus, words=["gigabu"], voices=["sw"], progress=False)
    with pytest.raises(ValueError, match="held-out voice"):
        build_corpus(tmp_path / "x", words=["gigabu"], voices=["sw", TEST_VOICE], progress=False)
    with pytest.raises(ValueError, match="not three syllables"):
        build_corpus(tmp_path / "x", words=["gigabo"], voices=["sw"], progress=False)
    with pytest.raises(EspeakError, match="no voice 'xx-nonexistent'"):
        build_corpus(tmp_path / "x", words=["gigabu"], voices=["xx-nonexistent"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_builds_and_summarises(tmp_path, capsys):
    out = tmp_path / "cli"
    train_words, test_words = word_split(0)
    assert main(["--out", str(out), "--voices", "sw", "--words", train_words[5], train_words[-5], test_words[0],
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "test_voice" in text and "crop" in text
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert set(record) == {"id", "path", "word", "syllables", "vowels", "voice", "pitch", "speed", "bounds",
                           "n_samples", "split"}
    assert len(load_corpus(out, "train")) == 2 and len(load_corpus(out, "test_voice")) == 1
    assert main(["--out", str(out), "--voices", "sw"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "y"), "--words", "gigabo", "--voices", "sw"]) == 2
    assert main(["--out", str(tmp_path / "z"), "--voices", "nope", "--words", "gigabu"]) == 2
    assert "no voice 'nope'" in capsys.readouterr().err
