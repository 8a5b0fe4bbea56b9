"""Audio generation metrics as the paper reports them (Sec. 4.2, Table 1): FD (its main metric),
FAD and IS, computed as the official AudioLDM evaluation (`haoheliu/audioldm_eval`, which the
paper uses) computes them, plus that tool's KL; from two folders of audio files.

    python -m echoes.metrics --generated samples/ --target vggsound_test/ \\
        --panns Cnn14_16k_mAP=0.438.pth --vggish vggish-10086976.pth

- The classifier: PANNs Cnn14 at 16 kHz (Kong et al. 2020, `audioset_tagging_cnn`
  `pytorch/models.py` `Cnn14_16k`, as audioldm_eval's copy of `Cnn14` builds it; checkpoint
  `Cnn14_16k_mAP=0.438.pth`, zenodo 3987831, weights under "model"), with the same module and
  key names, so the released file loads as it is (81.0 M parameters with the front end). Front
  end as torchlibrosa's: |STFT|^2 by two conv1d with the periodic-Hann-windowed DFT (n_fft 512,
  hop 160, reflect-padded by 256 each side), 64 Slaney mel bands 50-8000 Hz, 10 log10(max(x,
  1e-10)); the checkpoint carries its own DFT kernels and mel matrix, which are the ones used.
  Then bn0 over the mel bands, six conv blocks (two 3x3 conv + BN + ReLU each, 2x2 average
  pooling after the first five; 64 ... 2048 channels), the mean over frequency, max + mean over
  time, `embedding` = ReLU(fc1) (2048) and `logits` = fc_audioset (527 AudioSet classes).
  Dropout and SpecAugment act in training only and are left out.
- FAD's network: VGGish (Hershey et al. 2017) as `harritaylor/torchvggish` holds it (released
  weights `vggish-10086976.pth`, a bare state dict) and audioldm_eval uses it: no PCA
  postprocessing, the last ReLU dropped (the 128-d embedding before it). Front end as
  torchvggish's `waveform_to_examples` (in float64): frames of 400 samples every 160, no padding,
  a periodic Hann window, |rfft| of 512 points, 64 HTK-mel bands 125-7500 Hz without area
  normalisation (the DC bin left out), log(mel + 0.01), cut into 0.96 s examples (96 x 64, no
  overlap, a shorter tail dropped).
- Audio as audioldm_eval reads it (`datasets/load_mel.py` WaveDataset; for FAD as its
  `metrics/fad.py` at 8c06aff does): the first channel only, minus its mean, resampled to 16 kHz by
  torchaudio's default resampler (`resample_like_torchaudio`: Hann-windowed sinc, 6 zero
  crossings, rolloff 0.99), zero-padded at the end to at least 2 s, each clip whole.
- FD: the Frechet distance between Gaussians fitted to the embeddings of the generated and the
  target clips (`frechet_distance`); FAD: the same over the VGGish embeddings of every 0.96 s
  example of every clip. IS: exp(E KL(p(y|x) || p(y))) of the softmax of the generated
  clips' logits, in 10 splits of the rows shuffled with seed 2020: mean and standard deviation
  (`inception_score`). KL: with files of the same names in both folders (over 99% of them), the
  mean over pairs of KL(target || generated) of the softmax, and of the sigmoid as audioldm_eval
  sums it (its "kl_sigmoid", not a Bernoulli KL) (`paired_kl`).

Not here: the paper's CS (CLIP and Wav2CLIP, after Im2Wav), whose scoring script is not public.
Image FID (Tables 3, 4) is `echoes/fid.py`.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import zipfile

import numpy as np
import soundfile
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from echoes.audio import mel_filterbank
from echoes.cli import (UserError, check_file, check_writable, load_checkpoint,
                        load_state_strict, parse_settings, pick_device, run_cli, setting,
                        write_atomic)

SAMPLE_RATE = 16000  # Cnn14_16k's
MIN_SAMPLES = 32000  # audioldm_eval pads shorter clips with zeros to 2 s
IS_SPLITS = 10  # audioldm_eval's
CACHE_VERSION = 1  # of the features --cache keeps: a change to how they are computed raises it
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


# -----------------------------------------------------------------------------
# the classifier: PANNs Cnn14 at 16 kHz


@dataclasses.dataclass
class Cnn14Config:
    sample_rate: int = 16000  # Hz of the input waveform
    n_fft: int = 512  # STFT size and window length (32 ms)
    hop: int = 160  # STFT hop (10 ms)
    n_mels: int = 64  # Slaney mel bands
    fmin: float = 50.0  # Hz, lowest band edge
    fmax: float = 8000.0  # Hz, highest band edge
    classes: int = 527  # AudioSet's


class STFT(nn.Module):
    """torchlibrosa's STFT: the real and imaginary parts of the windowed DFT as conv1d kernels
    (F, 1, n_fft), F = n_fft // 2 + 1 frequencies, applied with stride `hop`: kernel row f at
    tap t is cos(2 pi f t / n_fft) w(t), resp. -sin(...) w(t)."""

    def __init__(self, n_fft, hop):
        super().__init__()
        F_ = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, F_, n_fft, stride=hop, bias=False)
        self.conv_imag = nn.Conv1d(1, F_, n_fft, stride=hop, bias=False)
        t = torch.arange(n_fft, dtype=torch.float64)
        angle = 2 * math.pi * torch.arange(F_, dtype=torch.float64)[:, None] * t / n_fft  # (F, n)
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)  # fftbins=True
        with torch.no_grad():
            self.conv_real.weight.copy_((torch.cos(angle) * window)[:, None])  # (F, 1, n)
            self.conv_imag.weight.copy_((-torch.sin(angle) * window)[:, None])
        self.requires_grad_(False)


class Spectrogram(nn.Module):
    """(B, L) waveform -> (B, 1, T, F) power spectrogram, centred frames (reflect padding)."""

    def __init__(self, n_fft, hop):
        super().__init__()
        self.n_fft = n_fft
        self.stft = STFT(n_fft, hop)

    def forward(self, wav):
        x = F.pad(wav[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        real, imag = self.stft.conv_real(x), self.stft.conv_imag(x)  # (B, F, T)
        return (real ** 2 + imag ** 2).transpose(1, 2)[:, None]  # (B, 1, T, F)


class LogMel(nn.Module):
    """(B, 1, T, F) power -> (B, 1, T, M) dB: 10 log10(max(power @ melW, 1e-10)) (ref 1)."""

    def __init__(self, sr, n_fft, n_mels, fmin, fmax):
        super().__init__()
        self.melW = nn.Parameter(mel_filterbank(sr, n_fft, n_mels, fmin, fmax).T.contiguous(),
                                 requires_grad=False)  # (F, M)

    def forward(self, power):
        return 10 * torch.log10(torch.clamp(power @ self.melW, min=1e-10))  # (B, 1, T, M)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions (no bias), each with BatchNorm and ReLU, then average pooling."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x, pool):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool)


class Cnn14(nn.Module):
    """PANNs Cnn14 for inference (see the module docstring). forward(wav (B, L) at 16 kHz) ->
    {"embedding": (B, 2048), "logits": (B, 527)}."""

    def __init__(self, config=None):
        super().__init__()
        c = self.config = config or Cnn14Config()
        self.spectrogram_extractor = Spectrogram(c.n_fft, c.hop)
        self.logmel_extractor = LogMel(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
        self.bn0 = nn.BatchNorm2d(c.n_mels)
        widths = [1, 64, 128, 256, 512, 1024, 2048]
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(widths[i], widths[i + 1]))
        self.fc1 = nn.Linear(2048, 2048)
        self.fc_audioset = nn.Linear(2048, c.classes)

    def forward(self, wav):
        x = self.logmel_extractor(self.spectrogram_extractor(wav))  # (B, 1, T, M)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalised per mel band
        for i in range(6):
            x = getattr(self, f"conv_block{i + 1}")(x, (2, 2) if i < 5 else (1, 1))
        x = x.mean(dim=3)  # (B, 2048, T'): the mean over frequency
        x = x.amax(dim=2) + x.mean(dim=2)  # (B, 2048): max + mean over time
        embedding = F.relu(self.fc1(x))  # (B, 2048), audioldm_eval's "2048"
        return {"embedding": embedding, "logits": self.fc_audioset(embedding)}  # (B, 527)


def load_cnn14(path, *, trusted=False):
    """PANNs Cnn14 (16 kHz) from its released checkpoint (weights under "model") or a bare state
    dict, in eval mode. Checkpoints saved before BatchNorm counted its batches load too."""
    obj = load_checkpoint(path, trusted=trusted, what="PANNs checkpoint")
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    model = Cnn14()
    if isinstance(sd, dict):  # num_batches_tracked does not enter inference
        sd = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")},
              **sd}
        melW = sd.get("logmel_extractor.melW")
        if torch.is_tensor(melW) and melW.shape != model.logmel_extractor.melW.shape:
            raise UserError(f"--panns {path} is a Cnn14 of another front end (mel matrix "
                            f"{tuple(melW.shape)}, e.g. the 32 kHz Cnn14_mAP=0.431.pth); "
                            "AudioLDM's evaluation at 16 kHz takes Cnn14_16k_mAP=0.438.pth")
    return load_state_strict(model, sd, "PANNs Cnn14 checkpoint", path).eval()


# -----------------------------------------------------------------------------
# FAD's network: VGGish

VGGISH_FRAME, VGGISH_HOP, VGGISH_FFT = 400, 160, 512  # 25 ms frames every 10 ms at 16 kHz
VGGISH_MELS, VGGISH_EXAMPLE = 64, 96  # mel bands; frames per 0.96 s example


def vggish_mel_matrix(sr=SAMPLE_RATE, n_bins=VGGISH_FFT // 2 + 1, n_mels=VGGISH_MELS,
                      fmin=125.0, fmax=7500.0):
    """(n_bins, n_mels) float64: triangles linear in HTK mel (1127 ln(1 + f / 700)), peak 1, no
    area normalisation, the DC bin 0 (torchvggish `mel_features.spectrogram_to_mel_matrix`)."""
    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    bins = mel(torch.linspace(0, sr / 2, n_bins, dtype=torch.float64))[:, None]  # (K, 1)
    edges = torch.linspace(float(mel(fmin)), float(mel(fmax)), n_mels + 2, dtype=torch.float64)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # (M,) each
    w = torch.clamp(torch.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), min=0)
    w[0] = 0.0
    return w  # (K, M)


def vggish_examples(wav):
    """(L,) waveform at 16 kHz -> (N, 1, 96, 64) float32 log-mel examples (see the module
    docstring); N = 0 for under 0.96 s."""
    x = torch.as_tensor(wav, dtype=torch.float64)
    n = 0 if len(x) < VGGISH_FRAME else 1 + (len(x) - VGGISH_FRAME) // VGGISH_HOP  # frames
    if n < VGGISH_EXAMPLE:  # no whole example (torchvggish fails on such a clip)
        return torch.zeros(0, 1, VGGISH_EXAMPLE, VGGISH_MELS)
    frames = x.unfold(0, VGGISH_FRAME, VGGISH_HOP)  # (T, 400), no padding
    window = torch.hann_window(VGGISH_FRAME, periodic=True, dtype=torch.float64)
    spec = torch.fft.rfft(frames * window, n=VGGISH_FFT).abs()  # (T, 257) magnitude
    log_mel = torch.log(spec @ vggish_mel_matrix() + 0.01)  # (T, 64)
    examples = log_mel.unfold(0, VGGISH_EXAMPLE, VGGISH_EXAMPLE)  # (N, 64, 96)
    return examples.transpose(1, 2)[:, None].float()  # (N, 1, 96, 64)


class VGGish(nn.Module):
    """forward((N, 1, 96, 64) examples) -> (N, 128) embeddings (before the last ReLU)."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):  # torchvggish make_layers
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 6 * 4, 4096), nn.ReLU(inplace=True),
                                        nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                                        nn.Linear(4096, 128))

    def forward(self, examples):
        x = self.features(examples)  # (N, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).flatten(1)  # (N, 6 * 4 * 512), flattened as TF's NHWC
        return self.embeddings(x)  # (N, 128)


def load_vggish(path, *, trusted=False):
    """VGGish from torchvggish's released weights (a bare state dict; a saved torchvggish model's
    state dict too, whose PCA entries `pproc.*` FAD does not use), in eval mode."""
    sd = load_checkpoint(path, trusted=trusted, what="VGGish checkpoint")
    if isinstance(sd, dict):
        sd = {k: v for k, v in sd.items() if not str(k).startswith("pproc.")}
    return load_state_strict(VGGish(), sd, "VGGish checkpoint", path).eval()


# -----------------------------------------------------------------------------
# audio as audioldm_eval reads it


def resample_plan(orig_sr, new_sr, zeros=6, rolloff=0.99):
    """(down, up, width, base) of `resample_like_torchaudio`'s kernel (up / down the reduced
    ratio, `width` input samples each side, `base` the cut-off); a one-line error for rates that
    share too few factors, whose kernel would not fit in memory."""
    g = math.gcd(int(orig_sr), int(new_sr))
    down, up = int(orig_sr) // g, int(new_sr) // g
    base = min(down, up) * rolloff
    width = math.ceil(zeros * down / base)
    if up * (2 * width + down) > 2 ** 25:  # e.g. 44101 -> 16000 Hz: a 16000 x 44135 kernel
        raise UserError(f"a sample rate of {orig_sr} Hz shares too few factors with {new_sr} Hz "
                        f"for this resampler (as torchaudio's); convert the file to {new_sr} Hz "
                        "first (e.g. ffmpeg -i IN -ar 16000 OUT.wav)")
    return down, up, width, base


def resample_like_torchaudio(wav, orig_sr, new_sr, zeros=6, rolloff=0.99):
    """`torchaudio.functional.resample` with its defaults (sinc_interp_hann): the last axis of
    `wav` from orig_sr to new_sr. A windowed-sinc FIR whose `up` phases repeat every `down`
    input samples (up / down the reduced ratio), applied by one strided conv1d; the kernel is
    computed in float64 (torchaudio: in the input's dtype), the output has ceil(T up / down)
    samples."""
    if orig_sr == new_sr:
        return wav
    down, up, width, base = resample_plan(orig_sr, new_sr, zeros, rolloff)
    idx = torch.arange(-width, width + down, dtype=torch.float64) / down  # (K,)
    t = (-torch.arange(up, dtype=torch.float64)[:, None] / up + idx) * base  # (up, K)
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * base / down
    shape, T = wav.shape[:-1], wav.shape[-1]
    x = F.pad(wav.reshape(-1, T).float(), (width, width + down))  # (B, T + 2 width + down)
    y = F.conv1d(x[:, None], kernel.float()[:, None], stride=down)  # (B, up, n_blocks)
    y = y.transpose(1, 2).reshape(len(x), -1)[:, :math.ceil(up * T / down)]  # (B, T')
    return y.reshape(*shape, -1)


def read_audio_file(path):
    """One audio file -> (float32 (L, channels) tensor, sample rate), or a one-line error for a
    file that cannot be read, holds no samples or holds NaN or infinite ones."""
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)  # (L, channels)
    except (RuntimeError, OSError, UnicodeError) as e:  # libsndfile's errors are RuntimeErrors
        raise UserError(f"cannot read audio {path} ({e})") from e
    if len(data) == 0:
        raise UserError(f"{path} holds no samples")
    if not np.isfinite(data).all():
        raise UserError(f"{path} holds NaN or infinite samples")
    return torch.from_numpy(data), rate


def read_eval_audio(path, sr=SAMPLE_RATE):
    """One file -> float32 (L,) at `sr`, as audioldm_eval's WaveDataset reads it: the first
    channel, its mean removed, resampled, zero-padded at the end to MIN_SAMPLES (a file with NaN
    or infinite samples in any channel is refused, where it would read the first alone)."""
    data, rate = read_audio_file(path)
    wav = data[:, 0].contiguous()  # (L,)
    wav = resample_like_torchaudio(wav - wav.mean(), rate, sr)
    return F.pad(wav, (0, max(0, MIN_SAMPLES - len(wav))))


@torch.no_grad()
def clip_features(paths, panns=None, vggish=None, device="cpu", progress=False, desc="clips"):
    """Each of the N files read once, one at a time (clips differ in length): with `panns`,
    "embedding" (N, 2048) and "logits" (N, 527); with `vggish`, "vggish" (E, 128), the embeddings
    of every clip's 0.96 s examples, E in all; float64 numpy."""
    rows = {}
    for path in tqdm(paths, desc=desc, unit="clip", disable=not progress, dynamic_ncols=True):
        wav = read_eval_audio(path)  # (L,) at 16 kHz, at least 2 s: at least 2 examples
        if panns is not None:
            out = panns(wav[None].to(device))
            for k in ("embedding", "logits"):
                rows.setdefault(k, []).append(out[k].double().cpu().numpy())  # (1, C)
        if vggish is not None:
            emb = vggish(vggish_examples(wav).to(device))  # (E_i, 128): this clip's
            rows.setdefault("vggish", []).append(emb.double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in rows.items()}


# -----------------------------------------------------------------------------
# the metrics


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to the rows of a and
    b (Heusel et al. 2017). tr (S_a S_b)^1/2 is the sum of the square roots of the eigenvalues of
    S_a^1/2 S_b S_a^1/2, which is symmetric positive semi-definite, so no complex sqrtm is
    needed even when the covariances are singular (fewer clips than dimensions); audioldm_eval
    takes scipy's sqrtm of S_a S_b, the same number up to rounding."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    Sa, Sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, V = np.linalg.eigh(Sa)
    root_a = (V * np.sqrt(np.clip(w, 0, None))) @ V.T  # S_a^1/2
    inner = np.linalg.eigvalsh(root_a @ Sb @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(Sa) + np.trace(Sb)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def inception_score(logits, splits=10, seed=2020):
    """(mean, std) over `splits` of exp(mean_x KL(p(y|x) || p(y))), p = softmax(logits), the rows
    shuffled with np.random.RandomState(seed) first and split as audioldm_eval splits them."""
    x = torch.as_tensor(np.asarray(logits)[np.random.RandomState(seed).permutation(len(logits))],
                        dtype=torch.float64)  # (N, C)
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    N, scores = len(x), []
    for k in range(splits):
        rows = slice(k * N // splits, (k + 1) * N // splits)
        part, log_part = p[rows], log_p[rows]  # (N / splits, C)
        q = part.mean(dim=0, keepdim=True)  # (1, C): p(y) over the split
        scores.append(float(torch.exp((part * (log_part - q.log())).sum(dim=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def paired_kl(generated, target, eps=1e-6):
    """generated, target: {name: logits (C,)} -> (kl_softmax, kl_sigmoid) over the names in both,
    as audioldm_eval: sum over pairs of KL(target || generated) / pairs, the generated
    probabilities + eps inside the log; for the sigmoid only the p log(p / q) terms."""
    names = sorted(set(generated) & set(target))
    g = torch.as_tensor(np.stack([generated[n] for n in names]), dtype=torch.float64)  # (P, C)
    t = torch.as_tensor(np.stack([target[n] for n in names]), dtype=torch.float64)
    out = []
    for act in (lambda z: z.softmax(dim=1), torch.sigmoid):
        out.append(float(F.kl_div((act(g) + eps).log(), act(t), reduction="sum") / len(names)))
    return tuple(out)


# -----------------------------------------------------------------------------
# command line


@dataclasses.dataclass
class Settings:
    """`python -m echoes.metrics` settings (each one is a --flag; see --help)."""
    generated: str = setting("", "folder of generated audio files (e.g. sample.py's --out)")
    target: str = setting("", "folder of the real clips they are compared with (for KL, files "
                          "of the same names as the generated ones)")
    panns: str = setting("", "PANNs checkpoint Cnn14_16k_mAP=0.438.pth (zenodo record 3987831): "
                         "FD, IS, KL")
    vggish: str = setting("", "VGGish weights vggish-10086976.pth (harritaylor/torchvggish "
                          "release v0.1): FAD")
    trust_checkpoints: bool = setting(False, "allow a checkpoint that needs full unpickling "
                                      "(only for files you trust)")
    device: str = setting("auto", "auto (a GPU when present), cpu, cuda or cuda:N")
    cache: str = setting("", "folder for the clips' features, reused while a folder's files and "
                         "the checkpoints stay as they are (a test set's are computed once)")


def cached_features(s, paths, panns, vggish, device, desc):
    """`clip_features` of the files, through --cache: the key is the files' names, sizes and
    modification times with the checkpoints', so a changed file or model computes afresh."""
    if not s.cache:
        return clip_features(paths, panns, vggish, device, progress=True, desc=desc)

    def stat(p):
        return [os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] if p else None

    key = json.dumps([CACHE_VERSION, [stat(p) for p in paths], stat(s.panns), stat(s.vggish)])
    path = os.path.join(s.cache, hashlib.sha1(key.encode()).hexdigest()[:20] + ".npz")
    want = ({"embedding", "logits"} if panns is not None else set()) | (
        {"vggish"} if vggish is not None else set())  # what this run needs from a kept file
    if os.path.isfile(path):
        try:
            z = np.load(path)
            if isinstance(z, np.lib.npyio.NpzFile):
                with z:
                    features = {k: z[k] for k in want & set(z.files)}
                if features.keys() == want and all(
                        len(features[k]) == len(paths) for k in want - {"vggish"}):
                    print(f"{desc}: features from {path}", file=sys.stderr)
                    return features
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # a damaged file: computed again, and replaced
    features = clip_features(paths, panns, vggish, device, progress=True, desc=desc)
    write_atomic(path, lambda f: np.savez(f, **features))
    return features


def list_files(folder, flag, exts, kind, any_case=True):
    """The files directly in `folder` whose names end in one of `exts` (in any case, or exactly),
    sorted; a one-line error for a missing or unlistable folder or one without such files
    (`kind`: "audio", "image")."""
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {folder!r} is not a folder")
    try:
        names = sorted(n for n in os.listdir(folder)
                       if (n.lower() if any_case else n).endswith(exts)
                       and os.path.isfile(os.path.join(folder, n)))
    except OSError as e:
        raise UserError(f"{flag} {folder} cannot be listed ({e.strerror or e})") from e
    if not names:
        raise UserError(f"{flag} {folder} holds no {kind} files ({', '.join(exts)})")
    return [os.path.join(folder, n) for n in names]


def audio_files(folder, flag):
    """`list_files` of the audio files and their headers (soundfile's info), each read now: a
    file that cannot be read, or whose rate cannot be resampled to 16 kHz, fails now, not after
    hours of the other folder."""
    paths = list_files(folder, flag, AUDIO_EXTS, "audio")
    infos = []
    for path in paths:
        try:
            infos.append(soundfile.info(path))
        except (RuntimeError, OSError, UnicodeError) as e:
            raise UserError(f"cannot read audio {path} ({e})") from e
        try:
            resample_plan(infos[-1].samplerate, SAMPLE_RATE)
        except UserError as e:
            raise UserError(f"{path}: {e}") from e
    return paths, infos


def evaluate(s):
    """FD, IS, KL (where the names pair up; with --panns) and FAD (with --vggish) of --generated
    against --target: a dict."""
    gen, tgt = audio_files(s.generated, "--generated")[0], audio_files(s.target, "--target")[0]
    if not (s.panns or s.vggish):
        raise UserError("give --panns (Cnn14_16k_mAP=0.438.pth: FD, IS, KL) and / or --vggish "
                        "(vggish-10086976.pth: FAD)")
    for flag, path in (("--panns", s.panns), ("--vggish", s.vggish)):
        if path:
            check_file(path, flag)
    if min(len(gen), len(tgt)) < 2:
        raise UserError("a Frechet distance needs at least 2 clips in each folder")
    if s.cache:
        check_writable(s.cache, "--cache")
    device = pick_device(s.device)
    panns = (load_cnn14(s.panns, trusted=s.trust_checkpoints).to(device) if s.panns else None)
    vggish = (load_vggish(s.vggish, trusted=s.trust_checkpoints).to(device) if s.vggish
              else None)
    fg = cached_features(s, gen, panns, vggish, device, "generated")
    ft = cached_features(s, tgt, panns, vggish, device, "target")
    result = {"generated": len(gen), "target": len(tgt)}
    if vggish is not None:
        result["FAD"] = frechet_distance(fg["vggish"], ft["vggish"])
    if panns is not None:
        result["FD"] = frechet_distance(fg["embedding"], ft["embedding"])
        if len(gen) >= IS_SPLITS:  # fewer clips leave a split empty
            result["IS"], result["IS_std"] = inception_score(fg["logits"], IS_SPLITS)
        # KL pairs files of one name (extension included), where over 99% of each folder's
        # audio files pair up (audioldm_eval's rule, which counts every file in the folders)
        g_names, t_names = map(os.path.basename, gen), map(os.path.basename, tgt)
        g_logits, t_logits = dict(zip(g_names, fg["logits"])), dict(zip(t_names, ft["logits"]))
        both = g_logits.keys() & t_logits.keys()
        if len(both) > 0.99 * len(gen) and len(both) > 0.99 * len(tgt):
            result["KL_softmax"], result["KL_sigmoid"] = paired_kl(g_logits, t_logits)
    return result


def main(argv=None):
    s = parse_settings(Settings, sys.argv[1:] if argv is None else argv,
                       description="FD, FAD, IS and KL of generated audio against real "
                                   "clips (PANNs Cnn14 and VGGish, as AudioLDM's evaluation "
                                   "computes them).",
                       prog="python -m echoes.metrics")
    r = evaluate(s)
    cells = {"generated": r["generated"], "target": r["target"], "FD": r.get("FD"),
             "FAD": r.get("FAD"), "IS": (f"{r['IS']:.3f} +- {r['IS_std']:.3f}" if "IS" in r
                                        else None),
             "KL (softmax)": r.get("KL_softmax"), "KL (sigmoid)": r.get("KL_sigmoid")}
    values = ["-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
              for v in cells.values()]
    print("| " + " | ".join(cells) + " |\n" + "|---" * len(cells) + "|\n| "
          + " | ".join(values) + " |")
    if s.panns and "KL_softmax" not in r:
        print("KL: not computed, the two folders' file names do not pair up (as audioldm_eval, "
              "over 99% of them must)", file=sys.stderr)
    if s.panns and "IS" not in r:
        print(f"IS: not computed, it needs at least {IS_SPLITS} generated clips (one per split)",
              file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
