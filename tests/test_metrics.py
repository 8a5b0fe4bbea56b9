"""echoes/metrics.py: PANNs Cnn14, VGGish, the audio reading and FD / FAD / IS / KL against the
outputs of the code the paper's numbers come from (tests/reference/panns_eval.pt: audioldm_eval's
Cnn14 and metric functions, torchaudio's resample; tests/reference/vggish_eval.pt: torchvggish as
audioldm_eval uses it), and the command line."""

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from conftest import recipe_weights, run_command
from echoes import metrics

REFERENCE = Path(__file__).parent / "reference"


@pytest.fixture(scope="module")
def ref():
    return torch.load(REFERENCE / "panns_eval.pt", weights_only=True)


@pytest.fixture(scope="module")
def vggish_ref():
    return torch.load(REFERENCE / "vggish_eval.pt", weights_only=True)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The reference weights saved as the released checkpoint stores them (under "model")."""
    path = tmp_path_factory.mktemp("panns") / "Cnn14_16k_mAP=0.438.pth"
    sd = recipe_weights(metrics.Cnn14(), keep=("spectrogram_extractor.", "logmel_extractor."))
    torch.save({"model": sd, "iteration": 0}, path)
    return path


def test_cnn14_loads_the_released_layout_and_gives_the_reference_outputs(ref, released):
    assert list(metrics.Cnn14().state_dict()) == ref["keys"].split("\n")
    model = metrics.load_cnn14(released)
    with torch.no_grad():
        out = model(ref["wav"])
    torch.testing.assert_close(out["embedding"], ref["embedding"], rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-5, atol=2e-4)
    assert (out["logits"][0] - out["logits"][1]).abs().max() > 1  # the two clips tell apart
    # a checkpoint saved before BatchNorm counted its batches
    old = {k: v for k, v in torch.load(released, weights_only=True)["model"].items()
           if not k.endswith("num_batches_tracked")}
    torch.save({"model": old}, released.with_name("old.pth"))
    metrics.load_cnn14(released.with_name("old.pth"))


def test_a_fresh_front_end_is_torchlibrosas(ref):
    """The DFT kernels and the mel matrix built here equal those torchlibrosa builds (periodic
    Hann window, librosa's Slaney mel filterbank), which the released checkpoint stores."""
    fresh = metrics.Cnn14().state_dict()
    torch.testing.assert_close(fresh["logmel_extractor.melW"], ref["melW"], rtol=1e-5, atol=1e-7)
    for part in ("real", "imag"):
        torch.testing.assert_close(fresh[f"spectrogram_extractor.stft.conv_{part}.weight"][::16],
                                   ref[f"conv_{part}_rows"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def vggish_released(tmp_path_factory):
    """Recipe weights saved as torchvggish releases them (a bare state dict)."""
    path = tmp_path_factory.mktemp("vggish") / "vggish-10086976.pth"
    torch.save(recipe_weights(metrics.VGGish()), path)
    return path


def test_vggish_is_torchvggishs_as_audioldm_eval_uses_it(vggish_ref, vggish_released):
    torch.testing.assert_close(metrics.vggish_mel_matrix(), vggish_ref["mel_matrix"],
                               rtol=1e-12, atol=1e-12)
    examples = metrics.vggish_examples(vggish_ref["wav"])  # 2.5 s: two examples, tail dropped
    torch.testing.assert_close(examples, vggish_ref["examples"], rtol=1e-6, atol=1e-6)
    model = metrics.load_vggish(vggish_released)
    assert list(model.state_dict()) == vggish_ref["keys"].split("\n")
    with torch.no_grad():
        emb = model(examples)
    torch.testing.assert_close(emb, vggish_ref["embedding"], rtol=1e-5, atol=1e-5)
    assert (vggish_ref["embedding_relu"] != emb).any()  # the last ReLU is left out
    saved = {**torch.load(vggish_released, weights_only=True),  # a saved torchvggish model's
             "pproc._pca_matrix": torch.eye(128), "pproc._pca_means": torch.zeros(128, 1)}
    torch.save(saved, vggish_released.with_name("hub.pth"))
    metrics.load_vggish(vggish_released.with_name("hub.pth"))  # PCA entries passed over
    assert metrics.vggish_examples(torch.zeros(15599)).shape == (0, 1, 96, 64)  # 95 frames
    assert metrics.vggish_examples(torch.zeros(15600)).shape == (1, 1, 96, 64)


def test_the_spectrogram_is_the_centred_stft_power():
    x = torch.randn(2, 3001, generator=torch.Generator().manual_seed(0))
    power = metrics.Spectrogram(512, 160)(x)[:, 0]  # (B, T, F)
    window = torch.hann_window(512, periodic=True, dtype=torch.float64)
    want = torch.stft(x.double(), 512, 160, window=window, center=True, pad_mode="reflect",
                      return_complex=True).abs() ** 2  # (B, F, T)
    torch.testing.assert_close(power.double(), want.transpose(1, 2), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rate", [22050, 44100, 48000, 8000])
def test_resampling_is_torchaudios(ref, rate):
    got = metrics.resample_like_torchaudio(ref["rs_x"], rate, 16000)
    torch.testing.assert_close(got, ref[f"rs_{rate}_16000"], rtol=0, atol=2e-4)


def test_the_metrics_are_audioldm_evals(ref):
    a, b = ref["fd_a"].numpy(), ref["fd_b"].numpy()
    assert metrics.frechet_distance(a, b) == pytest.approx(float(ref["fd"]), rel=1e-6)
    mean, std = metrics.inception_score(ref["is_logits"].numpy())
    assert (mean, std) == pytest.approx((float(ref["is_mean"]), float(ref["is_std"])), rel=1e-6)
    names = [f"clip{i}" for i in range(len(ref["kl_gen"]))]
    gen = dict(zip(names, ref["kl_gen"].numpy()))
    tgt = dict(zip(reversed(names), ref["kl_tgt"].numpy()[::-1]))  # paired by name, not order
    got = metrics.paired_kl(gen, tgt)
    assert got == pytest.approx((float(ref["kl_softmax"]), float(ref["kl_sigmoid"])), rel=1e-6)


def test_the_metrics_in_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 2))
    b = 2 * rng.standard_normal((4000, 2)) + 1  # FD of N(0, I) and N(1, 4I): 2 + 2 (2 - 1)^2
    assert metrics.frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    confident = np.eye(10)[np.arange(100) % 10] * 50  # every class once per 10, sure of each
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    assert metrics.inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)
    assert np.isfinite(metrics.inception_score(rng.standard_normal((10, 5)))).all()  # 1 a split


def test_audio_is_read_as_audioldm_eval_reads_it(tmp_path):
    left = np.full(8000, 0.5, np.float32)
    right = np.linspace(-1, 1, 8000).astype(np.float32)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left + 0.1 * np.sin(np.arange(8000)),
                                                       right], 1), 16000, subtype="FLOAT")
    wav = metrics.read_eval_audio(tmp_path / "stereo.wav")
    assert wav.shape == (metrics.MIN_SAMPLES,)  # padded at the end to 2 s
    head = wav[:8000].numpy()
    np.testing.assert_allclose(head, 0.1 * np.sin(np.arange(8000)) - np.mean(
        0.1 * np.sin(np.arange(8000))), atol=1e-5)  # the first channel, its mean removed
    assert (wav[8000:] == 0).all()
    soundfile.write(tmp_path / "slow.wav", np.zeros(22050 * 3, np.float32), 22050)
    assert metrics.read_eval_audio(tmp_path / "slow.wav").shape == (48000,)  # 3 s at 16 kHz
    # the order: the mean off, then resampled, then padded (at 16 kHz) to 2 s
    x = (0.3 + 0.2 * np.sin(np.arange(22050) / 7.0)).astype(np.float32)  # 1 s, a DC offset
    soundfile.write(tmp_path / "offset.wav", x, 22050, subtype="FLOAT")
    want = metrics.resample_like_torchaudio(torch.from_numpy(x - x.mean()), 22050, 16000)
    got = metrics.read_eval_audio(tmp_path / "offset.wav")
    torch.testing.assert_close(got, torch.cat([want, torch.zeros(32000 - len(want))]))
    for name, data, why in [("empty.wav", np.zeros(0, np.float32), "holds no samples"),
                            ("nan.wav", np.full(100, np.nan, np.float32), "NaN or infinite")]:
        soundfile.write(tmp_path / name, data, 16000, subtype="FLOAT")
        with pytest.raises(metrics.UserError, match=why):
            metrics.read_eval_audio(tmp_path / name)
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + b"\0" * 40)
    with pytest.raises(metrics.UserError, match="cannot read audio .*broken.wav"):
        metrics.read_eval_audio(tmp_path / "broken.wav")
    with pytest.raises(metrics.UserError, match="44101 Hz shares too few factors"):
        metrics.resample_like_torchaudio(torch.zeros(10), 44101, 16000)
    # such a rate, and NaN in a second channel only, are refused when the folder is listed and
    # when the file is read
    folder = tmp_path / "odd"
    folder.mkdir()
    soundfile.write(folder / "a.wav", np.zeros(100, np.float32), 44101)
    with pytest.raises(metrics.UserError, match=r"a.wav: a sample rate of 44101 Hz shares"):
        metrics.audio_files(folder, "--generated")
    soundfile.write(tmp_path / "nan2.wav", np.stack([np.zeros(100), np.full(100, np.nan)], 1),
                    16000, subtype="FLOAT")
    with pytest.raises(metrics.UserError, match="NaN or infinite"):
        metrics.read_eval_audio(tmp_path / "nan2.wav")


def write_clips(folder, names, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        t = np.arange(16000) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (300 + 100 * i) * t) + 0.05 * rng.standard_normal(16000)
        soundfile.write(folder / f"{name}.wav", wav.astype(np.float32), 16000)


def table(out):
    """The printed table's one row as {column: cell}."""
    lines = out.splitlines()
    head, row = ([x.strip() for x in line.split("|")[1:-1]] for line in (lines[0], lines[2]))
    return dict(zip(head, row))


def test_command_line(tmp_path, capsys, monkeypatch, released, vggish_released,
                      one_thread):
    other_rate = tmp_path / "Cnn14_mAP=0.431.pth"  # the 32 kHz model: a wider front end
    sd = torch.load(released, weights_only=True)["model"]
    sd["logmel_extractor.melW"] = torch.zeros(513, 64)
    torch.save({"model": sd}, other_rate)
    write_clips(tmp_path / "gen", ["a", "b", "c"], 0)
    write_clips(tmp_path / "real", ["a", "b", "c"], 1)
    write_clips(tmp_path / "bad", ["a", "b"], 2)
    (tmp_path / "bad" / "x.wav").write_bytes(b"not a sound file")  # found before any model runs
    folders = ["--generated", tmp_path / "gen", "--target", tmp_path / "real", "--device", "cpu"]
    flags = [*folders, "--panns", released, "--vggish", vggish_released]
    code, out_all, err = run_command(metrics.main, flags, capsys)
    assert code == 0, err
    row = table(out_all)
    assert row["generated"] == row["target"] == "3"
    assert float(row["FD"]) > 0 and float(row["FAD"]) > 0
    assert row["IS"] == "-" and "IS: not computed, it needs at least 10 generated clips" in err
    assert np.isfinite(float(row["KL (softmax)"])) and np.isfinite(float(row["KL (sigmoid)"]))
    code, out, _ = run_command(metrics.main, [*folders, "--vggish", vggish_released], capsys)
    assert code == 0 and table(out)["FAD"] == row["FAD"] and table(out)["FD"] == "-"
    # --cache: the features are computed once while the files and checkpoints stay as they are
    cached = [*flags, "--cache", tmp_path / "cache"]
    assert run_command(metrics.main, cached, capsys)[1] == out_all
    assert len(list((tmp_path / "cache").iterdir())) == 2  # generated and target
    calls = []
    monkeypatch.setattr(metrics, "clip_features", lambda *a, **k: calls.append(a) or {})
    code, out, err = run_command(metrics.main, cached, capsys)
    assert code == 0 and out == out_all and not calls and "features from" in err
    monkeypatch.undo()
    for kept in (tmp_path / "cache").iterdir():  # damaged kept files: computed again
        kept.write_bytes(b"")
    code, out, _ = run_command(metrics.main, cached, capsys)
    assert code == 0 and out == out_all
    for kept in (tmp_path / "cache").iterdir():
        with open(kept, "wb") as f:
            np.save(f, np.zeros(3))  # an .npy where an .npz belongs
    code, out, _ = run_command(metrics.main, cached, capsys)
    assert code == 0 and out == out_all
    soundfile.write(tmp_path / "gen" / "b.wav", np.zeros(16000, np.float32), 16000)  # changed
    code, out, _ = run_command(metrics.main, cached, capsys)
    assert code == 0 and table(out)["FD"] != row["FD"]
    assert len(list((tmp_path / "cache").iterdir())) == 3
    # pairs by the whole file name: c.flac is not c.wav (audioldm_eval's rule)
    soundfile.write(tmp_path / "real" / "c.flac", soundfile.read(tmp_path / "real" / "c.wav")[0],
                    16000)
    os.remove(tmp_path / "real" / "c.wav")
    code, out, err = run_command(metrics.main, [*folders, "--panns", released], capsys)
    assert code == 0 and table(out)["KL (softmax)"] == "-" and "do not pair up" in err
    for argv, want in [
            (["--generated", tmp_path / "nothing", "--target", tmp_path / "real"],
             "--generated '" + str(tmp_path / "nothing") + "' is not a folder"),
            (["--generated", tmp_path, "--target", tmp_path / "real"], "holds no audio files"),
            (folders, "give --panns"),
            ([*folders, "--panns", tmp_path / "gen" / "a.wav"], "PANNs checkpoint"),
            ([*folders, "--vggish", released], "VGGish checkpoint"),
            ([*folders, "--panns", other_rate], "AudioLDM's evaluation at 16 kHz takes"),
            (["--generated", tmp_path / "gen", "--target", tmp_path / "bad", "--panns",
              released], "cannot read audio " + str(tmp_path / "bad" / "x.wav")),
    ]:
        code, _, err = run_command(metrics.main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and want in err, err
