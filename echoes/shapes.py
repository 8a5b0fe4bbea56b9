"""The embedded demo data set "shapes and tones": a generator of paired images and clips, and
readers that recover the class from either modality by plain signal analysis.

12 classes = 4 colours x 3 shapes. The colour sets the image's fill colour and the clip's pitch;
the shape sets the image's outline and the clip's timbre / rhythm:

    colour  RGB             pitch     shape     image             sound
    red     (220, 50, 50)   262 Hz    circle    filled disc       steady pure tone
    green   (50, 170, 70)   330 Hz    square    filled square     odd harmonics 1, 3, 5, 7 at 1/k
    blue    (50, 90, 220)   392 Hz    triangle  upward triangle   pure tone gated on/off at 2 Hz
    yellow  (230, 200, 50)  523 Hz

- `make_pair(index, seed)` -> (label, image uint8 (64, 64, 3), wav float32 (CLIP_SAMPLES,)). Every
  item draws from its own generator seeded by (seed, index), so an item never depends on which
  other items were made, in what order or in what batch. The label is `index % 12`: any run of 12
  consecutive indices holds each class once.
- `generate(n, seed)` stacks items as arrays; `write_files(out_dir, indices, seed)` writes PNG +
  WAV files and `labels.csv` (example inputs for the scripts).
- `read_image`, `read_audio`, `read_mel` -> (colour, shape), or (None, None) where nothing stands
  out: no learning, so they can score what a model generates. `read_mel` reads the [0, 1] mel of
  the SpecVQGAN recipe (echoes/audio.py), which is what the audio tokenizer decodes to, before
  any vocoder.
- `python -m echoes.shapes --out DIR --n N --seed S` writes example files.

The clip is CLIP_SAMPLES = 127 * 256 = 32512 samples (1.474 s at 22050 Hz): with hop 256 and
center=True the mel has 1 + 32512 // 256 = 128 frames (DEMO_FRAMES), divisible by 16 as the audio
tokenizer's 16x downsampling needs (128 frames -> 8 token columns x 5 mel rows).
"""

import csv
import dataclasses
import io
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from echoes.audio import save_wav
from echoes.cli import (UserError, check_at_least, check_writable, parse_settings, run_cli,
                        setting, write_text)
from echoes.tokenizers import save_png

# -----------------------------------------------------------------------------
# the classes

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # label = colour * 3 + shape

PALETTE = {"red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220),
           "yellow": (230, 200, 50)}
PITCH_HZ = {"red": 262.0, "green": 330.0, "blue": 392.0, "yellow": 523.0}


def label_parts(label):
    """Class index -> (colour, shape)."""
    return COLOURS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]


def label_of(colour, shape):
    """(colour, shape) -> class index, or -1 when either part is not a known name (a reader that
    found nothing returns None)."""
    if colour not in COLOURS or shape not in SHAPES:
        return -1
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


# -----------------------------------------------------------------------------
# the generator


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """The numbers behind every generated pair; one frozen instance, SPEC."""
    image_size: int = 64            # images are image_size x image_size RGB
    background: int = 235           # light-grey background value, all three channels
    pixel_noise: float = 3.0        # std of the Gaussian noise added to every pixel (0-255 scale)
    min_size: int = 24              # shape extent (diameter / side / base = height) in pixels ...
    max_size: int = 40              # ... drawn uniformly in [min_size, max_size]
    colour_jitter: float = 12.0     # each RGB channel of the fill moves by up to this much
    supersample: int = 4            # sub-pixel grid per pixel for anti-aliased edges
    sample_rate: int = 22050        # Hz, the mel recipe's rate
    hop: int = 256                  # mel hop of the recipe; the clip is a whole number of hops
    frames: int = 128               # mel frames (center=True): 1 + samples // hop, divisible by 16
    pitch_jitter: float = 0.01      # fundamental moves by up to +-1%
    min_amp: float = 0.2            # peak amplitude (loudness), drawn uniformly in
    max_amp: float = 0.8            #   [min_amp, max_amp]
    min_noise: float = 0.003        # white-noise std relative to the peak amplitude, drawn in
    max_noise: float = 0.015        #   [min_noise, max_noise] (SNR about 33-47 dB for a pure tone)
    pulse_hz: float = 2.0           # triangle: tone on for 1 / (2 pulse_hz) s, then off, repeating
    ramp_s: float = 0.01            # raised-cosine fade at clip ends and pulse edges: no clicks

    def __post_init__(self):
        if self.frames % 16:
            raise ValueError(f"frames must be divisible by 16 (the audio tokenizer's downsampling),"
                             f" got {self.frames}")

    @property
    def samples(self):
        # (frames - 1) whole hops: 1 + samples // hop == frames exactly
        return (self.frames - 1) * self.hop


SPEC = ShapesSpec()
CLIP_SAMPLES = SPEC.samples  # 32512 samples, 1.474 s
DEMO_FRAMES = SPEC.frames    # 128 mel frames
SAMPLE_RATE = SPEC.sample_rate


def item_rng(index, seed):
    """The generator of item `index` under data seed `seed`: seeded by the pair alone (numpy
    SeedSequence mixes both words), so items are independent of order and batching."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _coverage(shape, x0, y0, size, spec):
    """Fraction of each pixel covered by the shape whose bounding box is [x0, x0+size) x
    [y0, y0+size) (pixel units, sub-pixel accurate), estimated on a supersample^2 grid."""
    n, k = spec.image_size, spec.supersample
    c = (np.arange(n * k) + 0.5) / k                 # sub-pixel centres, (n*k,)
    y, x = c[:, None], c[None, :]                    # (n*k, 1), (1, n*k)
    u, v = (x - x0) / size, (y - y0) / size          # box coordinates, [0, 1] inside the box
    if shape == "circle":
        inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    else:  # upward triangle: apex at the top centre, base along the bottom edge of the box
        inside = (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= 0.5 * v)
    inside = inside.reshape(n, k, n, k)              # (H, k, W, k)
    return inside.mean(axis=(1, 3))                  # (H, W)


def make_image(colour, shape, rng, spec=SPEC):
    """One 64x64 RGB uint8 image: the shape at a random size and position where it fits whole,
    its fill colour jittered per channel, on the grey background, plus pixel noise."""
    n = spec.image_size
    size = rng.uniform(spec.min_size, spec.max_size)
    x0, y0 = rng.uniform(0, n - size, size=2)
    fill = np.array(PALETTE[colour], dtype=np.float64)
    fill = fill + rng.uniform(-spec.colour_jitter, spec.colour_jitter, size=3)
    alpha = _coverage(shape, x0, y0, size, spec)[..., None]          # (H, W, 1)
    img = alpha * fill + (1 - alpha) * spec.background              # (H, W, 3)
    img = img + rng.normal(0, spec.pixel_noise, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _fade(t, ramp):
    """Raised-cosine ramp from 0 (t <= 0) to 1 (t >= ramp)."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(t / ramp, 0, 1))


def make_wav(colour, shape, rng, spec=SPEC):
    """One clip, float32 (CLIP_SAMPLES,): the colour's pitch (jittered), the shape's timbre or
    rhythm, a random peak amplitude, and white noise a little below it."""
    sr, n = spec.sample_rate, spec.samples
    t = np.arange(n) / sr
    f0 = PITCH_HZ[colour] * (1 + rng.uniform(-spec.pitch_jitter, spec.pitch_jitter))
    phase = rng.uniform(0, 2 * np.pi)
    if shape == "square":
        # the first four terms of a square wave's Fourier series: odd k at amplitude 1/k
        x = sum(np.sin(2 * np.pi * k * f0 * t + k * phase) / k for k in (1, 3, 5, 7))
    else:
        x = np.sin(2 * np.pi * f0 * t + phase)
    env = _fade(t, spec.ramp_s) * _fade(t[-1] - t, spec.ramp_s)
    if shape == "triangle":
        # on for the first half of every period, starting on at t = 0; each edge is ramped
        period = 1 / spec.pulse_hz
        tp = np.mod(t, period)
        env = env * _fade(tp, spec.ramp_s) * _fade(period / 2 - tp, spec.ramp_s)
    x = x * env
    amp = rng.uniform(spec.min_amp, spec.max_amp)
    x = amp * x / np.abs(x).max()
    x = x + amp * rng.uniform(spec.min_noise, spec.max_noise) * rng.normal(size=n)
    return np.clip(x, -1, 1).astype(np.float32)


def make_pair(index, seed=0, spec=SPEC):
    """Item `index` of the data set with seed `seed` -> (label, image uint8 (H, W, 3),
    wav float32 (CLIP_SAMPLES,)). The same (index, seed) always gives the same arrays."""
    label = int(index) % len(CLASSES)
    colour, shape = label_parts(label)
    rng = item_rng(index, seed)
    img = make_image(colour, shape, rng, spec)
    wav = make_wav(colour, shape, rng, spec)
    return label, img, wav


def generate(n, seed=0, start=0, spec=SPEC):
    """Items start .. start+n-1 -> (labels int64 (n,), images uint8 (n, H, W, 3),
    wavs float32 (n, CLIP_SAMPLES))."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    labels, imgs, wavs = zip(*(make_pair(i, seed, spec) for i in range(start, start + n)))
    return np.array(labels, dtype=np.int64), np.stack(imgs), np.stack(wavs)


LABELS_HEADER = ["index", "label", "class", "image", "audio"]


def write_files(out_dir, indices, seed=0, stems=None, progress=False, spec=SPEC):
    """Write items `indices` as `{stem}.png` + `{stem}.wav` (16-bit PCM; stems `{index:05d}`
    unless given) in `out_dir`, and `labels.csv` (index, label, class, image, audio) listing them
    and the pairs earlier calls wrote there; every file is written atomically. Returns the csv's
    path."""
    os.makedirs(out_dir, exist_ok=True)
    stems = stems or [f"{i:05d}" for i in indices]
    rows = {}
    path = os.path.join(out_dir, "labels.csv")
    if os.path.isfile(path):  # the pairs of earlier calls, when written by this function
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) == LABELS_HEADER:
                rows = {row[3]: row for row in reader if len(row) == len(LABELS_HEADER)}
    for i, stem in tqdm(list(zip(indices, stems)), disable=not progress, desc="shapes"):
        label, img, wav = make_pair(i, seed, spec)
        save_png(Image.fromarray(img), os.path.join(out_dir, stem + ".png"))
        save_wav(torch.from_numpy(wav), os.path.join(out_dir, stem + ".wav"), spec.sample_rate)
        rows[stem + ".png"] = [str(i), str(label), CLASSES[label], stem + ".png", stem + ".wav"]
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([LABELS_HEADER, *rows.values()])
    write_text(path, table.getvalue())
    return path


# -----------------------------------------------------------------------------
# image reader


def _as_image(img):
    """A PIL image, or an (H, W, 3) array / tensor (uint8, or float in [0, 1]) -> float64 (H, W, 3)
    on the 0-255 scale."""
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
    a = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    return a.astype(np.float64) * (1.0 if np.issubdtype(a.dtype, np.integer) else 255.0)


def _chroma(rgb):
    """Colour with brightness divided out (r, g, b) / (r + g + b): a darker or lighter rendering
    of a colour (a blurry reconstruction, a contrast change) keeps its chromaticity."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb / max(rgb.sum(), 1e-6)


def image_features(img):
    """Plain measurements of the one shape in an image, or None when nothing stands out.

    coverage alpha: each pixel is unmixed along the line from the background colour (median of
    the border) to the fill colour (median of the clearly-foreground pixels): alpha = 0 on the
    background, 1 inside. Blur only moves alpha between neighbours, so the area (the sum of alpha,
    unclipped so that pixel noise averages out, over the bounding box widened by a margin that
    catches the blurred edge) survives blur and JPEG, and the alpha = 0.5 contour that gives the
    bounding box stays near the true edge.
    fill: area / bounding-box area (circle pi/4, square 1, triangle 1/2).
    top: share of the area above the box's middle row (circle and square 1/2; the upward
    triangle 1/4, as area grows with the square of the distance from the apex)."""
    a = _as_image(img)                                                    # (H, W, 3)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])             # (2W + 2H, 3)
    bg = np.median(border, axis=0)                                        # (3,)
    dist = np.linalg.norm(a - bg, axis=-1)                                # (H, W)
    if dist.max() < 40:  # nothing differs from the background by more than noise and shading
        return None
    fg = a[dist > 0.6 * np.percentile(dist, 99.5)]                        # (P, 3)
    fill_rgb = np.median(fg, axis=0)                                      # (3,)
    axis = fill_rgb - bg
    if axis @ axis < 40 ** 2:  # the foreground's median is the background: no one shape
        return None
    alpha = (a - bg) @ axis / (axis @ axis)                               # (H, W)
    mask = alpha > 0.5
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = y1 - y0, x1 - x0
    m = 3  # margin in pixels: a Gaussian blur of sigma up to ~1.5 px leaves little beyond it
    box = alpha[max(y0 - m, 0): y1 + m, max(x0 - m, 0): x1 + m]           # (h + 2m, w + 2m)
    area = max(box.sum(), 1e-6)
    mid = y0 + h / 2 - max(y0 - m, 0)          # the box's middle, in rows of `box`
    rows_above = np.clip(mid - np.arange(box.shape[0]), 0, 1)             # (h + 2m,)
    top = (rows_above @ box.sum(1)) / area
    return {"background": bg, "colour_rgb": fill_rgb, "fill": area / (h * w), "top": top,
            "height": int(h), "width": int(w)}


# shape thresholds, between what clean shapes give (fill: circle 0.74-0.83, square 0.94-1.03;
# top: triangle 0.25-0.29, others 0.48-0.52) with room for blur, which lifts a triangle's top
# share toward 0.35 (its thin apex fades below alpha 0.5, so the box starts lower)
_TRIANGLE_TOP = 0.4
_SQUARE_FILL = 0.89


def read_image(img):
    """(H, W, 3) image (uint8, or float in [0, 1]; or a PIL image) -> (colour, shape), or
    (None, None) when no shape stands out.

    Colour: the palette entry nearest in chromaticity to the median foreground colour. Shape:
    triangle when under 40% of the area lies in the upper half of the bounding box (the most
    blur-proof cue), else square when the area fills the box (> 0.89), else circle."""
    f = image_features(img)
    if f is None:
        return None, None
    c = _chroma(f["colour_rgb"])
    colour = min(COLOURS, key=lambda k: np.linalg.norm(c - _chroma(PALETTE[k])))
    if f["top"] < _TRIANGLE_TOP:
        return colour, "triangle"
    return colour, "square" if f["fill"] > _SQUARE_FILL else "circle"


# -----------------------------------------------------------------------------
# audio readers (waveform and mel)


def _modulation_depth(env, rate, lo=1.5, hi=2.5):
    """Largest Fourier amplitude of an envelope between lo and hi Hz, over its mean: about 1.27
    (4 / pi) for a 50% on/off gate, near 0 for a steady tone. The range around 2 Hz tolerates a
    generated rhythm that is a little off; the clip holds only ~3 periods, so no finer grid."""
    env = np.asarray(env, dtype=np.float64)
    mean = env.mean()
    if mean <= 0 or len(env) < 4:
        return 0.0
    t = np.arange(len(env)) / rate
    freqs = np.linspace(lo, hi, 21)
    basis = np.exp(-2j * np.pi * freqs[:, None] * t[None, :])              # (F, T)
    amp = 2 * np.abs(basis @ (env - mean)) / len(env)                      # (F,)
    return float(amp.max() / mean)


def _trim(active):
    """Slice covering the first .. last True of a boolean array (all of it when none is True):
    zero padding before or after a clip is not part of its rhythm."""
    idx = np.flatnonzero(active)
    return slice(idx[0], idx[-1] + 1) if len(idx) else slice(None)


# shape thresholds, far from both sides: measured on clean clips, and on clips through the mel and
# Griffin-Lim (which smears partials: squares then range 0.02-0.15) or with added noise
_HARMONIC_RATIO = 0.01   # energy at 3f + 5f over energy at f: square ~0.15, pure tone < 1e-4
_PULSE_DEPTH = 0.5       # 2 Hz envelope modulation: pulsed ~1.28, steady < 0.04
# a tone at all: the fundamental's band over the floor around it, in power. White noise gives at
# most 2.5 dB, a clean clip 36-71 dB, one with noise of std 0.5 added 9.5 dB or more (under noise
# of std 1 and louder some clips read as nothing: 12% at std 1, 30% at std 1.5)
_PROMINENCE_DB = 6.0


def audio_features(wav, sr=SAMPLE_RATE):
    """Plain measurements of a clip: the candidate pitch holding the most energy, the odd-harmonic
    energy ratio and the 2 Hz envelope modulation depth."""
    x = np.asarray(wav.detach().cpu() if hasattr(wav, "detach") else wav, dtype=np.float64)
    x = x.reshape(-1)                                                       # (samples,)
    hop = 256
    n_frames = len(x) // hop
    rms = np.sqrt((x[: n_frames * hop].reshape(n_frames, hop) ** 2).mean(1))  # (frames,)
    first, last, _ = _trim(rms > 1e-4 * max(rms.max(), 1e-12)).indices(n_frames)
    x, rms = x[first * hop: last * hop], rms[first:last]  # without zero padding at either end
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2                 # (len(x)//2 + 1,)
    df = sr / len(x)  # Hz per FFT bin

    def bins(f_lo, f_hi):  # the bins between two frequencies, as a slice
        return slice(max(int(np.ceil(f_lo / df)), 0), max(int(np.floor(f_hi / df)) + 1, 0))

    def level(f, half=30.0):
        """Energy of a partial at f and of the local noise floor over as many bins (the mean
        power 60-200 Hz away, where no partial lies)."""
        inside = spec[bins(f - half, f + half)]
        ring = np.concatenate([spec[bins(f - 200, f - 60)], spec[bins(f + 60, f + 200)]])
        return inside.sum(), len(inside) * ring.mean()

    def partial(f):  # over the floor: noise alone then gives ~0, whatever its level
        inside, floor = level(f)
        return max(inside - floor, 0.0)

    # +-2% covers the 1% pitch jitter with margin and stays clear of the next candidate (>= 12%)
    energies = {c: spec[bins(0.98 * f, 1.02 * f)].sum() for c, f in PITCH_HZ.items()}
    colour = max(energies, key=energies.get)
    near = bins(0.98 * PITCH_HZ[colour], 1.02 * PITCH_HZ[colour])
    f0 = (near.start + np.argmax(spec[near])) * df  # the measured fundamental, for harmonics
    # +-30 Hz, the same at f, 3f and 5f: a mel-domain vocoder (Griffin-Lim) smears a partial
    # over a band of about that width, which a relative window would catch unevenly
    fundamental = partial(f0)
    harmonic = (partial(3 * f0) + partial(5 * f0)) / max(fundamental, 1e-30)
    inside, floor = level(f0)
    prominence_db = 10 * np.log10(max(inside, 1e-30) / max(floor, 1e-30))  # 0: all silent
    # envelope of the fundamental alone (a Hann-windowed 1024-sample DFT at f0 every hop): noise
    # outside its ~40 Hz band does not fill the gaps of a pulsed tone
    n_win = 1024
    if len(x) >= n_win:
        frames = np.lib.stride_tricks.sliding_window_view(x, n_win)[::hop]    # (T', n_win)
        phase = 2 * np.pi * f0 * np.arange(n_win) / sr
        probe = np.hanning(n_win) * np.stack([np.cos(phase), np.sin(phase)])   # (2, n_win)
        env = np.linalg.norm(np.ascontiguousarray(frames) @ probe.T, axis=1)   # (T',)
    else:
        env = rms
    depth = _modulation_depth(env, sr / hop)
    return {"colour": colour, "f0": float(f0), "fundamental": float(fundamental),
            "prominence_db": float(prominence_db), "harmonic": float(harmonic), "pulse": depth}


def _shape_from(harmonic, pulse):
    """Timbre and rhythm -> shape: pulsing wins (a pulsed square never occurs; a pulse is the
    stronger cue), then odd harmonics, else a steady pure tone."""
    if pulse > _PULSE_DEPTH:
        return "triangle"
    return "square" if harmonic > _HARMONIC_RATIO else "circle"


def read_audio(wav, sr=SAMPLE_RATE):
    """Mono clip (samples,) at `sr` -> (colour, shape), or (None, None) when no fundamental
    stands 6 dB out of its noise floor (silence, noise). Pitch: which of the four fundamentals
    (+-2%) holds the most energy in a Hann-windowed FFT of the whole clip. Square: energy at 3f and
    5f relative to f, each over its local noise floor. Triangle: the envelope of the fundamental
    (its magnitude in 1024-sample frames every 256 samples) modulated near 2 Hz."""
    f = audio_features(wav, sr)
    if not f["prominence_db"] >= _PROMINENCE_DB:  # not >=: a NaN in the clip reads nothing
        return None, None
    return f["colour"], _shape_from(f["harmonic"], f["pulse"])


def _hz_to_mel(f):
    """Slaney mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)),
                    m * (200.0 / 3))


def mel_band_centres(n_mels=80, fmin=125.0, fmax=7600.0):
    """Centre frequency (Hz) of each band of the recipe's filterbank (librosa.filters.mel): band i
    peaks at point i + 1 of n_mels + 2 points evenly spaced in mel from fmin to fmax."""
    pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    return pts[1:-1]


# thresholds for the mel reader, on the log (dB) scale of the mel
# louder of the 3f / 5f partials vs the fundamental, each over its local floor: squares give -9 to
# -14 dB (down to -22 dB on a mel blurred across bands), pure tones below -60 dB (-48 dB with
# noise of std 0.05 added to the clip)
_MEL_HARMONIC_DB = -30.0
# a tone at all: the fundamental's two bands over their floor, in amplitude. White noise gives at
# most 2 dB, clean and generated clips of the demo 30 dB or more, a clean clip with noise of std
# 0.2 added 13 dB or more
_MEL_PROMINENCE_DB = 6.0


def mel_features(mel01, n_mels=80, fmin=125.0, fmax=7600.0, sr=SAMPLE_RATE, hop=256):
    """Plain measurements of a [0, 1] mel (80, frames), as `audio_features`."""
    m = np.asarray(mel01.detach().cpu() if hasattr(mel01, "detach") else mel01, np.float64)
    m = m.reshape(m.shape[-2], m.shape[-1])                                # (M, T)
    m = np.clip(m, 0.0, 1.0)  # the recipe's range (its scaling clips to it)
    m = m[:, _trim(m.max(0) > 0.01)]  # drop leading / trailing floor frames (zero padding)
    # undo S = (20 log10(mel) - 20 + 100) / 100 to get the mel magnitude back
    amp = 10.0 ** ((100.0 * m - 80.0) / 20.0)                              # (M, T)
    centres = mel_band_centres(n_mels, fmin, fmax)                          # (M,)

    def bands(f):  # the two bands whose peaks bracket f: f's energy splits between them
        i = int(np.clip(np.searchsorted(centres, f), 1, n_mels - 1))
        return [i - 1, i]

    mean_amp = amp.mean(1)                                                  # (M,)

    def level(f):
        """Magnitude in f's bands and the local floor's there (bands 3-5 away on either side,
        clear of the partial's spread and of the next odd harmonic)."""
        lo, hi = bands(f)
        ring = [j for j in range(lo - 5, hi + 6) if 0 <= j < n_mels and (j < lo - 2 or j > hi + 2)]
        return mean_amp[[lo, hi]].sum(), 2 * np.median(mean_amp[ring])

    def partial(f):  # over the floor: noise alone then gives ~0
        inside, floor = level(f)
        return max(inside - floor, 0.0)

    energies = {c: mean_amp[bands(f)].sum() for c, f in PITCH_HZ.items()}
    colour = max(energies, key=energies.get)
    f0 = PITCH_HZ[colour]
    e35 = max(partial(3 * f0), partial(5 * f0))
    fundamental = partial(f0)
    harmonic_db = 20 * np.log10(max(e35, 1e-12) / max(fundamental, 1e-12))
    inside, floor = level(f0)
    prominence_db = 20 * np.log10(inside / floor)  # amp >= 1e-4: no division by zero
    env = amp[bands(f0)].sum(0)                                             # (T,)
    depth = _modulation_depth(env, sr / hop)
    return {"colour": colour, "fundamental": float(fundamental),
            "prominence_db": float(prominence_db), "harmonic_db": float(harmonic_db),
            "pulse": depth}


def read_mel(mel01, n_mels=80, fmin=125.0, fmax=7600.0, sr=SAMPLE_RATE, hop=256):
    """[0, 1] mel spectrogram ((80, frames) or (1, 80, frames), SpecVQGAN scaling as in
    echoes/audio.py) -> (colour, shape), or (None, None) when no fundamental stands 6 dB out of
    its bands' floor (silence, noise). Pitch: which candidate fundamental's bands hold the most
    energy; square: the 3f or 5f partial within 30 dB of the fundamental; triangle: the
    fundamental bands' envelope over frames modulated near 2 Hz."""
    f = mel_features(mel01, n_mels, fmin, fmax, sr, hop)
    if not f["prominence_db"] >= _MEL_PROMINENCE_DB:  # not >=: a NaN reads nothing
        return None, None
    odd = f["harmonic_db"] > _MEL_HARMONIC_DB
    return f["colour"], _shape_from(2 * _HARMONIC_RATIO if odd else 0.0, f["pulse"])


# -----------------------------------------------------------------------------
# command line


@dataclasses.dataclass
class Settings:
    """`python -m echoes.shapes` settings (each one is a --flag; see --help)."""
    out: str = setting("shapes_examples", "folder to write the PNG / WAV pairs and labels.csv "
                       "into (created if missing)")
    n: int = setting(24, "number of pairs to write (24 = every class twice)")
    seed: int = setting(0, "data seed; the same seed and index always give the same pair")
    start: int = setting(0, "index of the first pair (labels run index mod 12)")


def main(argv=None):
    s = parse_settings(Settings, argv, description="Write example pairs of the 'shapes and tones' "
                       "demo data set: PNG images, WAV clips and labels.csv.",
                       prog="python -m echoes.shapes")
    check_at_least(s, {"n": 1, "start": 0, "seed": 0})
    if not s.out:
        raise UserError("--out is empty; give a folder")
    check_writable(s.out)
    path = write_files(s.out, range(s.start, s.start + s.n), s.seed, progress=s.n >= 100)
    print(f"wrote {s.n} pairs and {path}")


if __name__ == "__main__":
    run_cli(main)
