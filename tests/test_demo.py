"""Tests for the embedded demo (echoes/demo.py): the shipped bundle and examples load and
work, and the build's stages do what they say (training the tokenizers themselves:
tests/test_tokenizer_training.py). The readers and the generator's determinism are
covered by tests/test_shapes.py. CPU only, well under a minute."""

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from echoes import checkpoint, demo, demo_scoring, sampler, shapes
from echoes.cli import parse_settings, run_cli
from echoes.model import Echoes, EchoesConfig
from echoes.audio import mel_spectrogram
from echoes.tokenizers import VQGAN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle():
    assert demo.DEMO_BUNDLE.is_file(), "the demo bundle is missing: python -m echoes.demo build"
    return checkpoint.load_for_sampling(demo.DEMO_BUNDLE, what="demo bundle")


def example_paths():
    return [(shapes.CLASSES.index(name), demo.DEMO_EXAMPLES / f"{stem}.png",
             demo.DEMO_EXAMPLES / f"{stem}.wav")
            for name, stem in zip(demo.EXAMPLE_CLASSES, demo.example_stems())]


# -----------------------------------------------------------------------------
# the shipped files


def test_bundle_size_and_layout(bundle):
    assert demo.DEMO_BUNDLE.stat().st_size <= demo.MAX_BUNDLE_BYTES
    model, image_tok, audio_tok, raw = bundle
    # the stored config is the demo preset (a rebuilt preset must ship a rebuilt bundle); a field
    # added after the bundle was built is at its default, off, there
    defaults = {f.name: f.default for f in dataclasses.fields(EchoesConfig)}
    assert {**defaults, **raw["config"]} == dataclasses.asdict(EchoesConfig.demo())
    assert image_tok.grid == (8, 8) and audio_tok.grid == (5, 8)
    assert model.config.image_len == 64 and model.config.audio_len == 40
    assert image_tok.vqgan.config.n_embed == model.config.image_codebook
    assert audio_tok.vqgan.config.n_embed == model.config.audio_codebook
    assert (audio_tok.n_samples, audio_tok.n_frames, audio_tok.sample_rate) == (
        shapes.CLIP_SAMPLES, shapes.DEMO_FRAMES, shapes.SAMPLE_RATE)
    for mode in ("i2a", "a2i"):
        opts = checkpoint.stored_sampling(raw, mode)
        assert set(opts) == {"steps", "temperature", "guidance", "token_temperature"}
    # the image decoder went through the build's decoder stage
    decoder = raw["tokenizers"]["image"]["metrics"]["decoder"]
    assert decoder["steps"] == demo.BuildSettings().decoder_steps and decoder["readable"] >= 0.98
    # weights are stored in fp16 to fit the budget
    assert all(v.dtype == torch.float16 for v in raw["model"].values() if v.is_floating_point())


def test_examples_are_generator_items():
    for label, png, wav in example_paths():
        img = np.asarray(Image.open(png).convert("RGB"))
        _, want_img, want_wav = shapes.make_pair(label, demo.EXAMPLE_SEED)
        assert np.array_equal(img, want_img)
        x, sr = soundfile.read(wav, dtype="float32")
        assert sr == shapes.SAMPLE_RATE and len(x) == shapes.CLIP_SAMPLES
        assert np.abs(x - want_wav).max() < 1e-3  # 16-bit PCM


def test_tokenizers_reconstruct_examples_readably(bundle):
    _, image_tok, audio_tok, _ = bundle
    for label, png, wav in example_paths():
        want = shapes.label_parts(label)
        rec = demo_scoring.decode_items("image", image_tok, image_tok.encode_files([png]))[0]
        assert shapes.read_image(rec) == want
        ids = audio_tok.encode_files([wav])
        assert ids.shape == (1, 40)
        assert shapes.read_mel(audio_tok.decode_to_mel(ids)[0]) == want


def test_image_codes_carry_their_patch_colour(bundle):
    """The shipped image tokenizer was trained with the patch-mean loss: a patch that lies wholly
    inside a shape gets a code that no other colour's inside patches share."""
    _, image_tok, _, _ = bundle
    labels, images, _ = shapes.generate(48, seed=5)
    ids = demo_scoring.encode_items("image", image_tok, images).numpy()  # (48, 64)
    inside = np.abs(images.astype(int) - shapes.SPEC.background).max(-1) > 30  # (48, 64, 64)
    inside = inside.reshape(48, 8, 8, 8, 8).all(axis=(2, 4)).reshape(48, 64)
    colours = {}
    for i, pos in zip(*np.nonzero(inside)):
        colours.setdefault(int(ids[i, pos]), set()).add(shapes.label_parts(int(labels[i]))[0])
    assert inside.sum() > 100 and len(colours) >= 4
    shared = {code: c for code, c in colours.items() if len(c) > 1}
    assert not shared, f"codes used inside shapes of several colours: {shared}"


def test_short_i2a_and_a2i_samples_run(bundle):
    model, image_tok, audio_tok, raw = bundle
    _, png, wav = example_paths()[0]
    gen = sampler.sample_generators(0, 1)
    opts = {**checkpoint.stored_sampling(raw, "i2a"), "steps": 3}
    audio, image = sampler.generate(model, "i2a", image_ids=image_tok.encode_files([png]),
                                    generator=gen, **opts)
    assert audio.shape == (1, 40) and 0 <= int(audio.min()) and int(audio.max()) < 256
    mel = audio_tok.decode_to_mel(audio)
    assert mel.shape == (1, 80, shapes.DEMO_FRAMES)
    opts = {**checkpoint.stored_sampling(raw, "a2i"), "steps": 3}
    _, image = sampler.generate(model, "a2i", audio_ids=audio_tok.encode_files([wav]),
                                generator=sampler.sample_generators(0, 1), **opts)
    assert image.shape == (1, 64)


def test_sample_cli_without_arguments_uses_the_demo(tmp_path):
    spec = importlib.util.spec_from_file_location("sample_demo", ROOT / "sample.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    run_cli(cli.main, ["--mode", "i2a", "--out", str(tmp_path), "--steps", "2"])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".wav") for n in written) and any(n.endswith("_mel.png")
                                                            for n in written)


# -----------------------------------------------------------------------------
# the build's stages


def test_build_gives_the_patch_mean_loss_to_the_image_tokenizer_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "tokenizer_main", calls.append)
    build = demo.BuildSettings(work=str(tmp_path), image_patch_mean=0.5)
    demo.stage_tokenizers(build, demo._paths(tmp_path), torch.device("cuda"))  # one by one
    got = {t.modality: t for t in (parse_settings(demo.TokenizerSettings, argv) for argv in calls)}
    assert got["image"].patch_mean == 0.5 and got["audio"].patch_mean == 0.0
    assert got["image"].steps == build.image_tokenizer_steps and got["image"].device == "cuda"


def test_model_fills_redraw_only_masked_codes(one_thread):
    torch.manual_seed(0)
    model = Echoes(EchoesConfig.demo(audio_len=10, image_len=16, audio_codebook=12,
                                     image_codebook=9, enc_dim=32, enc_heads=2, dec_dim=32,
                                     dec_heads=2, enc_depth=1)).eval()
    image = torch.randint(0, 9, (37, 16))
    audio = torch.randint(0, 12, (37, 10))
    fills = demo.model_fills(model, image, audio, torch.Generator().manual_seed(0),
                             ratio=(0.5, 0.5), batch_size=16)
    assert fills.shape == image.shape and fills.min() >= 0 and fills.max() < 9  # no mask id
    changed = (fills != image).float().mean().item()
    assert 0.2 < changed < 0.5  # half re-drawn, some of it to the same code
    again = demo.model_fills(model, image, audio, torch.Generator().manual_seed(0),
                             ratio=(0.5, 0.5), batch_size=16)
    assert torch.equal(fills, again)
    nothing = demo.model_fills(model, image, audio, torch.Generator().manual_seed(0),
                               ratio=(0.0, 0.0))
    assert torch.equal(nothing, image)
    # the sampler's loop: every masked code drawn, no mask id left
    g = torch.Generator().manual_seed(1)
    looped = demo.model_fills(model, image, audio, g, ratio=(0.9, 0.9), steps=4, batch_size=16)
    assert looped.shape == image.shape and looped.min() >= 0 and looped.max() < 9
    assert 0.5 < (looped != image).float().mean().item() < 0.95


def test_mel_recipe_gives_the_token_grid():
    _, _, wav = shapes.make_pair(0, seed=5)
    mel = mel_spectrogram(torch.from_numpy(wav))
    assert mel.shape == (1, 80, shapes.DEMO_FRAMES)
    vq = VQGAN(demo.audio_vqgan_config())
    assert vq.latent_size(80, shapes.DEMO_FRAMES) == (5, 8)
    assert VQGAN(demo.image_vqgan_config()).latent_size(64, 64) == (8, 8)


def test_tune_candidates_and_the_pick():
    for mode, candidates in demo.TUNE_CANDIDATES.items():
        assert len(set(candidates)) == len(candidates) >= 2, mode
    a, b, c = (dict(steps=n, temperature=2.0, token_temperature=0.5) for n in (12, 8, 20))
    assert demo.best_setting([(0.75, 0.75, a), (0.75, 0.80, c), (0.70, 0.9, b)]) is c
    assert demo.best_setting([(0.75, 0.75, a), (0.75, 0.75, b), (0.75, 0.75, c)]) is b


def test_a_stage_whose_inputs_changed_is_redone_from_scratch(tmp_path, monkeypatch, capsys):
    p = demo._paths(tmp_path)
    for key in ("data", "image_vqgan", "audio_vqgan"):
        p[key].write_bytes(b"x")
    os.utime(p["data"], (time.time() + 10, time.time() + 10))  # the data changed afterwards
    calls = []
    monkeypatch.setattr(demo, "STAGE_RUNS", {**demo.STAGE_RUNS, "tokenizers": lambda s, p, d:
                                             calls.append(s.force)})
    demo.build(demo.BuildSettings(work=str(tmp_path), stages=["tokenizers"], device="cpu"))
    assert calls == [True] and "its inputs changed: redone" in capsys.readouterr().out
    p["audio_vqgan"].unlink()  # half-finished: the image tokenizer left is still out of date
    assert demo.stale("tokenizers", p)
    assert demo.stale("shards", p) is False  # no shards yet: not stale, just not made
    p["shards"].mkdir()
    os.utime(p["shards"], (0, 0))
    assert demo.stale("shards", p)  # older than the data it was made from


def test_an_over_budget_bundle_leaves_the_old_one(tmp_path, monkeypatch):
    p = {**demo._paths(tmp_path), "bundle": tmp_path / "demo.pt"}  # never the package's
    p["bundle"].write_bytes(b"the shipped bundle")
    monkeypatch.setattr(demo, "MAX_BUNDLE_BYTES", 10)
    ckpt = {"model": {"w": torch.zeros(4)}, "config": {}, "step": 1, "data": {"clips": 8}}
    monkeypatch.setattr(demo, "load_checkpoint",
                        lambda path, what="": ckpt if "model" in what else
                        {"config": {}, "state_dict": {"w": torch.zeros(4)}})
    p["tune"].write_text(json.dumps({"sampling": {}, "table": []}))
    with pytest.raises(demo.UserError, match="over the 10 MB budget"):
        demo.stage_bundle(demo.BuildSettings(work=str(tmp_path)), p)
    assert p["bundle"].read_bytes() == b"the shipped bundle"


def test_build_options_are_checked_first(tmp_path):
    with pytest.raises(demo.UserError, match="--n-train must be at least 1, got 0"):
        demo.build(demo.BuildSettings(work=str(tmp_path / "w"), n_train=0))
    (tmp_path / "file").write_text("x")
    with pytest.raises(demo.UserError, match="--work .*file is not a folder"):
        demo.build(demo.BuildSettings(work=str(tmp_path / "file")))
    assert not (tmp_path / "w").exists()
    with pytest.raises(demo.UserError, match="use auto, cpu, cuda or cuda:N"):
        demo.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(demo.UserError, match="no CUDA GPU is available here"):
            demo.pick_device("cuda:1")  # a GPU's index is a device name


def test_a_stage_whose_inputs_no_stage_made_names_the_stage_that_makes_them(tmp_path):
    work = tmp_path / "w"
    for stages, message in ((["model"], "the model stage needs .*shards, which the shards stage "
                                        "makes: add shards to --stages"),
                            (["tune"], "the tune stage needs .*ckpt.pt, which the model stage")):
        with pytest.raises(demo.UserError, match=message):
            demo.build(demo.BuildSettings(work=str(work), stages=stages))
    assert not any(work.iterdir())


def test_stages_after_the_model_need_it_trained_and_the_bundle_needs_its_inputs(tmp_path):
    work = tmp_path / "w"
    p = demo._paths(work)
    p["shards"].mkdir(parents=True)
    os.utime(p["shards"], (0, 0))
    p["image_vqgan"].write_bytes(b"x")
    p["model"].mkdir()
    torch.save({"step": 10}, p["ckpt"])  # a killed model stage's checkpoint
    with pytest.raises(demo.UserError, match="needs the model trained to --model-steps 20, and "
                       ".*ckpt.pt is short of it .*add model to --stages"):
        demo.build(demo.BuildSettings(work=str(work), stages=["decoder"], model_steps=20))
    # the shipped bundle exists, but an empty --work has none of its inputs: not "done"
    with pytest.raises(demo.UserError, match="the bundle stage needs .*sampling.json"):
        demo.build(demo.BuildSettings(work=str(tmp_path / "empty"), stages=["bundle"]))


def test_no_command_prints_the_usage_on_stderr_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(demo.main, [])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and not out and err.startswith("usage: python -m echoes.demo COMMAND")
    for flag in ("-h", "--help"):
        assert run_cli(demo.main, [flag]) is None
        out, err = capsys.readouterr()
        assert out.startswith("usage: python -m echoes.demo COMMAND") and not err


def test_the_model_stage_runs_train_py_with_flags_it_takes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("echoes_train", demo.train_script())
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    seen = []

    class Finished:
        def __init__(self, cmd, env):
            seen.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(demo.subprocess, "Popen", Finished)
    s = parse_settings(demo.BuildSettings, [])
    paths = {"shards": tmp_path / "shards", "model": tmp_path / "model"}
    demo.stage_model(s, paths, torch.device("cpu"))
    (cmd, env), = seen
    settings = trainer.parse_settings(trainer.Settings, cmd[2:])  # every flag is train.py's
    assert settings.preset == "demo" and settings.decay_group == "linear"
    # --device cuda:1: train.py takes cuda:LOCAL_RANK, so it is shown GPU 1 alone
    demo.stage_model(s, paths, torch.device("cuda", 1))
    cmd, env = seen[-1]
    assert trainer.parse_settings(trainer.Settings, cmd[2:]).device == "cuda"
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # cuda:1 is then the machine's GPU 3
    demo.stage_model(s, paths, torch.device("cuda", 1))
    assert seen[-1][1]["CUDA_VISIBLE_DEVICES"] == "3"


@pytest.mark.parametrize("on_term", ["default", "exit 0"])  # train.py's last step exits 0
def test_a_sigterm_to_the_build_reaches_its_children_and_stops_it(on_term, capsys):
    import signal
    import sys
    import threading
    code = "import time; time.sleep(60)"
    if on_term == "exit 0":
        code = "import signal, sys, time; signal.signal(15, lambda *a: sys.exit(0)); " + code
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit) as e:
            demo.run_children([[sys.executable, "-c", code]], None)
    finally:
        timer.cancel()
    # the child got it and ended (run_children waits for it), and the build stops as a SIGTERM
    assert e.value.code == 128 + signal.SIGTERM and time.monotonic() - started < 30
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_child_that_cannot_start_ends_the_ones_started(tmp_path, monkeypatch):
    import subprocess
    import sys
    started, real = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(demo.subprocess, "Popen", popen)
    with pytest.raises(FileNotFoundError):
        demo.run_children([[sys.executable, "-c", "import time; time.sleep(60)"],
                           [str(tmp_path / "no_such_program")]], None)
    assert len(started) == 1 and started[0].poll() is not None  # told to stop, waited for
