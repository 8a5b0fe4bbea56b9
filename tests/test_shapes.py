"""Tests for echoes/shapes.py, the "shapes and tones" demo data set: the
generator's determinism and balance, the image / audio specs, and the readers' accuracy on fresh
items and under mild degradations. CPU only, a few seconds."""

import csv
import io
import os

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageFilter

from echoes import shapes
from echoes.audio import mel_filterbank, mel_spectrogram

N_EVAL = 240        # 20 of each class
EVAL_SEED = 1234


# -----------------------------------------------------------------------------
# mel of the SpecVQGAN recipe (echoes/audio.py)


def mel01(wavs):
    return mel_spectrogram(torch.as_tensor(np.asarray(wavs), dtype=torch.float32))


# -----------------------------------------------------------------------------
# degradations: what a tokenizer reconstruction or a generator may do to an item


def blur(img, sigma=1.0):
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)))


def jpeg(img, quality=30):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def low_res(img, factor=4):
    """Down to 16x16 and back up: the detail an 8x8-token reconstruction can lose."""
    n = img.shape[0]
    small = Image.fromarray(img).resize((n // factor, n // factor), Image.BILINEAR)
    return np.asarray(small.resize((n, n), Image.BICUBIC))


def colour_shift(img, offset=(20, -15, 10)):
    return np.clip(img.astype(np.int64) + np.array(offset), 0, 255).astype(np.uint8)


def accuracy(reader, items, labels):
    return np.mean([shapes.label_of(*reader(x)) == y for x, y in zip(items, labels)])


@pytest.fixture(scope="module")
def data():
    labels, imgs, wavs = shapes.generate(N_EVAL, seed=EVAL_SEED)
    return labels, imgs, wavs, mel01(wavs)


# -----------------------------------------------------------------------------
# classes, determinism, balance


def test_classes():
    assert len(shapes.CLASSES) == 12 and len(set(shapes.CLASSES)) == 12
    assert shapes.CLASSES[0] == "red circle"
    for label, name in enumerate(shapes.CLASSES):
        colour, shape = shapes.label_parts(label)
        assert name == f"{colour} {shape}"
        assert shapes.label_of(colour, shape) == label
    assert shapes.label_of(None, None) == -1


def test_determinism():
    label, img, wav = shapes.make_pair(7, seed=3)
    label2, img2, wav2 = shapes.make_pair(7, seed=3)
    assert label == label2 and np.array_equal(img, img2) and np.array_equal(wav, wav2)
    # order and batching do not matter: a batch from index 5 holds exactly the single items
    labels, imgs, wavs = shapes.generate(4, seed=3, start=5)
    for i in reversed(range(5, 9)):
        single = shapes.make_pair(i, seed=3)
        k = i - 5
        assert labels[k] == single[0]
        assert np.array_equal(imgs[k], single[1]) and np.array_equal(wavs[k], single[2])
    # another seed or another index of the same class gives another item
    _, img_s, wav_s = shapes.make_pair(7, seed=4)
    _, img_i, wav_i = shapes.make_pair(7 + 12, seed=3)
    assert not np.array_equal(img, img_s) and not np.array_equal(wav, wav_s)
    assert not np.array_equal(img, img_i) and not np.array_equal(wav, wav_i)


def test_balance(data):
    labels = data[0]
    assert labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels, minlength=12), np.full(12, N_EVAL // 12))


# -----------------------------------------------------------------------------
# specs


def test_image_spec(data):
    labels, imgs, _, _ = data
    assert imgs.shape == (N_EVAL, 64, 64, 3) and imgs.dtype == np.uint8
    spec = shapes.SPEC
    for label, img in zip(labels, imgs):
        colour, _ = shapes.label_parts(label)
        x = img.astype(np.float64)
        border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
        assert np.all(np.abs(np.median(border, axis=0) - spec.background) <= 2)
        fill = np.array(shapes.PALETTE[colour], dtype=np.float64)
        far = np.linalg.norm(x - spec.background, axis=-1) > 0.5 * np.linalg.norm(
            fill - spec.background)                                              # (H, W)
        rows, cols = np.flatnonzero(far.any(1)), np.flatnonzero(far.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        # 24-40 px, give or take the partly covered edge pixels
        assert spec.min_size - 2 <= h <= spec.max_size + 1
        assert spec.min_size - 2 <= w <= spec.max_size + 1
        # the core of the shape is the palette colour within the jitter (plus noise)
        core = np.median(x[far], axis=0)
        assert np.all(np.abs(core - fill) <= spec.colour_jitter + 3)
    # the background carries mild noise, not a flat value
    bg = imgs[:, :2, :2].astype(np.float64)
    assert 1.0 < bg.std() < 6.0


def test_audio_spec(data):
    labels, _, wavs, mels = data
    spec = shapes.SPEC
    assert wavs.shape == (N_EVAL, shapes.CLIP_SAMPLES) and wavs.dtype == np.float32
    assert 1 + shapes.CLIP_SAMPLES // 256 == shapes.DEMO_FRAMES and shapes.DEMO_FRAMES % 16 == 0
    assert 1.4 < shapes.CLIP_SAMPLES / shapes.SAMPLE_RATE < 1.6
    assert mels.shape == (N_EVAL, 80, shapes.DEMO_FRAMES)
    peaks = np.abs(wavs).max(1)
    assert peaks.min() >= 0.9 * spec.min_amp and peaks.max() <= 1.1 * spec.max_amp
    assert peaks.std() > 0.05  # loudness varies
    for label, wav in zip(labels, wavs):
        colour, _ = shapes.label_parts(label)
        f0 = shapes.audio_features(wav)["f0"]
        base = shapes.PITCH_HZ[colour]
        # within the jitter, plus one FFT bin (sr / CLIP_SAMPLES = 0.68 Hz)
        assert abs(f0 - base) <= spec.pitch_jitter * base + 1.0


def test_band_centres_match_filterbank():
    fb = mel_filterbank()  # tested against librosa's and Slaney's formula in test_tokenizers
    peak_hz = fb.argmax(1).numpy() * 22050 / 1024
    assert np.all(np.abs(shapes.mel_band_centres() - peak_hz) <= 22050 / 1024)


# -----------------------------------------------------------------------------
# readers on fresh items


def test_read_image(data):
    labels, imgs, _, _ = data
    assert accuracy(shapes.read_image, imgs, labels) >= 0.98
    # other input types give the same reading
    img = imgs[0]
    assert shapes.read_image(Image.fromarray(img)) == shapes.read_image(img)
    assert shapes.read_image(img / 255.0) == shapes.read_image(img)
    assert shapes.read_image(torch.from_numpy(img)) == shapes.read_image(img)
    # nothing there: no reading
    blank = np.full((64, 64, 3), 235, dtype=np.uint8)
    assert shapes.read_image(blank) == (None, None)


def test_read_audio(data):
    labels, _, wavs, _ = data
    assert accuracy(shapes.read_audio, wavs, labels) >= 0.98
    assert shapes.read_audio(torch.from_numpy(wavs[0])) == shapes.read_audio(wavs[0])


def test_read_mel(data):
    labels, _, _, mels = data
    assert accuracy(shapes.read_mel, mels, labels) >= 0.98
    assert shapes.read_mel(mels[0][None]) == shapes.read_mel(mels[0].numpy())


# -----------------------------------------------------------------------------
# readers under mild degradations


@pytest.mark.parametrize("degrade", [blur, jpeg, low_res, colour_shift,
                                     lambda x: jpeg(colour_shift(blur(x)))],
                         ids=["blur", "jpeg", "low_res", "colour_shift", "all"])
def test_read_image_degraded(data, degrade):
    labels, imgs, _, _ = data
    assert accuracy(shapes.read_image, [degrade(x) for x in imgs], labels) >= 0.95


def test_read_audio_degraded(data):
    labels, _, wavs, _ = data
    noisy = wavs + 0.05 * np.random.default_rng(0).standard_normal(wavs.shape, np.float32)
    assert accuracy(shapes.read_audio, noisy, labels) >= 0.95
    assert accuracy(shapes.read_mel, mel01(noisy), labels) >= 0.95
    # zero padding around a clip (a clip fitted into a longer window) changes no reading
    padded = np.pad(wavs[:24], ((0, 0), (4096, 20000)))
    assert accuracy(shapes.read_audio, padded, labels[:24]) >= 0.95
    assert accuracy(shapes.read_mel, mel01(padded), labels[:24]) >= 0.95


def test_read_mel_degraded(data):
    """A blurred, noisy mel: what a small audio tokenizer's reconstruction looks like."""
    labels, _, _, mels = data
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(mels[:, None], 3, stride=1, padding=1,
                                            count_include_pad=False)[:, 0]   # (B, 80, frames)
    noisy = (smooth + 0.03 * torch.randn(smooth.shape, generator=g)).clamp(0, 1)
    assert accuracy(shapes.read_mel, noisy, labels) >= 0.95


def test_readers_find_nothing_in_silence_and_in_an_image_of_no_one_shape():
    assert shapes.read_mel(np.zeros((80, 128))) == (None, None)  # the mel's floor
    assert shapes.read_mel(np.full((80, 128), 0.5)) == (None, None)  # flat: no partial stands out
    assert shapes.read_audio(np.zeros(shapes.CLIP_SAMPLES)) == (None, None)
    _, _, wav = shapes.make_pair(0, seed=5)
    wav[100] = np.nan  # a broken sample: no reading rather than one made of NaN
    assert shapes.read_audio(wav) == (None, None)
    assert shapes.read_mel(np.full((80, 128), np.nan)) == (None, None)
    assert shapes.read_mel(np.full((80, 128), -1.0)) == (None, None)  # below the recipe's range
    img = np.full((64, 64, 3), 128, np.uint8)  # three patches whose median is the background
    img[5:15, 5:15] = (255, 128, 128)
    img[25:35, 25:35] = (128, 255, 128)
    img[45:55, 45:55] = (128, 128, 255)
    assert shapes.read_image(img) == (None, None)
    img[5:15, 5:15], img[25:35, 25:35] = (200, 150, 128), (150, 200, 128)  # a median near it
    img[45:55, 45:55] = (128, 128, 200)
    assert shapes.read_image(img) == (None, None)


def test_readers_find_no_class_in_noise_and_one_in_a_tone_under_loud_noise(data):
    labels, _, wavs, _ = data
    rng = np.random.default_rng(0)
    for level in (0.01, 0.3, 1.0):  # white noise: no tone stands out, at any level
        noise = (level * rng.standard_normal((24, shapes.CLIP_SAMPLES))).astype(np.float32)
        assert all(shapes.read_audio(x) == (None, None) for x in noise)
        assert all(shapes.read_mel(m) == (None, None) for m in mel01(noise))
    # noise of std 0.2 (louder than the tones' harmonics): the class still reads
    noisy = wavs[:24] + 0.2 * rng.standard_normal(wavs[:24].shape).astype(np.float32)
    assert accuracy(shapes.read_audio, noisy, labels[:24]) >= 0.9
    assert all(shapes.read_mel(m)[0] is not None for m in mel01(noisy))


# -----------------------------------------------------------------------------
# files and command line


def test_write_files_and_cli(tmp_path, capsys):
    out = tmp_path / "ex"
    shapes.main(["--out", str(out), "--n", "13", "--seed", "5"])
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 and [int(r["label"]) for r in rows] == [i % 12 for i in range(13)]
    label, img, wav = shapes.make_pair(12, seed=5)
    r = rows[12]
    assert r["class"] == shapes.CLASSES[label]
    assert np.array_equal(np.asarray(Image.open(out / r["image"])), img)
    back, sr = soundfile.read(out / r["audio"], dtype="float32")
    assert sr == shapes.SAMPLE_RATE and back.shape == wav.shape
    assert np.abs(back - wav).max() <= 1.0 / 32768 + 1e-6  # 16-bit PCM
    assert shapes.read_audio(back) == shapes.label_parts(label)
    assert "wrote 13 pairs" in capsys.readouterr().out
    shapes.main(["--out", str(out), "--n", "2", "--seed", "5", "--start", "20"])  # more pairs
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [*range(13), 20, 21]  # the csv lists them all
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temp file left
    with pytest.raises(SystemExit) as e:
        shapes.main(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:  # wrong type: argparse's exit code 2
        shapes.main(["--n", "many"])
    assert e.value.code == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:  # a user error: one line, exit code 2
        shapes.run_cli(shapes.main, ["--out", str(tmp_path / "file")])
    assert e.value.code == 2 and "not a folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "file" / "labels.csv")
