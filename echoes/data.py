"""Token shards: their on-disk format, the dataset and loader `train.py` reads, and
`python -m echoes.data info DIR`. `python -m echoes.prepare` (echoes/prepare.py) makes them from
videos (paper Sec. 3.1, 4.1).

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
permutation, padded as torch's DistributedSampler pads); its position (epoch, index) is all a
checkpoint needs to continue on exactly the same data, because the frame draws are seeded by that
position too.
"""

import json
import math
import os
import sys

import numpy as np
import torch

from echoes.cli import UserError, run_cli, write_atomic, write_text

FORMAT, VERSION = "echoes-token-shards", 1
INDEX = "index.json"

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
                            "`python -m echoes.prepare`")
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


def read_sidecar(base):
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
            side = read_sidecar(base)
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
# command line


USAGE = """usage: python -m echoes.data COMMAND [options]

commands:
  info DIR  what a shard folder holds
  prepare   videos (+ an optional VGGSound CSV) -> token shards: `python -m echoes.prepare`"""

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
    """`python -m echoes.data info|prepare ...`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a missing command, as argparse treats a missing argument: usage, exit 2
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "info":
        info_main(argv[1:])
    elif argv[0] == "prepare":  # imported here: reading shards needs neither ffmpeg nor tokenizers
        from echoes import prepare
        prepare.main(argv[1:])
    else:
        raise UserError(f"unknown command {argv[0]!r}; see `python -m echoes.data --help`")


if __name__ == "__main__":
    run_cli(main)
