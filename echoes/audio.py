"""Sound for the tokenizers: SpecVQGAN's mel recipe, the vocoders and sound files (Visual Echoes
Sec. 3.2: "mel spectrograms ... converted back to waveforms with a vocoder").

What this file holds, top to bottom:
- The SpecVQGAN mel recipe (Iashin & Rahtu 2021, `feature_extraction/extract_mel_spectrogram.py`):
  |STFT|, a Slaney mel filterbank computed here the way `librosa.filters.mel` does, dB scaling to
  [0, 1]; the clip fitting and frame crop of its VGGSound features; the recipe's inverse.
- Vocoders: SpecVQGAN's MelGAN (Kumar et al. 2019, `vocoder/mel2wav/modules.py`), the HiFi-GAN
  generator (Kong et al. 2020, `models.py`), both loading the released files' keys, and
  Griffin-Lim, which needs no weights.
- Sound files: a band-limited resampler, `load_audio` (any file soundfile reads -> mono at the
  recipe's rate), `save_wav` (16-bit PCM, written atomically) and `save_mel_png` (a picture of a
  mel).

`echoes/tokenizers.py` turns these mels into ids and back. Imports only torch, numpy, soundfile,
Pillow and `echoes.cli`, so the file can be copied out.
Shape letters: B batch, F mel bands, T frames (or samples for waveforms), K frequency bins or
filter taps, C channels, J outputs.
"""

import functools
import io
import math
import os

import numpy as np
import soundfile
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from echoes.cli import UserError, check_file, load_checkpoint, load_state_strict, write_atomic

SAMPLE_RATE = 22050  # SpecVQGAN's VGGSound features
N_FFT, HOP, N_MELS, FMIN, FMAX = 1024, 256, 80, 125.0, 7600.0


# -----------------------------------------------------------------------------
# the SpecVQGAN mel recipe


def hz_to_mel(f):
    """Slaney's mel scale (librosa htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    linear = f / f_sp
    log = min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, linear)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=8)
def _mel_filterbank_np(sr, n_fft, n_mels, fmin, fmax):
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)  # (K,)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # (F+2,)
    widths = np.diff(edges)  # (F+1,)
    ramps = edges[:, None] - fft_freqs[None, :]  # (F+2, K)
    rising = -ramps[:-2] / widths[:-1, None]  # (F, K)
    falling = ramps[2:] / widths[1:, None]  # (F, K)
    weights = np.maximum(0, np.minimum(rising, falling))
    # Slaney norm: each triangle has unit area in Hz, so wide high bands are not louder
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _mel_pinv_np(sr, n_fft, n_mels, fmin, fmax):
    return np.linalg.pinv(_mel_filterbank_np(sr, n_fft, n_mels, fmin, fmax).astype(np.float64))


def mel_filterbank(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX):
    """(n_mels, 1 + n_fft // 2) float32, as `librosa.filters.mel(..., htk=False, norm='slaney')`."""
    return torch.from_numpy(_mel_filterbank_np(sr, n_fft, n_mels, float(fmin), float(fmax)))


def _stft_mag(wav, n_fft, hop):
    window = torch.hann_window(n_fft, device=wav.device, dtype=wav.dtype)  # periodic, as scipy's
    return torch.stft(wav, n_fft, hop, n_fft, window, center=True, pad_mode="reflect",
                      return_complex=True).abs()


def mel_spectrogram(wav, sr=SAMPLE_RATE, n_fft=N_FFT, hop=HOP, n_mels=N_MELS, fmin=FMIN,
                    fmax=FMAX):
    """(T,) or (B, T) float waveform -> (B, n_mels, 1 + T // hop) mel in [0, 1], SpecVQGAN's
    transform: |STFT| (power 1, centred, reflect-padded), mel filterbank, then
    S = clip((20 log10(max(mel, 1e-5)) - 20 + 100) / 100, 0, 1)."""
    wav = wav.float().reshape(-1, wav.shape[-1])  # (B, T)
    mag = _stft_mag(wav, n_fft, hop)  # (B, K, T_frames)
    mel = mel_filterbank(sr, n_fft, n_mels, fmin, fmax).to(wav.device) @ mag  # (B, F, T_frames)
    db = 20 * torch.log10(mel.clamp(min=1e-5)) - 20
    return ((db + 100) / 100).clamp(0, 1)


def fit_clip(wav, n_samples=220500):
    """Zero-pad or cut the last axis to `n_samples` (SpecVQGAN's 10 s at 22050 Hz)."""
    T = wav.shape[-1]
    return F.pad(wav, (0, n_samples - T)) if T < n_samples else wav[..., :n_samples]


def crop_mel(mel, n_frames=848, keep_frames=860):
    """Keep the first `keep_frames` frames (SpecVQGAN: 860 of 862), then a centre crop to
    `n_frames` (848, divisible by the codebook's 16x downsampling)."""
    mel = mel[..., :keep_frames] if keep_frames else mel
    T = mel.shape[-1]
    if T < n_frames:
        raise ValueError(f"a mel of {T} frames cannot be cropped to {n_frames}")
    start = (T - n_frames) // 2
    return mel[..., start:start + n_frames]


def mel01_to_linear(mel01, sr=SAMPLE_RATE, n_fft=N_FFT, fmin=FMIN, fmax=FMAX):
    """Inverse of the recipe's scaling, then the filterbank's pseudo-inverse: (B, F, T) in [0, 1]
    -> (B, 1 + n_fft // 2, T) non-negative magnitudes (an estimate: mel magnitudes below 1e-4,
    where the recipe clips S at 0, are lost)."""
    mel = 10 ** ((mel01 * 100 - 100 + 20) / 20)
    inv = _mel_pinv_np(sr, n_fft, mel01.shape[-2], float(fmin), float(fmax))  # (K, F)
    return (torch.from_numpy(inv).to(mel01) @ mel).clamp(min=0)


# -----------------------------------------------------------------------------
# vocoders


class WNConv1d(nn.Module):
    """Conv1d or ConvTranspose1d with weight norm stored as `weight_g` / `weight_v` parameters
    (torch's old `weight_norm` layout, dim 0), so released keys load whatever torch provides."""

    def __init__(self, c_in, c_out, k, stride=1, padding=0, dilation=1, transpose=False,
                 output_padding=0):
        super().__init__()
        shape = (c_in, c_out, k) if transpose else (c_out, c_in, k)
        self.weight_v = nn.Parameter(torch.randn(shape) * 0.02)
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(1, 2), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.transpose, self.output_padding = transpose, output_padding

    def forward(self, x):
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=(1, 2), keepdim=True)
        if self.transpose:
            return F.conv_transpose1d(x, w, self.bias, self.stride, self.padding,
                                      self.output_padding, dilation=self.dilation)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation)


class MelGANResBlock(nn.Module):
    def __init__(self, c, dilation):
        super().__init__()
        self.block = nn.Sequential(nn.LeakyReLU(0.2), nn.ReflectionPad1d(dilation),
                                   WNConv1d(c, c, 3, dilation=dilation), nn.LeakyReLU(0.2),
                                   WNConv1d(c, c, 1))
        self.shortcut = WNConv1d(c, c, 1)

    def forward(self, x):
        return self.shortcut(x) + self.block(x)


class MelGAN(nn.Module):
    """MelGAN generator as shipped with SpecVQGAN (`vocoder/logs/vggsound/best_netG.pt`): the [0, 1]
    mel S itself (not 2S - 1) -> waveform, hop 256 from ratios 8, 8, 2, 2. Module indices inside
    `model` (pads and activations included) reproduce the released key names."""

    def __init__(self, n_mel_channels=80, ngf=32, n_residual_layers=3):
        super().__init__()
        mult = 16
        layers = [nn.ReflectionPad1d(3), WNConv1d(n_mel_channels, mult * ngf, 7)]
        for r in (8, 8, 2, 2):
            layers += [nn.LeakyReLU(0.2),
                       WNConv1d(mult * ngf, mult * ngf // 2, 2 * r, stride=r,
                                padding=r // 2 + r % 2, transpose=True, output_padding=r % 2)]
            layers += [MelGANResBlock(mult * ngf // 2, 3 ** j) for j in range(n_residual_layers)]
            mult //= 2
        layers += [nn.LeakyReLU(0.2), nn.ReflectionPad1d(3), WNConv1d(ngf, 1, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, mel01):
        """(B, 80, T) in [0, 1] -> (B, 1, 256 T)."""
        return self.model(mel01)


class HiFiResBlock(nn.Module):
    """HiFi-GAN ResBlock1 (`kind="1"`: convs1 dilated + convs2 plain, pairwise) or ResBlock2."""

    def __init__(self, c, k, dilations, kind):
        super().__init__()
        pad = lambda d: (k * d - d) // 2  # noqa: E731  ("same" length)
        dil = list(dilations) if kind == "1" else list(dilations)[:2]
        convs = nn.ModuleList(WNConv1d(c, c, k, padding=pad(d), dilation=d) for d in dil)
        if kind == "1":
            self.convs1 = convs
            self.convs2 = nn.ModuleList(WNConv1d(c, c, k, padding=pad(1)) for _ in dil)
        else:
            self.convs = convs

    def forward(self, x):
        if hasattr(self, "convs1"):
            for c1, c2 in zip(self.convs1, self.convs2):
                x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        else:
            for c in self.convs:
                x = x + c(F.leaky_relu(x, 0.1))
        return x


HIFIGAN_V1 = dict(resblock="1", upsample_rates=[8, 8, 2, 2], upsample_kernel_sizes=[16, 16, 4, 4],
                  upsample_initial_channel=512, resblock_kernel_sizes=[3, 7, 11],
                  resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]], num_mels=80)


class HiFiGAN(nn.Module):
    """The hifi-gan `Generator(h)`; `config` is a dict of the `h` fields (config_v1.json's by
    default). No released HiFi-GAN uses this mel recipe: this is for users who train one on it."""

    def __init__(self, config=None):
        super().__init__()
        h = {**HIFIGAN_V1, **(config or {})}
        self.config = h
        ch0, kind = h["upsample_initial_channel"], str(h["resblock"])
        self.conv_pre = WNConv1d(h.get("num_mels", 80), ch0, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConv1d(ch0 // 2 ** i, ch0 // 2 ** (i + 1), k, stride=u, padding=(k - u) // 2,
                     transpose=True)
            for i, (u, k) in enumerate(zip(h["upsample_rates"], h["upsample_kernel_sizes"])))
        self.resblocks = nn.ModuleList(
            HiFiResBlock(ch0 // 2 ** (i + 1), k, d, kind) for i in range(len(self.ups))
            for k, d in zip(h["resblock_kernel_sizes"], h["resblock_dilation_sizes"]))
        self.conv_post = WNConv1d(ch0 // 2 ** len(self.ups), 1, 7, padding=3)

    def forward(self, mel):
        """(B, num_mels, T) -> (B, 1, prod(upsample_rates) T)."""
        n = len(self.config["resblock_kernel_sizes"])
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * n + j](x) for j in range(n)) / n  # multi-receptive fusion
        return torch.tanh(self.conv_post(F.leaky_relu(x)))  # hifi-gan: default slope 0.01 here


def weight_norm_layout(sd, model):
    """A vocoder's state dict in the releases' `X.weight_g / weight_v` layout of weight-normed
    convs (`WNConv1d`), from the other layouts: torch's parametrization keys
    (`X.parametrizations.weight.original0/1`, what newer torch saves) and a plain `X.weight` (a
    generator saved after `remove_weight_norm()`, as exported for inference: v = w and g = |w|
    over dims 1, 2 give w back; an all-zero filter gets v = 1, g = 0)."""
    rename = {".parametrizations.weight.original0": ".weight_g",
              ".parametrizations.weight.original1": ".weight_v"}
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        for old, new in rename.items():
            k = k.replace(old, new)
        base = k.removesuffix(".weight")
        if (k != base and f"{base}.weight_v" in own and f"{base}.weight_v" not in sd
                and torch.is_tensor(v) and v.dim() == 3):
            g = v.float().norm(dim=(1, 2), keepdim=True)  # (dim 0, 1, 1)
            out[f"{base}.weight_v"] = torch.where(g > 0, v, torch.ones_like(v))  # no 0 / 0
            out[f"{base}.weight_g"] = g.to(v.dtype)
        else:
            out[k] = v
    return out


def load_melgan(path, *, trusted=False, n_mel_channels=80, ngf=32, n_residual_layers=3):
    """SpecVQGAN's `best_netG.pt` (a bare state dict; `{"state_dict": ...}` also accepted)."""
    obj = load_checkpoint(path, trusted=trusted, what="MelGAN vocoder")
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    model = MelGAN(n_mel_channels, ngf, n_residual_layers)
    sd = weight_norm_layout(sd, model) if isinstance(sd, dict) else sd
    return load_state_strict(model, sd, "MelGAN vocoder", path).eval()


def load_hifigan(path, config=None, *, trusted=False):
    """A hifi-gan generator file (`{"generator": state_dict}`, as hifi-gan saves it)."""
    obj = load_checkpoint(path, trusted=trusted, what="HiFi-GAN vocoder")
    sd = obj.get("generator", obj) if isinstance(obj, dict) else obj
    model = HiFiGAN(config)
    sd = weight_norm_layout(sd, model) if isinstance(sd, dict) else sd
    return load_state_strict(model, sd, "HiFi-GAN vocoder", path).eval()


def griffin_lim(mel01, n_iter=32, generator=None, momentum=0.99, sr=SAMPLE_RATE, n_fft=N_FFT,
                hop=HOP, fmin=FMIN, fmax=FMAX):
    """(B, F, T) or (F, T) mel in [0, 1] -> (B, hop T) waveform, no weights needed: magnitudes from
    `mel01_to_linear`, phases by fast Griffin-Lim (Perraudin et al. 2013, as librosa's
    `griffinlim` with momentum), starting from random phases drawn from `generator`. Needs
    hop T > n_fft / 2 (3 frames at the recipe's sizes) for the re-analysis's reflect padding."""
    mel01 = mel01.float().reshape(-1, *mel01.shape[-2:])  # (B, F, T)
    if hop * mel01.shape[-1] <= n_fft // 2:
        raise ValueError(f"Griffin-Lim needs more than {n_fft // 2 // hop} frames of {hop} "
                         f"samples for an n_fft of {n_fft}, got {mel01.shape[-1]}")
    mag = mel01_to_linear(mel01, sr, n_fft, fmin, fmax)  # (B, K, T)
    window = torch.hann_window(n_fft, device=mag.device)
    length = hop * mag.shape[-1]  # the vocoders' length, so all three agree
    istft = lambda s: torch.istft(s, n_fft, hop, n_fft, window, center=True,  # noqa: E731
                                  length=length)
    stft = lambda w: torch.stft(w, n_fft, hop, n_fft, window, center=True,  # noqa: E731
                                pad_mode="reflect", return_complex=True)
    device = generator.device if generator is not None else mag.device
    phase = torch.rand(mag.shape, generator=generator, device=device).to(mag.device) * 2 * math.pi
    angles = torch.polar(torch.ones_like(mag), phase)
    rebuilt_prev = torch.zeros_like(angles)
    for _ in range(n_iter):
        # `length` is one hop longer than T frames need, so the re-analysis has one extra frame
        rebuilt = stft(istft(mag * angles))[..., :mag.shape[-1]]
        angles = rebuilt - (momentum / (1 + momentum)) * rebuilt_prev
        angles = angles / (angles.abs() + 1e-16)
        rebuilt_prev = rebuilt
    return istft(mag * angles)


# -----------------------------------------------------------------------------
# sound files


def _kaiser_sinc(d, fc, half, beta):
    """Low-pass taps at distances `d` (input samples): fc sinc(fc d) times a Kaiser window of
    half-width `half`; fc is the cutoff as a fraction of the input Nyquist frequency."""
    arg = beta * torch.sqrt((1 - (d / half) ** 2).clamp(min=0))
    window = torch.special.i0(arg) / torch.special.i0(torch.tensor(beta, dtype=d.dtype))
    return fc * torch.sinc(fc * d) * window * (d.abs() <= half)


TABLE_STEPS = 4096  # points per input sample of the filter table for ratios with a huge `up`


def resample(wav, orig_sr, new_sr, zeros=64, rolloff=0.95, beta=8.6):
    """Band-limited resampling of the last axis with a Kaiser-windowed sinc (Smith, "Digital Audio
    Resampling"). Cutoff rolloff * min(orig, new) / 2; the window spans `zeros` zero-crossings
    per side. For 44.1 -> 22.05 kHz the -1 dB edge is 10.3 kHz and everything above 10.92 kHz
    is below -80 dB (beta 8.6 is Kaiser's value for ~86 dB).

    Output j sits at input time j * orig / new. With up / down the reduced ratio, outputs fall
    into `up` phases whose taps repeat every `down` input samples, so one strided conv1d with an
    (up, K) kernel does it all (polyphase). Ratios with a huge `up` (e.g. 44101 -> 22050) instead
    gather the taps of each output from a table of the filter at TABLE_STEPS points per input
    sample, linearly interpolated (Smith's method; the table's error is below -120 dB)."""
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr == new_sr:
        return wav
    shape, T = wav.shape[:-1], wav.shape[-1]
    x = wav.reshape(-1, T).float()  # (B, T); taps are computed in float64, applied in float32
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    fc = rolloff * min(orig_sr, new_sr) / orig_sr
    half = zeros / fc  # window half-width in input samples
    W = int(math.ceil(half))
    n_out = -(-T * up // down)
    if up * (2 * W + down) <= 2 ** 22:
        # output (block k, phase i) reads inputs k*down + m, m in [-W + 1, W + down - 1]
        m = torch.arange(-W + 1, W + down, dtype=torch.float64)  # (K,)
        d = m[None, :] - torch.arange(up, dtype=torch.float64)[:, None] * down / up  # (up, K)
        kernel = _kaiser_sinc(d, fc, half, beta)
        n_blocks = -(-n_out // up)
        right = max(0, (n_blocks - 1) * down + len(m) - (T + W - 1))
        x = F.pad(x, (W - 1, right))[:, None]  # (B, 1, T_padded)
        y = F.conv1d(x, kernel[:, None].to(x), stride=down)[..., :n_blocks]  # (B, up, n_blocks)
        y = y.transpose(1, 2).reshape(x.shape[0], -1)[:, :n_out]  # (B, n_out)
    else:
        P = TABLE_STEPS
        table = _kaiser_sinc(torch.arange(W * P + 2, dtype=torch.float64) / P, fc, half, beta)
        slope = (table[1:] - table[:-1]).float()  # (W P + 1,) per table step
        table = table[:-1].float()
        taps = torch.arange(-W + 1, W + 1)  # (K,) input offsets from floor(input time)
        after = taps > 0  # taps after the output's time
        x = F.pad(x, (W, W + 1))  # (B, T_padded)
        chunks = []
        for j0 in range(0, n_out, 16384):  # chunks bound the (outputs, taps) weight matrix
            j = torch.arange(j0, min(j0 + 16384, n_out))  # (J,)
            base = j * down // up  # integer part of the input time, exact in int64
            q = j * down % up * P  # the fraction of the input time, in table steps times up
            whole = (q // up)[:, None]  # (J, 1)
            part = (q % up).double().div(up).float()[:, None]  # (J, 1) in [0, 1)
            # |tap - fraction| in table steps: tap P - whole - 1 + (1 - part) after the output,
            # whole - tap P + part before it; integer index plus interpolation weight
            index = torch.where(after, taps * P - 1 - whole, whole - taps * P)  # (J, K)
            weight = torch.where(after, 1 - part, part)  # (J, K)
            kernel = table[index] + weight * slope[index]  # (J, K)
            near = x[:, (base[:, None] + W + taps[None, :]).to(x.device)]  # (B, J, K)
            chunks.append(torch.einsum("bjk,jk->bj", near, kernel.to(x)))  # (B, J)
        y = torch.cat(chunks, dim=1)  # (B, n_out)
    return y.to(wav.dtype).reshape(*shape, n_out)


MIN_SAMPLE_RATE = 1000  # below it a file holds no sound worth the name (and resampling explodes)


def load_audio(path, sample_rate=SAMPLE_RATE, seconds=None):
    """Any file soundfile reads -> (T,) float32 mono at `sample_rate` (channels averaged); with
    `seconds`, only that much of the file's start (and 0.1 s more, so that resampling the cut
    end matches resampling the whole file there) is read."""
    path = os.fspath(path)
    check_file(path, "audio file", empty="give a recording")
    try:
        with soundfile.SoundFile(path) as f:
            sr = f.samplerate
            if sr < MIN_SAMPLE_RATE:
                raise UserError(f"audio {path} claims a sample rate of {sr} Hz; re-export it "
                                f"at {sample_rate} Hz")
            frames = -1 if seconds is None else math.ceil((seconds + 0.1) * sr)
            data = f.read(frames, dtype="float32", always_2d=True)  # (T, channels)
    except (RuntimeError, TypeError, ValueError) as e:  # soundfile's errors are RuntimeErrors
        raise UserError(f"cannot read audio {path} ({str(e).splitlines()[0][:100]}); "
                        "convert it to WAV or FLAC, e.g. with ffmpeg") from e
    if data.shape[0] == 0:
        raise UserError(f"audio {path} holds no samples; give a recording")
    if not np.isfinite(data).all():
        raise UserError(f"audio {path} holds NaN or infinite samples; re-export it")
    return resample(torch.from_numpy(data.mean(axis=1)), sr, sample_rate)


def full_scale(wav, where=None):
    """wav scaled down to full scale (peak 1) if its samples (those `where` is True) peak above
    it, rather than clipped by a 16-bit file; otherwise as it is."""
    used = wav if where is None else wav[where]
    peak = float(used.abs().max()) if used.numel() else 0.0
    return wav / peak if peak > 1 else wav


def save_wav(wav, path, sample_rate=SAMPLE_RATE, replace=True):
    """(T,) waveform -> 16-bit PCM WAV, written atomically (`replace=False`: never over an
    existing file, FileExistsError instead)."""
    data = wav.detach().float().cpu().numpy().reshape(-1)
    if not np.isfinite(data).all():  # PCM would turn NaN into full-scale clicks
        raise UserError(f"{path}: the waveform holds NaN or infinite samples (a vocoder or "
                        "checkpoint fault); nothing was written")
    data = np.clip(data, -1, 1)
    # encoded in memory first: soundfile writes a file object from C callbacks, where an OSError
    # (a full disk) is printed as a traceback rather than raised
    buffer = io.BytesIO()
    soundfile.write(buffer, data, sample_rate, subtype="PCM_16", format="WAV")
    write_atomic(path, lambda f: f.write(buffer.getbuffer()), replace)


# viridis at 9 evenly spaced points (matplotlib's table, sampled), linearly interpolated
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
                     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], np.float64)


def save_mel_png(mel01, path, scale=2, replace=True):
    """(F, T) or (1, F, T) mel in [0, 1] -> a PNG with low frequencies at the bottom, in a
    viridis-like colour map, each cell `scale` x `scale` pixels; written as `save_wav` writes."""
    m = mel01.detach().float().cpu().reshape(mel01.shape[-2:]).clamp(0, 1).numpy()[::-1]  # (F, T)
    pos = m * (len(_VIRIDIS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_VIRIDIS) - 2)
    t = (pos - lo)[..., None]
    rgb = (_VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t).round().astype(np.uint8)  # (F, T, 3)
    rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    write_atomic(path, lambda f: Image.fromarray(rgb).save(f, format="PNG"), replace)
