"""`python -m echoes.prepare`: videos (and a VGGSound CSV) -> token shards through ffmpeg and the
tokenizers (paper Sec. 3.1, 4.1). Most tests need ffmpeg and are skipped, saying so, without it."""

import dataclasses
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import run_command
from echoes import data, prepare
from echoes.cli import UserError, folder_lock


def run_prepare(argv, capsys):
    """(exit code, stdout, stderr) of `python -m echoes.prepare ARGV`, without a subprocess."""
    return run_command(prepare.main, argv, capsys)


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="ffmpeg is not installed (apt-get install ffmpeg)")


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def make_video(path, size="48x32", seconds=1.0, audio="sine=frequency=440"):
    src = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=10:duration={seconds}"]
    if audio:
        src += ["-f", "lavfi", "-i", f"{audio}:duration={seconds}", "-c:a", "aac"]
    ffmpeg(*src, "-c:v", "mpeg4", "-t", str(seconds), str(path))


def tiny_tokenizers(folder):
    """Random tiny VQGANs saved as echoes writes them ({"config", "state_dict"}): 32 px images
    -> 8 x 8 ids, 80 x 64 mels -> 5 x 4 ids, 64 codes each."""
    from echoes.tokenizers import VQGAN, VQGANConfig
    common = dict(ch=32, num_res_blocks=1, attn_resolutions=(), z_channels=32, embed_dim=8,
                  n_embed=64)
    paths = []
    for name, cfg in (("image", VQGANConfig(ch_mult=(1, 1, 1), resolution=32, **common)),
                      ("audio", VQGANConfig(ch_mult=(1, 1, 1, 1, 1), resolution=64,
                                            in_channels=1, out_ch=1, **common))):
        torch.manual_seed(0)
        path = folder / f"{name}_vqgan.pt"
        torch.save({"config": dataclasses.asdict(cfg), "state_dict": VQGAN(cfg).state_dict()},
                   path)
        paths.append(str(path))
    return ["--image-vqgan", paths[0], "--audio-vqgan", paths[1], "--image-size", "32",
            "--clip-seconds", "1", "--mel-frames", "64", "--frames", "3", "--workers", "2",
            "--batch-size", "2", "--device", "cpu"]


def tiny_bundle(folder):
    """A model checkpoint with `tiny_tokenizers`' VQGANs and a recipe inside, as the demo's."""
    flags = tiny_tokenizers(folder)
    entries = {m: torch.load(flags[flags.index(f"--{m}-vqgan") + 1], weights_only=True)
               for m in ("image", "audio")}
    entries["image"]["resolution"] = 32
    entries["audio"].update(n_samples=22050, n_frames=64, keep_frames=80, sample_rate=22050)
    path = folder / "bundle.pt"
    torch.save({"model": {}, "config": {"audio_len": 20, "image_len": 64},
                "tokenizers": entries}, path)
    return path


@needs_ffmpeg
def test_prepare_takes_the_tokenizers_and_their_recipe_from_a_bundle(tmp_path, capsys):
    from echoes.tokenizers import VQGANConfig, load_vqgan
    videos = tmp_path / "videos"
    (videos / "dogs").mkdir(parents=True)
    make_video(videos / "dogs" / "a.mp4")
    make_video(videos / "dogs" / "b.mp4", audio="sine=frequency=660")
    bundle = tiny_bundle(tmp_path)
    common = ["--videos", str(videos), "--frames", "2", "--device", "cpu",
              "--workers", "1", "--test-fraction", "0", "--tokenizers", str(bundle)]
    prepare.main([*common, "--out", str(tmp_path / "shards"), "--image-size", "32"])
    index = data.read_index(tmp_path / "shards")
    assert (index["image_len"], index["audio_len"]) == (64, 20)
    recipe = index["tokenizers"]
    assert recipe["image"]["resolution"] == 32
    assert {k: recipe["audio"][k] for k in ("n_samples", "n_frames", "keep_frames")} == {
        "n_samples": 22050, "n_frames": 64, "keep_frames": 80}
    assert len(data.TokenShards(tmp_path / "shards", "train")) == 2
    capsys.readouterr()
    # more clips into the same folder at other settings: refused before any clip is tokenized,
    # also for an index written before indexes carried the tokenizers' record
    index_path = tmp_path / "shards" / "index.json"
    index = json.loads(index_path.read_text())
    del index["tokenizers"]
    index_path.write_text(json.dumps(index))
    code, _, err = run_prepare([*common, "--out", str(tmp_path / "shards"), "--image-size", "32",
                                "--frames", "3"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "(frames, image tokens, audio tokens) = (2, 64, 20), these settings make (3, 64, 20)" \
        "; pass --frames 2 or use another --out" in err
    for extra, message in (
            (["--image-size", "64"], "--image-size 64 differs from the 32 of --tokenizers"),
            (["--clip-seconds", "2"], "--clip-seconds 2.0 differs from the 1 of --tokenizers"),
            (["--audio-vqgan", str(bundle)], "give --tokenizers or --image-vqgan / --audio-vqgan"),
    ):
        code, _, err = run_prepare([*common, "--out", str(tmp_path / "other"), *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    plain = tmp_path / "plain.pt"  # a model checkpoint without tokenizers inside
    torch.save({"model": {}, "config": {"audio_len": 20}}, plain)
    code, _, err = run_prepare(["--videos", str(videos), "--out", str(tmp_path / "p"),
                                "--tokenizers", str(plain)], capsys)
    assert code == 2 and "carries no tokenizer weights" in err
    # sample.py's --image-vqgan / --audio-vqgan take a bundle too: each its own modality
    assert load_vqgan(bundle, config=VQGANConfig.imagenet_f16_1024()).config.in_channels == 3
    assert load_vqgan(bundle, config=VQGANConfig.vggsound_codebook()).config.in_channels == 1
    assert load_vqgan(bundle, {"in_channels": 1, "double_z": False}).config.in_channels == 1
    with pytest.raises(UserError, match="without tokenizers inside, not a VQGAN"):
        load_vqgan(plain, config=VQGANConfig.vggsound_codebook())
    with pytest.raises(UserError, match="holds an image and an audio VQGAN: pass config="):
        load_vqgan(bundle)


@needs_ffmpeg
def test_a_bundle_given_as_a_vqgan_must_keep_its_recipe(tmp_path, capsys):
    bundle = str(tiny_bundle(tmp_path))
    (tmp_path / "videos").mkdir()
    args = ["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
            "--image-vqgan", bundle, "--audio-vqgan", bundle, "--device", "cpu"]
    code, _, err = run_prepare(args, capsys)  # the paper's recipe: 256 px, 10 s, 848 frames
    assert code == 2 and err.count("\n") == 1, err
    assert (f"--image-vqgan {bundle} is a bundle whose image tokenizer was made for another "
            f"recipe: --image-size 256 (its 32); give it as --tokenizers {bundle}") in err
    code, _, err = run_prepare([*args, "--image-size", "32"], capsys)
    assert code == 2 and "--audio-vqgan" in err and "--clip-seconds 10 (its 1)" in err
    assert "--mel-frames 848 (its 64), --keep-frames 860 (its 80)" in err
    # its own recipe: the tokenizers load, and the empty folder is what stops the run
    code, _, err = run_prepare([*args, "--image-size", "32", "--clip-seconds", "1",
                                "--mel-frames", "64", "--keep-frames", "80"], capsys)
    assert code == 2 and "holds no video files" in err, err


@needs_ffmpeg
def test_prepare_from_a_folder_of_videos(tmp_path, capsys):
    videos = tmp_path / "videos"
    (videos / "dogs").mkdir(parents=True)
    (videos / "cats").mkdir()
    make_video(videos / "dogs" / "a.mp4")
    make_video(videos / "dogs" / "b.mp4", size="32x48", audio="sine=frequency=660")
    make_video(videos / "cats" / "c.mkv", seconds=1.2)
    make_video(videos / "cats" / "quiet.mp4", audio="anullsrc=r=22050:cl=mono")
    # bytes no demuxer takes (random ones can hold an audio frame header ffprobe accepts)
    (videos / "cats" / "broken.mp4").write_bytes(b"this is not a video file\n" * 160)
    out = tmp_path / "shards"
    args = ["--videos", str(videos), "--out", str(out), "--test-fraction", "0.0",
            "--shard-size", "2", *tiny_tokenizers(tmp_path)]
    prepare.main(args)
    index = data.read_index(out)
    assert (index["frames"], index["image_len"], index["audio_len"]) == (3, 64, 20)
    assert index["tokenizers"]["audio"]["n_samples"] == 22050
    ds = data.TokenShards(out, "train")
    assert len(ds) == 3 and sorted(ds.ids) == ["cats/c", "dogs/a", "dogs/b"]
    assert sorted(ds.labels) == ["cats", "dogs", "dogs"]
    images = np.load(out / "train-00000.images.npy")
    assert images.shape == (2, 3, 64) and images.dtype == np.uint16 and images.max() < 64
    assert np.load(out / "train-00000.audio.npy").shape == (2, 20)
    skipped = {line.split("\t")[0]: line.split("\t")[1]
               for line in (out / "skipped.txt").read_text().splitlines()}
    assert set(skipped) == {"cats/broken", "cats/quiet"}
    assert "unreadable" in skipped["cats/broken"] and "silent" in skipped["cats/quiet"]
    # a rerun finds everything done (the bad clips are tried again and skipped again)
    capsys.readouterr()
    prepare.main(args)
    assert "3 already in shards" in capsys.readouterr().out
    assert len(data.TokenShards(out, "train")) == 3
    # one that tries a single clip again keeps the other skipped clip listed, counting its own
    capsys.readouterr()
    prepare.main([*args, "--limit", "1"])
    assert "; skipped 1 (reasons in" in capsys.readouterr().out
    assert set(prepare._read_skipped(out)) == {tuple(line.split("\t")) for line in
                                                (out / "skipped.txt").read_text().splitlines()}
    assert {row[0] for row in prepare._read_skipped(out)} == {"cats/broken", "cats/quiet"}
    # the codebooks' fingerprints are recorded
    from echoes.tokenizers import codebook_fingerprint, load_vqgan
    for m in ("image", "audio"):
        vq = load_vqgan(args[args.index(f"--{m}-vqgan") + 1])
        assert index["tokenizers"][m]["fingerprint"] == codebook_fingerprint(vq)
    # another audio VQGAN of the same shape is refused
    other = tmp_path / "other_audio.pt"
    vq = torch.load(args[args.index("--audio-vqgan") + 1], weights_only=True)
    vq["state_dict"]["quantize.embedding.weight"] += 1
    torch.save(vq, other)
    code, _, err = run_prepare([a if a != args[args.index("--audio-vqgan") + 1] else str(other)
                                for a in args], capsys)
    assert code == 2 and "holds shards made with other tokenizers" in err
    raw = json.loads((out / "index.json").read_text())  # an index from before fingerprints
    for m in ("image", "audio"):
        del raw["tokenizers"][m]["fingerprint"]
    (out / "index.json").write_text(json.dumps(raw))
    make_video(videos / "cats" / "d.mp4", audio="sine=frequency=550")
    prepare.main(args)  # takes the new clip into shards of the same (unfingerprinted) record
    assert "3 already in shards" in capsys.readouterr().out
    assert len(data.TokenShards(out, "train")) == 4
    assert "fingerprint" not in data.read_index(out)["tokenizers"]["audio"]
    assert not prepare._same_tokenizers({"image": None, "audio": {}}, index["tokenizers"])


@pytest.mark.parametrize("flag, value, want", [
    ("--clip-seconds", "nan", "--clip-seconds must be a finite number, got nan"),
    ("--workers", "-1", "--workers must be at least 0, got -1"),
    ("--min-fraction", "2", "--min-fraction and --test-fraction at most 1"),
    ("--device", "tpu", "--device 'tpu' is not a device this runs on"),
    ("--sample-rate", "11025", "--sample-rate 11025 is too low for the mel recipe"),
])
def test_impossible_prepare_settings_are_one_line(tmp_path, capsys, flag, value, want):
    code, _, err = run_prepare(["--videos", str(tmp_path), "--out",
                                str(tmp_path / "out"), flag, value], capsys)
    assert code == 2 and err.count("\n") == 1 and want in err, err


@needs_ffmpeg
def test_stereo_is_averaged_to_mono_as_the_wav_reader_does(tmp_path):
    import types

    from echoes.audio import load_audio
    s = types.SimpleNamespace(clip_seconds=1.0, min_fraction=0.5, image_size=32, frames=5,
                              sample_rate=22050, silence_db=-60)
    video = tmp_path / "stereo.mkv"  # left: a 0.8 sine, right: silence (lossless audio)
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x32:rate=10:duration=1", "-f", "lavfi", "-i",
           "aevalsrc=0.8*sin(2*PI*440*t)|0:s=22050:d=1", "-c:v", "mpeg4", "-c:a", "pcm_f32le",
           str(video))
    _, wav = prepare.decode_clip(str(video), s)
    assert 0.39 < np.abs(wav).max() < 0.41  # (L + R) / 2, not ffmpeg's (L + R) / sqrt(2)
    ffmpeg("-i", str(video), "-vn", "-c:a", "pcm_f32le", str(tmp_path / "stereo.wav"))
    ref = load_audio(str(tmp_path / "stereo.wav"), 22050)
    n = min(len(ref), len(wav))
    np.testing.assert_allclose(wav[:n], np.asarray(ref)[:n], atol=1e-4)


@needs_ffmpeg
def test_non_square_pixels_are_cropped_as_the_picture_is_shown(tmp_path):
    import types
    s = types.SimpleNamespace(clip_seconds=1.0, min_fraction=0.5, image_size=32, frames=2,
                              sample_rate=22050, silence_db=-60)
    square, wide = tmp_path / "square.mkv", tmp_path / "anamorphic.mkv"
    src = ["-f", "lavfi", "-i", "testsrc=size=128x64:rate=10:duration=1", "-f", "lavfi", "-i",
           "sine=frequency=440:duration=1", "-c:a", "pcm_s16le", "-c:v", "ffv1"]
    ffmpeg(*src, str(square))
    ffmpeg(*src, "-vf", "scale=96:64,setsar=4/3", str(wide))  # stored 96 x 64, shown 128 x 64
    a, _ = prepare.decode_clip(str(square), s)
    b, _ = prepare.decode_clip(str(wide), s)
    squeezed = np.abs(a.astype(float) - b.astype(float)).mean()
    assert squeezed < 12, squeezed


@needs_ffmpeg
def test_late_audio_stays_in_step_and_a_short_video_track_is_skipped(tmp_path):
    import types
    s = types.SimpleNamespace(clip_seconds=1.474, min_fraction=0.5, image_size=32, frames=5,
                              sample_rate=22050, silence_db=-60)
    late = tmp_path / "late.mp4"  # the sound starts 0.5 s after the picture
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x32:rate=10:duration=3", "-itsoffset", "0.5",
           "-f", "lavfi", "-i", "sine=frequency=440:duration=2.5", "-c:v", "mpeg4", "-c:a",
           "aac", str(late))
    frames, wav = prepare.decode_clip(str(late), s)
    first = np.nonzero(np.abs(wav) > 0.01)[0][0] / 22050
    assert frames.shape == (5, 32, 32, 3) and 0.45 < first < 0.55 and len(wav) > 32000
    short = tmp_path / "short_video.mp4"  # 0.4 s of picture, 3 s of sound
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x32:rate=10:duration=0.4", "-f", "lavfi", "-i",
           "sine=frequency=440:duration=3", "-c:v", "mpeg4", "-c:a", "aac", str(short))
    with pytest.raises(prepare.ClipError, match="video ends early"):
        prepare.decode_clip(str(short), s)


@needs_ffmpeg
def test_prepare_from_a_vggsound_csv(tmp_path):
    videos = tmp_path / "clips"
    videos.mkdir()
    make_video(videos / "abcdefghijk_000030.mp4")
    make_video(videos / "zyx_20000_30000.mkv")
    make_video(videos / "whole.mp4", seconds=2.5)  # a whole video: the clip starts at 1 s
    (tmp_path / "vggsound.csv").write_text(
        'abcdefghijk,30,"dog barking, loud",train\nzyx,20,cat purring,test\n'
        'gone,5,cat purring,train\nwhole,1,cat purring,train\n')
    out = tmp_path / "shards"
    prepare.main(["--videos", str(videos), "--csv", str(tmp_path / "vggsound.csv"),
                  "--out", str(out), *tiny_tokenizers(tmp_path)])
    train, test = data.TokenShards(out, "train"), data.TokenShards(out, "test", train=False)
    assert train.ids == ["abcdefghijk_000030", "whole_000001"]
    assert train.labels == ["dog barking, loud", "cat purring"]
    assert test.ids == ["zyx_000020"] and test.labels == ["cat purring"]
    assert "gone_000005\tno video file" in (out / "skipped.txt").read_text()
    a, v = train.fetch([0, 1])
    assert a.shape == (2, 20) and v.shape == (2, 64)
    assert json.loads((out / "index.json").read_text())["frames"] == 3


def test_two_files_of_one_clip_are_one_line_errors(tmp_path):
    videos = tmp_path / "videos"
    (videos / "dogs").mkdir(parents=True)
    for name in ("a.mp4", "a.mkv", "b.mp4"):  # list_clips only lists: empty files do
        (videos / "dogs" / name).write_bytes(b"")
    s = prepare.PrepareSettings(videos=str(videos))
    with pytest.raises(UserError, match="a.mkv and .*a.mp4 are both clip dogs/a"):
        prepare.list_clips(s)
    (videos / "dogs" / "a.mkv").unlink()
    assert [c.id for c in prepare.list_clips(s)] == ["dogs/a", "dogs/b"]
    (videos / "cats").mkdir()
    (videos / "cats" / "xyz_000030.mp4").write_bytes(b"")
    (videos / "dogs" / "xyz_000030.mp4").write_bytes(b"")
    csv_file = tmp_path / "clips.csv"
    csv_file.write_text("b,0,dog,train\n")
    assert [c.path for c in prepare.list_clips(dataclasses.replace(s, csv=str(csv_file)))] == \
        [str(videos / "dogs" / "b.mp4")]  # a clash the CSV does not ask for is no matter
    csv_file.write_text("xyz,30,dog,train\n")
    with pytest.raises(UserError, match="are both clip xyz_000030: keep one"):
        prepare.list_clips(dataclasses.replace(s, csv=str(csv_file)))
    # a clip already in the shards is not prepared again: its files do not matter
    assert prepare.list_clips(dataclasses.replace(s, csv=str(csv_file)), done={"xyz_000030"})


@pytest.mark.parametrize("text, want", [
    (b"abc,30,dog,train\n\xff\xd8\xff\xe0 a jpeg", "is not UTF-8 text \\(byte 0xff\\)"),
    (b"abc,30,dog,train\nxyz,20,cat\n", "line 2 has 3 columns"),
    (b"abc,30,dog barking, loud,train\n", "line 1 has 5 columns"),  # an unquoted comma
    (b"abc,30,dog,train\nxyz,thirty,cat,train\n", "line 2: start 'thirty' is not a number"),
    (b"abc,3O,dog,train\n", "line 1: start '3O' is not a number"),  # a typo, not a header
    (b"abc,inf,dog,train\n", "line 1: start 'inf' is not a number"),
    (b"abc,30,dog,\n", "line 1: an empty youtube_id or split"),
    (b"abc,2.9,dog,train\n", "line 1: start 2.9 is not whole seconds"),  # ids hold seconds
    (b"youtube_id,start_seconds,label,split\n\n", "lists no clips"),  # a header alone
    (b"", "lists no clips"),
])
def test_a_malformed_csv_is_one_user_error_naming_the_line(tmp_path, text, want):
    (tmp_path / "clips.csv").write_bytes(text)
    s = prepare.PrepareSettings(videos=str(tmp_path), csv=str(tmp_path / "clips.csv"))
    with pytest.raises(UserError, match=f"{want}.*youtube_id,start,label,split as "
                                             "VGGSound's vggsound.csv"):
        prepare.list_clips(s)


def test_a_csv_header_blank_lines_and_a_bom_are_passed_over(tmp_path):
    (tmp_path / "clips.csv").write_bytes(
        b'\xef\xbb\xbfyoutube_id,start_seconds,label,split\nabc,30,"dog, loud",train\n\n'
        b'xyz,20.0,cat,test\nabc,30,"dog, loud",train\n')  # a repeated row is one clip
    assert prepare.read_csv(str(tmp_path / "clips.csv")) == [
        ("abc", 30, "dog, loud", "train"), ("xyz", 20, "cat", "test"),
        ("abc", 30, "dog, loud", "train")]
    assert [c.id for c in prepare.list_clips(prepare.PrepareSettings(
        videos=str(tmp_path), csv=str(tmp_path / "clips.csv")))] == ["abc_000030", "xyz_000020"]
    (tmp_path / "late.csv").write_text("\n\nyoutube_id,start_seconds,label,split\n"
                                       "abc,30,dog,train\n")
    assert prepare.read_csv(str(tmp_path / "late.csv")) == [("abc", 30, "dog", "train")]


@pytest.mark.parametrize("text, want", [
    (b"abc,30,dog,../../x\n", "line 1: split '../../x' is not a name of letters"),  # a path
    (b"abc,30,dog,train\nabc,30,cat,train\n", "line 2 repeats abc,30 with another label"),
])
def test_a_csv_split_must_be_a_name_and_a_clip_has_one_row(tmp_path, text, want):
    (tmp_path / "clips.csv").write_bytes(text)
    with pytest.raises(UserError, match=want):
        prepare.read_csv(str(tmp_path / "clips.csv"))


def test_file_names_that_are_not_utf8_split_and_list_as_their_bytes(tmp_path):
    name = os.fsdecode(b"caf\xe9")  # a Latin-1 name: 'caf\udce9' in Python
    assert prepare._hash_split(name, 0.5) in ("train", "test")


@needs_ffmpeg
def test_flv_and_clips_past_the_end_or_without_samples(tmp_path):
    import types
    s = types.SimpleNamespace(clip_seconds=2.0, min_fraction=0.0, image_size=16, frames=4,
                              sample_rate=22050, silence_db=-60)
    # each frame's brightness is its number times 2 (50 levels a second), the sound its time / 10
    src = ["-f", "lavfi", "-i", "color=black:size=32x32:rate=25:duration=5,format=gray,"
           "geq=lum='N*2'", "-f", "lavfi", "-i", "aevalsrc='t/10':s=22050:d=5"]
    flv, mkv = tmp_path / "t.flv", tmp_path / "t.mkv"
    ffmpeg(*src, "-c:v", "ffv1", "-c:a", "pcm_f32le", str(mkv))
    try:  # FLV with MP3 sound and an index: a seek by it lands seconds late, even at 0
        ffmpeg(*src, "-c:v", "flv1", "-q:v", "2", "-c:a", "libmp3lame", "-ar", "22050",
               "-flvflags", "add_keyframe_index", str(flv))
    except subprocess.CalledProcessError:
        flv = None  # an ffmpeg built without the MP3 encoder
    for start in (0.0, 2.0):
        frames, wav = prepare.decode_clip(str(mkv), s, start)
        assert abs(wav[0] * 10 - start) < 0.01 and abs(wav[11025] * 10 - start - 0.5) < 0.01
        for frames in [frames] + ([prepare.decode_clip(str(flv), s, start)[0]] if flv else []):
            times = frames[..., 0].mean(axis=(1, 2)) / 2 / 25  # (F,) seconds
            assert 0 <= times[0] - start < 0.5, times
            assert np.allclose(np.diff(times), 0.5, atol=0.06), times
    with pytest.raises(prepare.ClipError, match="starts past the end \\(7 s of 5.0"):
        prepare.decode_clip(str(mkv), s, 7.0)
    empty = tmp_path / "no_samples.mkv"  # an audio stream that holds no samples
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=10:duration=2", "-f", "lavfi", "-i",
           "sine=frequency=440:duration=2", "-frames:a", "0", "-c:v", "mpeg4", str(empty))
    with pytest.raises(prepare.ClipError, match="short audio \\(0.00 s\\)"):
        prepare.decode_clip(str(empty), s)


def test_two_prepare_runs_never_write_one_folder_at_once(tmp_path, capsys):
    with folder_lock(str(tmp_path), "prepare run"):
        with pytest.raises(UserError, match="is being written by another prepare run"):
            with folder_lock(str(tmp_path), "prepare run"):
                pass
    with folder_lock(str(tmp_path), "prepare run"):  # released at the end of the block
        pass
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        return  # prepare itself needs ffmpeg
    videos, out = tmp_path / "videos", tmp_path / "shards"
    videos.mkdir()
    out.mkdir()
    make_video(videos / "a.mp4")
    with folder_lock(str(out), "prepare run"):  # another run at work in --out
        code, _, err = run_prepare(["--videos", str(videos), "--out", str(out),
                                    *tiny_tokenizers(tmp_path)], capsys)
    assert code == 2 and "is being written by another prepare run" in err


@needs_ffmpeg
def test_prepare_that_writes_no_clip_is_one_user_error(tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "shards"
    videos.mkdir()
    args = ["--videos", str(videos), "--out", str(out), *tiny_tokenizers(tmp_path)]
    code, _, err = run_prepare(args, capsys)
    assert code == 2 and err.startswith("error: --videos") and "holds no video files" in err
    assert err.count("\n") == 1
    make_video(videos / "short.mp4", seconds=0.3)  # under half of --clip-seconds 1
    code, _, err = run_prepare(args, capsys)
    err = err.splitlines()[-1]  # after the progress bar and the skipped clip's line
    assert code == 2 and err.startswith("error: no clip was usable")
    assert f"no clip was usable: all 1 skipped, reasons in {out / 'skipped.txt'}" in err
    assert "--clip-seconds" in err and not (out / data.INDEX).exists()
    assert (out / "skipped.txt").read_text().startswith("short\tshort (0.3")
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe")  # found before the tokenizers load
    code, _, err = run_prepare([*args, "--csv", str(tmp_path / "bad.csv")], capsys)
    assert code == 2 and "bad.csv is not UTF-8 text" in err
    # one usable clip: written; a rerun that adds nothing to it is a success
    make_video(videos / "long.mp4")
    assert run_prepare(args, capsys)[0] == 0 and len(data.TokenShards(out, "train")) == 1
    code, out_text, _ = run_prepare(args, capsys)
    assert code == 0 and "wrote 0 clips" in out_text
