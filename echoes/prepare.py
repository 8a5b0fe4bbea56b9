"""`python -m echoes.prepare`: videos (and an optional VGGSound CSV) -> token shards
(paper Sec. 3.1, 4.1; the shard format and its readers are in `echoes/data.py`).

    python -m echoes.prepare --csv vggsound.csv --videos clips/ --out shards/ \
        --image-vqgan vqgan_imagenet_f16_1024/last.ckpt --audio-vqgan vggsound_codebook.ckpt

Per clip: ffprobe reads its length, sample aspect ratio and audio channels; ffmpeg (through pipes,
no temp files) takes F frames uniformly over the clip, short side resized and centre-cropped, and
the clip's audio as mono float at the mel recipe's rate; clips that are unreadable, short, silent
or without a stream are listed in skipped.txt with the reason. Decodes run in a thread pool (the
work is in ffmpeg's processes); the frozen tokenizers turn each batch into uint16 ids, which are
appended as shards of shard_size clips (`data.write_shards`, atomic). A rerun skips the clips the
finished shards hold, so a killed run resumes; one run at a time holds the folder's lock.
Clip ids: VGGSound's youtube_id_start6 with --csv, else the path below --videos without the
extension (split train / test by a hash of the id, label = the parent folder).
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
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from echoes.cli import (UserError, check_at_least, check_finite, check_writable, folder_lock,
                        load_checkpoint, parse_settings, pick_device, remove_temps, run_cli,
                        setting, write_text)
from echoes.data import read_index, read_sidecar, write_shards

SKIPPED = "skipped.txt"  # clip id, reason and path of every clip a run skipped, tab-separated
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg")


@dataclasses.dataclass
class PrepareSettings:
    """`python -m echoes.prepare` settings (each one is a --flag; see --help)."""
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


# -----------------------------------------------------------------------------
# decoding: one video -> frames + audio (ffmpeg)


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


# -----------------------------------------------------------------------------
# the list of clips


def _read_skipped(folder):
    """The (clip id, reason, path) rows of a folder's skipped-clips file ([] without one)."""
    try:
        with open(os.path.join(folder, SKIPPED), encoding="utf-8", errors="surrogateescape") as f:
            rows = [line.rstrip("\n").split("\t") for line in f]
    except OSError:
        return []
    return [tuple(row) for row in rows if len(row) == 3]


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


def check_bundle_recipe(s, flag, path, obj, modality):
    """A bundle given as --image-vqgan / --audio-vqgan: its tokenizer was made for its recipe, so
    settings other than that recipe are an error that names --tokenizers (which takes it too)."""
    entries = obj.get("tokenizers") if isinstance(obj, dict) else None
    entry = entries.get(modality) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        return
    recipe = {name: entry.get(key) for name, (m, key) in BUNDLE_RECIPE.items() if m == modality}
    rate = entry.get("sample_rate")
    if modality == "audio" and isinstance(entry.get("n_samples"), int) and rate:
        recipe["clip_seconds"] = entry["n_samples"] / rate
    differ = [f"--{name.replace('_', '-')} {getattr(s, name):g} (its {value:g})"
              for name, value in recipe.items() if isinstance(value, (int, float))
              and not math.isclose(getattr(s, name), value, rel_tol=1e-4)]
    if differ:
        raise UserError(f"{flag} {path} is a bundle whose {modality} tokenizer was made for another "
                        f"recipe: {', '.join(differ)}; give it as --tokenizers {path}, which takes "
                        "its recipe too")


# -----------------------------------------------------------------------------
# tokenizers -> ids -> shards


def _make_tokenizers(s, device):
    from echoes.tokenizers import (AudioTokenizer, ImageTokenizer, VQGANConfig, check_modality,
                                   codebook_fingerprint, vqgan_from_checkpoint)
    image_path, audio_path = s.image_vqgan or s.tokenizers, s.audio_vqgan or s.tokenizers
    for flag, path in (("--image-vqgan", image_path), ("--audio-vqgan", audio_path)):
        if not path:
            raise UserError(f"give {flag} (see --help for the released checkpoints) or "
                            "--tokenizers")

    def load(flag, path, modality, config):
        obj = load_checkpoint(path, trusted=s.trust_checkpoints, what="VQGAN checkpoint")
        check_bundle_recipe(s, flag, path, obj, modality)
        return vqgan_from_checkpoint(obj, config, path).to(device)

    image_vq = load("--image-vqgan", image_path, "image", VQGANConfig.imagenet_f16_1024())
    audio_vq = load("--audio-vqgan", audio_path, "audio", VQGANConfig.vggsound_codebook())
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
        done.update(read_sidecar(os.path.join(s.out, entry["name"]))["ids"])
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


def main(argv=None):
    """`python -m echoes.prepare [options]` (also `python -m echoes.data prepare`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prepare(parse_settings(PrepareSettings, argv,
                           description="Videos -> token shards (paper Sec. 3.1, 4.1).",
                           prog="python -m echoes.prepare"))


if __name__ == "__main__":
    run_cli(main)
