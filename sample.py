"""Generate with a trained Visual Echoes model: image -> sound, sound -> image, both together,
audio inpainting and continuation (paper Sec. 3.4; the loop is `echoes/sampler.py`).

    python sample.py --mode i2a --image dog.png --ckpt model.pt \\
        --image-vqgan vqgan_imagenet_f16_1024.ckpt --audio-vqgan epoch_39.ckpt \\
        --vocoder best_netG.pt --out samples            # -> samples/dog.wav, samples/dog_mel.png
    python sample.py --mode a2i --audio bark.wav ...    # -> samples/bark.png
    python sample.py --mode joint --num-samples 4 ...   # -> samples/joint_000.png/.wav/_mel.png ...
    python sample.py --mode inpaint --audio bark.wav --image dog.png --start 2 --end 4 ...
    python sample.py --mode continue --audio bark.wav [--image dog.png] --start 5 ...
                                                        # -> samples/bark.wav, samples/bark_mel.png
    (inpaint / continue keep bark.wav's waveform, as the model reads it, outside the
    regenerated stretch)

What a run needs and where it comes from:
- the model: `--ckpt`, a file `train.py` writes: {"model": state dict, "config":
  asdict(EchoesConfig), optional "sampling": {steps, temperature, guidance, token_temperature},
  optional "tokenizers": {"image": {...}, "audio": {...}}, training state that is ignored}.
  Without `--ckpt` the embedded demo bundle `echoes/assets/demo.pt` is used: the same layout, whose
  "tokenizers" entries also carry the VQGAN weights ("state_dict", "config"), so it needs nothing
  else, and i2a / a2i runs that name no input take its example files from `echoes/assets/examples`;
- the tokenizers: `--image-vqgan` / `--audio-vqgan` (released taming / SpecVQGAN checkpoints use
  the presets of `echoes/tokenizers.py`; a file echoes wrote may carry a "config" entry), else the
  weights embedded in the checkpoint; the recipe (image resolution, clip length) comes from the
  checkpoint's "tokenizers" entry, else the paper's (256 px, 10 s at 22050 Hz);
- the vocoder: `--vocoder` (SpecVQGAN's MelGAN `best_netG.pt`), else Griffin-Lim (no weights);
- sampling settings: the command line, else the checkpoint's "sampling" entry (its "guidance" a
  number for every guided mode or a {mode: s} dict), else the paper's (Sec. 4.1: N = 30, T = 9,
  s = 3 when generating audio from an image, no CFG (s = 1) for audio -> image).

Randomness: sample j of a run (input j // K, its (j % K)-th sample, K = --num-samples) draws from
its own stream seeded by (--seed, j), so its output does not depend on --batch-size.
Existing files are never overwritten: a sample whose output name is taken in --out gets the first
free suffix -2, -3, ... (the written paths are printed), or with --skip-existing counts as done
(a killed run over many inputs, rerun with it, writes what is missing). Problems a user can fix
print one line and exit with code 2.
"""

import hashlib
import itertools
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import soundfile
import torch
from tqdm import tqdm

import kernels
from echoes import sampler
from echoes.audio import HOP, full_scale, load_audio, save_mel_png, save_wav
from echoes.checkpoint import (DEMO_BUNDLE, DEMO_EXAMPLES, check_fit, load_model, load_tokenizers,
                               stored_sampling)
from echoes.cli import (UserError, check_file, check_finite, check_rules, check_writable,
                        load_checkpoint, parse_settings, pick_device, remove_temps, run_cli,
                        setting, stdout_gone)
from echoes.tokenizers import codebook_fingerprint, save_png


@dataclass
class Settings:
    """sample.py's settings (each one is a --flag; see --help)."""
    mode: str = setting("i2a", "what to generate: i2a (image -> audio), a2i (audio -> image), "
                        "joint (both), inpaint (regenerate --start..--end of --audio, given "
                        "--image), continue (keep --audio before --start, generate the rest)")
    image: list[str] = setting([], "input image file(s): i2a, inpaint and (optional) continue")
    audio: list[str] = setting([], "input audio file(s): a2i, inpaint and continue")
    start: float | None = setting(None, "seconds: where inpainting / continuation starts")
    end: float | None = setting(None, "seconds: where inpainting ends (default: end of clip)")
    ckpt: str = setting("", "model checkpoint from train.py (default: the embedded demo)")
    image_vqgan: str = setting("", "image VQGAN checkpoint (taming layout or echoes's own); "
                               "default: the one embedded in the checkpoint (the demo bundle "
                               "has one, train.py's checkpoints do not)")
    audio_vqgan: str = setting("", "audio VQGAN checkpoint (SpecVQGAN codebook layout or "
                               "echoes's own); default: the one embedded in the checkpoint (as "
                               "for --image-vqgan)")
    vocoder: str = setting("", "MelGAN vocoder (SpecVQGAN best_netG.pt); default: Griffin-Lim")
    trust_checkpoints: bool = setting(False, "allow full unpickling of checkpoint files "
                                      "(only for files you trust)")
    steps: int | None = setting(None, "unmasking steps N (default: checkpoint's, else 30)")
    temperature: float | None = setting(None, "Gumbel choice temperature T, annealed "
                                        "(default: checkpoint's, else 9; with 0, positions of "
                                        "equal confidence at the cut all go back, as in the "
                                        "paper's Code 1, which can stall the schedule)")
    guidance: float | None = setting(None, "CFG scale s, 1 = none (default: checkpoint's, else "
                                     "3 for audio generation, 1 for a2i)")
    token_temperature: float | None = setting(None, "temperature of the categorical draw "
                                              "(default: checkpoint's, else 1)")
    hide_region: bool | None = setting(None, "inpaint / continue: silence the regenerated "
                                       "stretch in the mel before encoding, as the paper does "
                                       "(Sec. 4.3), so none of it reaches the kept tokens; "
                                       "--no-hide-region encodes the whole clip (the kept tokens "
                                       "then sound as in the original, and those near the "
                                       "stretch carry some of what it held). Default: on, but "
                                       "off with the embedded demo's audio tokenizer, which sees "
                                       "its whole 1.5 s clip at once")
    splice: bool = setting(True, "inpaint / continue: keep the input's waveform (mono, at "
                           "the model's rate and clip length) outside the regenerated stretch "
                           "(crossfaded over 20 ms); --no-splice "
                           "writes the whole clip as the vocoder renders the decoded tokens, "
                           "the paper's output")
    seed: int = setting(0, "random seed; sample j of the run draws from stream (seed, j)")
    batch_size: int = setting(8, "samples per sampling batch (CFG runs two passes per sample "
                              "in one forward)")
    num_samples: int = setting(1, "samples per input (joint: number of pairs); with several, "
                               "NAME_1, NAME_2, ... (joint: joint_000, joint_001, ...)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    cuda_graphs: bool = setting(True, "on a GPU, replay the transformer's forward from CUDA "
                                "graphs (the same ids, fewer kernel launches)")
    out: str = setting("samples", "output folder")
    skip_existing: bool = setting(False, "resume a run over many inputs: a sample whose files are "
                                  "all in --out under its own name is not generated again, "
                                  "and one with some of them gets only the missing ones (the "
                                  "others come out as the whole run would have written them: "
                                  "each sample draws from its own stream (seed, j))")


# -----------------------------------------------------------------------------
# checking the request (before anything is loaded)


def check_options(s):
    """One-line errors for options that are impossible or make no sense for the mode."""
    if s.mode not in sampler.MODES:
        raise UserError(f"unknown --mode {s.mode!r}: use one of {', '.join(sampler.MODES)}")
    takes = {"i2a": {"image"}, "a2i": {"audio"}, "joint": set(),
             "inpaint": {"image", "audio", "start", "end"},
             "continue": {"image", "audio", "start"}}[s.mode]
    given = {"image": s.image, "audio": s.audio, "start": s.start, "end": s.end}
    for name, value in given.items():
        if value not in (None, []) and name not in takes:
            raise UserError(f"--{name} makes no sense for --mode {s.mode}")
    if s.hide_region is not None and s.mode not in ("inpaint", "continue"):
        flag = "--hide-region" if s.hide_region else "--no-hide-region"
        raise UserError(f"{flag} makes no sense for --mode {s.mode}")
    if not s.splice and s.mode not in ("inpaint", "continue"):
        raise UserError(f"--no-splice makes no sense for --mode {s.mode}")
    if s.guidance is not None and (s.mode == "joint" or (s.mode == "continue" and not s.image)):
        without = "without --image " if s.mode == "continue" else ""
        raise UserError(f"--guidance makes no sense for --mode {s.mode} {without}"
                        "(nothing to guide by)")
    for name, low in (("steps", 1), ("batch_size", 1), ("num_samples", 1)):
        value = getattr(s, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    check_rules(s, {name: sampler.SAMPLING_RULES[name]
                    for name in ("temperature", "guidance", "token_temperature")})
    check_finite(s)
    if s.start is not None and s.end is not None and s.start >= s.end:
        raise UserError(f"--start {s.start:g} is not before --end {s.end:g}: the stretch to "
                        "regenerate would be empty")


def model_source(s):
    """The checkpoint to load: --ckpt, else the embedded demo bundle."""
    if s.ckpt:
        return s.ckpt
    if DEMO_BUNDLE.is_file():
        return DEMO_BUNDLE
    raise UserError(f"no --ckpt given and no embedded demo at {DEMO_BUNDLE}: pass --ckpt PATH "
                    "(a checkpoint written by train.py) or rebuild the demo with "
                    "`python -m echoes.demo build`")


def demo_examples(s):
    """With the demo model and no input, i2a / a2i take the first example file shipped with it."""
    if s.ckpt or not DEMO_EXAMPLES.is_dir():
        return
    if s.mode == "i2a" and not s.image:
        s.image = sorted(map(str, DEMO_EXAMPLES.glob("*.png")))[:1]
    if s.mode == "a2i" and not s.audio:
        s.audio = sorted(map(str, DEMO_EXAMPLES.glob("*.wav")))[:1]


def check_inputs(s):
    """One-line errors for missing inputs, unpaired inputs and outputs that would collide."""
    needs = {"i2a": ["image"], "a2i": ["audio"], "joint": [],
             "inpaint": ["image", "audio", "start"], "continue": ["audio", "start"]}[s.mode]
    missing = [f"--{name}" for name in needs if getattr(s, name) in (None, [])]
    if missing:
        listed = ", ".join(missing[:-1]) + " and " * (len(missing) > 1) + missing[-1]
        raise UserError(f"--mode {s.mode} needs {listed}")
    if s.mode in ("inpaint", "continue") and s.image and len(s.image) not in (1, len(s.audio)):
        each = f" or {len(s.audio)}, one per --audio" if len(s.audio) > 1 else ""
        raise UserError(f"--mode {s.mode} pairs each --audio with an --image: give one --image "
                        f"(for every clip){each}, not {len(s.image)}")
    for flag, paths, files in (("--image", s.image, "*.png"), ("--audio", s.audio, "*.wav")):
        for path in paths:
            if os.path.isdir(path):
                raise UserError(f"{flag} {path} is a folder; give its files, e.g. "
                                f"{os.path.join(path, files)}")
            check_file(path, "input file")


def sampling_settings(s, ckpt, source="the checkpoint"):
    """steps, temperature, guidance, token_temperature: command line > checkpoint > paper."""
    out = stored_sampling(ckpt, s.mode, source)
    out.update({k: getattr(s, k) for k in sampler.SAMPLING_KEYS if getattr(s, k) is not None})
    if s.mode == "joint" or (s.mode == "continue" and not s.image):
        out["guidance"] = 1.0  # nothing to guide by
    return out


# -----------------------------------------------------------------------------
# the run


def output_names(s):
    """The output name of every sample, sample j being input j // K's (j % K)-th: the input's
    name (`input_names`; joint: joint_000, ...), with _k for K > 1. The files get the first free
    stem of name, name-2, name-3, ... when they are written (`write_sample`)."""
    K = s.num_samples
    if s.mode == "joint":
        return [f"joint_{j:03d}" for j in range(K)]
    names = input_names(s.image if s.mode == "i2a" else s.audio)
    return [name + (f"_{k + 1}" if K > 1 else "") for name in names for k in range(K)]


def samples_left(s, names):
    """--skip-existing: the indices of the samples whose files are not all in --out under their
    own names, with a note on how many are there already."""
    counts = Counter(names)
    twice = next((name for name in names if counts[name] > 1), None)
    if twice is not None:
        raise UserError(f"--skip-existing needs one output name per sample, and {twice} is the "
                        "name of two (an input given twice?): give each input once")
    out = os.path.realpath(s.out)
    if any(os.path.dirname(os.path.realpath(p)) == out for p in s.image + s.audio):
        raise UserError(f"--skip-existing takes the files in --out as this run's, and --out "
                        f"{s.out} holds its inputs (whose names its outputs share): write to "
                        "another --out")
    endings = output_endings(s.mode)
    left = [j for j, name in enumerate(names)
            if not all((Path(s.out) / f"{name}{ending}").exists() for ending in endings)]
    if len(left) < len(names):
        print(f"note: {len(names) - len(left)} of {len(names)} samples are in {s.out} already "
              f"(--skip-existing): {len(left)} to generate", file=sys.stderr, flush=True)
    return left


def input_names(paths, max_bytes=200):
    """Each input's file name without its extension, or, where inputs in several folders share
    one, with as many of its folders as tell them apart: a/0001.png, b/0001.png -> a_0001,
    b_0001. Names that still coincide (one file given twice, a_0001.png beside a/0001.png) are
    numbered by `write_sample`. A name past `max_bytes` (UTF-8) keeps its end and a hash of the
    whole, so that every file name it gets stays within the file systems' 255 bytes."""
    parts = [Path(os.path.abspath(p)).with_suffix("").parts[1:] for p in paths]  # no root
    depth = [1] * len(parts)
    for k in range(1, max(map(len, parts), default=0)):
        files = {}  # the last k folders and name -> the inputs' distinct paths that end so
        for mine in parts:
            files.setdefault(mine[-k:], set()).add(mine)
        shared = [i for i, mine in enumerate(parts) if depth[i] == k and len(mine) > k
                  and len(files[mine[-k:]]) > 1]
        if not shared:
            break
        for i in shared:
            depth[i] = k + 1
    names = ["_".join(mine[-d:]) for mine, d in zip(parts, depth)]
    return [name if len(name.encode()) <= max_bytes else
            name.encode()[-(max_bytes - 9):].decode(errors="ignore") + "-"
            + hashlib.sha1(name.encode()).hexdigest()[:8] for name in names]


def encode_inputs(s, image_tok, audio_tok, device, keep=None, inputs=None):
    """Token ids of the inputs, encoded in batches: (image ids or None, audio ids or None), row r
    for input inputs[r] (default: all; an input is an image for i2a, a clip for the modes that
    take audio). With `keep` (inpaint / continue), the audio's mel is silenced under the
    regenerated token columns before it is encoded, as the paper does (Sec. 4.3)."""
    def encode(tok, paths, **kw):
        if not paths:
            return None
        return torch.cat([tok.encode_files(paths[i:i + s.batch_size], **kw)
                          for i in range(0, len(paths), s.batch_size)]).to(device)
    n = len(s.image if s.mode == "i2a" else s.audio)
    inputs = list(range(n)) if inputs is None else inputs
    if s.mode in ("inpaint", "continue") and len(s.image) == 1:  # one picture for every clip
        images = encode(image_tok, s.image)
        images = None if images is None else images.expand(len(inputs), -1)  # (I, Lv)
    else:
        images = encode(image_tok, [s.image[i] for i in inputs] if s.image else [])
    hidden = None if keep is None else sampler.hidden_columns(keep, audio_tok.grid)
    return images, encode(audio_tok, [s.audio[i] for i in inputs] if s.audio else [],
                          hidden=hidden)


def demo_audio_codebook(audio_tok, bundle=None):
    """Whether the audio tokenizer has the embedded demo's codebook (the demo model, or one
    trained on shards made with its tokenizers). Its encoder sees the whole 1.5 s clip at once:
    silencing a stretch changes most of the kept tokens, into ones such a model never met
    (README, demo quality), so inpainting there encodes the whole clip unless --hide-region.
    `bundle`: the demo bundle's contents when they are loaded already."""
    if bundle is None:
        if not DEMO_BUNDLE.is_file():
            return False
        bundle = load_checkpoint(DEMO_BUNDLE, what="embedded demo")
    entry = (bundle.get("tokenizers") or {}).get("audio") or {}
    book = (entry.get("state_dict") or {}).get("quantize.embedding.weight")
    return book is not None and codebook_fingerprint(book) == codebook_fingerprint(audio_tok.vqgan)


def note_many_steps(s, steps, model, keep):
    """A note when --steps exceeds the tokens to generate: every step but the last fixes at
    least one token, so the steps past that count only re-draw the last masked one."""
    c = model.config
    tokens = {"i2a": c.audio_len, "a2i": c.image_len, "joint": max(c.audio_len, c.image_len)}
    n = tokens[s.mode] if keep is None else int((~keep).sum())
    if steps > n:
        print(f"note: {steps} steps for {n} tokens to generate: the steps past {max(n - 1, 1)} "
              "only re-draw the last masked token", file=sys.stderr, flush=True)


def note_clip_length(paths, audio_tok):
    """A note for each input whose length is not the model's clip: a shorter one is padded with
    silence, a longer one cut to its first clip."""
    clip = audio_tok.n_samples / audio_tok.sample_rate
    for path in paths:
        seconds = soundfile.info(path).duration
        if abs(seconds - clip) > 0.05:
            what = ("the rest is taken as silence" if seconds < clip else
                    f"only its first {clip:.2f} s are used")
            print(f"note: {path} is {seconds:.2f} s long, the model's clips {clip:.2f} s: "
                  f"{what}", file=sys.stderr, flush=True)


def audio_keep(s, audio_tok):
    """The kept audio positions for inpaint / continue, from --start / --end in seconds; says
    which stretch is regenerated (whole token columns). An --end less than a column past the
    clip's end means the end ("1.5" for a 1.474 s clip, or its length as printed, rounded)."""
    duration = audio_tok.n_samples / audio_tok.sample_rate
    edges = audio_tok.column_edges()
    end = duration if s.mode == "continue" or s.end is None else s.end
    if duration < end <= duration + duration / audio_tok.grid[1]:
        end = duration
    try:
        keep = sampler.audio_keep_outside(s.start, end, audio_tok.grid, duration, edges)
    except ValueError as e:
        flags = "--start" if s.mode == "continue" else "--start/--end"
        raise UserError(f"{flags}: {e}") from e
    cols = sampler.hidden_columns(keep, audio_tok.grid).nonzero().flatten().tolist()
    column = audio_tok.n_frames / audio_tok.grid[1] * HOP / audio_tok.sample_rate  # the inner ones
    print(f"note: regenerating {float(edges[cols[0]]):.3f}-{float(edges[cols[-1] + 1]):.3f} s "
          f"of the clip (whole token columns of {column:.3f} s)", file=sys.stderr, flush=True)
    return keep


def output_endings(mode):
    """The files of one sample: NAME.wav and NAME_mel.png for the modes that make audio, NAME.png
    for those that make an image."""
    return [".wav", "_mel.png"] * (mode != "a2i") + [".png"] * (mode in ("a2i", "joint"))


def write_outputs(s, names, audio_ids, image_ids, generators, image_tok, audio_tok,
                  sources=None, hidden=None):
    """Decode one batch and write its files; returns the written paths. Each sample is decoded
    on its own, so its files do not depend on the batching. With `sources` (each sample's
    input audio file) and `hidden` (the regenerated token columns), the input's waveform is
    kept outside the stretch (`AudioTokenizer.splice`) and the mel picture is the result's."""
    written = []
    for j, (name, g) in enumerate(zip(names, generators)):
        files = {}  # ending -> write(path), never over an existing file
        if s.mode != "a2i":
            mel = audio_tok.decode_to_mel(audio_ids[j:j + 1])  # (1, 80, T)
            # Griffin-Lim's random phases come from the sample's own stream
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
            phase_gen = torch.Generator(mel.device).manual_seed(seed)
            wav = audio_tok.mel_to_wav(mel, generator=phase_gen)[0]  # (T,)
            if sources is None:
                wav = full_scale(wav)  # rather than clipped by the 16-bit file
            else:  # the input's level as it is around the stretch
                seconds = audio_tok.n_samples / audio_tok.sample_rate
                original = load_audio(sources[j], audio_tok.sample_rate, seconds)
                wav = audio_tok.splice(wav, torch.as_tensor(original), hidden)  # (n_samples,)
                mel = audio_tok.wav_to_mel(wav)  # (1, 80, T) what the file holds
            files[".wav"] = lambda path, wav=wav: save_wav(wav, path, audio_tok.sample_rate,
                                                           replace=False)
            files["_mel.png"] = lambda path, mel=mel: save_mel_png(mel, path, replace=False)
        if s.mode in ("a2i", "joint"):
            image = image_tok.decode_to_images(image_ids[j:j + 1])[0]
            files[".png"] = lambda path, image=image: save_png(image, path, replace=False)
        written += write_sample(Path(s.out), name, files, s.skip_existing)
    return written


def write_sample(out, name, files, fill=False):
    """Write one sample's files ({ending: write(path)}) under the first stem of name, name-2,
    name-3, ... for which no file in `out` exists: a run never overwrites its inputs, earlier
    outputs, or the files of another run writing to the same folder at the same time (its first
    file claims the stem). With `fill` (--skip-existing) the stem is `name` and only its missing
    files are written. Returns the paths written."""
    if fill:
        paths = [out / f"{name}{ending}" for ending in files]
        missing = [(path, write) for path, write in zip(paths, files.values())
                   if not path.exists()]
        for path, write in missing:
            try:
                write(path)
            except FileExistsError:
                raise UserError(f"{path} appeared while this run wrote it; is another run "
                                "writing to this --out?") from None
        return [path for path, _ in missing]
    for n in itertools.count(1):
        stem = name if n == 1 else f"{name}-{n}"
        paths = [out / f"{stem}{ending}" for ending in files]
        if any(p.exists() for p in paths):
            continue
        try:
            for path, write in zip(paths, files.values()):
                try:
                    write(path)
                except FileExistsError:
                    if path != paths[0]:  # the stem was ours: someone else made this very file
                        raise UserError(f"{path} appeared while this run wrote "
                                        f"{paths[0].name}; write to another --out") from None
                    raise
        except FileExistsError:  # another run took the stem first
            continue
        return paths


def main(argv=None):
    """sample.py's command line: inputs -> token ids -> the files of every sample."""
    s = parse_settings(Settings, argv, description=__doc__.split("\n\n")[0])
    check_options(s)
    source = model_source(s)
    demo_examples(s)
    check_inputs(s)
    device = pick_device(s.device)
    try:  # the model picks its kernels through this switch: a bad ECHOES_KERNELS fails here
        kernels.resolve()
    except (ValueError, RuntimeError) as e:
        raise UserError(f"ECHOES_KERNELS: {e}") from e
    if device.type == "cuda" and kernels.missing_triton():
        print("note: Triton is not installed, so the plain PyTorch path runs (pip install triton "
              "for the fused kernels)", file=sys.stderr, flush=True)
    ckpt = load_checkpoint(source, trusted=s.trust_checkpoints,
                           what="model checkpoint" if s.ckpt else "embedded demo")
    source = str(source)
    model = load_model(ckpt, source).to(device)
    image_tok, audio_tok = load_tokenizers(ckpt, source, device, s.image_vqgan, s.audio_vqgan,
                                           s.vocoder, s.trust_checkpoints)
    check_fit(model, image_tok, audio_tok, source)
    opts = sampling_settings(s, ckpt, source)
    keep = audio_keep(s, audio_tok) if s.mode in ("inpaint", "continue") else None
    note_many_steps(s, opts["steps"], model, keep)
    hide = (s.hide_region if s.hide_region is not None or keep is None
            else not demo_audio_codebook(audio_tok, None if s.ckpt else ckpt))
    K = s.num_samples
    names = output_names(s)
    todo = samples_left(s, names) if s.skip_existing else list(range(len(names)))
    inputs = sorted({j // K for j in todo})  # the inputs of the samples to make
    row = {i: r for r, i in enumerate(inputs)}  # input -> its row in the encoded ids
    images, audios = encode_inputs(s, image_tok, audio_tok, device, keep if hide else None,
                                   inputs)
    note_clip_length([s.audio[i] for i in inputs] if s.audio else [], audio_tok)  # encoded: read
    check_writable(s.out)
    remove_temps(s.out, dead_only=True)  # what runs killed mid-write left; never a live run's

    hidden = None if keep is None else sampler.hidden_columns(keep, audio_tok.grid)
    # over the batches, when there are several (each batch's steps have a bar of their own)
    bar = tqdm(total=len(todo), desc="samples", unit="sample",
               disable=len(todo) <= s.batch_size)
    for lo in range(0, len(todo), s.batch_size):
        js = todo[lo:lo + s.batch_size]  # the batch's samples; sample j is input j // K's
        generators = [sampler.sample_generators(s.seed, 1, offset=j)[0] for j in js]
        rows = torch.tensor([row[j // K] for j in js], device=device)  # (b,) their inputs' rows
        try:
            audio_ids, image_ids = sampler.generate(  # the inputs' ids: (b, La), (b, Lv)
                model, s.mode, audio_ids=None if audios is None else audios[rows],
                image_ids=None if images is None else images[rows], audio_keep=keep,
                batch_size=len(js), generator=generators, progress=True,
                cuda_graphs=s.cuda_graphs, **opts)
        except ValueError as e:  # settings from a checkpoint's "sampling" entry end up here
            raise UserError(str(e)) from e
        sources = [s.audio[j // K] for j in js] if keep is not None and s.splice else None
        for path in write_outputs(s, [names[j] for j in js], audio_ids, image_ids, generators,
                                  image_tok, audio_tok, sources, hidden):
            try:
                tqdm.write(str(path), file=sys.stdout)  # above the bars, not through them
                sys.stdout.flush()
            except BrokenPipeError:  # `| head -1`: the paths go unprinted, the files still come
                stdout_gone()
        bar.update(len(js))
    bar.close()


if __name__ == "__main__":
    run_cli(main)
