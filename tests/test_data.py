"""Training data: folder validation names every bad file; crops are HOP-aligned, deterministic, padded."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from train.audio import CROP_SAMPLES, HOP
from train.corpus import load_corpus
from train.data import ClipDataset, DataError, corpus_dataset, folder_dataset, scan_audio_dir


def test_scan_accepts_the_librispeech_layout(audio_dir_factory):
    root = audio_dir_factory({
        "103/1240/103-1240-0000.flac": dict(n_samples=20_000),
        "103/1240/103-1240-0001.flac": dict(n_samples=CROP_SAMPLES),
        "19/198/19-198-0000.wav": dict(n_samples=16_000),
        "19/198/notes.txt": dict(raw=b"not audio, ignored"),
    })
    files = scan_audio_dir(root)
    assert [f.name for f in files] == ["103-1240-0000.flac", "103-1240-0001.flac", "19-198-0000.wav"]
    assert all(f.is_file() for f in files)


def test_scan_names_every_bad_file_with_its_problem(audio_dir_factory):
    root = audio_dir_factory({
        "good.wav": dict(n_samples=12_000),
        "spk/good.flac": dict(n_samples=12_000),
        "spk/garbage.wav": dict(raw=b"RIFF....this is not a wav file"),
        "spk/cd_rate.wav": dict(n_samples=44_100, rate=44_100),
        "stereo.flac": dict(n_samples=12_000, channels=2),
        "deep/er/short.wav": dict(n_samples=5_000),
    })
    with pytest.raises(DataError) as info:
        scan_audio_dir(root)
    err = info.value
    problems = {p.name: problem for p, problem in err.problems}
    assert set(problems) == {"garbage.wav", "cd_rate.wav", "stereo.flac", "short.wav"}
    assert "unreadable" in problems["garbage.wav"]
    assert "44100 Hz" in problems["cd_rate.wav"]
    assert "2 channels" in problems["stereo.flac"]
    assert "too short: 5000 samples" in problems["short.wav"] and "10240" in problems["short.wav"]
    message = str(err)
    assert "4 of 6 audio files" in message
    for p, problem in err.problems:  # every bad file, with its own problem, is in the message
        assert f"{p}: {problem}" in message
    assert "good.wav" not in message and "good.flac" not in message
    # a lower minimum lets the short file through, the others stay bad
    with pytest.raises(DataError) as info:
        scan_audio_dir(root, min_samples=4_000)
    assert {p.name for p, _ in info.value.problems} == {"garbage.wav", "cd_rate.wav", "stereo.flac"}


def test_scan_rejects_empty_and_missing_folders(audio_dir_factory, tmp_path):
    empty = audio_dir_factory({"readme.txt": dict(raw=b"nothing here")})
    with pytest.raises(DataError, match="no audio files"):
        scan_audio_dir(empty)
    with pytest.raises(DataError, match="not a directory"):
        scan_audio_dir(tmp_path / "missing")


def _ramp(n: int) -> np.ndarray:
    """int16 samples whose value is their index (mod 2**15): a crop reveals its own offset."""
    return (np.arange(n) % 32768).astype(np.int16)


def _offset(clip: torch.Tensor) -> int:
    return int(round(float(clip[0]) * 32768))


@pytest.fixture
def ramp_dir(audio_dir_factory):
    lengths = [30_000, 25_003, 10_240 + 159, 10_240 + 160, 20_000]
    return audio_dir_factory({f"s{i}/f{i}.wav": dict(data=_ramp(n)) for i, n in enumerate(lengths)}), lengths


def test_random_crops_are_hop_aligned_in_range_and_deterministic(ramp_dir):
    root, lengths = ramp_dir
    ds = folder_dataset(root, seed=5)
    assert ds.mode == "random" and len(ds) == len(lengths)
    seen = {}
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i, n in enumerate(lengths):
            clip = ds[i]
            assert clip.dtype == torch.float32 and clip.shape == (CROP_SAMPLES,)
            off = _offset(clip)
            assert off % HOP == 0 and 0 <= off <= n - CROP_SAMPLES
            expected = (np.arange(off, off + CROP_SAMPLES) % 32768) / 32768
            assert np.array_equal(clip.numpy(), expected.astype(np.float32))  # a contiguous window
            assert off == ds.crop_offset(i, n)
            seen[(epoch, i)] = off
    # the file 159 samples longer than the crop has one position, the one 160 longer has two
    assert {seen[(e, 2)] for e in range(12)} == {0}
    assert {seen[(e, 3)] for e in range(12)} == {0, 160}
    # offsets vary with the epoch, and a fresh dataset (a resumed run) reproduces them exactly
    assert len({seen[(e, 0)] for e in range(12)}) > 3
    resumed = folder_dataset(root, seed=5)
    for epoch in (7, 3, 11):
        resumed.set_epoch(epoch)
        for i in reversed(range(len(lengths))):  # any order, any index subset
            assert _offset(resumed[i]) == seen[(epoch, i)]
    other = folder_dataset(root, seed=6)
    other_offsets = []
    for e in range(12):
        other.set_epoch(e)
        other_offsets.append(_offset(other[0]))
    assert other_offsets != [seen[(e, 0)] for e in range(12)]


def test_first_crop_takes_the_start_and_pads_short_files(audio_dir_factory):
    root = audio_dir_factory({"short.wav": dict(data=_ramp(5_000)), "long.wav": dict(data=_ramp(30_000))})
    ds = ClipDataset([root / "short.wav", root / "long.wav"], mode="first")
    short, long = ds[0], ds[1]
    assert short.shape == long.shape == (CROP_SAMPLES,)
    assert np.array_equal(short[:5_000].numpy(), (np.arange(5_000) / 32768).astype(np.float32))
    assert torch.count_nonzero(short[5_000:]) == 0
    assert _offset(long) == 0 and float(long[-1]) == (CROP_SAMPLES - 1) / 32768
    ds.set_epoch(9)  # no effect on "first" crops
    assert torch.equal(ds[1], long) and torch.equal(ds[-2], short)
    small = ClipDataset([root / "long.wav"], crop=3_200, mode="first")
    assert small[0].shape == (3_200,)
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(ValueError, match="mode"):
        ClipDataset([root / "long.wav"], mode="middle")


def test_corpus_dataset_serves_first_crops_of_a_split(small_corpus):
    utts = load_corpus(small_corpus, "test")
    ds = corpus_dataset(small_corpus, "test")
    assert len(ds) == len(utts) and ds.mode == "first" and ds.cache
    for i in (0, len(ds) - 1):
        audio, _ = sf.read(str(utts[i].path), dtype="float32")
        clip = ds[i]
        n = min(len(audio), CROP_SAMPLES)
        assert clip.shape == (CROP_SAMPLES,)
        assert np.array_equal(clip[:n].numpy(), audio[:n]) and torch.count_nonzero(clip[n:]) == 0
    assert set(ds._cache) == {0, len(ds) - 1}  # loaded lazily, kept after the first load
    stacked = ds.stack()
    assert stacked.shape == (len(utts), CROP_SAMPLES) and torch.equal(stacked[0], ds[0])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    assert torch.equal(next(iter(loader)), stacked[:8])


def test_a_file_that_breaks_after_the_scan_is_named(audio_dir_factory):
    root = audio_dir_factory({"a.wav": dict(n_samples=12_000)})
    ds = folder_dataset(root)
    (root / "a.wav").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="a.wav"):
        ds[0]
