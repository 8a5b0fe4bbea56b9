"""Token shards: their on-disk format, the dataset and loader `train.py` reads, and
`python -m echoes.data prepare`, which makes them from videos (paper Sec. 3.1, 4.1).

The transformer never sees pixels or waveforms, only the ids the frozen tokenizers give:

    video --ffmpeg--> F frames (short side resized, centre crop) + 10 s of 22050 Hz mono audio
          --VQGAN tokenizers--> uint16 image ids (F, Lv) and audio ids (La,) --> shards

Format of a shard folder (every file is written to a temp name and renamed, and `index.json` is
written last, so a run killed at any point leaves no broken shard visible):

    index.json               {"format", "version", "frames", "image_len", "audio_len",
                              "shards": [{"name", "split", "n"}, ...], optional "tokenizers"}
    train-00000.images.npy   uint16 (N, F, Lv): every frame's image ids, row-major over the grid
    train-00000.audio.npy    uint16 (N, La): audio ids, row-major over (mel row, time)
    train-00000.json         {"split", "n", "ids": [clip id, ...], "labels": [label, ...]}
    skipped.txt              from `prepare`: clip id, reason and path of every clip it skipped
    .echoes-lock             locked by a `prepare` run while it writes: one run at a time

A shard not listed in `index.json` does not exist for readers; a rerun of `prepare` skips clips
that finished shards already hold.

Reading: `TokenShards(root, split, train)` memory-maps a split's shards (np.load mmap_mode="r").
In training it draws one of the F frames per sample at random, in evaluation it takes the middle
frame (paper Sec. 4.1). `ShardLoader` cuts each epoch's permutation, drawn from (seed, epoch),
into per-rank micro-batches (at each micro-step the ranks take consecutive blocks of the
permutation, padded as torch's DistributedSampler pads); its
position (epoch, index) is all a checkpoint needs to continue on exactly the same data, because
the frame draws are seeded by that position too.
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from collections import deque
from typing import NamedTuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from echoes.cli import (UserError, check_at_least, check_finite, check_writable, folder_lock,
                        load_checkpoint, parse_settings, pick_device, remove_temps, run_cli,
                        setting, write_atomic, write_text)

FORMAT, VERSION = "echoes-token-shards", 1
INDEX, SKIPPED = "index.json", "skipped.txt"
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")

# -----------------------------------------------------------------------------
# writing shards


def _write_json(path, obj):
    write_text(path, json.dumps(obj))


def read_index(root, required=True):
    """The parsed `index.json` of a shard folder; None (or a `UserError` when `required`) when
    there is none."""
    path = os.path.join(os.fspath(root), INDEX)
    if not os.path.isfile(path):
        if required:
            raise UserError(f"{root} holds no token shards (no {INDEX}); make them with "
                            "`python -m echoes.data prepare`")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise UserError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                        "prepare the shards again") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{path} is not an echoes shard index; prepare the shards again")
    if index.get("version") != VERSION or isinstance(index.get("version"), bool):
        raise UserError(f"{path} is version {index.get('version')!r} of the shard format, this "
                        f"echoes reads version {VERSION}; prepare the shards again or use the "
                        "echoes that wrote them")
    shards = index.get("shards")

    def count(x):
        return isinstance(x, int) and x >= 0

    if not (all(count(index.get(k)) for k in ("frames", "image_len", "audio_len"))
            and isinstance(shards, list)
            and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                    and isinstance(s.get("split"), str) and count(s.get("n"))
                    for s in shards)):
        raise UserError(f"{path} is corrupt (frames, image_len, audio_len or a shard's name, "
                        "split or n is missing, negative or of the wrong type); prepare the "
                        "shards again")
    return index


def split_sizes(index):
    """{split: number of clips} over the finished shards of an index."""
    sizes = {}
    for s in index["shards"]:
        sizes[s["split"]] = sizes.get(s["split"], 0) + s["n"]
    return sizes


def _as_uint16(x, what):
    x = x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    if x.size and (x.min() < 0 or x.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{what} ids must lie in [0, 65535] to be stored as uint16")
    return x.astype(np.uint16)


def write_shards(out_dir, split, image_ids, audio_ids, ids, labels, shard_size=None, meta=None):
    """Append clips to a shard folder as new shards of `split`, atomically.

    image_ids (N, F, Lv) or (N, Lv) for single images (stored as F = 1); audio_ids (N, La);
    ids: N unique clip ids (str); labels: N labels (str or int; "" when unknown). Arrays may be
    numpy or torch. `shard_size` cuts the clips into shards of at most that many (default: one
    shard). `meta` (a dict, e.g. {"tokenizers": {...}}) is stored in the index; a key that is
    already there must hold the same value. Returns the new shard names. One writer at a time."""
    out_dir = os.fspath(out_dir)
    image = _as_uint16(image_ids, "image")
    audio = _as_uint16(audio_ids, "audio")
    if image.ndim == 2:
        image = image[:, None]  # (N, 1, Lv)
    N = len(ids)
    if image.ndim != 3 or audio.ndim != 2 or len(image) != N or len(audio) != N or len(labels) != N:
        raise ValueError(f"expected image ids (N, F, Lv), audio ids (N, La), N ids and N labels; "
                         f"got {image.shape}, {audio.shape}, {N} ids, {len(labels)} labels")
    if N == 0:
        return []
    os.makedirs(out_dir, exist_ok=True)
    index = read_index(out_dir, required=False) or {
        "format": FORMAT, "version": VERSION, "frames": image.shape[1],
        "image_len": image.shape[2], "audio_len": audio.shape[1], "shards": []}
    have = (index["frames"], index["image_len"], index["audio_len"])
    if have != (image.shape[1], image.shape[2], audio.shape[1]):
        raise ValueError(f"{out_dir} holds shards of (frames, Lv, La) = {have}, these clips are "
                         f"{(image.shape[1], image.shape[2], audio.shape[1])}")
    for key, value in (meta or {}).items():
        value = json.loads(json.dumps(value))  # as it reads back (tuples become lists)
        if key in index and index[key] != value:
            raise ValueError(f"{out_dir} holds {key} = {index[key]}, not {value}")
        index[key] = value
    taken = [int(s["name"].rsplit("-", 1)[1]) for s in index["shards"] if s["split"] == split]
    k = max(taken, default=-1) + 1
    names = []
    size = shard_size or N
    for start in range(0, N, size):
        name = f"{split}-{k:05d}"
        end = min(start + size, N)
        base = os.path.join(out_dir, name)
        for suffix, arr in ((".images.npy", image[start:end]), (".audio.npy", audio[start:end])):
            write_atomic(base + suffix, lambda f, a=arr: np.save(f, np.ascontiguousarray(a)))
        _write_json(base + ".json", {
            "split": split, "n": end - start, "ids": [str(i) for i in ids[start:end]],
            "labels": [lab if isinstance(lab, str) else int(lab) for lab in labels[start:end]]})
        index["shards"].append({"name": name, "split": split, "n": end - start})
        names.append(name)
        k += 1
    _write_json(os.path.join(out_dir, INDEX), index)  # last: only now do the shards exist
    return names


def _read_sidecar(base):
    """The {"ids", "labels", ...} sidecar of the shard at `base` (path without suffix)."""
    try:
        with open(base + ".json", encoding="utf-8") as f:
            side = json.load(f)
        if not (isinstance(side.get("ids"), list) and isinstance(side.get("labels"), list)):
            raise ValueError("no ids or labels list")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"shard {base} is unreadable ({type(e).__name__}: {e}); delete the "
                        "folder and prepare it again") from e
    return side


# -----------------------------------------------------------------------------
# reading shards


class TokenShards:
    """One split of a shard folder, memory-mapped. `fetch(indices)` gives (audio (B, La),
    image (B, Lv)) int64 tensors: in training one frame per sample drawn at random (from the
    dataset's own generator `rng`, seeded by `seed`, unless the caller passes the frames), in
    evaluation the middle frame F // 2.

    `ids`, `labels` and `classes` (an int per clip: labels numbered in sorted order, -1 for an
    empty label) are per clip, in index order. With `codebooks` (audio, image), a fetched id
    at or above its codebook size is a `UserError`."""

    def __init__(self, root, split, train=True, seed=0, codebooks=None):
        self.root, self.split, self.train = os.fspath(root), split, train
        self.codebooks = codebooks  # (audio, image) code counts the ids must stay below
        index = read_index(self.root)
        self.frames, self.image_len = index["frames"], index["image_len"]
        self.audio_len = index["audio_len"]
        self.tokenizers = index.get("tokenizers")
        self.rng = np.random.default_rng(seed)
        self.images, self.audio, self.ids, self.labels, counts = [], [], [], [], []
        for s in (s for s in index["shards"] if s["split"] == split):
            base = os.path.join(self.root, s["name"])
            try:
                image = np.load(base + ".images.npy", mmap_mode="r")  # (n, F, Lv)
                audio = np.load(base + ".audio.npy", mmap_mode="r")  # (n, La)
            except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
                raise UserError(f"shard {base} is unreadable ({type(e).__name__}: {e}); "
                                "delete the folder and prepare it again") from e
            side = _read_sidecar(base)
            n = s["n"]
            if (image.shape != (n, self.frames, self.image_len)
                    or audio.shape != (n, self.audio_len) or len(side["ids"]) != n):
                raise UserError(f"shard {base} does not match {INDEX}: images {image.shape}, "
                                f"audio {audio.shape}, {len(side['ids'])} ids for n = {n}")
            self.images.append(image)
            self.audio.append(audio)
            self.ids += side["ids"]
            self.labels += side["labels"]
            counts.append(n)
        if not counts:
            raise UserError(f"{self.root} holds no shards of split {split!r} "
                            f"(splits: {', '.join(sorted(split_sizes(index))) or 'none'})")
        # shard k holds clips offsets[k] .. offsets[k + 1] - 1
        self.offsets = np.concatenate([[0], np.cumsum(counts)])  # (shards + 1,)
        names = sorted({str(lab) for lab in self.labels if lab != ""})
        number = {name: i for i, name in enumerate(names)}
        self.classes = np.array([number[str(lab)] if lab != "" else -1 for lab in self.labels])

    def __len__(self):
        return int(self.offsets[-1])

    def fetch(self, indices, frames=None, image_indices=None):
        """Clips `indices` -> (audio (B, La), image (B, Lv)) int64. `frames` (B,) picks each
        image's frame; by default training draws them from the dataset's generator and
        evaluation takes the middle one. `image_indices` (B,) takes each image from another clip
        instead (re-pairing, see `ShardLoader`)."""
        idx = np.asarray(indices, dtype=np.int64)
        img_idx = idx if image_indices is None else np.asarray(image_indices, dtype=np.int64)
        B = len(idx)
        if frames is None:
            frames = (self.rng.integers(0, self.frames, size=B) if self.train
                      else np.full(B, self.frames // 2))
        frames = np.asarray(frames, dtype=np.int64)
        audio = np.empty((B, self.audio_len), np.uint16)
        image = np.empty((B, self.image_len), np.uint16)
        for k, sel in self._by_shard(idx):
            audio[sel] = self.audio[k][idx[sel] - self.offsets[k]]
        for k, sel in self._by_shard(img_idx):
            image[sel] = self.images[k][img_idx[sel] - self.offsets[k], frames[sel]]
        for kind, ids, book in zip(("audio", "image"), (audio, image), self.codebooks or ()):
            if ids.size and ids.max() >= book:  # on a GPU: a device-side assert, far from here
                raise UserError(f"the {self.split} shards of {self.root} hold {kind} id "
                                f"{ids.max()}, the model's codebook has {book} codes: prepare "
                                "them with the model's tokenizers, or fix the codebook size")
        return (torch.from_numpy(audio.astype(np.int64)),   # (B, La)
                torch.from_numpy(image.astype(np.int64)))   # (B, Lv)

    def _by_shard(self, idx):
        """(shard k, positions of idx in shard k, in ascending clip order: kinder to the mmap)."""
        shard = np.searchsorted(self.offsets, idx, side="right") - 1  # (B,)
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            yield k, sel[np.argsort(idx[sel], kind="stable")]


def rank_slice(order, rank, world_size, batch_size):
    """The positions of `order` a rank reads, in reading order: at micro-step k the ranks take
    consecutive blocks of `batch_size` from order[k * W * B : (k + 1) * W * B]."""
    blocks = np.asarray(order).reshape(-1, world_size, batch_size)  # (steps, W, B)
    return blocks[:, rank].reshape(-1)  # (steps * B,)


class ShardLoader:
    """Endless per-rank micro-batches of a training split (build-nanogpt's DataLoaderLite,
    with DistributedSampler's padded shuffle).

    Epoch e visits a permutation of all N clips drawn from (seed, e), padded with its own first
    clips to a multiple of world_size * batch_size so that every rank takes the same number of
    steps; within an epoch the ranks' samples are disjoint (but for that padding) and together
    complete. The position (epoch, index), index = clips of the epoch consumed by all ranks
    together, is the whole state (`state_dict`): each step's frame draws and re-pairings come
    from a generator seeded by (seed, epoch, index), so a restored position reproduces the data
    exactly, with no generator state to save (a counter-based stream, as JAX's PRNG keys).

    `repair_within_class` (a research trick that helped the demo; off in the paper recipe): each
    sample's image is taken from a random clip of the same class, a fresh draw every batch, so
    the model learns class-level rather than clip-level pairing. Unlabelled clips keep their own."""

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0,
                 repair_within_class=False):
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.repair_within_class = repair_within_class
        self.epoch, self.index = 0, 0
        self._order = None
        if repair_within_class:
            cls = dataset.classes
            self._by_class = {c: np.nonzero(cls == c)[0] for c in np.unique(cls) if c >= 0}

    @property
    def step_samples(self):
        return self.world_size * self.batch_size

    def steps_per_epoch(self):
        return math.ceil(len(self.dataset) / self.step_samples)

    def epoch_order(self, epoch):
        """All ranks' reading order of epoch `epoch`: (steps_per_epoch * W * B,) clip indices."""
        if self._order is None or self._order[0] != epoch:
            N = len(self.dataset)
            perm = np.random.default_rng([self.seed, epoch]).permutation(N)
            pad = self.steps_per_epoch() * self.step_samples - N
            self._order = (epoch, np.concatenate([perm, np.resize(perm, pad)]))
        return self._order[1]

    def rank_indices(self, epoch):
        """This rank's clips of epoch `epoch`, in reading order."""
        return rank_slice(self.epoch_order(epoch), self.rank, self.world_size, self.batch_size)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "clips": len(self.dataset),
                "micro_batch": self.batch_size}

    def load_state_dict(self, state):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        # a different process count or batch may leave index off a step boundary: round down
        self.index -= self.index % self.step_samples

    def next(self):
        """The next micro-batch of this rank: (audio (B, La), image (B, Lv)) int64 on the CPU."""
        W, B = self.world_size, self.batch_size
        order = self.epoch_order(self.epoch)
        if self.index >= len(order):
            self.epoch, self.index = self.epoch + 1, 0
            order = self.epoch_order(self.epoch)
        # draws for the whole step (all ranks), so a clip's frame depends on its position only
        rng = np.random.default_rng([self.seed, self.epoch, self.index])
        frames = rng.integers(0, self.dataset.frames, size=W * B)  # (W*B,)
        partner = rng.random(W * B)  # (W*B,) uniform, picks the re-paired image
        mine = slice(self.rank * B, (self.rank + 1) * B)
        idx = order[self.index:self.index + W * B][mine]  # (B,)
        image_idx = None
        if self.repair_within_class:
            image_idx = idx.copy()
            for i, (c, u) in enumerate(zip(self.dataset.classes[idx], partner[mine])):
                if c >= 0:
                    members = self._by_class[c]
                    image_idx[i] = members[int(u * len(members))]
        self.index += W * B
        return self.dataset.fetch(idx, frames=frames[mine], image_indices=image_idx)


def eval_batches(dataset, batch_size, rank=0, world_size=1, limit=0):
    """This rank's evaluation batches: clips rank, rank + W, ... of the first `limit` (0 = all),
    in order, as (the clips' indices (B,) int64 array, audio (B, La), image (B, Lv)). Ranks may
    get one batch more or less: the caller sums over batches and all-reduces once at the end."""
    n = min(len(dataset), limit) if limit > 0 else len(dataset)
    idx = np.arange(n)[rank::world_size]
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        yield (chunk, *dataset.fetch(chunk))


# -----------------------------------------------------------------------------
# preparation: videos -> frames + audio (ffmpeg) -> ids (tokenizers) -> shards


class ClipError(Exception):
    """A clip that cannot be used; the message is the reason written to skipped.txt."""


def _ffmpeg_error(proc):
    lines = proc.stderr.decode(errors="replace").strip().splitlines()
    return lines[-1][:160] if lines else f"exit code {proc.returncode}"


def probe(path):
    """ffprobe -> (duration in seconds or None, the first video stream's sample aspect ratio
    ("4:3"; None without a video stream), audio channels of the first audio stream: 0 without
    one, the container's format names ("flv", "mov,mp4,m4a,3gp,3g2,mj2", ...))."""
    cmd = ["ffprobe", "-v", "error", "-show_entries",
           "format=duration,format_name:stream=codec_type,channels,sample_aspect_ratio", "-of",
           "json", path]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise ClipError(f"unreadable ({_ffmpeg_error(proc)})")
    info = json.loads(proc.stdout or b"{}")
    streams = info.get("streams", [])
    audio = [st for st in streams if st.get("codec_type") == "audio"]
    try:
        duration = float(info.get("format", {}).get("duration"))
    except (TypeError, ValueError):
        duration = None
    channels = int(audio[0].get("channels") or 1) if audio else 0
    video = [st for st in streams if st.get("codec_type") == "video"]
    sar = (video[0].get("sample_aspect_ratio") or "1:1") if video else None
    return duration, sar, channels, info.get("format", {}).get("format_name", "")


def decode_clip(path, s, start=0.0):
    """One video -> (frames uint8 (F, S, S, 3), wav float32 (T,)), T <= clip_seconds * rate, via
    ffmpeg pipes (no temp files). Frames are taken uniformly over the `clip_seconds` from
    `start` (the fps filter at F / duration), short side resized to S (bicubic), centre-cropped.
    Raises ClipError for unreadable, short or silent clips."""
    duration, sar, channels, container = probe(path)
    if sar is None:
        raise ClipError("no video stream")
    if not channels:
        raise ClipError("no audio stream")
    if duration is not None and start >= duration:
        raise ClipError(f"starts past the end ({start:g} s of {duration:.2f} s; a clip cut "
                        "already is named youtube_id_start)")
    span = s.clip_seconds if duration is None else min(duration - start, s.clip_seconds)
    if span < s.min_fraction * s.clip_seconds:
        raise ClipError(f"short ({span:.2f} s)")
    S, F = s.image_size, s.frames
    # the clip: a seek before -i jumps by the index, exact in most containers; FLV's lands up
    # to seconds late (even at 0), so there ffmpeg decodes from the start and drops what comes
    # before `start` (-ss and -t after -i; the frame grid then starts at `start` explicitly)
    flv = "flv" in container.split(",")
    clip = (["-ss", f"{start:.3f}"] if start > 0 else []) + ["-t", f"{span:.6f}"]
    base = (["ffmpeg", "-v", "error", "-nostdin", "-i", path, *clip] if flv else
            ["ffmpeg", "-v", "error", "-nostdin", *clip, "-i", path])
    grid = f":start_time={start:.3f}" if flv else ""
    vf = (f"fps={F}/{span:.6f}{grid},scale={S}:{S}:force_original_aspect_ratio=increase:"
          f"flags=bicubic,crop={S}:{S}")
    if sar not in ("1:1", "0:1", "N/A"):  # non-square pixels: first to the shape it is shown at
        vf = f"scale=trunc(iw*sar/2)*2:ih:flags=bicubic,setsar=1,{vf}"
    proc = subprocess.run(base + ["-an", "-vf", vf, "-frames:v", str(F), "-f", "rawvideo",
                                  "-pix_fmt", "rgb24", "pipe:1"], capture_output=True)
    got = len(proc.stdout) // (S * S * 3)
    if proc.returncode != 0 or got == 0:
        raise ClipError(f"video decode failed ({_ffmpeg_error(proc)})")
    frames = np.frombuffer(proc.stdout[:got * S * S * 3], np.uint8).reshape(got, S, S, 3)
    if got < F - 1:  # a video stream shorter than the clip: frames would be repeats
        raise ClipError(f"video ends early ({got} of {F} frames in {span:.2f} s)")
    if got < F:  # the fps filter's rounding can end one frame early: repeat the last
        frames = np.concatenate([frames, np.repeat(frames[-1:], F - got, axis=0)])
    # aresample's first_pts=0 pads an audio stream that starts late with silence, so the sound
    # stays in step with the frames (without it, its first sample would play at 0 s). The
    # channels come out as they are and are averaged here, as `audio.load_audio` does
    # (ffmpeg's own float downmix sums stereo at 1/sqrt(2) each: 3 dB louder)
    proc = subprocess.run(base + ["-vn", "-map", "0:a:0", "-ac", str(channels), "-ar",
                                  str(s.sample_rate), "-af", "aresample=async=1:first_pts=0",
                                  "-f", "f32le", "pipe:1"], capture_output=True)
    if proc.returncode != 0:
        raise ClipError(f"audio decode failed ({_ffmpeg_error(proc)})")
    frame_bytes = 4 * channels
    wav = np.frombuffer(proc.stdout[:len(proc.stdout) // frame_bytes * frame_bytes], np.float32)
    wav = wav.reshape(-1, channels).mean(axis=1, dtype=np.float32)  # (T,)
    n_samples = round(s.clip_seconds * s.sample_rate)
    if len(wav) == 0 or len(wav) < s.min_fraction * n_samples:
        raise ClipError(f"short audio ({len(wav) / s.sample_rate:.2f} s)")
    peak = float(np.abs(wav).max())
    if peak < 10 ** (s.silence_db / 20):
        raise ClipError(f"silent (peak {20 * math.log10(max(peak, 1e-12)):.0f} dBFS)")
    return frames, wav[:n_samples].copy()


def _read_skipped(folder):
    """The (clip id, reason, path) rows of a folder's skipped-clips file ([] without one)."""
    try:
        with open(os.path.join(folder, SKIPPED), encoding="utf-8", errors="surrogateescape") as f:
            rows = [line.rstrip("\n").split("\t") for line in f]
    except OSError:
        return []
    return [tuple(row) for row in rows if len(row) == 3]


@dataclasses.dataclass
class PrepareSettings:
    """`python -m echoes.data prepare` settings (each one is a --flag; see --help)."""
    videos: str = setting("", "folder of video clips, searched recursively")
    csv: str = setting("", "VGGSound-style CSV (youtube_id, start_seconds, label, split; a "
                       "header row is optional): its clips are looked up in --videos as "
                       "ID_START6.mp4 (VGGSound's usual naming), ID_START.mp4, "
                       "ID_STARTms_ENDms.mp4, or ID.mp4 (a whole video: seeked to START); "
                       "any video extension. Empty: every "
                       "video under --videos, labelled by its parent folder")
    out: str = setting("", "folder for the shards (created; a rerun adds only what is missing)")
    image_vqgan: str = setting("", "image VQGAN checkpoint: taming's vqgan_imagenet_f16_1024 "
                               "last.ckpt, or a file with a 'config' key written by echoes")
    audio_vqgan: str = setting("", "audio VQGAN checkpoint: SpecVQGAN's vggsound codebook "
                               "epoch_39.ckpt, or a file with a 'config' key written by echoes")
    tokenizers: str = setting("", "instead of --image-vqgan / --audio-vqgan: a bundle with its "
                              "tokenizers inside (e.g. the demo's, echoes/assets/demo.pt), whose "
                              "recipe (frame size, clip length, mel frames, sample rate) is then "
                              "used too: shards for a model of that size (train.py --preset "
                              "demo)")
    trust_checkpoints: bool = setting(False, "allow tokenizer files that need full unpickling "
                                      "(only for files you trust)")
    frames: int = setting(10, "frames per clip, uniformly over it (training draws one)")
    image_size: int = setting(256, "frame size: short side resized to it, then a centre crop")
    clip_seconds: float = setting(10.0, "seconds of each clip to use (audio padded/cut to it)")
    sample_rate: int = setting(22050, "audio rate in Hz (SpecVQGAN's mel recipe)")
    mel_frames: int = setting(848, "mel frames the audio tokenizer sees (centre crop)")
    keep_frames: int = setting(860, "mel frames kept before that crop (SpecVQGAN: 860 of 862)")
    min_fraction: float = setting(0.5, "skip clips shorter than this fraction of --clip-seconds")
    silence_db: float = setting(-60.0, "skip clips whose audio peak is below this (dBFS)")
    test_fraction: float = setting(0.05, "without --csv: share of clips in the test split, "
                                   "chosen by a hash of the clip id (stable across reruns)")
    shard_size: int = setting(1024, "clips per shard")
    batch_size: int = setting(16, "clips per tokenizer batch")
    workers: int = setting(0, "parallel ffmpeg decodes; 0 = one per CPU core, at most 16")
    device: str = setting("auto", "where the tokenizers run: auto (a GPU when present), cpu, "
                          "cuda or cuda:N")
    limit: int = setting(0, "prepare at most this many new clips (0 = all), e.g. for a trial")


def _find_videos(folder):
    """{stem: [paths]} and the sorted paths of every video file under `folder`."""
    stems, paths = {}, []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTS:
                path = os.path.join(dirpath, name)
                stems.setdefault(stem, []).append(path)
                paths.append(path)
    return stems, paths


def _one_file(stems, name, clip_id, done):
    """The video file named `name` (no extension), None when there is none; two are an error
    unless the clip is already in the shards."""
    found = stems.get(name, [])
    if len(found) > 1 and clip_id not in done:
        raise UserError(f"{found[0]} and {found[1]} are both clip {clip_id}: keep one")
    return found[0] if found else None


def _hash_split(clip_id, test_fraction):
    # surrogateescape: a file name that is not UTF-8 hashes as its bytes
    h = int(hashlib.sha1(clip_id.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) / 2 ** 32
    return "test" if h < test_fraction else "train"


class Clip(NamedTuple):
    id: str  # VGGSound: youtube_id_start6; a folder: the path below --videos, no extension
    label: str
    split: str
    path: str | None  # None: the CSV lists it, no file was found
    start: float = 0.0  # where the clip starts in the file (a whole video named ID.mp4)


def list_clips(s, done=frozenset()):
    """[Clip] from the CSV or the folder. Two video files for one clip are an error, unless the
    clip is in `done` (already in the shards)."""
    stems, paths = _find_videos(s.videos)
    clips, seen = [], set()
    if not s.csv:
        first = {}  # clip id -> its file
        for path in paths:
            rel = os.path.relpath(path, s.videos)
            clip_id = os.path.splitext(rel)[0].replace(os.sep, "/")
            if clip_id in first and clip_id not in done:
                raise UserError(f"{first[clip_id]} and {path} are both clip {clip_id} (ids are "
                                "paths without the extension): keep one")
            first[clip_id] = path
            parent = os.path.dirname(rel)
            label = os.path.basename(parent) if parent else ""
            clips.append(Clip(clip_id, label, _hash_split(clip_id, s.test_fraction), path))
        return clips
    for yt, start, label, split in read_csv(s.csv):
        clip_id = f"{yt}_{start:06d}"
        if clip_id in seen:
            continue
        seen.add(clip_id)
        cut = (clip_id, f"{yt}_{start}", f"{yt}_{start * 1000}_{(start + 10) * 1000}")
        path = next((_one_file(stems, n, clip_id, done) for n in cut if n in stems), None)
        if path is not None:
            clips.append(Clip(clip_id, label, split, path))
        else:  # the whole video, if that is what was downloaded: seek to the clip
            clips.append(Clip(clip_id, label, split, _one_file(stems, yt, clip_id, done),
                              float(start)))
    return clips


CSV_EXPECTED = ("expected a UTF-8 CSV with rows youtube_id,start,label,split as VGGSound's "
                "vggsound.csv (a label that holds a comma in quotes)")


def read_csv(path):
    """[(youtube_id, start in whole seconds, label, split)] of a VGGSound-style CSV; blank lines
    and a first row that names the columns (its start is a word) are passed over.

    A malformed row is a `UserError` naming its line rather than a clip in skipped.txt: it is a
    typo or the wrong file (a label's unquoted comma shifts the split into the label), fixed in a
    minute, where a dropped row would quietly change the data set, and it has no clip id."""
    if not os.path.isfile(path):
        raise UserError(f"--csv {path} not found")
    rows, seen = [], {}  # (youtube_id, start) -> (label, split) of its first row
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: drops a BOM (Excel)
            reader = csv.reader(f)
            first = True  # the first row that is not blank may be a header
            for row in reader:
                if not "".join(row).strip():
                    continue
                line, header_allowed, first = reader.line_num, first, False
                if len(row) != 4:
                    raise UserError(f"--csv {path} line {line} has {len(row)} columns; "
                                    f"{CSV_EXPECTED}")
                yt, start, label, split = (x.strip() for x in row)
                try:
                    seconds = float(start)
                except ValueError:
                    if header_allowed and re.fullmatch(r"[A-Za-z_ ]+", start):
                        continue  # a header row: start_seconds, start, ...
                    seconds = math.nan
                if not math.isfinite(seconds) or seconds < 0:
                    raise UserError(f"--csv {path} line {line}: start {start!r} is not a number "
                                    f"of seconds; {CSV_EXPECTED}")
                if not yt or not split:
                    raise UserError(f"--csv {path} line {line}: an empty youtube_id or split; "
                                    f"{CSV_EXPECTED}")
                if seconds != int(seconds):  # the clip id holds whole seconds, as VGGSound's
                    raise UserError(f"--csv {path} line {line}: start {start} is not whole "
                                    f"seconds; {CSV_EXPECTED}")
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", split):  # names shard files
                    raise UserError(f"--csv {path} line {line}: split {split!r} is not a name of "
                                    "letters, digits, '_', '.' and '-' (train, test, ...)")
                if seen.setdefault((yt, int(seconds)), (label, split)) != (label, split):
                    raise UserError(f"--csv {path} line {line} repeats {yt},{start} with another "
                                    "label or split; keep one row per clip")
                rows.append((yt, int(seconds), label, split))
    except UnicodeDecodeError as e:
        raise UserError(f"--csv {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                        f"{CSV_EXPECTED}") from e
    except csv.Error as e:
        raise UserError(f"--csv {path} is not a CSV file ({e}); {CSV_EXPECTED}") from e
    except OSError as e:
        raise UserError(f"--csv {path} cannot be read ({e.strerror or e})") from e
    if not rows:
        raise UserError(f"--csv {path} lists no clips; {CSV_EXPECTED}")
    return rows


# the recipe settings a --tokenizers bundle fixes: {setting: (modality, the bundle's key)}
BUNDLE_RECIPE = {"image_size": ("image", "resolution"), "sample_rate": ("audio", "sample_rate"),
                 "mel_frames": ("audio", "n_frames"), "keep_frames": ("audio", "keep_frames")}


def with_bundle_recipe(s):
    """With --tokenizers: the settings with the bundle's recipe (a recipe flag given otherwise is
    an error); without, `s` as it is."""
    if not s.tokenizers:
        return s
    if s.image_vqgan or s.audio_vqgan:
        raise UserError("give --tokenizers or --image-vqgan / --audio-vqgan, not both")
    entries = (load_checkpoint(s.tokenizers, trusted=s.trust_checkpoints,
                               what="tokenizer bundle") or {})
    entries = entries.get("tokenizers") if isinstance(entries, dict) else None
    if not (isinstance(entries, dict) and all(
            isinstance(entries.get(m), dict) and isinstance(entries[m].get("state_dict"), dict)
            for m in ("image", "audio"))):
        raise UserError(f"--tokenizers {s.tokenizers} carries no tokenizer weights; give a bundle "
                        "as `python -m echoes.demo build` makes (echoes/assets/demo.pt)")
    audio = entries["audio"]
    recipe = {name: entries[m].get(key) for name, (m, key) in BUNDLE_RECIPE.items()}
    if not all(isinstance(v, int) for v in [*recipe.values(), audio.get("n_samples")]):
        raise UserError(f"--tokenizers {s.tokenizers}: its recipe is incomplete; rebuild it")
    recipe["clip_seconds"] = audio["n_samples"] / audio["sample_rate"]
    defaults = PrepareSettings()
    for name, value in recipe.items():
        given = getattr(s, name)
        if given != getattr(defaults, name) and not math.isclose(given, value, rel_tol=1e-4):
            raise UserError(f"--{name.replace('_', '-')} {given} differs from the "
                            f"{value:g} of --tokenizers {s.tokenizers}; leave it out")
    return dataclasses.replace(s, **recipe)


def _make_tokenizers(s, device):
    from echoes.tokenizers import (AudioTokenizer, ImageTokenizer, VQGANConfig, check_modality,
                                   codebook_fingerprint, load_vqgan)
    image_path, audio_path = s.image_vqgan or s.tokenizers, s.audio_vqgan or s.tokenizers
    for flag, path in (("--image-vqgan", image_path), ("--audio-vqgan", audio_path)):
        if not path:
            raise UserError(f"give {flag} (see --help for the released checkpoints) or "
                            "--tokenizers")
    image_vq = load_vqgan(image_path, VQGANConfig.imagenet_f16_1024(),
                          trusted=s.trust_checkpoints).to(device)
    audio_vq = load_vqgan(audio_path, VQGANConfig.vggsound_codebook(),
                          trusted=s.trust_checkpoints).to(device)
    check_modality(image_vq, "image", image_path)
    check_modality(audio_vq, "audio", audio_path)
    n_samples = round(s.clip_seconds * s.sample_rate)
    try:
        audio_tok = AudioTokenizer(audio_vq, n_samples=n_samples, n_frames=s.mel_frames,
                                   keep_frames=s.keep_frames, sample_rate=s.sample_rate)
    except ValueError as e:
        raise UserError(f"{e}: lower --mel-frames or raise --clip-seconds") from e
    image_tok = ImageTokenizer(image_vq, resolution=s.image_size)
    meta = {"image": {"resolution": s.image_size, "grid": list(image_tok.grid),
                      "codebook": image_vq.config.n_embed, "frames": s.frames,
                      "fingerprint": codebook_fingerprint(image_vq)},
            "audio": {"sample_rate": s.sample_rate, "n_samples": n_samples,
                      "n_frames": s.mel_frames, "keep_frames": s.keep_frames,
                      "grid": list(audio_tok.grid), "codebook": audio_vq.config.n_embed,
                      "fingerprint": codebook_fingerprint(audio_vq)}}
    return image_tok, audio_tok, meta


def _same_tokenizers(old, new):
    """Whether an index's tokenizer record `old` matches `new`; a record without fingerprints
    (an index written without them) matches on the rest."""
    new = json.loads(json.dumps(new))  # tuples as JSON lists
    return isinstance(old, dict) and old.keys() == new.keys() and all(
        isinstance(old[m], dict)
        and old[m] == {k: v for k, v in new[m].items() if k != "fingerprint" or k in old[m]}
        for m in new)


def _tokenize(items, image_tok, audio_tok, batch_size):
    """[(frames (F, S, S, 3) uint8, wav (T,))] -> image ids (B, F, Lv), audio ids (B, La)."""
    device = next(image_tok.vqgan.parameters()).device
    frames = torch.from_numpy(np.stack([f for f, _ in items]))  # (B, F, S, S, 3)
    B, F = frames.shape[:2]
    x = frames.flatten(0, 1).permute(0, 3, 1, 2)  # (B*F, 3, S, S) uint8, moved as uint8
    image = torch.cat([image_tok.encode(x[i:i + batch_size].to(device).float() / 127.5 - 1).cpu()
                       for i in range(0, B * F, batch_size)])  # (B*F, Lv)
    audio = audio_tok.encode_waveforms([torch.from_numpy(w) for _, w in items]).cpu()  # (B, La)
    return image.view(B, F, -1), audio  # (B, F, Lv), (B, La)


def prepare(s):
    """Videos -> shards (see the module docstring); returns (clips written, clips skipped)."""
    if not s.videos or not os.path.isdir(s.videos):
        raise UserError(f"--videos {s.videos!r} is not a folder")
    if not s.out:
        raise UserError("give --out, the folder for the shards")
    check_finite(s)
    check_at_least(s, {"frames": 1, "image_size": 1, "shard_size": 1, "batch_size": 1,
                       "workers": 0, "limit": 0, "min_fraction": 0, "test_fraction": 0})
    if not s.clip_seconds > 0 or s.min_fraction > 1 or s.test_fraction > 1:
        raise UserError("--clip-seconds must be above 0, --min-fraction and --test-fraction at "
                        "most 1")
    from echoes.audio import FMAX  # here, as below: training never loads soundfile or PIL
    if not s.sample_rate > 2 * FMAX:
        raise UserError(f"--sample-rate {s.sample_rate} is too low for the mel recipe (bands up "
                        f"to {FMAX:g} Hz need more than {2 * FMAX:g} Hz); use 22050, the "
                        "recipe's rate")
    device = pick_device(s.device)
    for tool in ("ffmpeg", "ffprobe"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise UserError(f"{tool} not found: install ffmpeg (e.g. apt-get install ffmpeg)")
    s = with_bundle_recipe(s)
    check_writable(s.out)  # makes the folder
    with folder_lock(s.out, "prepare run"):  # one writer at a time: shards are appended
        if s.csv:
            read_csv(s.csv)  # a bad CSV fails now, not after the released tokenizers load
        image_tok, audio_tok, tok_meta = _make_tokenizers(s, device)
        return _prepare_locked(s, image_tok, audio_tok, tok_meta, device)


def _prepare_locked(s, image_tok, audio_tok, tok_meta, device):
    """`prepare` once its settings are checked, its tokenizers loaded and --out locked."""
    from tqdm import tqdm
    index = read_index(s.out, required=False)
    want = (s.frames, math.prod(image_tok.grid), math.prod(audio_tok.grid))
    have = None if index is None else (index["frames"], index["image_len"], index["audio_len"])
    if have is not None and have != want:
        hint = " and ".join(  # token counts come from the tokenizers
            ([f"--frames {have[0]}"] if have[0] != want[0] else [])
            + (["the tokenizers it was made with"] if have[1:] != want[1:] else []))
        raise UserError(f"{s.out} holds shards of (frames, image tokens, audio tokens) = {have}, "
                        f"these settings make {want}; pass {hint} or use another --out")
    if index is not None and not _same_tokenizers(index.get("tokenizers", tok_meta), tok_meta):
        raise UserError(f"{s.out} holds shards made with other tokenizers or settings "
                        f"({index['tokenizers']}); use another --out")
    if index is not None and "tokenizers" in index:
        tok_meta = index["tokenizers"]  # the record new shards must match (perhaps without
        # fingerprints)
    done = set()
    for entry in (index or {"shards": []})["shards"]:
        done.update(_read_sidecar(os.path.join(s.out, entry["name"]))["ids"])
    remove_temps(s.out)  # temp files of a killed run: never part of a shard

    clips = list_clips(s, done)
    if not clips and not done:
        raise UserError(f"--videos {s.videos} holds no video files ({', '.join(VIDEO_EXTS)})")
    skipped = [(c.id, "no video file", "") for c in clips if c.path is None and c.id not in done]
    todo = [c for c in clips if c.path is not None and c.id not in done]
    if s.limit > 0:
        todo = todo[:s.limit]
    # an earlier run's skipped clips that this run does not try again stay listed
    again = {c.id for c in todo} | {row[0] for row in skipped} | done
    listed = {c.id for c in clips}
    missing = len(skipped)
    carried = [row for row in _read_skipped(s.out) if row[0] in listed and row[0] not in again]
    skipped = carried + skipped  # this run's are the rows after len(carried)
    print(f"{len(clips)} clips listed, {len(done)} already in shards, {missing} without a "
          f"video file, {len(todo)} to prepare (tokenizers on {device})")

    def write_skipped():
        text = "".join(f"{c}\t{why}\t{p}\n" for c, why, p in skipped)
        write_text(os.path.join(s.out, SKIPPED), text)

    buffers = {}  # split -> [image ids (F, Lv), audio ids (La,), clip id, label]
    written = 0

    def flush(split, final=False):
        nonlocal written
        buf = buffers.get(split, [])
        while buf and (len(buf) >= s.shard_size or final):
            chunk, buf[:] = buf[:s.shard_size], buf[s.shard_size:]
            write_shards(s.out, split, np.stack([c[0] for c in chunk]),
                         np.stack([c[1] for c in chunk]), [c[2] for c in chunk],
                         [c[3] for c in chunk], meta={"tokenizers": tok_meta})
            written += len(chunk)
            write_skipped()

    def run_batch(batch):
        image, audio = _tokenize([b[1] for b in batch], image_tok, audio_tok, s.batch_size)
        for (clip, _), im, au in zip(batch, image.numpy(), audio.numpy()):
            buffers.setdefault(clip.split, []).append((im, au, clip.id, clip.label))
            flush(clip.split)

    workers = s.workers or min(16, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(workers)  # ffmpeg runs in subprocesses: threads overlap them
    batch, pending, clips_iter = [], deque(), iter(todo)
    try:
        with tqdm(total=len(todo), unit="clip", dynamic_ncols=True) as bar:
            while True:
                while len(pending) < 4 * workers:  # a bounded window keeps memory flat
                    clip = next(clips_iter, None)
                    if clip is None:
                        break
                    pending.append((clip, pool.submit(decode_clip, clip.path, s, clip.start)))
                if not pending:
                    break
                clip, future = pending.popleft()
                try:
                    batch.append((clip, future.result()))
                except ClipError as e:
                    skipped.append((clip.id, str(e), clip.path))
                    tqdm.write(f"skipped {clip.path}: {e}", file=sys.stderr)
                bar.update(1)
                if len(batch) == s.batch_size:
                    run_batch(batch)
                    batch = []
            if batch:
                run_batch(batch)
    finally:  # an interrupted run drops the queued decodes instead of waiting for them
        pool.shutdown(wait=True, cancel_futures=True)
    for split in list(buffers):
        flush(split, final=True)
    write_skipped()
    n_skipped = len(skipped) - len(carried)  # by this run
    if written == 0 and not done:  # an empty --out would fail later, in `info` or train.py
        raise UserError(f"no clip was usable: all {n_skipped} skipped, reasons in "
                        f"{os.path.join(s.out, SKIPPED)} (short: lower --clip-seconds or "
                        "--min-fraction; silent: --silence-db; no video file: check --videos "
                        "against the CSV's ids)")
    print(f"wrote {written} clips to {s.out}; skipped {n_skipped} "
          f"(reasons in {os.path.join(s.out, SKIPPED)})")
    return written, n_skipped


# -----------------------------------------------------------------------------
# command line


USAGE = """usage: python -m echoes.data COMMAND [options]

commands:
  prepare   videos (+ an optional VGGSound CSV) -> token shards; see `prepare --help`
  info DIR  what a shard folder holds"""

INFO_USAGE = """usage: python -m echoes.data info DIR

Print what the shard folder DIR holds: clip shapes, clips per split, tokenizer settings."""


def info(root):
    """Print a shard folder's splits, clip counts, token layout and tokenizer record."""
    index = read_index(root)
    sizes = split_sizes(index)
    print(f"{root}: frames {index['frames']}, image ids {index['image_len']}, audio ids "
          f"{index['audio_len']}, {len(index['shards'])} shards")
    for split, n in sorted(sizes.items()):
        print(f"  {split}: {n} clips")
    if "tokenizers" in index:
        print(f"  tokenizers: {json.dumps(index['tokenizers'])}")


def info_main(argv):
    """`python -m echoes.data info FOLDER`."""
    if "-h" in argv or "--help" in argv:
        print(INFO_USAGE)
        return
    options = [a for a in argv if a.startswith("-")]
    if options:
        raise UserError(f"info takes no option {options[0]}; usage: python -m echoes.data info DIR")
    if not argv:
        raise UserError("info needs the shard folder: python -m echoes.data info DIR")
    if len(argv) > 1:
        raise UserError(f"info takes one shard folder, got {len(argv)} ({' '.join(argv)}): "
                        "python -m echoes.data info DIR")
    info(argv[0])


def main(argv=None):
    """`python -m echoes.data prepare|info ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a missing command, as argparse treats a missing argument: usage, exit 2
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "prepare":
        prepare(parse_settings(PrepareSettings, argv[1:],
                               description="Videos -> token shards (paper Sec. 3.1, 4.1).",
                               prog="python -m echoes.data prepare"))
    elif argv[0] == "info":
        info_main(argv[1:])
    else:
        raise UserError(f"unknown command {argv[0]!r}; see `python -m echoes.data --help`")


if __name__ == "__main__":
    run_cli(main)
