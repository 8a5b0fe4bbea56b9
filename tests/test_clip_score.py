"""CS (echoes/clip_score.py) against the public code it follows: OpenAI CLIP's image encoder and
preprocessing (tests/reference/clip_eval.pt) and Wav2CLIP's audio embedding
(tests/reference/wav2clip_eval.pt), each run with the weights of `recipe_weights` and loaded from
files made here in the released formats; then the command line end to end."""

import os
import warnings
import zipfile

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
    to even), RGB, CLIP's normalisation: the same pixels, read back from PNG files; and for
    grey, RGBA and palette files and one whose short side is already 64."""
    for i in range(3):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(clip_ref[f"image{i}"].numpy()).save(path)
        torch.testing.assert_close(cs.read_cs_image(path, 64), clip_ref["pixels"][i],
                                   atol=0, rtol=0)
    for mode in ("L", "RGBA", "P", "RGB_exact"):
        path = tmp_path / f"{mode}.png"
        path.write_bytes(clip_ref[f"mode_{mode}_png"].numpy().tobytes())
        torch.testing.assert_close(cs.read_cs_image(path, 64), clip_ref[f"mode_{mode}_pixels"],
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
    rounded = set(clip_ref["fp16_rounded_keys"].split("\n"))
    for k, v in recipe_weights(plain).items():
        want = v.half().float() if "visual." + k in rounded else v
        torch.testing.assert_close(model.state_dict()[k], want, atol=0, rtol=0, msg=k)


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
        torch.testing.assert_close(torch.cat([model(w[None]) for w in quiet]),
                                   wav2clip_ref["embedding_scaled_each"], atol=1e-4, rtol=1e-5)


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
        if i == 0:  # stereo, the second channel unrelated: the two are averaged
            wav = np.stack([wav, 0.3 * np.sign(np.sin(2 * np.pi * 1500 * t))], 1)
        soundfile.write(os.path.join(folder, f"{stem}.wav"), wav.astype(np.float32), rate)
    return stems


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny TorchScript CLIP with 512-dim features (Wav2CLIP's space) and a Wav2CLIP.pt."""
    folder = tmp_path_factory.mktemp("cs_weights")
    cfg = cs.CLIPVisionConfig(resolution=64, patch=32, width=64, layers=1, heads=1,
                              embed_dim=512)  # ViT-B/32's patches and features, smaller
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


def test_clips_pair_with_the_images_sample_py_made_them_from(tmp_path):
    """cat.wav, cat_2.wav (--num-samples), cat-2.wav and cat_2-3.wav (names taken) all come from
    cat.png; an image of the clip's own name wins (the input itself was named dog_1)."""
    stems = write_pairs(tmp_path, stems=["cat", "dog_1", "dog"])
    for stem in ("cat_2", "cat-2", "cat_2-3", "dog_1-2"):
        soundfile.write(tmp_path / f"{stem}.wav", np.zeros(4000, np.float32), 16000)
    got = {os.path.basename(a): os.path.basename(i) for a, _, i in cs.pairs(tmp_path, tmp_path)}
    assert got == {"cat.wav": "cat.png", "cat_2.wav": "cat.png", "cat-2.wav": "cat.png",
                   "cat_2-3.wav": "cat.png", "dog_1.wav": "dog_1.png", "dog.wav": "dog.png",
                   "dog_1-2.wav": "dog_1.png"}
    assert len(stems) == 3


@pytest.mark.parametrize("case, message", [
    ("missing image", "1 of 3 clips in --audio have no image of the same name"),
    ("two images", "holds two files named clip1 (clip1.jpg, clip1.png)"),
    ("two clips", "holds two files named clip1 (clip1.flac, clip1.wav)"),
    ("no audio flag", "give --audio"),
    ("no clip flag", "give --clip"),
    ("short clip", "too short for Wav2CLIP"),
    ("odd rate", "shares too few factors with 16000 Hz"),
    ("damaged image", "the file is damaged"),
    ("small clip", "16-dim features; Wav2CLIP's audio features are in the space of CLIP ViT-B/32"),
    ("b16 clip", "16-pixel patches"),
    ("resnet clip", "hold no vision transformer"),
    ("flat clip", "hold no vision transformer"),
    ("clip as wav2clip", "is a TorchScript file (OpenAI CLIP's?)"),
    ("damaged torchscript", "damaged TorchScript archive"),
    ("flipped torchscript", "fails its checksum"),
])
def test_command_line_errors_are_one_line(tmp_path, weights, capsys, case, message):
    """Each mistake is one line naming it (exit 2), found before any model runs."""
    write_pairs(tmp_path / "gen")
    clip_path, w2c_path = weights
    argv = ["--audio", str(tmp_path / "gen"), "--clip", clip_path, "--wav2clip", w2c_path,
            "--device", "cpu"]

    def use(flag, value):
        argv[argv.index(flag) + 1] = str(value)

    if case == "missing image":
        os.remove(tmp_path / "gen" / "clip2.png")
    elif case == "two images":
        Image.new("RGB", (8, 8)).save(tmp_path / "gen" / "clip1.jpg")
    elif case == "two clips":
        soundfile.write(tmp_path / "gen" / "clip1.flac", np.zeros(4000, np.float32), 16000)
    elif case == "no audio flag":
        use("--audio", "")
    elif case == "no clip flag":
        use("--clip", "")
    elif case == "short clip":
        soundfile.write(tmp_path / "gen" / "clip1.wav", np.zeros(200, np.float32), 16000)
    elif case == "odd rate":
        soundfile.write(tmp_path / "gen" / "clip1.wav", np.zeros(44101, np.float32), 44101)
    elif case == "damaged image":
        data = (tmp_path / "gen" / "clip1.png").read_bytes()
        (tmp_path / "gen" / "clip1.png").write_bytes(data[:len(data) // 2])
    elif case == "small clip":
        use("--clip", released_clip(tmp_path / "tiny.pt"))  # 16-dim features
    elif case == "b16 clip":
        use("--clip", released_clip(tmp_path / "b16.pt", cs.CLIPVisionConfig(
            resolution=64, patch=16, width=64, layers=1, heads=1, embed_dim=512)))
    elif case in ("resnet clip", "flat clip"):
        sd = ({"visual.layer1.0.conv1.weight": torch.zeros(1)} if case == "resnet clip" else
              {"visual.conv1.weight": torch.zeros(4, 3), "visual.positional_embedding":
               torch.zeros(5, 4), "visual.proj": torch.zeros(4, 512)})
        torch.save(sd, tmp_path / "odd.pt")
        use("--clip", tmp_path / "odd.pt")
    elif case == "clip as wav2clip":
        use("--wav2clip", clip_path)
    elif case == "flipped torchscript":  # one bit of a tensor changed
        data = bytearray(open(clip_path, "rb").read())
        data[len(data) // 2] ^= 0x01
        (tmp_path / "flipped.pt").write_bytes(bytes(data))
        use("--clip", tmp_path / "flipped.pt")
    else:  # a readable zip whose pickled module is garbage
        with zipfile.ZipFile(clip_path) as src, zipfile.ZipFile(tmp_path / "torn.pt", "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                dst.writestr(item, b"garbage" if item.filename.endswith("data.pkl") else data)
        use("--clip", tmp_path / "torn.pt")
    code, out, err = run_command(cs.main, argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_nan_audio_is_a_one_line_error(tmp_path, weights, capsys):
    """Found when the clip is read (headers are read up front, samples once)."""
    write_pairs(tmp_path / "gen")
    soundfile.write(tmp_path / "gen" / "clip1.wav", np.full(4000, np.nan, np.float32), 16000,
                    subtype="FLOAT")
    clip_path, w2c_path = weights
    code, out, err = run_command(cs.main, ["--audio", tmp_path / "gen", "--clip", clip_path,
                                           "--wav2clip", w2c_path, "--device", "cpu"], capsys)
    assert code == 2 and "holds NaN or infinite samples" in err.strip().splitlines()[-1], err
