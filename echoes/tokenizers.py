"""Tokenizers: images and sounds to discrete ids and back (Visual Echoes Sec. 3.2).

What this file holds, top to bottom:
- `VQGAN`: the taming-transformers VQGAN (Esser et al. 2021; Encoder/Decoder of
  `taming/modules/diffusionmodules/model.py`, VectorQuantizer2 of
  `taming/modules/vqvae/quantize.py`), one class for the image model `vqgan_imagenet_f16_1024` and
  SpecVQGAN's VGGSound codebook (Iashin & Rahtu 2021: the same code on (80, 848) spectrograms).
  `state_dict()` keys are taming's, so the released weights load unchanged.
- Image files: `load_image` (any file Pillow reads -> a square crop in [-1, 1]), `save_png`.
- `ImageTokenizer` (images <-> ids) and `AudioTokenizer` (waveforms -> SpecVQGAN mels -> ids and
  back, through a vocoder; the splice of a regenerated stretch into a clip).

The mel recipe, the vocoders and sound files are in `echoes/audio.py`. Imports only torch, numpy,
Pillow, `echoes.audio` and `echoes.cli`, so the two files can be copied out together.
Shape letters: B batch, C channels, H, W image or mel size, h, w latent grid, L = h*w ids,
D code dimension, R image resolution, T frames (or samples for waveforms).
"""

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from echoes.audio import (FMAX, HOP, N_MELS, SAMPLE_RATE, crop_mel, fit_clip, full_scale,
                          griffin_lim, load_audio, mel_spectrogram)
from echoes.cli import UserError, check_file, load_checkpoint, load_state_strict, write_atomic


def n_params(module):
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# VQGAN (taming-transformers)


@dataclass
class VQGANConfig:
    """taming's ddconfig plus the quantizer's size; the defaults are `vqgan_imagenet_f16_1024`."""
    ch: int = 128                          # channels at full resolution
    ch_mult: tuple = (1, 1, 2, 2, 4)       # channel multiplier per level; len-1 downsamplings
    num_res_blocks: int = 2                # ResnetBlocks per level (decoder: one more)
    attn_resolutions: tuple = (16,)        # levels whose nominal size is listed get attention
    resolution: int = 256                  # nominal input size; only decides attention levels
    in_channels: int = 3                   # 3 for RGB, 1 for a spectrogram
    out_ch: int = 3                        # decoder output channels
    z_channels: int = 256                  # encoder output / decoder input channels
    embed_dim: int = 256                   # code dimension D
    n_embed: int = 1024                    # codebook size
    dropout: float = 0.0                   # in ResnetBlocks (0 in both released models)

    @classmethod
    def imagenet_f16_1024(cls, **overrides):
        """taming's `vqgan_imagenet_f16_1024`: 256x256 RGB -> 16x16 ids, 72.14 M parameters."""
        return cls(**overrides)

    @classmethod
    def vggsound_codebook(cls, **overrides):
        """SpecVQGAN `2021-05-19T22-16-54_vggsound_codebook`: (80, 848) mel -> 5x53 ids."""
        return cls(**{**dict(resolution=848, in_channels=1, out_ch=1, attn_resolutions=(53,)),
                      **overrides})


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm, swish, conv3x3, norm, swish, dropout, conv3x3, plus a 1x1 shortcut if C changes."""

    def __init__(self, c_in, c_out, dropout):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1 convs for q, k, v, proj_out."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))
        # q, k, v: (B, 1, H*W, C); the default scale C^-0.5 is taming's
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        h = h.transpose(2, 3).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 stride-2 conv after zero-padding right and bottom by one (taming's asymmetric pad)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` and `attn` lists (attn empty or one per block), an optional
    `downsample` / `upsample` module. Attribute names give taming's state_dict keys."""

    def __init__(self, c_in, c_out, n_blocks, attention, dropout):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(c_in, c_out, dropout))
            c_in = c_out
            if attention:
                self.attn.append(AttnBlock(c_out))

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        return x


class Middle(nn.Module):
    def __init__(self, c, dropout):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, dropout)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c, dropout)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """conv_in; per level ResnetBlocks (+ attention), Downsample except after the last; mid;
    GroupNorm, swish, conv_out to z_channels (taming's double_z=False)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        mults = (1,) + tuple(c.ch_mult)
        # Attention is decided by the *nominal* size `resolution` halved per level, not by the
        # tensor's actual size: SpecVQGAN's (80, 848) input gets attention at 848/16 = 53 (= w).
        curr_res = c.resolution
        self.down = nn.ModuleList()
        for i in range(len(c.ch_mult)):
            level = Level(c.ch * mults[i], c.ch * mults[i + 1], c.num_res_blocks,
                          curr_res in c.attn_resolutions, c.dropout)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(c.ch * mults[i + 1])
                curr_res = curr_res // 2
            self.down.append(level)
        c_top = c.ch * c.ch_mult[-1]
        self.mid = Middle(c_top, c.dropout)
        self.norm_out = group_norm(c_top)
        self.conv_out = nn.Conv2d(c_top, c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """The mirror of the encoder with num_res_blocks + 1 blocks per level; `up[0]` is the full
    resolution level (taming builds from the lowest level and prepends)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        n = len(c.ch_mult)
        c_in = c.ch * c.ch_mult[-1]
        curr_res = c.resolution // 2 ** (n - 1)  # taming's nominal size at the lowest level
        self.conv_in = nn.Conv2d(c.z_channels, c_in, 3, padding=1)
        self.mid = Middle(c_in, c.dropout)
        up = []
        for i in reversed(range(n)):
            c_out = c.ch * c.ch_mult[i]
            level = Level(c_in, c_out, c.num_res_blocks + 1, curr_res in c.attn_resolutions,
                          c.dropout)
            c_in = c_out
            if i != 0:
                level.upsample = Upsample(c_out)
                curr_res = curr_res * 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, c.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup, taming's VectorQuantizer2 (no remap)."""

    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z):
        """(B, D, h, w) latents -> (B, h*w) ids, row-major."""
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        e = self.embedding.weight
        # taming's expansion |z|^2 + |e|^2 - 2 z.e (not cdist), so near ties resolve the same way
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # (B*h*w, n_embed)
        return d.argmin(dim=1).reshape(B, h * w)

    def lookup(self, ids, hw):
        """(B, L) ids -> (B, D, h, w) codes."""
        B, L = ids.shape
        return self.embedding(ids).reshape(B, *hw, -1).permute(0, 3, 1, 2)  # (B, D, h, w)


class VQGAN(nn.Module):
    """taming's VQModel without the losses: encoder, quant_conv, quantize, post_quant_conv, decoder.

    `VQGAN(**kwargs)` takes taming's ddconfig names plus `embed_dim`, `n_embed` (defaults:
    `vqgan_imagenet_f16_1024`); `VQGAN(config)` takes a `VQGANConfig`; kwargs override its fields.
    Inputs are in [-1, 1]; `encode` -> (B, h*w) ids, `decode(ids, (h, w))` -> (B, out_ch, H, W),
    unclamped as in taming. `forward` returns the reconstruction with a straight-through estimator,
    for training a small tokenizer with this code."""

    def __init__(self, config=None, **kwargs):
        super().__init__()
        if kwargs.pop("double_z", False):  # in taming's configs; a VQGAN's encoder has it off
            raise ValueError("double_z=True is a KL autoencoder's encoder, not a VQGAN's")
        config = dataclasses.replace(config or VQGANConfig(), **kwargs)
        config.ch_mult, config.attn_resolutions = (tuple(config.ch_mult),
                                                    tuple(config.attn_resolutions))
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def latent_size(self, H, W):
        """The id grid (h, w) for an (H, W) input: each Downsample maps n -> n // 2."""
        for _ in range(len(self.config.ch_mult) - 1):
            H, W = H // 2, W // 2
        return H, W

    def encode_latent(self, x):
        """(B, in_channels, H, W) -> (B, D, h, w) continuous latents, before quantization."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        """(B, in_channels, H, W) in [-1, 1] -> (B, h*w) LongTensor, row-major over (h, w)."""
        return self.quantize(self.encode_latent(x))

    def decode_codes(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, ids, hw):
        """(B, h*w) ids and the grid (h, w) -> (B, out_ch, H, W)."""
        return self.decode_codes(self.quantize.lookup(ids, hw))

    def forward(self, x):
        """Returns (reconstruction, ids, z, z_q); gradients reach the encoder through
        z + (z_q - z).detach() (taming), and the codebook through whatever loss uses z_q."""
        z = self.encode_latent(x)
        ids = self.quantize(z.detach())
        z_q = self.quantize.lookup(ids, z.shape[-2:])
        return self.decode_codes(z + (z_q - z).detach()), ids, z, z_q


def load_vqgan(path, config=None, *, trusted=False, **kwargs):
    """A VQGAN from a file: a Lightning checkpoint (`{"state_dict": ...}` with `loss.*` keys, as
    taming and SpecVQGAN release them), a bare state dict, or a file echoes wrote, which carries
    its own `"config"` (VQGANConfig fields) next to `"state_dict"` or `"model"`.
    `config` (a VQGANConfig, or a dict such as taming's ddconfig) and kwargs, as for `VQGAN`,
    build a released file; a file's own config wins."""
    obj = load_checkpoint(path, trusted=trusted, what="VQGAN checkpoint")
    return vqgan_from_checkpoint(obj, config, os.fspath(path), **kwargs)


def vqgan_from_checkpoint(obj, config=None, source="(loaded object)", **kwargs):
    """`load_vqgan` on an object already loaded (a file's contents, or an entry of a bundle).
    A bundle (an echoes model checkpoint with its tokenizers inside, as the demo's) gives the
    tokenizer of the modality `config` is for (3 input channels: image, else audio)."""
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        names = {f.name for f in dataclasses.fields(VQGANConfig)}
        unknown = sorted(set(obj["config"]) - names)
        if "audio_len" in unknown and "model" in obj:
            channels = (config.get("in_channels", 3) if isinstance(config, dict)
                        else getattr(config, "in_channels", 3))
            modality = None if config is None else ("image" if channels == 3 else "audio")
            entry = (obj.get("tokenizers") or {}).get(modality) if modality else None
            if isinstance(entry, dict) and isinstance(entry.get("state_dict"), dict):
                return vqgan_from_checkpoint(entry, config, f"the {modality} VQGAN in {source}",
                                             **kwargs)
            if modality is None and isinstance(obj.get("tokenizers"), dict):
                raise UserError(f"{source} holds an image and an audio VQGAN: pass config= "
                                "(VQGANConfig.imagenet_f16_1024() or .vggsound_codebook()) "
                                "to pick one")
            raise UserError(f"{source} is an echoes model checkpoint without tokenizers inside, "
                            "not a VQGAN (sample.py takes it as --ckpt)")
        if unknown:
            raise UserError(f"{source}: its VQGAN config has unknown fields "
                            f"({', '.join(unknown[:4])}); use the echoes version that wrote it")
        config, kwargs, own = None, dict(obj["config"]), True
    else:
        own = False
        if isinstance(config, dict):  # taming's ddconfig names, as VQGAN takes them
            config, kwargs = None, {**config, **kwargs}
    sd = obj
    if isinstance(obj, dict):
        sd = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), obj)
    if isinstance(sd, dict):  # the perceptual loss and the discriminator are training-only
        sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    try:
        model = VQGAN(config, **kwargs)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError) as e:
        whose, fix = ((f"{source}: its VQGAN config", "re-create the file") if own else
                      ("the VQGAN config given", "check its fields"))
        raise UserError(f"{whose} builds no model ({type(e).__name__}: {str(e)[:100]}); "
                        f"{fix}") from e
    return load_state_strict(model, sd, "VQGAN checkpoint", source).eval()


# -----------------------------------------------------------------------------
# image files


def read_image_file(path, convert):
    """`convert(the opened PIL image)` of an image file (convert must load the pixels), or a
    one-line `UserError` naming what is wrong with the file."""
    path = os.fspath(path)
    check_file(path, "image file", empty="give a PNG or JPEG file")
    try:
        with Image.open(path) as f:
            return convert(f)
    except Image.DecompressionBombError as e:
        raise UserError(f"image {path} is too large to open safely ({e}); scale it "
                        "down first") from e
    except UnidentifiedImageError as e:
        raise UserError(f"{path} is not an image file this reads; use a PNG or JPEG "
                        "file") from e
    except PermissionError as e:
        raise UserError(f"cannot read image {path} ({e.strerror}); check its "
                        "permissions") from e
    except (OSError, ValueError) as e:  # a damaged file of a known format
        first = (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise UserError(f"cannot read image {path}, the file is damaged ({first}); "
                        "re-export it") from e


def _upright(f):
    """An opened image turned as its EXIF orientation says (kept as stored when that is broken)."""
    try:
        return ImageOps.exif_transpose(f)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        return f.copy()


def load_image(path_or_image, resolution):
    """A file (any mode Pillow reads, any size up to 20:1), a PIL image or an (H, W[, 3 or 4])
    uint8 array -> (3, resolution, resolution) in [-1, 1]: transparent pixels composited over
    white (`to_rgb`), short side resized to `resolution` (bicubic), then a centre crop."""
    image = path_or_image
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        image = read_image_file(image, lambda f: to_rgb(_upright(f)))
    image = to_rgb(image)
    w, h = image.size
    if max(w, h) > MAX_ASPECT * min(w, h):  # resizing the short side would blow up the long one
        name = (f"image {os.fspath(path_or_image)}" if isinstance(path_or_image, (str, os.PathLike))
                else "the image")
        raise UserError(f"{name} is {w} x {h}, wider than {MAX_ASPECT}:1; crop it first")
    s = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))),
                         Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (R, R, 3)
    return x.permute(2, 0, 1) / 127.5 - 1  # (3, R, R)


MAX_ASPECT = 20  # the widest image load_image takes (it is centre-cropped to a square anyway)


def to_rgb(image):
    """A PIL image of any mode -> RGB, transparency composited over white (convert() would keep
    whatever colour the transparent pixels hold, often black), CIELab converted to sRGB (convert()
    would copy L, a, b into R, G, B)."""
    if image.mode == "LAB":
        from PIL import ImageCms  # Pillow's littleCMS binding, only needed here
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    image = to_8bit(image)
    if image.mode == "La":  # premultiplied; Pillow converts it to LA only
        image = image.convert("LA")
    if image.has_transparency_data:  # an alpha band, an RGBA palette or a transparent key
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def to_8bit(image):
    """A PIL image of 16-bit or float grey levels (modes I;16*, I, F) -> mode L, scaled rather
    than clipped as convert() would: levels above 255 as 16-bit ones, floats of [0, 1] to
    0..255; mode LA where a transparent level is set. Other modes as they are."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    x = np.asarray(image, dtype=np.float64)
    key = image.info.get("transparency")
    # I;16 modes hold 16-bit levels however dark; mode I (32-bit) is taken as 16-bit above 255
    if image.mode.startswith("I;16") or (image.mode == "I" and x.max() > 255):
        grey = x / 257  # 65535 -> 255
    elif image.mode == "F" and x.max() <= 1:
        grey = x * 255
    else:
        grey = x
    grey = np.clip(grey, 0, 255).round().astype(np.uint8)
    if isinstance(key, (int, float)):  # that level (before scaling) is transparent
        alpha = np.where(x == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], -1), "LA")
    return Image.fromarray(grey, "L")


def to_pil(x):
    """(3, H, W) in [-1, 1] -> RGB PIL image."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())  # (H, W, 3)


def save_png(image, path, replace=True):
    """A PIL image -> PNG, written as `save_wav` writes."""
    write_atomic(path, lambda f: image.save(f, format="PNG"), replace)


# -----------------------------------------------------------------------------
# tokenizers: files <-> ids


def _device(module):
    return next(module.parameters()).device


def codebook_fingerprint(codebook):
    """16 hex digits of the SHA-256 of a VQGAN's codebook (fp32): what its ids mean. Shards and
    the checkpoints trained on them record it, so a model is never decoded through another
    tokenizer's codes (a decoder fine-tuned on a frozen codebook keeps it). `codebook`: a VQGAN
    or its (n_embed, D) codebook tensor."""
    w = codebook.quantize.embedding.weight if isinstance(codebook, VQGAN) else codebook
    w = w.detach().float().cpu().contiguous()  # (n_embed, D)
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]


def check_modality(vqgan, modality, source, flags=True):
    """A `UserError` when a VQGAN is of the other modality: 3 input channels for images (RGB),
    1 for audio (a mel spectrogram); e.g. the two --...-vqgan files swapped (`flags`: the caller
    takes those options)."""
    want = 3 if modality == "image" else 1
    if vqgan.config.in_channels != want:
        other = "audio" if modality == "image" else "image"
        hint = " (swap --image-vqgan and --audio-vqgan?)" if flags else ""
        raise UserError(f"{source} takes {vqgan.config.in_channels}-channel input, an {modality} "
                        f"VQGAN takes {want}: it looks like the {other} VQGAN{hint}")


class ImageTokenizer:
    """Images <-> ids with a VQGAN. `grid` is (h, w); each image gives h*w ids, row-major.

        tok = ImageTokenizer(load_vqgan("last.ckpt"))   # 256 -> (16, 16) grid
        ids = tok.encode_files(["a.jpg", "b.png"])      # (2, 256)
        tok.decode_to_images(ids)[0].save("a_rec.png")
    """

    def __init__(self, vqgan, resolution=None):
        self.vqgan = vqgan.eval()
        self.resolution = resolution or vqgan.config.resolution
        self.grid = vqgan.latent_size(self.resolution, self.resolution)

    @torch.no_grad()
    def encode(self, x):
        """(B, 3, R, R) in [-1, 1] -> (B, h*w) ids."""
        return self.vqgan.encode(x.to(_device(self.vqgan)))

    def encode_images(self, images):
        """File paths, PIL images or uint8 arrays -> (B, h*w) ids."""
        return self.encode(torch.stack([load_image(im, self.resolution) for im in images]))

    encode_files = encode_images

    @torch.no_grad()
    def decode(self, ids):
        """(B, h*w) ids -> (B, 3, R, R), roughly in [-1, 1]."""
        return self.vqgan.decode(ids.to(_device(self.vqgan)), self.grid)

    def decode_to_images(self, ids):
        """(B, h*w) ids -> list of B RGB PIL images (save them with `.save("x.png")`)."""
        return [to_pil(x) for x in self.decode(ids)]


class AudioTokenizer:
    """Sounds <-> ids: waveform -> SpecVQGAN mel (fit to `n_samples`, trim to `keep_frames`, centre
    crop to `n_frames`) -> VQGAN ids; ids -> [0, 1] mel -> waveform with `vocoder` (a `MelGAN` or
    `HiFiGAN`) or Griffin-Lim when it is None. `grid` is (h, w) = (80, n_frames) / 2^levels;
    ids are row-major over (mel row, time). Defaults are the VGGSound recipe (10 s, 5x53 ids).

        tok = AudioTokenizer(load_vqgan("epoch_39.ckpt", config=VQGANConfig.vggsound_codebook()),
                             vocoder=load_melgan("best_netG.pt"))
        ids = tok.encode_files(["a.wav"])               # (1, 265)
        save_wav(tok.mel_to_wav(tok.decode_to_mel(ids))[0], "a_rec.wav")
    """

    def __init__(self, vqgan, vocoder=None, n_samples=220500, n_frames=848, keep_frames=860,
                 sample_rate=SAMPLE_RATE, griffin_lim_iters=32):
        self.vqgan, self.vocoder = vqgan.eval(), vocoder.eval() if vocoder is not None else None
        self.n_samples, self.n_frames, self.keep_frames = n_samples, n_frames, keep_frames
        self.sample_rate, self.griffin_lim_iters = sample_rate, griffin_lim_iters
        if not sample_rate > 2 * FMAX:  # the mel's top band must lie below the Nyquist rate
            raise ValueError(f"a sample rate of {sample_rate} Hz is too low for the mel recipe "
                             f"(bands up to {FMAX:g} Hz need more than {2 * FMAX:g} Hz)")
        frames = 1 + n_samples // HOP
        if min(frames, keep_frames or frames) < n_frames:
            raise ValueError(f"{n_samples} samples give {frames} frames, fewer than {n_frames}")
        self.grid = vqgan.latent_size(N_MELS, n_frames)

    def wav_to_mel(self, wavs):
        """(T,) or (B, T) tensor, or a list of (T_i,) tensors, at `sample_rate`
        -> (B, 80, n_frames) mel in [0, 1]."""
        if isinstance(wavs, (list, tuple)):
            wavs = torch.stack([fit_clip(torch.as_tensor(w).float(), self.n_samples) for w in wavs])
        wavs = fit_clip(wavs.reshape(-1, wavs.shape[-1]), self.n_samples)  # (B, n_samples)
        mel = mel_spectrogram(wavs.to(_device(self.vqgan)), self.sample_rate)
        return crop_mel(mel, self.n_frames, self.keep_frames)

    def crop_offset(self):
        """The first STFT frame of the cropped mel: (min(frames, keep_frames) - n_frames) // 2
        (6 for VGGSound). A rendering of the mel starts that many hops into the clip."""
        frames = 1 + self.n_samples // HOP
        return (min(frames, self.keep_frames or frames) - self.n_frames) // 2

    def splice(self, rendering, original, hidden, fade=0.02):
        """The clip a user hears after inpainting: the input's waveform (as read: mono, at
        `sample_rate`, cut or padded to the clip) outside the regenerated token columns and the
        rendering of the decoded mel inside them, crossfaded (raised cosine, `fade` s) just
        outside the stretch. rendering (T_r,) from `mel_to_wav`, its sample k at the input's
        sample k + crop_offset() * HOP; original (T,) at `sample_rate`; hidden (w,) bool, True =
        regenerated (`sampler.hidden_columns`; several stretches are spliced each on its own)
        -> (n_samples,), aligned with the input. Where
        the rendering does not reach (at the clip's very ends, the frames the mel's centre crop
        drops) the stretch fades to silence. The rendering is scaled down to full scale if the
        part of it that is used peaks above it, and the result if the input itself does."""
        n, sr = self.n_samples, self.sample_rate
        original = fit_clip(original.float().cpu(), n)
        cols = hidden.nonzero().flatten().tolist()
        if not cols:
            return full_scale(original)
        edges = self.column_edges()
        stretches = []  # [first, last] column of each run of consecutive hidden columns
        for j in cols:
            if stretches and stretches[-1][1] == j - 1:
                stretches[-1][1] = j
            else:
                stretches.append([j, j])
        shift = self.crop_offset() * HOP
        part = rendering.float().cpu()[:max(0, n - shift)]
        t = torch.arange(n, dtype=torch.float32)
        width = max(1.0, fade * sr)
        ramp = lambda d: 0.5 + 0.5 * torch.cos(torch.pi * (d / width).clamp(0, 1))  # noqa: E731
        gen = torch.zeros(n, dtype=torch.float32)
        gen[shift:shift + len(part)] = part
        if shift > 0:  # fade in from the silence before the rendering's first sample
            gen = gen * (1 - ramp(t - shift + 1))
        if shift + len(part) < n:  # and out into the silence after its last
            gen = gen * (1 - ramp(shift + len(part) - t))
        weight = torch.zeros(n)  # (n,) the rendering's share: 1 inside a stretch, fading outside
        for first, last in stretches:
            a, b = round(edges[first] * sr), round(edges[last + 1] * sr)  # its samples [a, b)
            inside = torch.where(t < a, ramp(a - t), torch.where(t >= b, ramp(t - b + 1), 1.0))
            weight = torch.maximum(weight, inside)
        gen = full_scale(gen, where=weight > 0)
        return full_scale((1 - weight) * original + weight * gen)

    def column_edges(self):
        """The w + 1 times (s, exact fractions) between the token columns: column j holds the
        frames [j, j + 1) * n_frames / w of the cropped mel, which starts at frame
        off = (min(frames, keep_frames) - n_frames) // 2 of the centred STFT (frame f centred at
        f * HOP / sample_rate, so a column starts half a hop before its first frame); the first
        and last edges are the clip's ends (the frames the crop cut go to the nearest column)."""
        off = self.crop_offset()
        w = self.grid[1]
        edges = [(off + Fraction(j * self.n_frames, w) - Fraction(1, 2)) * HOP / self.sample_rate
                 for j in range(w + 1)]
        edges[0], edges[-1] = Fraction(0), Fraction(self.n_samples, self.sample_rate)
        return edges

    @torch.no_grad()
    def encode_mels(self, mel01):
        """(B, 80, n_frames) in [0, 1] -> (B, h*w) ids; the model sees 2 S - 1."""
        return self.vqgan.encode((2 * mel01 - 1).unsqueeze(1).to(_device(self.vqgan)))

    def silence_columns(self, mel01, hidden):
        """(B, 80, n_frames) mel in [0, 1] with the frames under the token columns `hidden`
        ((w,) bool, True = hidden) set to 0, the mel's floor (silence): what inpainting hides
        before encoding (paper Sec. 4.3: "we mask the input audio mel spectrogram and the audio
        tokens of corresponding area"), so that no kept token carries what the region held
        (the encoder's receptive field spans columns). Frame f is under column f * w // n_frames."""
        n, w = mel01.shape[-1], self.grid[1]
        if tuple(hidden.shape) != (w,):
            raise ValueError(f"hidden columns must be ({w},), got {tuple(hidden.shape)}; "
                             "sampler.hidden_columns turns an audio_keep into them")
        column = torch.arange(n, device=hidden.device) * w // n  # (n_frames,)
        return mel01.masked_fill(hidden.bool()[column].to(mel01.device), 0.0)

    def encode_waveforms(self, wavs, hidden=None):
        """Waveforms (as `wav_to_mel` takes them) -> (B, h*w) ids; with `hidden` ((w,) bool),
        the mel under those token columns is silenced first (`silence_columns`)."""
        mel = self.wav_to_mel(wavs)
        return self.encode_mels(mel if hidden is None else self.silence_columns(mel, hidden))

    def encode_files(self, paths, hidden=None):
        """Audio files (any rate from 1000 Hz and channel count soundfile reads) -> (B, h*w) ids;
        `hidden` as in `encode_waveforms`."""
        seconds = self.n_samples / self.sample_rate  # the clip length: the rest is cut anyway
        return self.encode_waveforms([load_audio(p, self.sample_rate, seconds) for p in paths],
                                     hidden)

    @torch.no_grad()
    def decode_to_mel(self, ids):
        """(B, h*w) ids -> (B, 80, n_frames) mel in [0, 1]."""
        x = self.vqgan.decode(ids.to(_device(self.vqgan)), self.grid)  # (B, 1, 80, n_frames)
        return ((x[:, 0] + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def mel_to_wav(self, mel01, generator=None):
        """(B, 80, T) in [0, 1] -> (B, 256 T) waveform at `sample_rate`."""
        if self.vocoder is None:
            return griffin_lim(mel01, self.griffin_lim_iters, generator, sr=self.sample_rate)
        return self.vocoder(mel01.to(_device(self.vocoder)))[:, 0]

    def decode_to_wav(self, ids, generator=None):
        return self.mel_to_wav(self.decode_to_mel(ids), generator)
