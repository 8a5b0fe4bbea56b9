"""CS (echoes/clip_score.py) against the public code it follows: OpenAI CLIP's image encoder and
preprocessing (tests/reference/clip_eval.pt) and Wav2CLIP's audio embedding
(tests/reference/wav2clip_eval.pt), each run with the weights of `recipe_weights` and loaded from
files made here in the released formats; then the command line end to end."""

import os
import warnings

import numpy as np
import pytest
import soundfile
import torch
import torch.nn as nn
from PIL import Image

from conftest import recipe_weights, run_command
from echoes import clip_score as cs

REF = os.path.join(os.path.dirname(__file__), "reference")
TINY = cs.CLIPVisionConfig(resolution=64, patch=16, width=64, layers=2, heads=1, embed_dim=16)


@pytest.fixture(scope="module")
def clip_ref():
    return torch.load(os.path.join(REF, "clip_eval.pt"), weights_only=True)


@pytest.fixture(scope="module")
def wav2clip_ref():
    return torch.load(os.path.join(REF, "wav2clip_eval.pt"), weights_only=True)


class ReleasedCLIP(nn.Module):
    """What OpenAI's TorchScript files hold: `visual.*`, the text side (one entry of it stands in
    here) and three scalar entries that build_model drops."""

    def __init__(self, cfg):
        super().__init__()
        self.visual = cs.CLIPVision(cfg)
        self.text_projection = nn.Parameter(torch.zeros(8, cfg.embed_dim))
        for name, value in (("input_resolution", cfg.resolution), ("context_length", 8),
                            ("vocab_size", 64)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, x):
        return self.visual(x)


def released_clip(path, cfg=TINY):
    """A TorchScript CLIP file at `path` whose vision weights are the recipe's (fp32)."""
    model = ReleasedCLIP(cfg)
    model.visual.load_state_dict(recipe_weights(model.visual))
    with warnings.catch_warnings():  # the tracer's notes on shapes read as Python values
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # OpenAI's files are TorchScript
        traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, cfg.resolution, cfg.resolution),
                                 check_trace=False)
    traced.save(str(path))
    return path


def released_wav2clip(path):
    """A Wav2CLIP.pt at `path` in the released layout (a flat state dict with the training's image
    projection and loss scales beside the audio entries), with the recipe's weights."""
    model = cs.Wav2CLIP()
    sd = recipe_weights(model, keep=("audio_encoder.spectrogram.",))
    sd = {**sd, "image_transform.sequential.0.weight": torch.zeros(4, 4),
          "loss_fn_image.logit_scale": torch.tensor(2.0)}
    torch.save(sd, path)
    return path


def test_clip_preprocessing_matches_clip_transform(clip_ref, tmp_path):
    """Short side to 64 bicubically (torchvision's sizes), centre crop with its rounding (halves
    to even), RGB, CLIP's normalisation: the same pixels, read back from PNG files."""
    for i in range(3):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(clip_ref[f"image{i}"].numpy()).save(path)
        torch.testing.assert_close(cs.read_cs_image(path, 64), clip_ref["pixels"][i],
                                   atol=0, rtol=0)


def test_clip_vision_matches_encode_image(clip_ref, tmp_path):
    """A TorchScript file loaded as clip.load(jit=False) builds it (sizes read from the weights,
    fp16 rounding where build_model stores fp16, fp32 compute): encode_image's features."""
    model = cs.load_clip_vision(released_clip(tmp_path / "clip.pt"))
    assert model.cfg == TINY
    with torch.no_grad():
        got = model(clip_ref["pixels"])
    torch.testing.assert_close(got, clip_ref["features"], atol=1e-5, rtol=1e-5)
    # and without the rounding the features are the unrounded weights' (so it is tested)
    plain = cs.CLIPVision(TINY)
    plain.load_state_dict(recipe_weights(plain))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(clip_ref["pixels"]),
                                   clip_ref["features_fp32_weights"], atol=1e-5, rtol=1e-5)
    rounded = {"visual." + k for k in model.state_dict()
               if k == "proj" or k.endswith(cs.HALF_KEYS)}
    assert rounded == set(clip_ref["fp16_rounded_keys"].split("\n"))


def test_clip_vision_keys_and_sizes_are_vit_b32s(clip_ref):
    """Our names and shapes at the default config are the released ViT-B/32's `visual.*`, and
    the sizes read back from them are that config."""
    released = dict(line.split(" ", 1) for line in clip_ref["vitb32_visual_keys"].split("\n"))
    with torch.device("meta"):
        model = cs.CLIPVision()
    ours = {"visual." + k: str(tuple(v.shape)) for k, v in model.state_dict().items()}
    assert ours == released
    sd = {k: torch.empty(0).new_empty(v.shape, device="meta") for k, v in
          (("visual." + k, v) for k, v in model.state_dict().items())}
    assert cs.clip_vision_config(sd, "ViT-B-32.pt") == cs.CLIPVisionConfig()


def test_wav2clip_matches_embed_audio(wav2clip_ref, tmp_path):
    """The released checkpoint layout loads (its other entries left out) and each clip embedded
    alone gives embed_audio's features of that clip alone; a batch gives the batch's (Wav2CLIP
    normalises over the batch), which is why CS embeds one clip at a time."""
    model = cs.load_wav2clip(released_wav2clip(tmp_path / "Wav2CLIP.pt"))
    assert list(model.state_dict()) == wav2clip_ref["checkpoint_keys"].split("\n")
    with torch.no_grad():
        each = torch.cat([model(w[None]) for w in wav2clip_ref["wav"]])
        torch.testing.assert_close(each, wav2clip_ref["embedding_each"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(model(wav2clip_ref["wav_odd"][None]),
                                   wav2clip_ref["embedding_odd"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(model(wav2clip_ref["wav"]), wav2clip_ref["embedding"],
                                   atol=1e-4, rtol=1e-5)
        quiet = torch.stack([wav2clip_ref["wav"][0], wav2clip_ref["wav"][1] * 0.01])
        torch.testing.assert_close(model(quiet), wav2clip_ref["embedding_scaled"], atol=1e-4,
                                   rtol=1e-5)
    assert not torch.allclose(wav2clip_ref["embedding_scaled"],
                              wav2clip_ref["embedding_scaled_each"], atol=1e-2)


def test_score_is_100_times_the_mean_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [0.0, -1.0], [4.0, -3.0]])
    assert cs.clip_score(a, b) == pytest.approx(100 * (1 - 1 + 0) / 3)
    assert cs.clip_score(a, 5 * a) == pytest.approx(100)


def write_pairs(folder, n=3, rate=22050, stems=None):
    """n images and n clips of the same names (one clip stereo), in `folder`."""
    g = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    stems = stems or [f"clip{i}" for i in range(n)]
    for i, stem in enumerate(stems):
        Image.fromarray(g.integers(0, 256, (40 + 7 * i, 52, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{stem}.png"))
        t = np.arange(int(rate * 0.6)) / rate
        wav = 0.3 * np.sin(2 * np.pi * (300 + 100 * i) * t) + 0.02 * g.standard_normal(len(t))
        wav = np.stack([wav, 0.5 * wav], 1) if i == 0 else wav
        soundfile.write(os.path.join(folder, f"{stem}.wav"), wav.astype(np.float32), rate)
    return stems


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny TorchScript CLIP with 512-dim features (Wav2CLIP's space) and a Wav2CLIP.pt."""
    folder = tmp_path_factory.mktemp("cs_weights")
    cfg = cs.CLIPVisionConfig(resolution=64, patch=16, width=64, layers=1, heads=1,
                              embed_dim=512)
    return (str(released_clip(folder / "clip.pt", cfg)),
            str(released_wav2clip(folder / "Wav2CLIP.pt")))


def test_command_line_scores_the_pairs(tmp_path, weights, capsys, one_thread):
    """Joint-mode layout (both in one folder): the printed CS is 100 times the mean cosine of
    each image's CLIP features and its clip's Wav2CLIP features (channels averaged, 16 kHz)."""
    stems = write_pairs(tmp_path / "gen")
    clip_path, w2c_path = weights
    code, out, err = run_command(cs.main, ["--audio", tmp_path / "gen", "--clip", clip_path,
                                           "--wav2clip", w2c_path, "--device", "cpu"], capsys)
    assert code == 0, err
    printed = float(out.strip().splitlines()[-1].split("|")[2])
    clip, w2c = cs.load_clip_vision(clip_path), cs.load_wav2clip(w2c_path)
    cos = []
    with torch.no_grad():
        for stem in stems:
            img = cs.clip_pixels(Image.open(tmp_path / "gen" / f"{stem}.png"), 64)
            data, rate = soundfile.read(tmp_path / "gen" / f"{stem}.wav", always_2d=True,
                                        dtype="float32")
            wav = cs.resample_like_torchaudio(torch.from_numpy(data.mean(1)), rate, 16000)
            cos.append(torch.cosine_similarity(clip(img[None]), w2c(wav[None])).item())
    assert printed == pytest.approx(100 * np.mean(cos), abs=0.006)


@pytest.mark.parametrize("case, message", [
    ("missing image", "1 of 3 clips in --audio have no image of the same name"),
    ("two images", "holds two images named clip1"),
    ("no clip flag", "give --clip"),
    ("short clip", "too short for Wav2CLIP"),
    ("wide clip", "512-dim space: give ViT-B-32.pt"),
    ("resnet clip", "hold no vision transformer"),
])
def test_command_line_errors_are_one_line(tmp_path, weights, capsys, case, message):
    write_pairs(tmp_path / "gen")
    clip_path, w2c_path = weights
    argv = ["--audio", str(tmp_path / "gen"), "--clip", clip_path, "--wav2clip", w2c_path,
            "--device", "cpu"]
    if case == "missing image":
        os.remove(tmp_path / "gen" / "clip2.png")
    elif case == "two images":
        Image.new("RGB", (8, 8)).save(tmp_path / "gen" / "clip1.jpg")
    elif case == "no clip flag":
        argv[argv.index("--clip") + 1] = ""
    elif case == "short clip":
        soundfile.write(tmp_path / "gen" / "clip1.wav", np.zeros(200, np.float32), 16000)
    elif case == "wide clip":
        argv[argv.index("--clip") + 1] = str(released_clip(tmp_path / "tiny.pt"))  # 16-dim
    else:
        torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1), "text_projection":
                    torch.zeros(1, 1)}, tmp_path / "rn50.pt")
        argv[argv.index("--clip") + 1] = str(tmp_path / "rn50.pt")
    code, out, err = run_command(cs.main, argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
