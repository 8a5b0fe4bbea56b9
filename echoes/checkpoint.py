"""Loading a model checkpoint for generation: the transformer, its two tokenizers and its stored
sampling settings, as `sample.py`, the embedded demo and `bench/quality.py` all need them.

What a checkpoint holds (`train.py` writes it; the demo bundle `echoes/assets/demo.pt` has the
same layout): {"model": state dict, "config": asdict(EchoesConfig), optional "sampling": {steps,
temperature, guidance, token_temperature}, each one value or a {mode: value} dict, optional
"tokenizers": {"image": {...}, "audio": {...}}: the recipe (image resolution; clip length, mel
frames, sample rate), the codebooks' "fingerprint" when the shards recorded them (a VQGAN given
with another codebook is an error) and, in the demo bundle, the VQGAN weights ("config",
"state_dict")}.
Training state in the file is ignored. Problems a user can fix raise `UserError` (one line).
"""

import dataclasses
from pathlib import Path

from echoes import sampler
from echoes.audio import load_melgan
from echoes.cli import UserError, check_file, load_checkpoint, load_state_strict
from echoes.model import Echoes, EchoesConfig
from echoes.tokenizers import (AudioTokenizer, ImageTokenizer, VQGANConfig, check_modality,
                               codebook_fingerprint, load_vqgan, vqgan_from_checkpoint)

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_BUNDLE = ASSETS / "demo.pt"  # the embedded demo: model + tokenizers + tuned settings
DEMO_EXAMPLES = ASSETS / "examples"  # its example inputs, for runs that name none

AUDIO_RECIPE_KEYS = ("n_samples", "n_frames", "keep_frames", "sample_rate")
# paper Sec. 4.1; guidance per mode: CFG for the audio-generating modes, none for audio -> image
PAPER_SAMPLING = {"steps": 30, "temperature": 9.0, "token_temperature": 1.0,
                  "guidance": {m: s for m, s in sampler.PAPER_GUIDANCE.items() if m != "joint"}}


def load_model(ckpt, source):
    """`Echoes` rebuilt from the checkpoint alone (its stored config), weights loaded strictly
    (fp16 weights, as the demo bundle stores them, are cast to fp32), in eval mode."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) \
            or not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{source} is not an echoes model checkpoint (it needs 'model' and "
                        "'config' entries, as train.py writes them)")
    fields = {f.name for f in dataclasses.fields(EchoesConfig)}
    unknown = sorted(map(str, set(ckpt["config"]) - fields))
    if unknown:
        raise UserError(f"{source}: its config has fields this version of EchoesConfig does not "
                        f"know ({', '.join(unknown[:4])}); use the echoes version that wrote it")
    try:
        config = EchoesConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: its model config is not valid ({e}); re-create the "
                        "checkpoint with train.py") from e
    return load_state_strict(Echoes(config), ckpt["model"], "model checkpoint", source).eval()


def load_tokenizers(ckpt, source, device="cpu", image_vqgan="", audio_vqgan="", vocoder="",
                    trusted=False, flags=True):
    """(ImageTokenizer, AudioTokenizer): VQGAN weights from the given files (released taming /
    SpecVQGAN checkpoints, or files echoes wrote), else the ones embedded in the checkpoint;
    the recipe from the checkpoint's "tokenizers" entry, else the paper's; the vocoder a MelGAN
    file, else Griffin-Lim. `flags`: the caller takes --image-vqgan / --audio-vqgan (named in
    the error when the checkpoint carries no VQGAN)."""
    info = ckpt.get("tokenizers") or {}
    image_info, audio_info = (info.get(m) or {} if isinstance(info, dict) else None
                              for m in ("image", "audio"))
    given = {k: v for part in (image_info, audio_info) if isinstance(part, dict)
             for k, v in part.items() if k in ("resolution",) + AUDIO_RECIPE_KEYS}
    least = {"keep_frames": 0}  # 0: keep every frame; the others count something
    if not (isinstance(image_info, dict) and isinstance(audio_info, dict)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= least.get(k, 1)
            for k, v in given.items()):
        raise UserError(f"{source}: its 'tokenizers' entry is not {{image: {{resolution}}, "
                        "audio: {n_samples, n_frames, keep_frames, sample_rate}} of positive "
                        "integers (keep_frames 0: all); re-create the checkpoint")

    missing = [(flag, what) for flag, path, entry, what in (
        ("image-vqgan", image_vqgan, image_info, "image VQGAN"),
        ("audio-vqgan", audio_vqgan, audio_info, "audio VQGAN"))
        if not path and not isinstance(entry.get("state_dict"), dict)]
    if missing:  # both named at once
        fix = (" and ".join(f"--{flag} PATH" for flag, _ in missing) if flags else
               "give a bundle with its tokenizers inside, as `python -m echoes.demo build` makes")
        raise UserError(f"{source} carries no {' and no '.join(w for _, w in missing)}: "
                        + (f"pass {fix}" if flags else fix))

    def vqgan(path, entry, preset, what):
        if path:
            return load_vqgan(path, preset, trusted=trusted)
        return vqgan_from_checkpoint(entry, preset, f"{what} embedded in {source}")

    image_vq = vqgan(image_vqgan, image_info, VQGANConfig.imagenet_f16_1024(), "image VQGAN")
    audio_vq = vqgan(audio_vqgan, audio_info, VQGANConfig.vggsound_codebook(), "audio VQGAN")
    for modality, vq, path, entry in (("image", image_vq, image_vqgan, image_info),
                                      ("audio", audio_vq, audio_vqgan, audio_info)):
        name = path or f"the {modality} VQGAN in {source}"
        check_modality(vq, modality, name, flags)
        want, got = entry.get("fingerprint"), codebook_fingerprint(vq)
        if want is not None and got != want:  # the shards' tokenizers, recorded by prepare
            raise UserError(f"{name} is not the {modality} VQGAN {source} was trained with (its "
                            f"codebook's fingerprint is {got}, the checkpoint's {want}); pass "
                            "the one its shards were made with")
    melgan = load_melgan(vocoder, trusted=trusted).to(device) if vocoder else None
    image_tok = ImageTokenizer(image_vq.to(device), resolution=image_info.get("resolution"))
    recipe = {k: audio_info[k] for k in AUDIO_RECIPE_KEYS if k in audio_info}
    try:
        audio_tok = AudioTokenizer(audio_vq.to(device), melgan, **recipe)
    except ValueError as e:
        raise UserError(f"the audio recipe of {source} does not fit: {e}") from e
    return image_tok, audio_tok


def check_fit(model, image_tok, audio_tok, source):
    """The model and the tokenizers must agree on token counts and codebook sizes."""
    c = model.config
    for what, tok, length, codebook in (("image", image_tok, c.image_len, c.image_codebook),
                                        ("audio", audio_tok, c.audio_len, c.audio_codebook)):
        h, w = tok.grid
        n_embed = tok.vqgan.config.n_embed
        if h * w != length or n_embed != codebook:
            raise UserError(f"{source} expects {length} {what} tokens over {codebook} codes, but "
                            f"the {what} tokenizer gives {h}x{w} = {h * w} ids over {n_embed} "
                            f"codes: pass the {what} VQGAN the model was trained with")


def stored_sampling(ckpt, mode, source="the checkpoint"):
    """The checkpoint's sampling settings for one mode, else the paper's: {steps, temperature,
    guidance, token_temperature}. Per-mode dicts without an entry for inpaint / continue use
    i2a's (both generate audio from an image); joint, which has nothing to guide by, gets
    guidance 1 (so must a continuation without an image, which only the caller knows of)."""
    try:
        sampler.check_sampling_defaults(ckpt.get("sampling") or {})
    except ValueError as e:
        raise UserError(f"{source}'s {e}; re-save it with valid sampling defaults") from e
    stored = {**PAPER_SAMPLING, **(ckpt.get("sampling") or {})}
    like = "i2a" if mode in ("inpaint", "continue") else mode
    out = {}
    for name in sampler.SAMPLING_KEYS:
        value = stored[name]
        if isinstance(value, dict):  # per mode, e.g. {"i2a": 3.0, "a2i": 1.0}
            paper = PAPER_SAMPLING[name]
            paper = paper.get(mode, 1.0) if isinstance(paper, dict) else paper
            value = value.get(mode, value.get(like, paper))
        out[name] = value
    if mode == "joint":
        out["guidance"] = 1.0
    return out


def load_for_sampling(path=DEMO_BUNDLE, device="cpu", trusted=False, what="checkpoint"):
    """A checkpoint file with embedded tokenizers (the demo bundle) -> (model, image tokenizer,
    audio tokenizer, the checkpoint dict), on `device`, checked to fit together."""
    path = Path(path)
    check_file(path, what, "build it with `python -m echoes.demo build`" if path == DEMO_BUNDLE
               else "check the path")
    ckpt = load_checkpoint(path, trusted=trusted, what=what)
    model = load_model(ckpt, str(path)).to(device)
    image_tok, audio_tok = load_tokenizers(ckpt, str(path), device, flags=False)
    check_fit(model, image_tok, audio_tok, str(path))
    return model, image_tok, audio_tok, ckpt
