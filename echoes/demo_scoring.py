"""Scoring the embedded demo "shapes and tones" (`echoes/shapes.py`) by reading its outputs back:
the demo's pictures and clips as tokenizer inputs and outputs, and how many of a set of
reconstructions or generations (i2a, a2i, joint, and inpainting through `generate_ids`) the class
readers of `echoes/shapes.py` recover. Used by the demo build (`echoes/demo.py`: the tokenizers'
and the tune stage's scores) and by `bench/quality.py`.
"""

import numpy as np
import torch

from echoes import sampler, shapes
from echoes.tokenizer_training import reconstruct, tokenize

# -----------------------------------------------------------------------------
# the demo's pictures and clips as tokenizer inputs and outputs


def image_input(images):
    """uint8 (B, H, W, 3) -> (B, 3, H, W) float in [-1, 1], the image VQGAN's input."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    return x / 127.5 - 1


def audio_input(mels):
    """[0, 1] mels (B, 80, T) -> (B, 1, 80, T) float 2 S - 1, the audio VQGAN's input."""
    return torch.as_tensor(np.asarray(mels)).float().unsqueeze(1) * 2 - 1


def model_input(modality, arrays):
    return image_input(arrays) if modality == "image" else audio_input(arrays)


def output_to_uint8(x):
    """Image VQGAN output (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def output_to_mel(x):
    """Audio VQGAN output (B, 1, 80, T) -> [0, 1] mels (B, 80, T) numpy."""
    return ((x[:, 0].float() + 1) / 2).clamp(0, 1).cpu().numpy()


def read_parts(modality, item):
    """An image (H, W, 3) or a [0, 1] mel (80, T) -> (colour, shape) by the readers of
    echoes/shapes.py ((None, None) when unreadable)."""
    return (shapes.read_image if modality == "image" else shapes.read_mel)(item)


def read_class(modality, item):
    """An image (H, W, 3) or a [0, 1] mel (80, T) -> class index (-1 when unreadable)."""
    return shapes.label_of(*read_parts(modality, item))

# -----------------------------------------------------------------------------
# how many reconstructions and generations the readers recover


def readable_fraction(modality, vqgan, arrays, labels):
    """Share of reconstructions whose class the readers of echoes/shapes.py recover, and the share
    of codes in use. arrays: uint8 images (N, H, W, 3) or [0, 1] mels (N, 80, T)."""
    recon, ids = reconstruct(vqgan, model_input(modality, arrays))
    items = output_to_uint8(recon) if modality == "image" else output_to_mel(recon)
    right = [read_class(modality, it) == int(lab) for it, lab in zip(items, labels)]
    return float(np.mean(right)), len(torch.unique(ids)) / vqgan.config.n_embed


def encode_items(modality, tok, arrays, batch_size=256):
    """uint8 images (N, H, W, 3) or [0, 1] mels (N, 80, T) -> ids (N, L) with a demo tokenizer."""
    vq = tok.vqgan
    x = model_input(modality, arrays)
    return tokenize(vq, x, batch_size)


@torch.no_grad()
def decode_items(modality, tok, ids, batch_size=256):
    """ids (N, L) -> uint8 images (N, H, W, 3) or [0, 1] mels (N, 80, T), numpy."""
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        if modality == "image":
            out.append(output_to_uint8(tok.decode(chunk)))
        else:
            out.append(tok.decode_to_mel(chunk).cpu().numpy())
    return np.concatenate(out)


def score(modality, items, labels):
    """Read every generated item -> {"colour", "shape", "both"} accuracies against `labels` and
    the read class indices (N,) (-1 where unreadable)."""
    parts = [read_parts(modality, it) for it in items]
    want = [shapes.label_parts(int(lab)) for lab in labels]
    colour = np.mean([p[0] == w[0] for p, w in zip(parts, want)])
    shape = np.mean([p[1] == w[1] for p, w in zip(parts, want)])
    both = np.mean([p == w for p, w in zip(parts, want)])
    read = np.array([shapes.label_of(*p) if p[0] is not None else -1 for p in parts])
    return {"colour": float(colour), "shape": float(shape), "both": float(both)}, read


def generate_ids(model, mode, opts, seed, batch_size=64, **ids):
    """`sampler.generate` over a long list in batches, sample i drawing from stream (seed, i)."""
    n = len(next(v for v in ids.values() if v is not None)) if ids else opts.pop("n")
    outs = []
    gens = sampler.sample_generators(seed, n)
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        part = {k: (v[lo:hi] if v is not None and k != "audio_keep" else v)
                for k, v in ids.items()}
        outs.append(sampler.generate(model, mode, generator=gens[lo:hi], batch_size=hi - lo,
                                     **part, **opts))
    return torch.cat([o[0] for o in outs]).cpu(), torch.cat([o[1] for o in outs]).cpu()


def eval_i2a(model, image_tok, audio_tok, image_ids, labels, opts, seed=0):
    """Image ids (N, Lv) of labelled images -> generated audio read by `read_mel`: accuracies,
    the read classes and the generated [0, 1] mels."""
    audio, _ = generate_ids(model, "i2a", opts, seed, image_ids=image_ids)
    mels = decode_items("audio", audio_tok, audio)
    acc, read = score("audio", mels, labels)
    return acc, read, mels


def eval_a2i(model, image_tok, audio_tok, audio_ids, labels, opts, seed=0):
    """Audio ids (N, La) of labelled clips -> generated images read by `read_image`."""
    _, image = generate_ids(model, "a2i", opts, seed, audio_ids=audio_ids)
    images = decode_items("image", image_tok, image)
    acc, read = score("image", images, labels)
    return acc, read, images


def eval_joint(model, image_tok, audio_tok, n, opts, seed=0):
    """n pairs from nothing -> {"both": share whose image class (read_image) equals the audio class
    (read_mel), both readable}, the read classes of the clips, the images and the mels."""
    opts = {k: v for k, v in opts.items() if k != "guidance"}  # nothing to guide by
    audio, image = generate_ids(model, "joint", {**opts, "n": n}, seed)
    mels = decode_items("audio", audio_tok, audio)
    images = decode_items("image", image_tok, image)
    read_a = np.array([read_class("audio", m) for m in mels])
    read_v = np.array([read_class("image", im) for im in images])
    return {"both": float(np.mean((read_a == read_v) & (read_a >= 0)))}, read_a, images, mels
