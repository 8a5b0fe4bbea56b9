"""CS, the paper's image-audio alignment score (Tables 1 and 2, "following Im2Wav"): 100 times the
mean cosine similarity between the CLIP image features of each conditioning image and the
Wav2CLIP features of the audio generated from it (Radford et al. 2021; Wu et al. 2022, whose
audio encoder is distilled into the image space of CLIP ViT-B/32, the CLIP Im2Wav uses).

    python -m echoes.clip_score --audio gen/ --images test_frames/ \\
        --clip ViT-B-32.pt --wav2clip Wav2CLIP.pt

- Pairs: each audio file in --audio with the image of its name in --images (sample.py names its
  outputs after its inputs: cat.png gives cat.wav, cat_2.wav with --num-samples, cat-2.wav when
  cat.wav is taken); --images defaults to --audio, where joint mode writes both.
- The image side: OpenAI CLIP's `encode_image` with its `_transform` (`clip/model.py`,
  `clip/clip.py`): the short side resized to 224 bicubically, the centre cropped, RGB, CLIP's
  normalisation; the vision transformer built from the released TorchScript file (ViT-B-32.pt,
  only its tensors read) with the weights `clip.load` gives it.
- The audio side: `wav2clip.embed_audio(audio, wav2clip.get_model())` (wav2clip 0.1.0, the
  released `Wav2CLIP.pt`): the log power spectrogram (n_fft 512, hop 353) normalised by its own
  mean and std, ResNet-18 and the projection into CLIP's space.
- CS: 100 * mean_i cos(image_i, audio_i); cosines are not clipped at 0.

Im2Wav's own scoring script is not public, so three choices here are this project's, stated so
that numbers can be compared: Wav2CLIP takes its mean and std over the whole batch it is given,
so a clip's features depend on its batch: each clip is embedded alone (CS does not depend on
order or batch size). Audio is made mono by averaging its channels, as librosa.load did for
wav2clip's training, and resampled to 16 kHz with torchaudio's resampler
(`echoes.metrics.resample_like_torchaudio`; librosa's differs slightly). Both networks compute in
fp32 (on a GPU with torch's default TF32 convolutions), where clip.load computes in fp16 on a GPU.
"""

import dataclasses
import math
import os
import re
import sys
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from echoes.cli import (UserError, check_file, check_zip_checksums, load_checkpoint,
                        load_state_strict, parse_settings, pick_device, run_cli, setting)
from echoes.fid import IMAGE_EXTS
from echoes.metrics import (audio_files, list_files, read_audio_file,
                            resample_like_torchaudio)
from echoes.tokenizers import read_image_file

SAMPLE_RATE = 16000  # Wav2CLIP's

# -----------------------------------------------------------------------------
# the image side: CLIP's vision transformer as OpenAI's `clip/model.py` builds it


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, x sigmoid(1.702 x) (OpenAI `clip/model.py`)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block of CLIP's transformer: x + attn(ln_1(x)), then x + mlp(ln_2(x)), on
    sequence-first (L, B, D) tensors as nn.MultiheadAttention takes them by default."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """`layers` residual attention blocks on (L, B, width) tensors."""

    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads)
                                         for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision transformer's sizes (defaults: ViT-B/32's), as `clip_vision_config` reads them
    from a state dict."""
    resolution: int = 224  # input side, patch * grid
    patch: int = 32  # side of a patch: one token each
    width: int = 768  # token dimension
    layers: int = 12  # residual attention blocks
    heads: int = 12  # attention heads: CLIP's build_model takes width // 64
    embed_dim: int = 512  # image features, the shared image-text (and Wav2CLIP) space


class CLIPVision(nn.Module):
    """CLIP's image encoder (ViT): forward((B, 3, R, R) preprocessed pixels) -> (B, embed_dim)
    image features, CLIP's `encode_image`. Names as in the released files under `visual.`."""

    def __init__(self, cfg=CLIPVisionConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, cfg.patch, stride=cfg.patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros((cfg.resolution // cfg.patch) ** 2
                                                             + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.zeros(w, cfg.embed_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, G, W): G = grid^2 patches, row-major
        cls = self.class_embedding.to(x.dtype).expand(len(x), 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + G, W)
        x = self.ln_pre(x).transpose(0, 1)  # (1 + G, B, W): sequence first
        x = self.transformer(x).transpose(0, 1)  # (B, 1 + G, W)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim): the class token


def is_torchscript(path):
    """Whether the file is a TorchScript archive (a zip holding constants.pkl)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def clip_state_dict(path, trusted=False):
    """The state dict of a CLIP file: a TorchScript archive as OpenAI releases them (ViT-B-32.pt),
    read by torch.jit.load as clip.load reads it (TorchScript's own loader, not Python's
    unpickler; only the tensors are used, no method of it runs), or a plain state dict saved
    by torch.save (read weights-only unless `trusted`)."""
    check_file(path, "--clip")
    if not is_torchscript(path):
        return load_checkpoint(path, trusted=trusted, what="CLIP weights")
    check_zip_checksums(path, "CLIP weights")
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's files are TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # a damaged archive: torch raises many types
        first = (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise UserError(f"CLIP weights {path} are a damaged TorchScript archive ({first}); "
                        "re-download them") from e


def clip_vision_config(sd, path):
    """The ViT's sizes from the state dict, as CLIP's `build_model` reads them."""
    need = {"visual.conv1.weight": 4, "visual.positional_embedding": 2, "visual.proj": 2}
    if not isinstance(sd, dict) or not all(torch.is_tensor(sd.get(k)) and sd[k].dim() == rank
                                           for k, rank in need.items()):
        raise UserError(f"CLIP weights {path} hold no vision transformer (no visual.conv1, "
                        "visual.positional_embedding, visual.proj as CLIP shapes them); give "
                        "OpenAI's ViT-B-32.pt (a ResNet CLIP is not supported)")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    blocks = "visual.transformer.resblocks."
    layers = len({k.split(".")[3] for k in sd
                  if k.startswith(blocks) and k.endswith(".attn.in_proj_weight")})
    heads = max(1, width // 64)
    if width % heads:
        raise UserError(f"CLIP weights {path} have a width of {width}, which CLIP's {heads} "
                        "heads do not divide; give OpenAI's ViT-B-32.pt")
    return CLIPVisionConfig(resolution=patch * grid, patch=patch, width=width, layers=layers,
                            heads=heads, embed_dim=sd["visual.proj"].shape[1])


# the entries CLIP's build_model keeps in fp16 (convert_weights: convolution, linear and attention
# weights and biases, the projection) before clip.load casts the model to fp32 on a CPU; the
# released files hold them in fp16 already, so the rounding changes only other files
HALF_KEYS = ("conv1.weight", "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
             "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


def load_clip_vision(path, *, trusted=False):
    """CLIP's image encoder from a released CLIP file, with the weights clip.load gives it on a
    CPU (fp16-rounded where build_model stores fp16, computed in fp32), in eval mode."""
    sd = clip_state_dict(path, trusted)
    cfg = clip_vision_config(sd, path)
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    visual = {k: (v.half() if k == "proj" or k.endswith(HALF_KEYS) else v).float()
              if torch.is_tensor(v) and v.is_floating_point() else v for k, v in visual.items()}
    return load_state_strict(CLIPVision(cfg), visual, "CLIP weights", path).eval()


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(img, n_px):
    """A PIL image -> (3, n_px, n_px) float32 as CLIP's `_transform(n_px)` makes it: the short
    side resized to n_px bicubically (torchvision's Resize on PIL images: left as it is when
    already n_px, the long side int(n_px * long / short)), the centre n_px x n_px cropped
    (offsets rounded), then converted to RGB, scaled to [0, 1] and normalised."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short != n_px:
        size = (n_px, int(n_px * long / short))
        img = img.resize(size if w <= h else size[::-1], Image.BICUBIC)
        w, h = img.size
    top, left = int(round((h - n_px) / 2.0)), int(round((w - n_px) / 2.0))
    img = img.crop((left, top, left + n_px, top + n_px)).convert("RGB")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


# -----------------------------------------------------------------------------
# the audio side: Wav2CLIP (wav2clip 0.1.0, `model/resnet.py` and `model/encoder.py`)


class Spectrogram(nn.Module):
    """torchaudio's Spectrogram(n_fft=512, hop_length=353) as Wav2CLIP runs it: the power |X|^2
    of a centred, reflect-padded STFT with a periodic Hann window (the buffer `window`)."""

    def __init__(self, n_fft=512, hop=353):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, wav):
        spec = torch.stft(wav, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)  # (B, n_fft / 2 + 1, frames)
        return spec.abs() ** 2


class BasicBlock(nn.Module):
    """ResNet-18's block: two 3x3 convolutions (no bias) with BatchNorm, plus the input (through
    a strided 1x1 convolution and BatchNorm where the shape changes)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(cout)) if stride != 1 else None)

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Wav2CLIPEncoder(nn.Module):
    """The log power spectrogram, normalised, through ResNet-18 with one input channel and no
    classifier: (B, T) 16 kHz audio -> (B, 512)."""

    def __init__(self):
        super().__init__()
        self.spectrogram = Spectrogram()
        self.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = (64, 128, 256, 512)
        for i, (cin, cout) in enumerate(zip((64,) + widths[:-1], widths)):
            stride = 1 if i == 0 else 2
            self.add_module(f"layer{i + 1}", nn.Sequential(BasicBlock(cin, cout, stride),
                                                           BasicBlock(cout, cout)))

    def forward(self, wav):
        x = torch.log(self.spectrogram(wav)[:, None] + 1e-7)  # (B, 1, 257, 1 + T // 353)
        # Wav2CLIP normalises with one mean and one (unbiased) std over everything it is given,
        # so a clip's embedding depends on its batch: callers embed one clip at a time
        x = (x - x.mean()) / (x.std() + 1e-9)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x.mean(dim=(2, 3))  # (B, 512): the global average pool


class Wav2CLIPTransform(nn.Module):
    """The projection into CLIP's image space: Linear, ReLU, Dropout(0.1), Linear."""

    def __init__(self, dim=512):
        super().__init__()
        self.sequential = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(dim, dim))

    def forward(self, x):
        return self.sequential(x)


class Wav2CLIP(nn.Module):
    """Wav2CLIP's clip-level audio embedding, `wav2clip.embed_audio(audio, get_model())`:
    forward((B, T) 16 kHz audio) -> (B, 512) in CLIP ViT-B/32's image space (not normalised).
    Names as the released checkpoint holds them."""

    def __init__(self):
        super().__init__()
        self.audio_encoder = Wav2CLIPEncoder()
        self.audio_transform = Wav2CLIPTransform()

    def forward(self, wav):
        return self.audio_transform(self.audio_encoder(wav))


def load_wav2clip(path, *, trusted=False):
    """Wav2CLIP from its released checkpoint (`Wav2CLIP.pt`, a flat state dict whose
    `audio_encoder.*` and `audio_transform.*` entries the model takes; the others, the image
    projection and the losses' scales of training, are left out as wav2clip leaves them), in
    eval mode."""
    check_file(path, "--wav2clip")
    if is_torchscript(path):
        raise UserError(f"--wav2clip {path} is a TorchScript file (OpenAI CLIP's?), not "
                        "Wav2CLIP's checkpoint; give Wav2CLIP.pt")
    sd = load_checkpoint(path, trusted=trusted, what="Wav2CLIP weights")
    model = Wav2CLIP()
    if isinstance(sd, dict):  # num_batches_tracked does not enter inference
        sd = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")},
              **{k: v for k, v in sd.items()
                 if str(k).startswith(("audio_encoder.", "audio_transform."))}}
    return load_state_strict(model, sd, "Wav2CLIP weights", path).eval()


# -----------------------------------------------------------------------------
# reading the pairs, the score and the command line


def read_cs_image(path, n_px):
    """One image file -> (3, n_px, n_px) float32 CLIP input (`clip_pixels`)."""
    return read_image_file(path, lambda f: clip_pixels(f, n_px))


def read_cs_audio(path):
    """One audio file -> float32 (L,) at 16 kHz: channels averaged (as librosa.load, which
    wav2clip's training used, makes it mono), resampled as torchaudio does."""
    data, rate = read_audio_file(path)  # (L, channels)
    wav = resample_like_torchaudio(data.mean(dim=1), rate, SAMPLE_RATE)  # (L',)
    check_length(path, len(wav))
    return wav


def check_length(path, n):
    """A one-line error for a clip of n samples at 16 kHz, too short for Wav2CLIP's STFT (its
    reflect padding needs more than n_fft / 2 samples)."""
    if n <= 256:
        raise UserError(f"{path} is too short for Wav2CLIP ({n} samples at 16 kHz; it needs at "
                        "least 257)")


def source_stems(stem):
    """The names of the image a clip named `stem` may come from, most specific first: sample.py
    writes NAME, NAME_k (--num-samples above 1) and NAME-2, NAME-3 ... (when NAME is taken)."""
    names = [stem, re.sub(r"-\d+$", "", stem)]
    names += [re.sub(r"_\d+$", "", n) for n in names]
    return list(dict.fromkeys(names))


def by_stem(paths, flag, folder):
    """{file name without extension: path}; a one-line error for two files of one name."""
    out = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in out:
            raise UserError(f"{flag} {folder} holds two files named {stem} "
                            f"({os.path.basename(out[stem])}, {os.path.basename(path)}); "
                            "keep one")
        out[stem] = path
    return out


def pairs(audio_dir, image_dir):
    """[(audio path, its header, image path)] for every audio file of `audio_dir`, paired by
    name (`source_stems`); a one-line error for a clip without its image."""
    paths, infos = audio_files(audio_dir, "--audio")
    clips = by_stem(paths, "--audio", audio_dir)
    info = dict(zip(paths, infos))
    images = by_stem(list_files(image_dir, "--images", IMAGE_EXTS, "image"), "--images",
                     image_dir)
    out, missing = [], []
    for stem, path in clips.items():
        found = [images[n] for n in source_stems(stem) if n in images]
        if found:
            out.append((path, info[path], found[0]))
        else:
            missing.append(os.path.basename(path))
    if missing:
        raise UserError(f"{len(missing)} of {len(clips)} clips in --audio have no image of the "
                        f"same name in --images {image_dir} (first: {missing[0]}); give the "
                        "folder of the images they were generated from")
    return out


@torch.no_grad()
def cs_features(clip, wav2clip, todo, device="cpu", progress=False):
    """(N, D) CLIP image features and (N, D) Wav2CLIP audio features of the (audio, header,
    image) pairs, float64 numpy, each image and each clip on its own (an image several clips
    came from, e.g. with --num-samples, once)."""
    n_px = clip.cfg.resolution
    seen, img, aud = {}, [], []
    for audio_path, _, image_path in tqdm(todo, desc="pairs", unit="pair",
                                          disable=not progress, dynamic_ncols=True):
        if image_path not in seen:
            x = read_cs_image(image_path, n_px)[None].to(device)  # (1, 3, n_px, n_px)
            seen[image_path] = clip(x).double().cpu()
        img.append(seen[image_path])
        aud.append(wav2clip(read_cs_audio(audio_path)[None].to(device)).double().cpu())
    return torch.cat(img).numpy(), torch.cat(aud).numpy()


def clip_score(image_features, audio_features):
    """100 * the mean over rows of the cosine similarity of the two (N, D) feature sets."""
    a = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    b = audio_features / np.linalg.norm(audio_features, axis=1, keepdims=True)
    return float(100 * np.mean(np.sum(a * b, axis=1)))


@dataclasses.dataclass
class Settings:
    """`python -m echoes.clip_score` settings (each one is a --flag; see --help)."""
    audio: str = setting("", "folder of generated audio (e.g. sample.py --mode i2a's --out)")
    images: str = setting("", "folder of the images it was generated from, same file names "
                          "(default: --audio, where joint mode writes both)")
    clip: str = setting("", "OpenAI CLIP's ViT-B-32.pt (the TorchScript file clip.load "
                        "downloads; read with torch.jit.load, as clip.load reads it)")
    wav2clip: str = setting("", "Wav2CLIP's released Wav2CLIP.pt (lyrebird-wav2clip "
                            "v0.1.0-alpha)")
    trust_checkpoints: bool = setting(False, "allow a weights file that needs full unpickling "
                                      "(only for files you trust)")
    device: str = setting("auto", "auto (a GPU when present), cpu, cuda or cuda:N")


def main(argv=None):
    s = parse_settings(Settings, sys.argv[1:] if argv is None else argv,
                       description="CS: CLIP image / Wav2CLIP audio alignment of generated "
                                   "audio and the images it came from.",
                       prog="python -m echoes.clip_score")
    if not s.audio:
        raise UserError("give --audio, the folder of generated audio")
    todo = pairs(s.audio, s.images or s.audio)
    for flag, path, fix in (("--clip", s.clip, "OpenAI CLIP's ViT-B-32.pt"),
                            ("--wav2clip", s.wav2clip, "Wav2CLIP's Wav2CLIP.pt")):
        if not path:
            raise UserError(f"give {flag}, {fix}")
        check_file(path, flag)
    for image_path in dict.fromkeys(p for _, _, p in todo):  # a bad file fails now, not later
        read_image_file(image_path, lambda f: f.load())
    for audio_path, info, _ in todo:
        check_length(audio_path, math.ceil(info.frames * SAMPLE_RATE / info.samplerate))
    device = pick_device(s.device)
    clip = load_clip_vision(s.clip, trusted=s.trust_checkpoints)
    if (clip.cfg.patch, clip.cfg.embed_dim) != (32, 512):
        raise UserError(f"--clip {s.clip} is a ViT with {clip.cfg.patch}-pixel patches and "
                        f"{clip.cfg.embed_dim}-dim features; Wav2CLIP's audio features are in "
                        "the space of CLIP ViT-B/32 (32-pixel patches, 512-dim): give "
                        "ViT-B-32.pt")
    wav2clip = load_wav2clip(s.wav2clip, trusted=s.trust_checkpoints)
    cs = clip_score(*cs_features(clip.to(device), wav2clip.to(device), todo, device,
                                 progress=True))
    print(f"| pairs | CS |\n|---|---|\n| {len(todo)} | {cs:.2f} |")


if __name__ == "__main__":
    run_cli(main)
