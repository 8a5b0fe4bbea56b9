"""The embedded demo "shapes and tones": how its tokenizers, model and bundle are built (data set:
`echoes/shapes.py`; generations scored by `echoes/demo_scoring.py`; the shipped bundle is loaded
like any checkpoint, by `echoes/checkpoint.py`).

    python -m echoes.demo build            # every stage that has no output yet
    python -m echoes.demo build --force    # all of them again
    python -m echoes.demo build --stages model tune bundle   # some stages only

The build runs these stages; each writes its output under --work (the bundle and examples into
the package) and is skipped when that output exists and is newer than its inputs (so a killed
build resumes where it stopped; the model stage resumes train.py's checkpoint), unless --force:

    data        generated pairs of the training and validation seeds: images, [0, 1] mels
    tokenizers  two small VQGANs (the same `VQGAN` class as the paper's tokenizers, at 0.24 M and
                0.28 M parameters: 64x64 image -> 8x8 ids, (80, 128) mel -> 5x8 ids), trained
                on the training pairs with `train_tokenizer` (echoes/tokenizer_training.py: EMA
                codebook, dead-code restarts, L1 + L2 reconstruction, and for the image one a
                patch-mean loss that makes each code carry its own patch's colour); on a CPU as
                two 1-thread processes side by side
    shards      both sets tokenized into token shards (`echoes.data.write_shards`, 1 frame)
    model       the `demo` preset trained by `train.py` on the shards (re-pairing images and
                clips within a class every batch; bf16 autocast on a GPU)
    decoder     the image tokenizer's decoder fine-tuned on the trained model's own fills of
                partly masked training images (`model_fills`, then `tune_decoder`): encoder and
                codebook stay as they are, so the ids and the shards do not change
    tune        steps, temperature, guidance and token temperature for i2a, a2i and joint,
                chosen on the validation seeds by the class readers of `echoes/shapes.py`
    bundle      echoes/assets/demo.pt (model + tokenizers + sampling defaults + audio recipe,
                fp16 weights) and example inputs in echoes/assets/examples/

Seeds of the generator (`shapes.make_pair(index, seed)`): training TRAIN_SEED, validation (tuning)
VAL_SEED, test (bench/quality.py) TEST_SEED, shipped examples EXAMPLE_SEED; no item is shared.
A GPU is used when present (`--device auto`): the tokenizers then train one after the other on
it and the model stage takes about a minute. On 2 CPU cores a build from a clean checkout took
51.9 min on 2026-11-27: 0.7 (data), 7.8 (tokenizers), 0.4 (shards), 31.7 (model: 2500 steps of
64 in fp32, 0.75 s each), 9.1 (decoder) and 2.1 (tune). The same machine runs the same training
step in 0.75-1.35 s at different hours, so the total moves by up to 10 min.
"""

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from echoes import sampler, shapes
from echoes.checkpoint import DEMO_BUNDLE, DEMO_EXAMPLES, load_model
from echoes.cli import (UserError, check_at_least, check_writable, load_checkpoint, parse_settings,
                        pick_device, remove_temps, run_cli, save_atomic, setting, write_atomic,
                        write_text)
from echoes.audio import mel_spectrogram
from echoes.data import write_shards
from echoes.demo_scoring import (audio_input, encode_items, eval_a2i, eval_i2a, eval_joint,
                                 image_input, model_input, readable_fraction)
from echoes.tokenizer_training import tokenize, train_tokenizer, tune_decoder
from echoes.tokenizers import (VQGAN, AudioTokenizer, ImageTokenizer, VQGANConfig, n_params,
                               vqgan_from_checkpoint)

MAX_BUNDLE_BYTES = 10 * 1024 * 1024

TRAIN_SEED, VAL_SEED, TEST_SEED, EXAMPLE_SEED = 1, 2, 3, 4

# the audio recipe of the demo: 1.474 s clips, 128 mel frames (echoes/shapes.py), no crop
AUDIO_RECIPE = {"sample_rate": shapes.SAMPLE_RATE, "n_samples": shapes.CLIP_SAMPLES,
                "n_frames": shapes.DEMO_FRAMES, "keep_frames": shapes.DEMO_FRAMES}
IMAGE_SIZE = shapes.SPEC.image_size


def image_vqgan_config():
    """64x64 RGB -> 8x8 ids over 256 codes of dimension 32 (three downsamplings). One channel
    width throughout and no encoder blocks besides the middle ones: the full-resolution levels
    cost most, and one filled shape on a flat background needs little capacity."""
    return VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=0, attn_resolutions=(),
                       resolution=IMAGE_SIZE, in_channels=3, out_ch=3, z_channels=32,
                       embed_dim=32, n_embed=256)


def audio_vqgan_config():
    """(80, 128) mel -> 5x8 ids over 256 codes of dimension 32 (four downsamplings, as
    SpecVQGAN's 16x). One channel width throughout: the full-resolution levels cost most."""
    return VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=0, attn_resolutions=(),
                       resolution=shapes.DEMO_FRAMES, in_channels=1, out_ch=1, z_channels=32,
                       embed_dim=32, n_embed=256)


VQGAN_CONFIGS = {"image": image_vqgan_config, "audio": audio_vqgan_config}


# -----------------------------------------------------------------------------
# data: generated pairs as model inputs


def make_set(n, seed, progress=False, chunk=240):
    """Items 0 .. n-1 of `seed` -> labels int64 (n,), images uint8 (n, 64, 64, 3), [0, 1] mels
    float16 (n, 80, 128) of the SpecVQGAN recipe (the audio tokenizer's input)."""
    labels, images, mels = [], [], []
    with tqdm(total=n, desc=f"pairs (seed {seed})", disable=not progress, unit="pair") as bar:
        for start in range(0, n, chunk):
            lab, img, wav = shapes.generate(min(chunk, n - start), seed, start=start)
            labels.append(lab)
            images.append(img)
            mels.append(mel_spectrogram(torch.from_numpy(wav)).half().numpy())  # (b, 80, 128)
            bar.update(len(lab))
    return np.concatenate(labels), np.concatenate(images), np.concatenate(mels)


# -----------------------------------------------------------------------------
# tokenizer files


def vqgan_from_entry(entry):
    """A bundle's tokenizer entry {"config", "state_dict", ...} -> VQGAN in eval mode (fp32:
    loading casts the stored fp16 weights)."""
    return vqgan_from_checkpoint(entry, source="demo tokenizer entry")


# -----------------------------------------------------------------------------
# the build


@dataclasses.dataclass
class BuildSettings:
    """`python -m echoes.demo build` settings (each one is a --flag; see --help)."""
    work: str = setting("demo_build", "folder for the intermediate outputs of every stage (the "
                        "bundle stage writes echoes/assets/demo.pt and the example files into "
                        "the package)")
    force: bool = setting(False, "redo the chosen stages even when their outputs exist")
    stages: list[str] = setting(["data", "tokenizers", "shards", "model", "decoder", "tune",
                                 "bundle"],
                                "stages to run, in order (each skipped when its output exists)")
    device: str = setting("auto", "auto (a GPU when present), cpu, cuda or cuda:N")
    threads: int = setting(0, "CPU threads for the model and tuning stages (0 = all cores)")
    n_train: int = setting(6000, "training pairs (seeds TRAIN_SEED), tokenizers and model")
    n_val: int = setting(240, "validation pairs (VAL_SEED): tokenizer checks, eval loss, tuning")
    image_tokenizer_steps: int = setting(1200, "optimizer steps of the image tokenizer")
    audio_tokenizer_steps: int = setting(500, "optimizer steps of the audio tokenizer")
    tokenizer_batch: int = setting(16, "tokenizer batch size")
    tokenizer_lr: float = setting(2e-3, "tokenizer peak learning rate (Adam, cosine to 1/10)")
    image_patch_mean: float = setting(1.0, "weight of the image tokenizer's patch-mean loss "
                                      "(each code must carry its own patch's mean colour)")
    model_steps: int = setting(2500, "optimizer steps of the transformer (train.py --max-steps)")
    model_batch: int = setting(64, "transformer batch (train.py --global-batch)")
    model_lr: float = setting(1e-3, "transformer peak learning rate (train.py --lr)")
    decoder_steps: int = setting(1200, "optimizer steps of the image decoder's fine-tune on the "
                                 "model's fills (at the tokenizer's lr / 4)")
    decoder_batch: int = setting(32, "batch size of the image decoder's fine-tune")
    decoder_sampled_fills: int = setting(1500, "training images the decoder stage also fills "
                                         "with the sampler's loop (SAMPLED_FILLS), a third of "
                                         "the fills it trains on")
    model_amp: str = setting("auto", "train.py --amp; auto = bf16 on a GPU, fp32 on a CPU (a CPU "
                             "without bf16 instructions ran a demo step 3x slower under bf16 "
                             "autocast)", choices=["auto", "bf16", "fp32"])
    repair_within_class: bool = setting(True, "train.py --repair-within-class: every batch pairs "
                                        "each clip with a random image of its class")
    n_tune: int = setting(240, "validation pairs per setting tried in the tune stage")
    seed: int = setting(0, "seed of tokenizer and model training and of the tuning draws")


STAGES = ("data", "tokenizers", "shards", "model", "decoder", "tune", "bundle")


def _paths(work):
    w = Path(work)
    return {"data": w / "data.npz", "image_vqgan": w / "image_vqgan.pt",
            "audio_vqgan": w / "audio_vqgan.pt", "shards": w / "shards",
            "image_decoder": w / "image_vqgan_decoder.pt",
            "model": w / "model", "ckpt": w / "model" / "ckpt.pt", "tune": w / "sampling.json",
            "bundle": DEMO_BUNDLE, "examples": DEMO_EXAMPLES}


def _save_npz(path, **arrays):
    write_atomic(path, lambda f: np.savez(f, **arrays))


def load_data(work):
    """The data stage's arrays: {train,val}_{labels,images,mels}."""
    path = _paths(work)["data"]
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); redo the data stage: "
                        "build --stages data --force") from e


def stage_data(s, p):
    train = make_set(s.n_train, TRAIN_SEED, progress=True)
    val = make_set(s.n_val, VAL_SEED, progress=True)
    _save_npz(p["data"], train_labels=train[0], train_images=train[1], train_mels=train[2],
              val_labels=val[0], val_images=val[1], val_mels=val[2])


def token_grid(vqgan, modality):
    """A demo tokenizer's id grid [h, w]: [8, 8] for the 64 px image, [5, 8] for the mel."""
    size = (IMAGE_SIZE, IMAGE_SIZE) if modality == "image" else (80, shapes.DEMO_FRAMES)
    return list(vqgan.latent_size(*size))


def tokenizer_file(vqgan, modality, extra):
    """What a tokenizer file (and a bundle entry) holds: config, weights, recipe, metrics."""
    recipe = ({"resolution": IMAGE_SIZE} if modality == "image" else dict(AUDIO_RECIPE))
    return {"config": dataclasses.asdict(vqgan.config), "state_dict": vqgan.state_dict(),
            **recipe, "grid": token_grid(vqgan, modality), "codebook": vqgan.config.n_embed,
            **extra}


def train_one_tokenizer(modality, work, steps, batch_size, lr, seed, device, patch_mean=0.0,
                        progress=True):
    """Train one demo tokenizer on the data stage's training pairs and save it (the body of the
    `tokenizer` command, which the build runs once per modality)."""
    d = load_data(work)
    key = "images" if modality == "image" else "mels"
    data = model_input(modality, d[f"train_{key}"])  # (N, C, H, W) in [-1, 1]
    torch.manual_seed(seed)
    vqgan = VQGAN(VQGAN_CONFIGS[modality]()).to(device)
    t0 = time.time()
    losses = train_tokenizer(vqgan, data, steps, batch_size, lr, patch_mean=patch_mean,
                             generator=torch.Generator().manual_seed(seed), progress=progress,
                             desc=f"{modality} tokenizer")
    readable, used = readable_fraction(modality, vqgan, d[f"val_{key}"], d["val_labels"])
    minutes = (time.time() - t0) / 60
    print(f"{modality} tokenizer: {n_params(vqgan) / 1e6:.2f} M parameters, {steps} steps in "
          f"{minutes:.1f} min, final loss {np.mean(losses[-20:]):.4f}, {100 * used:.0f}% of codes "
          f"used, {100 * readable:.1f}% of validation reconstructions readable", flush=True)
    save_atomic(tokenizer_file(vqgan.cpu(), modality, {
        "metrics": {"readable": readable, "codes_used": used, "loss": float(np.mean(losses[-20:])),
                    "minutes": minutes, "steps": steps, "patch_mean": patch_mean}}),
                _paths(work)[f"{modality}_vqgan"])


def stage_tokenizers(s, p, device):
    todo = [m for m in ("image", "audio") if s.force or not p[f"{m}_vqgan"].exists()]
    steps = {"image": s.image_tokenizer_steps, "audio": s.audio_tokenizer_steps}
    patch_mean = {"image": s.image_patch_mean, "audio": 0.0}
    args = lambda m: ["tokenizer", "--modality", m, "--work", s.work, "--steps",  # noqa: E731
                      str(steps[m]), "--batch-size", str(s.tokenizer_batch), "--lr",
                      str(s.tokenizer_lr), "--patch-mean", str(patch_mean[m]), "--seed",
                      str(s.seed), "--device", str(device)]
    if device.type == "cuda" or len(todo) < 2:
        for m in todo:
            tokenizer_main(args(m)[1:])
        return
    # on a CPU: two 1-thread processes side by side (faster than one 2-thread process each)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    codes = run_children([[sys.executable, "-m", "echoes.demo", *args(m),
                           *([] if m == "image" else ["--no-progress"])] for m in todo], env)
    if any(codes):
        raise UserError(f"tokenizer training failed (exit codes {codes}); see the output above")


def load_tokenizer(path, device="cpu"):
    return vqgan_from_entry(load_checkpoint(path, what="demo tokenizer")).to(device)


def stage_shards(s, p, device):
    d = load_data(s.work)
    image_vq = load_tokenizer(p["image_vqgan"], device)
    audio_vq = load_tokenizer(p["audio_vqgan"], device)
    tmp = p["shards"].with_name(".tmp-shards")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = {"tokenizers": {
        "image": {"resolution": IMAGE_SIZE, "grid": token_grid(image_vq, "image"),
                  "codebook": image_vq.config.n_embed, "frames": 1},
        "audio": {**AUDIO_RECIPE, "grid": token_grid(audio_vq, "audio"),
                  "codebook": audio_vq.config.n_embed}}}
    for split, seed in (("train", TRAIN_SEED), ("val", VAL_SEED)):
        labels = d[f"{split}_labels"]
        image = tokenize(image_vq, image_input(d[f"{split}_images"]))  # (N, 64)
        audio = tokenize(audio_vq, audio_input(d[f"{split}_mels"]))  # (N, 40)
        names = [shapes.CLASSES[int(lab)] for lab in labels]
        write_shards(tmp, split, image, audio, [f"{seed}-{i}" for i in range(len(labels))],
                     names, meta=meta)
        print(f"shards: {split} {len(labels)} pairs, {len(torch.unique(image))} image and "
              f"{len(torch.unique(audio))} audio codes in use", flush=True)
    shutil.rmtree(p["shards"], ignore_errors=True)
    os.replace(tmp, p["shards"])


def run_children(commands, env):
    """Run the commands as child processes side by side and return their exit codes, each
    waited for to its end. A SIGTERM or Ctrl-C to the build is passed on to them (a terminal's
    Ctrl-C reaches them too; train.py takes the two as one keypress and saves at the end of its
    step), so that no child outlives the build and a rerun never works beside one; then the
    build stops with the shell's code for the signal, whatever the children's codes."""
    procs, got = [], []

    def forward(signum, frame):
        got.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    # handlers can only be set from the main thread (a test may build from another)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main else None
    try:
        try:
            for command in commands:
                if got:  # stopped while starting: no more children
                    break
                procs.append(subprocess.Popen(command, env=env))
        except BaseException as e:  # a start that failed, or Ctrl-C: the started ones end too
            forward(signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM, None)
            for proc in procs:
                proc.wait()
            if not isinstance(e, KeyboardInterrupt):
                raise
        while True:
            try:
                codes = [proc.wait() for proc in procs]
                break
            except KeyboardInterrupt:
                forward(signal.SIGINT, None)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if got:
        print(f"stopped by {signal.Signals(got[0]).name}; rerun the build to resume it",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + got[0])
    return codes


def train_script():
    path = Path(__file__).resolve().parents[1] / "train.py"
    if not path.is_file():
        raise UserError(f"train.py not found beside the echoes package ({path.parent}): the "
                        "model stage runs from a source checkout")
    return path


def stage_model(s, p, device):
    if s.force and p["model"].exists():
        shutil.rmtree(p["model"])
    amp = s.model_amp if s.model_amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    cmd = [sys.executable, str(train_script()), "--data", str(p["shards"]), "--out",
           str(p["model"]), "--preset", "demo", "--global-batch", str(s.model_batch),
           "--max-steps", str(s.model_steps), "--lr", str(s.model_lr), "--amp", amp,
           "--eval-split", "val", "--eval-every", "500", "--save-every", "250",
           "--log-every", "100", "--seed", str(s.seed), "--device", device.type, "--resume",
           "--warmup-steps", str(max(1, s.model_steps // 20)), "--min-lr-ratio", "0.1",
           "--decay-group", "linear",  # the shipped model's recipe
           "--repair-within-class" if s.repair_within_class else "--no-repair-within-class"]
    env = dict(os.environ)
    if device.index is not None:  # train.py takes cuda:LOCAL_RANK: show it the chosen GPU alone
        visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
        env["CUDA_VISIBLE_DEVICES"] = (visible[device.index] if device.index < len(visible)
                                       else str(device.index))
    if s.threads:
        env["OMP_NUM_THREADS"] = str(s.threads)
    # the masked-row count, so the heads' matrix shapes, changes every step, and on a CPU oneDNN
    # caches compiled kernels per shape (up to 1024): a training run grew to 6 GB by step 2000; 8
    # keeps it under 1 GB at the same speed
    env.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    (code,) = run_children([cmd], env)
    if code != 0:
        why = {130: " (Ctrl-C, after saving)", 143: " (SIGTERM, after saving)"}.get(code, "")
        raise UserError(f"train.py exited with code {code}{why}; rerun the build to resume it")


# -----------------------------------------------------------------------------
# the image decoder, fine-tuned on the model's fills

# the decoder stage's fills by the sampler's loop: how much of an image is masked (uniform in
# `ratio`; audio -> image masks all of it, but a few known codes must pin the shape's place for
# the clean image to be the right target) and the loop's settings
SAMPLED_FILLS = {"ratio": (0.5, 0.95), "steps": 8, "temperature": 9.0, "token_temperature": 0.5}


@torch.no_grad()
def model_fills(model, image_ids, audio_ids, generator, ratio=(0.1, 0.9), steps=1,
                temperature=9.0, token_temperature=0.5, batch_size=128):
    """Image ids with a share of each (uniform in `ratio`) masked and re-drawn by the sampler's
    loop (`sampler.unmask`, no guidance) in `steps` steps, given the rest and the clip: codes of
    the kind sampling makes, each plausible and their outlines not quite consistent. With one
    step every masked code is drawn at once; with more, they are drawn as audio -> image draws
    them, a few at a time, each step seeing the codes drawn before. (N, Lv), (N, La) -> (N, Lv)."""
    out = []
    for lo in range(0, len(image_ids), batch_size):
        v, a = image_ids[lo:lo + batch_size], audio_ids[lo:lo + batch_size]
        B, L = v.shape
        r = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(B, 1, generator=generator)  # (B, 1)
        masked = (torch.rand(B, L, generator=generator) < r).to(v.device)  # (B, Lv)
        _, fill = sampler.unmask(model, a, v.masked_fill(masked, model.image_mask_id), ["image"],
                                 sampler.per_sample_generators(generator, B), steps=steps,
                                 temperature=temperature, guidance=1.0,
                                 token_temperature=token_temperature)
        out.append(fill)
    return torch.cat(out)


def stage_decoder(s, p, device):
    d = load_data(s.work)
    model, _ = model_from_ckpt(p["ckpt"], device)
    model.eval()
    image_vq = load_tokenizer(p["image_vqgan"], device)
    audio_vq = load_tokenizer(p["audio_vqgan"], device)
    data = image_input(d["train_images"])  # (N, 3, 64, 64)
    image_ids = tokenize(image_vq, data)  # (N, 64)
    audio_ids = tokenize(audio_vq, audio_input(d["train_mels"]))  # (N, 40)
    g = torch.Generator().manual_seed(s.seed)
    t0 = time.time()
    N = len(image_ids)
    # two one-step fills of every image, and fills of some by the sampler's loop, a third of the
    # fills drawn. Audio -> image shape from the same generated ids (validation clips of two
    # rebuilt models, 480 generations each, token T 0.25), decoder batch 16: 70.0% and 74.2%
    # with one-step fills alone, 72.3% and 75.6% with the sampled fills; batch 32: 75.6% on the
    # first model
    on_device = image_ids.to(device), audio_ids.to(device)
    fills = [model_fills(model, *on_device, g).cpu() for _ in range(2)]
    items, weights = [torch.arange(N)] * 2, [torch.ones(2 * N)]
    some = torch.randperm(N, generator=g)[:s.decoder_sampled_fills]
    if len(some):
        fills.append(model_fills(model, *(x[some.to(device)] for x in on_device), g,
                                 **SAMPLED_FILLS).cpu())
        items.append(some)
        weights.append(torch.full((len(some),), N / len(some)))
    fills, items, weights = torch.cat(fills), torch.cat(items), torch.cat(weights)
    losses = tune_decoder(image_vq, data, image_ids, fills, items, s.decoder_steps, weights,
                          batch_size=s.decoder_batch, lr=s.tokenizer_lr / 4, generator=g,
                          progress=True)
    readable, _ = readable_fraction("image", image_vq, d["val_images"], d["val_labels"])
    minutes = (time.time() - t0) / 60
    print(f"image decoder: {s.decoder_steps} steps on the model's fills in {minutes:.1f} min, "
          f"{100 * (fills != image_ids[items]).float().mean():.0f}% of the codes changed by "
          f"the fills, {100 * readable:.1f}% of validation reconstructions readable", flush=True)
    entry = load_checkpoint(p["image_vqgan"], what="demo tokenizer")
    save_atomic(tokenizer_file(image_vq.cpu(), "image", {
        "metrics": {**entry.get("metrics", {}), "decoder": {
            "steps": s.decoder_steps, "batch": s.decoder_batch, "sampled_fills": len(some),
            "minutes": minutes, "readable": readable,
            "loss": float(np.mean(losses[-20:])) if losses else None}}}), p["image_decoder"])


# The settings the tune stage chooses from, per mode: (steps N, Gumbel temperature T, token
# temperature). Each did best or within noise of the best on the validation pairs of two demo
# models built independently, in a grid over N 8-20, T 2-9, token T 0.25-1 and CFG s 1-3. Guidance
# is left out: s > 1 did worse for both models in every mode (bench/quality.py reports it).
# A few candidates scored on every validation pair: a wide grid on fewer pairs picked noise (a
# rebuilt model's pick scored 80% on the 96 tuning pairs and 66% on the 144 others, against 72%
# for the second-best). Audio -> image, with a decoder tuned on one-step fills alone (batch 16):
# token T 0.25 beat 0.5 on the validation clips of two rebuilt models (shape 74.2% against 69.8%
# and 70.0% against 66.9%, 480 generations each, N 12, T 9), and 0.125 did no better.
TUNE_CANDIDATES = {
    "i2a": [(8, 2.0, 0.5), (12, 2.0, 0.5), (12, 9.0, 0.5)],
    "a2i": [(12, 9.0, 0.25), (12, 9.0, 0.125), (12, 9.0, 0.5)],
    "joint": [(12, 9.0, 0.25), (20, 9.0, 0.25), (12, 2.0, 0.25)],
}


def model_from_ckpt(path, device):
    ckpt = load_checkpoint(path, what="demo model checkpoint")
    return load_model(ckpt, str(path)).to(device), ckpt


def best_setting(results):
    """[(both, shape, opts)] -> the opts with the most 'both right', then the best shape, then
    the fewest steps."""
    return max(results, key=lambda r: (r[0], r[1], -r[2]["steps"]))[2]


def stage_tune(s, p, device):
    """Pick, per mode, the candidate (`TUNE_CANDIDATES`) with the best 'both right' accuracy
    (joint: consistency) on n_tune validation pairs (ties: fewer steps); write sampling.json."""
    d = load_data(s.work)
    model, _ = model_from_ckpt(p["ckpt"], device)
    image_tok = ImageTokenizer(load_tokenizer(p["image_decoder"], device), resolution=IMAGE_SIZE)
    audio_tok = AudioTokenizer(load_tokenizer(p["audio_vqgan"], device), **AUDIO_RECIPE)
    n = min(s.n_tune, len(d["val_labels"]))
    labels = d["val_labels"][:n]
    image_ids = encode_items("image", image_tok, d["val_images"][:n])
    audio_ids = encode_items("audio", audio_tok, d["val_mels"][:n])
    best, table = {}, []
    for mode in ("i2a", "a2i", "joint"):
        def run(o, mode=mode):
            if mode == "i2a":
                acc = eval_i2a(model, image_tok, audio_tok, image_ids, labels, o, s.seed)[0]
            elif mode == "a2i":
                acc = eval_a2i(model, image_tok, audio_tok, audio_ids, labels, o, s.seed)[0]
            else:  # joint: consistency counts as 'both', there is no shape of its own
                acc = {**eval_joint(model, image_tok, audio_tok, n, o, s.seed)[0], "shape": 0.0}
            return acc
        results = []
        for steps, temperature, token_temperature in tqdm(TUNE_CANDIDATES[mode],
                                                          desc=f"tune {mode}", unit="setting"):
            opts = dict(steps=steps, temperature=temperature, guidance=1.0,
                        token_temperature=token_temperature)
            acc = run(dict(opts))
            results.append((acc["both"], acc["shape"], opts))
            table.append({"mode": mode, **opts, **acc})
            tqdm.write(f"{mode} {opts} -> {acc}")
        best[mode] = best_setting(results)
        print(f"tune: {mode} -> {best[mode]}", flush=True)
    sampling = {k: {m: best[m][k] for m in best} for k in ("steps", "temperature", "guidance",
                                                          "token_temperature")}
    for k in sampling:  # inpainting and continuation generate audio given an image, as i2a
        sampling[k].update({"inpaint": best["i2a"][k], "continue": best["i2a"][k]})
    text = json.dumps({"sampling": sampling, "table": table}, indent=1)
    write_text(p["tune"], text)


# -----------------------------------------------------------------------------
# the bundle


EXAMPLE_CLASSES = ("red circle", "green square", "blue triangle", "yellow square")


def half(state_dict):
    """fp16 copies of the floating-point tensors of a state dict (the bundle's storage)."""
    return {k: (v.half() if v.is_floating_point() else v).clone() for k, v in state_dict.items()}


def example_stems():
    return [name.replace(" ", "_") for name in EXAMPLE_CLASSES]  # red_circle, ...


def example_files():
    return [stem + ext for stem in example_stems() for ext in (".png", ".wav")] + ["labels.csv"]


def write_examples(folder, seed=EXAMPLE_SEED):
    """One PNG + WAV pair per class of EXAMPLE_CLASSES (generator seed `seed`), named after the
    class (red_circle.png, red_circle.wav, ...), and labels.csv."""
    labels = [shapes.CLASSES.index(name) for name in EXAMPLE_CLASSES]  # item = label: that class
    shapes.write_files(folder, labels, seed, stems=example_stems())


def stage_bundle(s, p):
    ckpt = load_checkpoint(p["ckpt"], what="demo model checkpoint")
    tuned = json.loads(p["tune"].read_text())
    tokenizers = {}
    for m, key in (("image", "image_decoder"), ("audio", "audio_vqgan")):
        entry = load_checkpoint(p[key], what="demo tokenizer")
        tokenizers[m] = {**entry, "state_dict": half(entry["state_dict"])}
    bundle = {"model": half(ckpt["model"]), "config": ckpt["config"],
              "sampling": tuned["sampling"], "tokenizers": tokenizers,
              "demo": {"seeds": {"train": TRAIN_SEED, "val": VAL_SEED, "test": TEST_SEED,
                                 "examples": EXAMPLE_SEED},
                       "n_train": ckpt["data"]["clips"], "model_steps": ckpt["step"],
                       "train_settings": {k: v for k, v in ckpt.get("settings", {}).items()
                                          if k not in ("data", "out")},  # no local paths
                       "train_metrics": ckpt.get("metrics", {}), "tune": tuned["table"]}}
    data = io.BytesIO()
    torch.save(bundle, data)
    size = data.getbuffer().nbytes
    if size > MAX_BUNDLE_BYTES:  # checked before the shipped bundle is replaced
        raise UserError(f"the bundle would be {size / 2**20:.1f} MiB, over the 10 MB budget: "
                        "shrink the demo preset or the tokenizers")
    write_atomic(p["bundle"], lambda f: f.write(data.getbuffer()))
    os.chmod(p["bundle"], 0o644)  # a package file: readable by everyone
    write_examples(p["examples"])
    print(f"bundle: {p['bundle']} ({size / 2**20:.2f} MiB), examples in {p['examples']}")


STAGE_FILES = {  # stage: (its outputs, its inputs)
    "data": (["data"], []),
    "tokenizers": (["image_vqgan", "audio_vqgan"], ["data"]),
    "shards": (["shards"], ["data", "image_vqgan", "audio_vqgan"]),
    "model": (["ckpt"], ["shards"]),
    "decoder": (["image_decoder"], ["ckpt", "image_vqgan"]),
    "tune": (["tune"], ["ckpt", "image_decoder"]),
    "bundle": (["bundle"], ["tune", "ckpt", "image_decoder", "audio_vqgan"]),
}


STAGE_RUNS = {"data": stage_data, "tokenizers": stage_tokenizers, "shards": stage_shards,
              "model": stage_model, "decoder": stage_decoder, "tune": stage_tune,
              "bundle": stage_bundle}


def stale(stage, p):
    """Whether one of a stage's outputs is older than one of its inputs: it was made from inputs
    that have changed since, so the stage is redone from scratch (all of its outputs)."""
    outputs, inputs = STAGE_FILES[stage]
    made = [p[k].stat().st_mtime for k in outputs if p[k].exists()]
    return bool(made) and any(p[k].exists() and p[k].stat().st_mtime > min(made)
                              for k in inputs)


def stage_done(stage, s, p):
    """Whether a stage's inputs and outputs exist and its outputs are newer than its inputs (the
    build then skips it unless --force); the model stage also needs --model-steps reached."""
    outputs, inputs = STAGE_FILES[stage]
    if not all(p[k].exists() for k in outputs + inputs) or stale(stage, p):
        return False
    if stage == "model":
        return load_checkpoint(p["ckpt"], what="demo model checkpoint")["step"] >= s.model_steps
    if stage == "bundle":  # the example files too, each of which may have gone missing
        return all((p["examples"] / name).exists() for name in example_files())
    return True


def build(s):
    unknown = [x for x in s.stages if x not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    check_at_least(s, {"threads": 0, "n_train": 1, "n_val": 1, "image_tokenizer_steps": 1,
                       "audio_tokenizer_steps": 1, "tokenizer_batch": 1, "tokenizer_lr": 0,
                       "image_patch_mean": 0, "model_steps": 1, "model_batch": 1, "model_lr": 0,
                       "decoder_steps": 0, "decoder_batch": 1, "decoder_sampled_fills": 0,
                       "n_tune": 1})
    device = pick_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    p = _paths(s.work)
    check_writable(s.work, "--work")
    remove_temps(s.work, dead_only=True)  # what a build killed mid-save left
    t_all = time.time()
    for stage in STAGES:
        if stage not in s.stages:
            continue
        if not s.force and stage_done(stage, s, p):
            print(f"== {stage}: done already (its output exists; --force redoes it)")
            continue
        missing = [k for k in STAGE_FILES[stage][1] if not p[k].exists()]
        if missing:  # an earlier stage left out of --stages and never run
            maker = next(x for x in STAGES if missing[0] in STAGE_FILES[x][0])
            raise UserError(f"the {stage} stage needs {p[missing[0]]}, which the {maker} stage "
                            f"makes: add {maker} to --stages, or build every stage")
        if "ckpt" in STAGE_FILES[stage][1] and not stage_done("model", s, p):  # a killed run's
            raise UserError(f"the {stage} stage needs the model trained to --model-steps "
                            f"{s.model_steps}, and {p['ckpt']} is short of it or older than the "
                            "shards: add model to --stages (it resumes)")
        if stale(stage, p):  # outputs of old inputs: a resume would keep them
            print(f"== {stage} (its inputs changed: redone)", flush=True)
            s_stage = dataclasses.replace(s, force=True)
        else:
            print(f"== {stage}", flush=True)
            s_stage = s
        t0 = time.time()
        if stage in ("data", "bundle"):
            STAGE_RUNS[stage](s_stage, p)
        else:
            STAGE_RUNS[stage](s_stage, p, device)
        print(f"== {stage}: {(time.time() - t0) / 60:.1f} min", flush=True)
    print(f"build finished in {(time.time() - t_all) / 60:.1f} min")


# -----------------------------------------------------------------------------
# command line


@dataclasses.dataclass
class TokenizerSettings:
    """`python -m echoes.demo tokenizer` (one stage of the build, run per modality)."""
    modality: str = setting("image", "which tokenizer", choices=["image", "audio"])
    work: str = setting("demo_build", "the build folder (reads data.npz, writes *_vqgan.pt)")
    steps: int = setting(1200, "optimizer steps (the build: --image-tokenizer-steps 1200, "
                         "--audio-tokenizer-steps 500)")
    batch_size: int = setting(16, "batch size")
    lr: float = setting(2e-3, "peak learning rate")
    patch_mean: float = setting(0.0, "weight of the patch-mean loss (see train_tokenizer; the "
                                "build: --image-patch-mean 1.0 for the image one, 0 for audio)")
    seed: int = setting(0, "seed of the init and the batches")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = setting(True, "show a progress bar")


def tokenizer_main(argv):
    t = parse_settings(TokenizerSettings, argv, description="Train one demo tokenizer.",
                       prog="python -m echoes.demo tokenizer")
    check_at_least(t, {"steps": 1, "batch_size": 1, "lr": 0, "patch_mean": 0})
    if not _paths(t.work)["data"].exists():
        raise UserError(f"{t.work} has no data.npz: run `python -m echoes.demo build` "
                        "(its data stage comes first)")
    train_one_tokenizer(t.modality, t.work, t.steps, t.batch_size, t.lr, t.seed,
                        pick_device(t.device), t.patch_mean, t.progress)


USAGE = """usage: python -m echoes.demo COMMAND [options]

commands:
  build       rebuild the embedded demo (echoes/assets/demo.pt and examples); see `build --help`
  tokenizer   train one demo tokenizer (a stage of build); see `tokenizer --help`"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a missing command, as argparse treats a missing argument: usage, exit 2
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "build":
        build(parse_settings(BuildSettings, argv[1:], description="Rebuild the embedded demo.",
                             prog="python -m echoes.demo build"))
    elif argv[0] == "tokenizer":
        tokenizer_main(argv[1:])
    else:
        raise UserError(f"unknown command {argv[0]!r}; see `python -m echoes.demo --help`")


if __name__ == "__main__":
    run_cli(main)
