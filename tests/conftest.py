"""Shared fixtures: a small real synthesised corpus, and folders of audio files with chosen defects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from train.corpus import SYLLABLES, TEST_VOICE, build_corpus, word_split

SMALL_VOICES = ("sw", "id+f3")  # training voices of the small corpus; TEST_VOICE is the held-out one
SMALL_TRAIN_WORDS = 20
SMALL_TEST_WORDS = 10


def covering_words(words: tuple[str, ...], n: int) -> list[str]:
    """n words from `words` (in order), chosen so every syllable appears at every position if possible."""
    def parts(w: str) -> set[tuple[int, str]]:
        return {(pos, w[2 * pos : 2 * pos + 2]) for pos in range(3)}

    need = {(pos, s) for pos in range(3) for s in SYLLABLES}
    chosen: list[str] = []
    while len(chosen) < n and need:  # greedy set cover: the word that covers most of what is missing
        best = max((w for w in words if w not in chosen), key=lambda w: len(parts(w) & need))
        if not parts(best) & need:
            break
        chosen.append(best)
        need -= parts(best)
    for w in words[::7]:  # fill up with words spread over the list
        if len(chosen) >= n:
            break
        if w not in chosen:
            chosen.append(w)
    return chosen


def small_corpus_words(seed: int = 0) -> tuple[list[str], list[str]]:
    train_words, test_words = word_split(seed)
    return covering_words(train_words, SMALL_TRAIN_WORDS), covering_words(test_words, SMALL_TEST_WORDS)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A real corpus (seed 0): 20 train + 10 test words x voices sw, id+f3; TEST_VOICE reads the 10 test words.

    70 utterances: 40 "train", 20 "test", 10 "test_voice". Builds in a few seconds.
    """
    train_words, test_words = small_corpus_words(0)
    out = tmp_path_factory.mktemp("small_corpus") / "corpus"
    return build_corpus(out, seed=0, words=train_words + test_words, voices=SMALL_VOICES,
                        test_voice=TEST_VOICE, progress=False)


def write_audio(path: Path, n_samples: int, *, rate: int = 16_000, channels: int = 1,
                data: np.ndarray | None = None) -> Path:
    """Write noise (or `data`) as PCM16 wav/flac (format from the suffix); int16 data is written exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        rng = np.random.default_rng(n_samples)
        data = (0.1 * rng.standard_normal((n_samples, channels))).astype(np.float32)
        if channels == 1:
            data = data[:, 0]
    sf.write(str(path), data, rate, subtype="PCM_16")
    return path


@pytest.fixture
def audio_dir_factory(tmp_path):
    """make({relative path: dict(n_samples=..., rate=..., channels=..., data=..., raw=bytes)}) -> root dir.

    `raw` writes those bytes instead of audio (an unreadable file).
    """
    counter = iter(range(1_000_000))

    def make(files: dict[str, dict]) -> Path:
        root = tmp_path / f"audio{next(counter)}"
        root.mkdir()
        for rel, spec in files.items():
            spec = dict(spec)
            path = root / rel
            if "raw" in spec:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(spec["raw"])
            else:
                write_audio(path, spec.pop("n_samples", 16_000), **spec)
        return root

    return make


@pytest.fixture(scope="session")
def model(tmp_path_factory, small_corpus):
    """(exported model dir, checkpoint) of a small random SIM encoder, shared by the service and client tests."""
    from support.serving import model_dir

    return model_dir(tmp_path_factory.getbasetemp(), small_corpus)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, small_corpus):
    """exported(method, decoders=False) -> the export directory of a small random model (built once)."""
    from support.exports import export_small

    root = tmp_path_factory.mktemp("exports")
    return lambda method, decoders=False: export_small(method, root, small_corpus, decoders)
