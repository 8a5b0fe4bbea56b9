"""`sample.py`, the command line: the files it promises and its one-line errors (exit code 2).

The test makes a tiny random model and tiny VQGANs (16-code books; images 16 px -> 4x4 ids,
0.36 s clips -> 80x32 mels -> 5x2 ids), saves them the way `train.py` and echoes's tokenizer
training write them, and runs the script: through a subprocess for a few cases (the real entry
point) and in-process through `run_cli` for the rest, to stay fast.
"""

import dataclasses
import io
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from conftest import run_command
from echoes.cli import run_cli
from echoes.model import Echoes, EchoesConfig
from echoes.tokenizers import VQGAN, VQGANConfig, codebook_fingerprint

ROOT = Path(__file__).resolve().parents[1]
N_FRAMES = 32
N_SAMPLES = (N_FRAMES - 1) * 256  # 1 + N_SAMPLES // 256 = 32 mel frames: 0.36 s at 22050 Hz
RECIPE = {"image": {"resolution": 16},
          "audio": {"n_samples": N_SAMPLES, "n_frames": N_FRAMES, "sample_rate": 22050}}

spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def tiny_vqgans():
    torch.manual_seed(0)
    small = dict(ch=32, num_res_blocks=1, attn_resolutions=(), z_channels=8, embed_dim=8,
                 n_embed=16)
    image = VQGANConfig(ch_mult=(1, 1, 1), resolution=16, **small)  # 16 px -> 4x4
    audio = VQGANConfig(ch_mult=(1, 1, 1, 1, 1), resolution=N_FRAMES, in_channels=1, out_ch=1,
                        **small)  # (80, 32) -> 5x2
    return {"image": (image, VQGAN(image)), "audio": (audio, VQGAN(audio))}


def tiny_checkpoint(**config_overrides):
    torch.manual_seed(0)
    config = EchoesConfig(**{**dict(audio_len=10, image_len=16, audio_codebook=16,
                                    image_codebook=16, enc_dim=32, enc_depth=1, enc_heads=2,
                                    dec_dim=32, dec_depth=1, dec_heads=2, dropout=0.0),
                             **config_overrides})
    return {"model": Echoes(config).state_dict(), "config": dataclasses.asdict(config),
            "sampling": {"steps": 3}, "tokenizers": RECIPE, "step": 10, "optimizer": {}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = {}
    vqgans = tiny_vqgans()
    for m, (config, vq) in vqgans.items():  # echoes's own layout: config next to the weights
        out[f"{m}_vqgan"] = d / f"{m}_vqgan.pt"
        torch.save({"config": dataclasses.asdict(config), "state_dict": vq.state_dict()},
                   out[f"{m}_vqgan"])
    out["ckpt"] = d / "model.pt"
    torch.save(tiny_checkpoint(), out["ckpt"])
    out["mismatched"] = d / "mismatched.pt"  # a model for 5x5 image ids
    torch.save(tiny_checkpoint(image_len=25), out["mismatched"])
    out["other_codes"] = d / "other_codes.pt"  # image ids over 32 codes, the VQGAN has 16
    torch.save(tiny_checkpoint(image_codebook=32), out["other_codes"])
    out["other_audio"] = d / "other_audio.pt"  # 12 audio ids, the audio VQGAN gives 5 x 2
    torch.save(tiny_checkpoint(audio_len=12), out["other_audio"])
    broken = tiny_checkpoint()
    broken["model"].pop("mask_emb")
    out["broken"] = d / "broken.pt"
    torch.save(broken, out["broken"])
    diverged = tiny_checkpoint()
    diverged["model"]["mask_emb"][0] = float("nan")
    out["diverged"] = d / "diverged.pt"
    torch.save(diverged, out["diverged"])
    nan_vqgan = tiny_vqgans()["image"]
    nan_state = {k: v.clone() for k, v in nan_vqgan[1].state_dict().items()}
    nan_state["quantize.embedding.weight"][3] = float("inf")
    out["nan_image_vqgan"] = d / "nan_image_vqgan.pt"
    torch.save({"config": dataclasses.asdict(nan_vqgan[0]), "state_dict": nan_state},
               out["nan_image_vqgan"])
    # the demo bundle layout: the tokenizers' weights travel inside the model checkpoint
    bundle = tiny_checkpoint()
    bundle["tokenizers"] = {m: {**RECIPE[m], "config": dataclasses.asdict(config),
                                "state_dict": vq.state_dict()}
                            for m, (config, vq) in vqgans.items()}
    out["bundle"] = d / "demo.pt"
    torch.save(bundle, out["bundle"])
    rng = np.random.default_rng(0)
    for name, size in (("cat", (24, 20)), ("dog", (16, 16))):
        out[name] = d / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(out[name])
    t = np.arange(int(0.3 * 16000)) / 16000  # 0.3 s at 16 kHz: resampled and zero-padded
    out["bark"] = d / "bark.wav"
    soundfile.write(out["bark"], 0.5 * np.sin(2 * np.pi * 440 * t), 16000)
    out["folder"] = d / "folder"
    out["folder"].mkdir()
    out["zero_bytes"] = d / "zero_bytes.png"
    out["zero_bytes"].write_bytes(b"")
    out["cut_png"] = d / "cut.png"
    out["cut_png"].write_bytes(out["cat"].read_bytes()[:100])  # a PNG cut short
    for name, image_print in (("other_codebook", "0" * 16), ("same_codebook", None)):
        ckpt = tiny_checkpoint()  # shards' fingerprints of the codebooks (prepare records them)
        ckpt["tokenizers"] = {m: {**RECIPE[m], "fingerprint": codebook_fingerprint(vq)}
                              for m, (_, vq) in vqgans.items()}
        ckpt["tokenizers"]["image"]["fingerprint"] = (
            image_print or ckpt["tokenizers"]["image"]["fingerprint"])
        out[name] = d / f"{name}.pt"
        torch.save(ckpt, out[name])
    out["garbage"] = d / "garbage.png"
    out["garbage"].write_bytes(b"not an image at all")
    out["garbage_wav"] = d / "garbage.wav"
    out["garbage_wav"].write_bytes(b"RIFF but not really a wave file")
    out["garbage_ckpt"] = d / "garbage.pt"
    out["garbage_ckpt"].write_bytes(b"not a checkpoint")
    out["empty_wav"] = d / "empty.wav"
    soundfile.write(out["empty_wav"], np.zeros(0, dtype=np.float32), 16000)
    out["nan_wav"] = d / "nan.wav"
    soundfile.write(out["nan_wav"], np.full(1000, np.nan, dtype=np.float32), 16000,
                    subtype="FLOAT")
    bad = tiny_checkpoint()
    bad["config"]["enc_heads"] = 3  # width 32
    out["bad_config"] = d / "bad_config.pt"
    torch.save(bad, out["bad_config"])
    bad = tiny_checkpoint()
    bad["tokenizers"] = {**RECIPE, "audio": {**RECIPE["audio"], "sample_rate": 0}}
    out["bad_recipe"] = d / "bad_recipe.pt"
    torch.save(bad, out["bad_recipe"])
    bad["tokenizers"] = {**RECIPE, "audio": {**RECIPE["audio"], "sample_rate": 500}}
    out["low_rate_recipe"] = d / "low_rate_recipe.pt"
    torch.save(bad, out["low_rate_recipe"])
    bad = tiny_checkpoint()
    bad["sampling"] = {"steps": 8.0}
    out["bad_sampling"] = d / "bad_sampling.pt"
    torch.save(bad, out["bad_sampling"])
    out["a_file"] = d / "a_file.txt"
    out["a_file"].write_text("not a folder")
    return out


def args(files, *extra, ckpt=True, tokenizers=True):
    a = ["--ckpt", str(files["ckpt"])] if ckpt else []
    if tokenizers:
        a += ["--image-vqgan", str(files["image_vqgan"]), "--audio-vqgan",
              str(files["audio_vqgan"])]
    return a + [str(x) for x in extra]


def run_in_process(argv, capsys):
    """(exit code, stdout lines, stderr lines)."""
    code, out, err = run_command(cli.main, argv, capsys)
    # tqdm redraws its bar with carriage returns: keep only real lines
    return code, out.splitlines(), [line for line in err.splitlines() if line.startswith("error")]


def check_wav(path, n=N_FRAMES * 256):
    """A rendering of the mel's frames (n = N_FRAMES * 256), or a clip spliced into the input
    (n = N_SAMPLES)."""
    wav, sr = soundfile.read(path)
    assert sr == 22050 and wav.shape == (n,) and np.isfinite(wav).all()


# -----------------------------------------------------------------------------
# the files it promises


def test_i2a_subprocess_writes_wav_and_mel_per_sample(files, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--mode", "i2a", "--image",
                        files["cat"], files["dog"], "--num-samples", "2", "--batch-size", "3",
                        "--out", out, *args(files)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = [out / f"{stem}_{k}{suffix}" for stem in ("cat", "dog") for k in (1, 2)
                for suffix in (".wav", "_mel.png")]
    assert sorted(r.stdout.split()) == sorted(map(str, expected))
    for path in expected:
        assert path.is_file()
    check_wav(out / "cat_1.wav")
    assert Image.open(out / "cat_1_mel.png").size == (2 * N_FRAMES, 2 * 80)


def test_a_reader_that_stops_early_leaves_the_run_writing_its_files(files, tmp_path):
    # `sample.py ... | head -1`: the reader closes the pipe after the first path
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--mode", "joint",
                             "--num-samples", "3", "--batch-size", "1", "--out", out,
                             *args(files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert b"joint_000." in first and "Traceback" not in err
    assert len(list(out.glob("joint_*.wav"))) == 3  # every sample, printed or not


def test_ids_do_not_depend_on_the_batch_size(files, tmp_path, capsys, monkeypatch):
    calls, generate = [], cli.sampler.generate

    def recording(*a, **kw):
        out = generate(*a, **kw)
        calls.append(out[0])
        return out

    monkeypatch.setattr(cli.sampler, "generate", recording)
    monkeypatch.setattr(cli, "write_outputs", lambda *a: [])  # the ids are what is compared
    results = {}
    for b in (1, 3):
        calls.clear()
        code, _, _ = run_in_process(["--mode", "i2a", "--image", files["cat"], files["dog"],
                                     "--num-samples", "2", "--batch-size", str(b),
                                     "--out", tmp_path, *args(files)], capsys)
        assert code == 0
        results[b] = (len(calls), torch.cat(calls))
    assert results[1][0] == 4 and results[3][0] == 2
    assert torch.equal(results[1][1], results[3][1])
    assert len({tuple(row.tolist()) for row in results[1][1]}) == 4  # four distinct samples


def test_each_sample_gets_its_input_its_settings_and_its_seed(files, tmp_path, capsys,
                                                              monkeypatch):
    calls = []

    def recording(model, mode, **kw):
        states = [g.get_state() for g in kw["generator"]]  # before the loop draws from them
        calls.append((kw, states))
        B = kw["batch_size"]
        return (torch.zeros(B, model.config.audio_len, dtype=torch.long),
                torch.zeros(B, model.config.image_len, dtype=torch.long))

    monkeypatch.setattr(cli.sampler, "generate", recording)
    monkeypatch.setattr(cli, "write_outputs", lambda *a: [])
    code, _, _ = run_in_process(["--mode", "i2a", "--image", files["cat"], files["dog"],
                                 "--num-samples", "2", "--batch-size", "3", "--steps", "5",
                                 "--temperature", "4", "--guidance", "2.5", "--seed", "7",
                                 "--out", tmp_path, *args(files)], capsys)
    assert code == 0 and [kw["batch_size"] for kw, _ in calls] == [3, 1]
    images = torch.cat([kw["image_ids"] for kw, _ in calls])  # (4, Lv): cat, cat, dog, dog
    assert torch.equal(images[0], images[1]) and torch.equal(images[2], images[3])
    assert not torch.equal(images[1], images[2])
    for kw, _ in calls:
        assert (kw["steps"], kw["temperature"], kw["guidance"]) == (5, 4.0, 2.5)
    states = [state for _, batch in calls for state in batch]
    want = [g.get_state() for g in cli.sampler.sample_generators(7, 4)]
    assert all(torch.equal(a, b) for a, b in zip(states, want))  # sample j: (--seed, j)
    calls.clear()  # no flags: the checkpoint's own, else the paper's (N 30, T 9, s 3 for i2a)
    assert run_in_process(["--mode", "i2a", "--image", files["cat"], "--out", tmp_path,
                           *args(files)], capsys)[0] == 0
    (kw, _), = calls
    stored = torch.load(files["ckpt"], weights_only=True).get("sampling") or {}
    want = {"steps": 30, "temperature": 9.0, "guidance": 3.0, **stored}
    assert (kw["steps"], kw["temperature"], kw["guidance"]) == (
        want["steps"], want["temperature"], want["guidance"])


def test_a2i_writes_png(files, tmp_path, capsys):
    code, out, _ = run_in_process(["--mode", "a2i", "--audio", files["bark"], "--out", tmp_path,
                                   *args(files)], capsys)
    assert code == 0 and out == [str(tmp_path / "bark.png")]
    assert Image.open(tmp_path / "bark.png").size == (16, 16)


def test_inputs_of_one_name_get_their_folders_in_the_output_name(files, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "0001.wav").write_bytes(files["bark"].read_bytes())
    long = tmp_path / ("x" * 240 + ".wav")  # its outputs' names would pass 255 bytes
    long.write_bytes(files["bark"].read_bytes())
    inputs = [tmp_path / "a" / "0001.wav", tmp_path / "b" / "0001.wav", files["bark"],
              files["bark"], long]  # bark twice: numbered, as an earlier output would be
    code, out, _ = run_in_process(["--mode", "a2i", "--audio", *inputs, "--out", tmp_path / "o",
                                   "--num-samples", "2", *args(files)], capsys)
    assert code == 0
    assert out[:8] == [str(tmp_path / "o" / name) for name in
                       ("a_0001_1.png", "a_0001_2.png", "b_0001_1.png", "b_0001_2.png",
                        "bark_1.png", "bark_2.png", "bark_1-2.png", "bark_2-2.png")]
    assert [len(Path(path).name) for path in out[8:]] == [206, 206]  # 200 + "_1.png"
    assert all(Path(path).name.startswith("x" * 191 + "-") for path in out[8:])


@pytest.mark.parametrize("mode, inputs", [("i2a", ["--image", "cat", "dog", "cat2"]),
                                         ("a2i", ["--audio", "bark", "bark2"]), ("joint", [])])
def test_a_killed_run_resumes_with_skip_existing(files, tmp_path, capsys, mode, inputs):
    (tmp_path / "cat2.png").write_bytes(files["cat"].read_bytes())
    (tmp_path / "bark2.wav").write_bytes(files["bark"].read_bytes())
    files = {**files, "cat2": tmp_path / "cat2.png", "bark2": tmp_path / "bark2.wav"}
    inputs = [files.get(x, x) for x in inputs]
    common = ["--mode", mode, *inputs, "--num-samples", "2", "--batch-size", "3", *args(files)]
    code, whole, _ = run_in_process([*common, "--out", tmp_path / "whole"], capsys)
    names = cli.output_names(cli.parse_settings(cli.Settings, [str(a) for a in common]))
    endings = cli.output_endings(mode)
    assert code == 0 and len(names) == (2 if mode == "joint" else 2 * len(inputs) - 2)
    assert sorted(whole) == sorted(str(tmp_path / "whole" / (n + e))
                                   for n in names for e in endings)
    # a run killed after some samples: the first one whole, one file of the second, none after
    part = tmp_path / "part"
    part.mkdir()
    for n, e in [(names[0], e) for e in endings] + [(names[1], endings[-1])]:
        (part / (n + e)).write_bytes((tmp_path / "whole" / (n + e)).read_bytes())
    code, out, err = run_in_process([*common, "--out", part, "--skip-existing"], capsys)
    assert code == 0 and not err
    want = [(names[1], e) for e in endings[:-1]] + [(n, e) for n in names[2:] for e in endings]
    assert out == [str(part / (n + e)) for n, e in want]  # no NAME-2: the missing files only
    for n in names:  # every file as the whole run wrote it
        for e in endings:
            assert (part / (n + e)).read_bytes() == (tmp_path / "whole" / (n + e)).read_bytes()
    code, out, _ = run_in_process([*common, "--out", part, "--skip-existing"], capsys)
    assert code == 0 and out == []  # all there: nothing to do
    if mode != "joint":  # and no input read: a damaged one is no matter
        files[inputs[-1].stem].write_bytes(b"damaged")
        code, out, _ = run_in_process([*common, "--out", part, "--skip-existing"], capsys)
        assert code == 0 and out == []
    if mode != "joint":  # --out holding the inputs: they would count as outputs
        code, _, err = run_in_process([*common, "--out", tmp_path, "--skip-existing"], capsys)
        assert code == 2 and "holds its inputs (whose names its outputs share)" in err[0]
    if mode == "i2a":  # one input given twice: two samples of one name
        code, _, err = run_in_process(["--mode", mode, *inputs, files["cat"], "--out", part,
                                       "--skip-existing", *args(files)], capsys)
        assert code == 2 and "--skip-existing needs one output name per sample" in err[0]


def test_joint_writes_numbered_pairs(files, tmp_path, capsys):
    code, out, _ = run_in_process(["--mode", "joint", "--num-samples", "3", "--batch-size", "2",
                                   "--out", tmp_path, *args(files)], capsys)
    assert code == 0
    for j in range(3):
        for suffix in (".png", ".wav", "_mel.png"):
            assert str(tmp_path / f"joint_{j:03d}{suffix}") in out
    check_wav(tmp_path / "joint_002.wav")


@pytest.mark.parametrize("mode, extra", [
    ("inpaint", ["--image", "cat", "--start", "0.1", "--end", "0.2"]),
    ("continue", ["--start", "0.2"]),
    ("continue", ["--image", "cat", "--start", "0.2", "--guidance", "2"]),
])
def test_inpaint_and_continue_write_wav_and_mel(files, tmp_path, capsys, mode, extra):
    extra = [files[x] if x in files else x for x in extra]
    code, out, _ = run_in_process(["--mode", mode, "--audio", files["bark"], *extra,
                                   "--out", tmp_path, *args(files)], capsys)
    assert code == 0
    assert out == [str(tmp_path / "bark.wav"), str(tmp_path / "bark_mel.png")]
    check_wav(tmp_path / "bark.wav", N_SAMPLES)


def test_inpainting_keeps_the_inputs_waveform_outside_the_stretch(files, tmp_path, capsys):
    from echoes.audio import fit_clip, load_audio
    original = fit_clip(load_audio(files["bark"], 22050), N_SAMPLES).numpy()  # (N_SAMPLES,)
    common = ["--mode", "inpaint", "--audio", files["bark"], "--image", files["cat"], "--start",
              "0.2", *args(files)]
    code, _, _ = run_in_process([*common, "--out", tmp_path / "a"], capsys)
    wav, _ = soundfile.read(tmp_path / "a" / "bark.wav")
    code2, _, _ = run_in_process([*common, "--no-splice", "--out", tmp_path / "b"], capsys)
    rendering, _ = soundfile.read(tmp_path / "b" / "bark.wav")
    assert code == code2 == 0 and wav.shape == original.shape
    # the stretch starts at 0.180 s (the note's); 20 ms of crossfade before it
    before = round((0.180 - 0.021) * 22050)
    np.testing.assert_allclose(wav[:before], original[:before], atol=1e-4)
    assert np.abs(wav[before + 500:] - original[before + 500:]).max() > 0.01  # regenerated
    assert rendering.shape == (N_FRAMES * 256,)  # the paper's output: the mel's rendering


def test_each_inpainted_clip_keeps_its_own_inputs_waveform(files, tmp_path, capsys):
    from echoes.audio import fit_clip, load_audio
    t = np.arange(int(0.3 * 16000)) / 16000
    other = tmp_path / "meow.wav"
    soundfile.write(other, 0.5 * np.sin(2 * np.pi * 660 * t), 16000)  # another clip
    code, _, _ = run_in_process(["--mode", "inpaint", "--audio", files["bark"], other, "--image",
                                 files["cat"], "--start", "0.2", "--batch-size", "1", "--out",
                                 tmp_path / "out", *args(files)], capsys)
    assert code == 0
    before = round((0.180 - 0.021) * 22050)  # up to the crossfade before the stretch
    from echoes.audio import save_mel_png
    from echoes.checkpoint import load_tokenizers
    _, audio_tok = load_tokenizers(torch.load(files["ckpt"], weights_only=True), "test", "cpu",
                                   files["image_vqgan"], files["audio_vqgan"])
    for name, source in (("bark", files["bark"]), ("meow", other)):
        wav, _ = soundfile.read(tmp_path / "out" / f"{name}.wav")
        original = fit_clip(load_audio(source, 22050), N_SAMPLES).numpy()
        np.testing.assert_allclose(wav[:before], original[:before], atol=1e-4)
        # the picture is the spliced clip's mel, not the rendering's
        save_mel_png(audio_tok.wav_to_mel(torch.from_numpy(wav).float()), tmp_path / "want.png")
        got = np.asarray(Image.open(tmp_path / "out" / f"{name}_mel.png"), dtype=int)
        assert np.abs(got - np.asarray(Image.open(tmp_path / "want.png"), dtype=int)).max() <= 3


def test_the_stretch_follows_the_recipes_column_edges_not_an_even_split():
    from echoes import sampler
    from echoes.tokenizers import AudioTokenizer
    config = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                         z_channels=8, embed_dim=8, n_embed=16, resolution=848, in_channels=1,
                         out_ch=1)
    tok = AudioTokenizer(VQGAN(config))  # the VGGSound recipe: (80, 848) -> 5 x 53 ids
    edges = tok.column_edges()  # column 0 ends at 0.250 s (an even split: 0.189 s)
    s = dataclasses.replace(cli.Settings(), mode="inpaint", start=0.2, end=0.24)
    hidden = sampler.hidden_columns(cli.audio_keep(s, tok), tok.grid)
    assert float(edges[1]) > 0.24 and hidden.nonzero().flatten().tolist() == [0]


def test_the_regenerated_stretch_is_named_and_an_end_just_past_the_clip_is_its_end(
        files, tmp_path, capsys):
    duration = N_SAMPLES / 22050  # 0.36 s in 2 token columns
    argv = ["--mode", "inpaint", "--audio", files["bark"], "--image", files["cat"], "--start",
            "0.2", "--end", f"{duration + 0.12:.2f}", "--out", tmp_path, *args(files)]
    run_cli(cli.main, [str(a) for a in argv])  # 0.12 s past the end: within one column
    err = capsys.readouterr().err
    assert f"note: regenerating 0.180-{duration:.3f} s of the clip (whole token columns of " \
           "0.186 s)" in err, err
    assert (tmp_path / "bark.wav").exists()
    argv[argv.index("--end") + 1] = f"{duration + 0.25:.2f}"  # more than a column past: refused
    code, _, err = run_in_process(argv, capsys)
    assert code == 2 and len(err) == 1 and "outside the clip" in err[0]


def test_a_louder_than_full_scale_vocoding_is_scaled_not_clipped(files, tmp_path, capsys,
                                                                  monkeypatch):
    from echoes.tokenizers import AudioTokenizer
    t = torch.arange(N_FRAMES * 256) / 22050
    loud = 2.5 * torch.sin(2 * torch.pi * 440 * t)  # (T,) peaks at 2.5
    monkeypatch.setattr(AudioTokenizer, "mel_to_wav", lambda self, mel, generator=None:
                        loud[None].repeat(mel.shape[0], 1))
    code, out, _ = run_in_process(["--mode", "i2a", "--image", files["cat"], "--out", tmp_path,
                                   *args(files)], capsys)
    wav, _ = soundfile.read(tmp_path / "cat.wav")
    assert code == 0 and 0.99 < np.abs(wav).max() <= 1.0
    np.testing.assert_allclose(wav, loud.numpy() / 2.5, atol=1e-4)  # the shape kept


def test_the_demo_bundle_plugs_in_without_ckpt(files, tmp_path, capsys, monkeypatch):
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "tone.png").write_bytes(files["dog"].read_bytes())
    monkeypatch.setattr(cli, "DEMO_BUNDLE", files["bundle"])
    monkeypatch.setattr(cli, "DEMO_EXAMPLES", examples)
    code, out, err = run_in_process(["--mode", "i2a", "--image", files["cat"], "--out", tmp_path],
                                    capsys)
    assert code == 0, err
    assert out == [str(tmp_path / "cat.wav"), str(tmp_path / "cat_mel.png")]
    # no input named: the demo's example
    code, out, err = run_in_process(["--mode", "i2a", "--out", tmp_path], capsys)
    assert code == 0 and out == [str(tmp_path / "tone.wav"), str(tmp_path / "tone_mel.png")]


def test_sampling_defaults_come_from_the_checkpoint(files):
    s = cli.Settings(mode="i2a", temperature=2.0)
    ckpt = {"sampling": {"steps": 3, "guidance": {"i2a": 1.5}}}
    assert cli.sampling_settings(s, ckpt) == dict(steps=3, temperature=2.0, guidance=1.5,
                                                  token_temperature=1.0)
    assert cli.sampling_settings(cli.Settings(mode="inpaint"), ckpt)["guidance"] == 1.5  # as i2a
    assert cli.sampling_settings(cli.Settings(mode="a2i"), ckpt)["guidance"] == 1.0  # paper
    assert cli.sampling_settings(cli.Settings(mode="a2i"), {})["guidance"] == 1.0
    assert cli.sampling_settings(cli.Settings(mode="i2a"), {})["guidance"] == 3.0
    for mode in ("inpaint", "continue"):  # audio from an image: the paper's s = 3 too
        s = cli.Settings(mode=mode, image=["cat.png"])
        assert cli.sampling_settings(s, {})["guidance"] == 3.0
        assert cli.sampling_settings(s, ckpt)["guidance"] == 1.5  # i2a's
    own = {"sampling": {"guidance": {"i2a": 1.5, "inpaint": 2.0}}}  # a mode's own entry first
    for mode, want in (("inpaint", 2.0), ("continue", 1.5)):
        s = cli.Settings(mode=mode, image=["cat.png"])
        assert cli.sampling_settings(s, own)["guidance"] == want
    assert cli.sampling_settings(cli.Settings(mode="continue"), own)["guidance"] == 1.0  # no image


# -----------------------------------------------------------------------------
# one-line errors, exit code 2


@pytest.mark.parametrize("argv, message", [
    (["--mode", "i2a", "--image", "missing.png"], "not found"),
    (["--mode", "x2y"], "unknown --mode"),
    (["--mode", "i2a", "--steps", "3.5"], "argument --steps: invalid int value: '3.5'"),
])
def test_errors_subprocess(files, tmp_path, argv, message):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *argv, *args(files)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.parametrize("argv, message, kw", [
    (["--mode", "i2a", "--image", "garbage"], "is not an image file this reads", {}),
    (["--mode", "a2i", "--audio", "garbage_wav"], "cannot read audio", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "garbage_ckpt"], "garbage.pt", {}),
    (["--mode", "i2a", "--image", "cat", "--audio", "bark"], "--audio makes no sense", {}),
    (["--mode", "a2i", "--audio", "bark", "--start", "0.1"], "--start makes no sense", {}),
    (["--mode", "joint", "--guidance", "3"], "--guidance makes no sense", {}),
    (["--mode", "continue", "--audio", "bark", "--start", "0.1", "--guidance", "3"],
     "--guidance makes no sense", {}),
    (["--mode", "i2a"], "needs --image", {}),
    (["--mode", "inpaint", "--audio", "bark", "--image", "cat"], "needs --start", {}),
    (["--mode", "inpaint", "--audio", "bark", "--image", "cat", "cat", "dog", "--start", "0.1"],
     "give one --image (for every clip), not 3", {}),
    (["--mode", "inpaint", "--audio", "bark", "bark", "--image", "cat", "cat", "dog", "--start",
      "0.1"], "give one --image (for every clip) or 2, one per --audio, not 3", {}),
    (["--mode", "inpaint"], "--mode inpaint needs --image, --audio and --start", {}),
    (["--mode", "inpaint", "--audio", "bark", "--image", "cat", "--start", "1", "--end", "0.5"],
     "--start 1 is not before --end 0.5", {}),
    (["--mode", "a2i", "--audio", "folder"],  # "--audio PATH is a folder; ... e.g. PATH/*.wav"
     "is a folder; give its files, e.g. ", {}),
    (["--mode", "a2i", "--audio", "folder"], os.path.join("folder", "*.wav"), {}),
    (["--mode", "i2a", "--image", "folder"], os.path.join("folder", "*.png"), {}),
    (["--mode", "i2a", "--image", "cat", "--no-hide-region"],
     "--no-hide-region makes no sense for --mode i2a", {}),
    (["--mode", "a2i", "--audio", "bark", "--hide-region"],
     "--hide-region makes no sense for --mode a2i", {}),
    (["--mode", "i2a", "--image", "zero_bytes"], "is empty (0 bytes)", {}),
    (["--mode", "a2i", "--audio", "zero_bytes"], "is empty (0 bytes)", {}),
    (["--mode", "i2a", "--image", "cut_png"], "the file is damaged (", {}),
    (["--mode", "i2a", "--image", "cat", "--num-samples", "0"], "at least 1", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "mismatched"], "expects 25 image tokens", {}),
    (["--mode", "a2i", "--audio", "bark", "--ckpt", "other_codes"],
     "expects 16 image tokens over 32 codes", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "other_audio"],
     "expects 12 audio tokens over 16 codes", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "broken"], "missing 1 keys (mask_emb)", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "diverged"],
     "holds nan or inf weights (mask_emb)", {}),
    (["--mode", "a2i", "--audio", "bark", "--image-vqgan", "nan_image_vqgan", "--audio-vqgan",
      "audio_vqgan"],
     "nan_image_vqgan.pt holds nan or inf weights (quantize.embedding.weight)",
     dict(tokenizers=False)),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "bark"], "bark.wav", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "other_codebook"],
     "image_vqgan.pt is not the image VQGAN", {}),
    (["--mode", "inpaint", "--audio", "bark", "--image", "cat", "--start", "0.2", "--end", "5"],
     "outside the clip", {}),
    (["--mode", "continue", "--audio", "bark", "--start", "-1"], "outside the clip", {}),
    (["--mode", "i2a", "--image", "cat"], "no embedded demo", dict(ckpt=False)),
    (["--mode", "i2a"], "no embedded demo", dict(ckpt=False, tokenizers=False)),
    (["--mode", "i2a", "--image", "cat"], "carries no image VQGAN and no audio VQGAN: pass "
     "--image-vqgan PATH and --audio-vqgan PATH", dict(tokenizers=False)),
    (["--mode", "i2a", "--image", "cat", "--image-vqgan", "image_vqgan"],
     "carries no audio VQGAN: pass --audio-vqgan PATH", dict(tokenizers=False)),
    (["--mode", "i2a", "--image", "cat", "--device", "cuda:0"], "no CUDA GPU", {}),
    (["--mode", "i2a", "--image", "cat", "--device", "meta"], "not a device this runs on", {}),
    (["--mode", "a2i", "--audio", "empty_wav"], "holds no samples", {}),
    (["--mode", "a2i", "--audio", "nan_wav"], "NaN or infinite samples", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "bad_config"],
     "its model config is not valid (enc_dim 32 is not divisible by enc_heads 3)", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "bad_recipe"],
     "its 'tokenizers' entry is not", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "low_rate_recipe"],
     "a sample rate of 500 Hz is too low for the mel recipe", {}),
    (["--mode", "i2a", "--image", "cat", "--ckpt", "bad_sampling"],
     "sampling setting 'steps' must be an integer >= 1", {}),
    (["--mode", "i2a", "--image", "cat", "--guidance", "1e300"],
     "--guidance must be a number in [-1e6, 1e6]", {}),
    (["--mode", "i2a", "--image", "cat", "--token-temperature", "1e-300"],
     "--token-temperature must be a number in [1e-6, 1e6]", {}),
])
def test_errors_in_process(files, tmp_path, capsys, monkeypatch, argv, message, kw):
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(cli, "DEMO_BUNDLE", tmp_path / "no_demo_here.pt")
    monkeypatch.setattr(cli, "DEMO_EXAMPLES", tmp_path / "no_examples_here")
    argv = [str(files[a]) if a in files else a for a in argv]
    tail = args(files, "--out", tmp_path / "out", **kw)
    if "--ckpt" in argv:  # the case names its own checkpoint
        tail = tail[2:]
    code, out, err = run_in_process(argv + tail, capsys)
    assert code == 2 and out == []
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_never_overwrites_inputs_or_earlier_outputs(files, tmp_path, capsys):
    wav = tmp_path / "clip.wav"
    wav.write_bytes(files["bark"].read_bytes())
    before = wav.read_bytes()
    argv = ["--mode", "continue", "--audio", wav, "--start", "0.1", "--out", tmp_path,
            *args(files), "--steps", "2"]
    killed = tmp_path / ".echoes-tmp-x1"  # what a run killed a minute ago left (unlocked)
    killed.write_bytes(b"half a wav")
    os.utime(killed, (time.time() - 60, time.time() - 60))
    for run in (1, 2):
        code, out, _ = run_in_process(argv, capsys)
        assert code == 0
        assert out == [str(tmp_path / f"clip-{run + 1}.wav"),
                       str(tmp_path / f"clip-{run + 1}_mel.png")]
    assert wav.read_bytes() == before
    assert not killed.exists()  # what a killed run left behind
    # only one file of a sample's pair taken: the pair moves on together, nothing is replaced
    (tmp_path / "solo").mkdir()
    (tmp_path / "solo" / "clip_mel.png").write_bytes(b"someone's picture")
    code, out, _ = run_in_process(["--mode", "continue", "--audio", wav, "--start", "0.1", "--out",
                                   tmp_path / "solo", *args(files), "--steps", "2"], capsys)
    assert code == 0 and out == [str(tmp_path / "solo" / "clip-2.wav"),
                                 str(tmp_path / "solo" / "clip-2_mel.png")]
    assert (tmp_path / "solo" / "clip_mel.png").read_bytes() == b"someone's picture"
    assert not (tmp_path / "solo" / "clip.wav").exists()


def test_an_output_folder_that_cannot_be_written_is_one_line(files, capsys):
    code, out, err = run_in_process(["--mode", "i2a", "--image", files["cat"], "--out",
                                     files["a_file"] / "sub", *args(files)], capsys)
    assert code == 2 and out == [] and len(err) == 1 and "cannot write there" in err[0], err


def test_too_large_an_image_is_one_line(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # cat.png, 480 pixels, is a "bomb" now
    code, out, err = run_in_process(["--mode", "i2a", "--image", files["cat"], "--out", tmp_path,
                                     *args(files)], capsys)
    assert code == 2 and len(err) == 1 and "too large to open safely" in err[0], err


def test_files_do_not_depend_on_the_batch_size(files, tmp_path, capsys):
    for b in (1, 2):
        code, _, _ = run_in_process(["--mode", "joint", "--num-samples", "2", "--batch-size",
                                     str(b), "--out", tmp_path / str(b), *args(files)], capsys)
        assert code == 0
    for name in ("joint_000.wav", "joint_001.wav", "joint_001_mel.png", "joint_001.png"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_a_run_writing_to_the_same_folder_keeps_its_files(tmp_path):
    def other_run_first(path):  # another run claims the stem between the check and the write
        (tmp_path / "cat.wav").write_bytes(b"theirs")
        cli.save_wav(torch.zeros(100), path, replace=False)

    writes = {".wav": other_run_first,
              "_mel.png": lambda path: cli.save_mel_png(torch.zeros(80, 4), path,
                                                        replace=False)}
    paths = cli.write_sample(tmp_path, "cat", writes)
    assert paths == [tmp_path / "cat-2.wav", tmp_path / "cat-2_mel.png"]
    assert (tmp_path / "cat.wav").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-2.wav", "cat-2_mel.png",
                                                           "cat.wav"]  # no temp file left


def test_a_failed_write_leaves_no_file_and_is_one_line(tmp_path, monkeypatch):
    real_write_atomic = cli.save_wav.__globals__["write_atomic"]

    def full_disk(path, write, replace=True):  # the temp file fills the disk half-way
        def partial(file):
            file.write(b"RIFF partial")
            raise OSError(28, "No space left on device")
        return real_write_atomic(path, partial, replace)

    monkeypatch.setitem(cli.save_wav.__globals__, "write_atomic", full_disk)
    with pytest.raises(cli.UserError, match="cannot write .*cat.wav \\(No space left on device"):
        cli.write_sample(tmp_path, "cat", {".wav": lambda p: cli.save_wav(torch.zeros(10), p,
                                                                           replace=False)})
    assert list(tmp_path.iterdir()) == []


def test_an_input_shorter_or_longer_than_a_clip_gets_a_note(files, tmp_path, capsys):
    clip = N_SAMPLES / 22050
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(int(3 * clip * 16000), np.float32), 16000)
    argv = ["--mode", "a2i", "--audio", files["bark"], long, "--out", tmp_path / "out",
            *args(files), "--steps", "2"]
    run_cli(cli.main, [str(a) for a in argv])
    captured = capsys.readouterr()
    notes = captured.err.splitlines()
    assert (f"note: {files['bark']} is 0.30 s long, the model's clips {clip:.2f} s: the rest is "
            "taken as silence") in notes
    assert (f"note: {long} is {3 * clip:.2f} s long, the model's clips {clip:.2f} s: only its "
            f"first {clip:.2f} s are used") in notes
    assert captured.out.splitlines() == [str(tmp_path / "out" / "bark.png"),
                                         str(tmp_path / "out" / "long.png")]


def test_more_steps_than_tokens_to_generate_get_a_note(files, tmp_path, capsys):
    argv = ["--mode", "a2i", "--audio", files["bark"], "--out", tmp_path, *args(files),
            "--steps", "20"]  # the tiny model's images are 16 tokens
    run_cli(cli.main, [str(a) for a in argv])
    assert ("note: 20 steps for 16 tokens to generate: the steps past 15 only re-draw the last "
            "masked token") in capsys.readouterr().err.splitlines()
    run_cli(cli.main, [str(a) for a in argv[:-1] + ["16"]])
    assert "steps for" not in capsys.readouterr().err


def test_a_full_disk_is_an_error_not_a_printed_traceback(tmp_path, monkeypatch, capfd):
    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setitem(cli.save_wav.__globals__, "write_atomic",
                        lambda path, write, replace: write(FullDisk()))
    with pytest.raises(OSError, match="No space left"):
        cli.save_wav(torch.zeros(1000), tmp_path / "x.wav")
    assert "Exception ignored" not in capfd.readouterr().err  # soundfile's C callbacks print


def test_continuation_hides_the_regenerated_stretch_from_the_encoder(files, tmp_path):
    from echoes.checkpoint import load_tokenizers
    image_tok, audio_tok = load_tokenizers(torch.load(files["ckpt"], weights_only=True), "test",
                                           "cpu", files["image_vqgan"], files["audio_vqgan"])
    wav, sr = soundfile.read(files["bark"])
    changed = wav.copy()
    changed[int(0.27 * sr):] = 0.9 * np.sign(np.sin(np.arange(len(wav) - int(0.27 * sr))))
    soundfile.write(tmp_path / "changed.wav", changed, sr)
    s = cli.Settings(mode="continue", audio=[str(files["bark"]), str(tmp_path / "changed.wav")],
                     start=0.2)
    keep = cli.audio_keep(s, audio_tok)  # grid (5, 2): the second column is regenerated
    assert keep.reshape(5, 2)[:, 1].logical_not().all() and keep.reshape(5, 2)[:, 0].all()
    _, shown = cli.encode_inputs(s, image_tok, audio_tok, "cpu")
    _, hidden = cli.encode_inputs(s, image_tok, audio_tok, "cpu", keep)
    mels = audio_tok.wav_to_mel([torch.from_numpy(w).float() for w in (wav, changed)])
    assert not torch.equal(mels[0], mels[1])
    assert not torch.equal(shown[0], shown[1])  # the region's content reached the ids
    assert torch.equal(hidden[0], hidden[1])


@pytest.mark.parametrize("ckpt, demo_codebook, flag, hidden", [
    (True, False, [], True), (True, False, ["--no-hide-region"], False),
    # the demo's audio codebook (the demo, or a model trained on its tokenizers): off by default
    (False, True, [], False), (False, True, ["--hide-region"], True), (True, True, [], False),
])
def test_inpainting_hides_the_stretch_but_not_for_the_demo_tokenizer(
        files, tmp_path, capsys, monkeypatch, ckpt, demo_codebook, flag, hidden):
    # the test bundle's VQGANs are the test checkpoint's
    monkeypatch.setattr(cli, "DEMO_BUNDLE", files["bundle"] if demo_codebook
                        else tmp_path / "no_demo.pt")
    seen, encode = [], cli.encode_inputs

    def spy(s, image_tok, audio_tok, device, keep=None, inputs=None):
        seen.append(keep)
        return encode(s, image_tok, audio_tok, device, keep, inputs)

    monkeypatch.setattr(cli, "encode_inputs", spy)
    code, _, err = run_in_process(["--mode", "inpaint", "--audio", files["bark"], "--image",
                                   files["cat"], "--start", "0.2", "--out", tmp_path,
                                   *args(files, ckpt=ckpt, tokenizers=ckpt), "--steps", "2",
                                   *flag], capsys)
    assert code == 0, err
    assert (seen[0] is not None) == hidden
    if hidden:
        assert seen[0].reshape(5, 2).tolist() == [[True, False]] * 5


def test_a_checkpoint_whose_shards_recorded_the_same_codebooks_samples(files, tmp_path, capsys):
    code, out, err = run_in_process(["--mode", "i2a", "--image", files["cat"], "--out", tmp_path,
                                     *args(files, ckpt=False), "--ckpt", files["same_codebook"],
                                     "--steps", "2"], capsys)
    assert code == 0 and out == [str(tmp_path / "cat.wav"), str(tmp_path / "cat_mel.png")], err


def test_a_recipe_that_keeps_every_mel_frame_loads(files):
    from echoes.checkpoint import load_tokenizers
    ckpt = {"tokenizers": {"image": {"resolution": 24},  # another size than the VQGAN's 16
                           "audio": {**RECIPE["audio"], "keep_frames": 0}}}
    image_tok, audio_tok = load_tokenizers(ckpt, "test", "cpu", files["image_vqgan"],
                                           files["audio_vqgan"])
    assert audio_tok.grid == (5, 2) and audio_tok.keep_frames == 0  # the recipe's, taken
    assert image_tok.resolution == 24


@pytest.mark.parametrize("image_vqgan, audio_vqgan, message", [
    ("audio_vqgan", "image_vqgan", "swap --image-vqgan and --audio-vqgan"),
    ("ckpt", "audio_vqgan", "without tokenizers inside, not a VQGAN (sample.py takes it as "
     "--ckpt)"),
])
def test_tokenizer_files_of_the_wrong_kind_are_one_line(files, tmp_path, capsys, image_vqgan,
                                                        audio_vqgan, message):
    code, out, err = run_in_process(["--mode", "i2a", "--image", files["cat"], "--out", tmp_path,
                                     "--ckpt", files["ckpt"], "--image-vqgan", files[image_vqgan],
                                     "--audio-vqgan", files[audio_vqgan]], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
