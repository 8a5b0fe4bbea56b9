"""Token shards, their dataset and loader, `python -m echoes.data` (paper Sec. 3.1, 4.1); making
them from videos is tests/test_prepare.py."""

import os
import re

import numpy as np
import pytest
import torch

from conftest import run_command
from echoes import data


def make_shards(root, n=23, frames=5, Lv=6, La=4, split="train", shard_size=7, seed=0,
                classes=3):
    """Clip i has audio ids 100 * i + position and image ids 10 * frame + position (frame f of
    every clip holds f in the tens), so a fetched row tells which clip and frame it came from."""
    rng = np.random.default_rng(seed)
    audio = 100 * np.arange(n)[:, None] + np.arange(La)[None]  # (n, La)
    image = 10 * np.arange(frames)[None, :, None] + rng.integers(0, 10, (n, frames, Lv))
    ids = [f"{split}{i}" for i in range(n)]
    labels = [f"class {i % classes}" for i in range(n)]
    data.write_shards(root, split, image, audio, ids, labels, shard_size=shard_size)
    return image, audio, ids, labels


def test_shard_round_trip(tmp_path):
    image, audio, ids, labels = make_shards(tmp_path, n=23, shard_size=7)
    # a second call appends shards; another split lives beside it
    more = make_shards(tmp_path, n=5, shard_size=7, seed=1)
    make_shards(tmp_path, n=4, split="test")
    index = data.read_index(tmp_path)
    assert data.split_sizes(index) == {"train": 28, "test": 4}
    assert [s["name"] for s in index["shards"] if s["split"] == "train"] == [
        f"train-{k:05d}" for k in range(5)]  # 7 + 7 + 7 + 2, then 5
    ds = data.TokenShards(tmp_path, "train", train=True)
    assert len(ds) == 28 and ds.ids == ids + more[2] and ds.labels == labels + more[3]
    stored = np.load(tmp_path / "train-00000.images.npy", mmap_mode="r")
    assert stored.dtype == np.uint16 and isinstance(stored, np.memmap)
    idx = np.array([22, 0, 7, 13, 23, 27, 6])
    frames = np.array([0, 4, 2, 3, 1, 0, 4])
    a, v = ds.fetch(idx, frames=frames)
    all_image = np.concatenate([image, more[0]])
    all_audio = np.concatenate([audio, more[1]])
    assert a.dtype == torch.int64 and a.shape == (7, 4) and v.shape == (7, 6)
    np.testing.assert_array_equal(a.numpy(), all_audio[idx])
    np.testing.assert_array_equal(v.numpy(), all_image[idx, frames])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".echoes-tmp-")]


def test_single_image_shards(tmp_path):
    """The demo data has one image per clip: (N, Lv) image ids are stored as one frame."""
    image = np.arange(12).reshape(3, 4)
    data.write_shards(tmp_path, "train", torch.tensor(image), torch.zeros(3, 2, dtype=torch.long),
                      ["a", "b", "c"], [0, 1, 0])
    ds = data.TokenShards(tmp_path, "train", train=True)
    assert ds.frames == 1 and ds.labels == [0, 1, 0]
    _, v = ds.fetch([2, 0])
    np.testing.assert_array_equal(v.numpy(), image[[2, 0]])
    with pytest.raises(ValueError, match="frames"):  # a folder holds one shape of clip
        data.write_shards(tmp_path, "train", np.zeros((1, 2, 4)), np.zeros((1, 2)), ["d"], [0])


def test_training_draws_every_frame_and_evaluation_takes_the_middle(tmp_path):
    make_shards(tmp_path, n=10, frames=5)
    train = data.TokenShards(tmp_path, "train", train=True, seed=0)
    seen = {int(f) for _ in range(20) for f in train.fetch(np.arange(10))[1][:, 0] // 10}
    assert seen == set(range(5))
    loader = data.ShardLoader(train, batch_size=5, seed=3)
    seen = {int(f) for _ in range(20) for f in loader.next()[1][:, 0] // 10}
    assert seen == set(range(5))
    evaluation = data.TokenShards(tmp_path, "train", train=False)
    for _ in range(3):
        assert (evaluation.fetch(np.arange(10))[1] // 10 == 2).all()  # frame 5 // 2
    # every step of an epoch draws its own frames (seeded by the position in the epoch)
    fresh = data.ShardLoader(train, batch_size=5, seed=3)
    frames = [fresh.next()[1][:, 0] // 10 for _ in range(2)]  # epoch 0's two steps
    assert fresh.epoch == 0 and not torch.equal(*frames)
    make_shards(tmp_path / "four", n=3, frames=4)  # an even count: the later of the middle two
    evaluation = data.TokenShards(tmp_path / "four", "train", train=False)
    assert (evaluation.fetch(np.arange(3))[1] // 10 == 2).all()


@pytest.mark.parametrize("n, world, batch", [(24, 3, 4), (23, 3, 2), (5, 4, 2)])
def test_rank_sharding_is_disjoint_and_complete(tmp_path, n, world, batch):
    make_shards(tmp_path, n=n)
    ds = data.TokenShards(tmp_path, "train")
    loaders = [data.ShardLoader(ds, batch, rank, world, seed=7) for rank in range(world)]
    for epoch in (0, 1):
        parts = [ld.rank_indices(epoch) for ld in loaders]
        assert len({len(p) for p in parts}) == 1  # the same number of steps on every rank
        merged = np.concatenate(parts)
        assert set(merged) == set(range(n))  # complete
        pad = len(merged) - n  # only the padding repeats clips
        assert pad < world * batch and len(merged) - len(set(merged)) == pad
    assert not np.array_equal(loaders[0].rank_indices(0), loaders[0].rank_indices(1))
    # what next() yields is exactly the rank's share, epoch after epoch
    for ld, rank in zip(loaders, range(world)):
        got = [ld.next()[0][:, 0] // 100 for _ in range(2 * ld.steps_per_epoch())]
        want = np.concatenate([ld.rank_indices(0), ld.rank_indices(1)])
        np.testing.assert_array_equal(torch.cat(got).numpy(), want)
    # evaluation batches: disjoint and complete without padding
    seen = []
    for r in range(world):
        for clips, a, _ in data.eval_batches(ds, 3, r, world):
            assert (a[:, 0] // 100).tolist() == clips.tolist()
            seen += clips.tolist()
    assert sorted(seen) == list(range(n))
    assert [c.tolist() for c, _, _ in data.eval_batches(ds, 3, 0, 1, limit=4)] == [[0, 1, 2], [3]]


def test_loader_position_restores_the_same_batches(tmp_path):
    make_shards(tmp_path, n=23)
    ds = data.TokenShards(tmp_path, "train")

    def loader():
        return data.ShardLoader(ds, 4, rank=1, world_size=2, seed=5, repair_within_class=True)

    a = loader()
    for _ in range(5):  # past the end of epoch 0 (3 steps of 8)
        a.next()
    state = a.state_dict()
    want = [a.next() for _ in range(4)]
    b = loader()
    b.load_state_dict(state)
    for (wa, wv), (ga, gv) in zip(want, (b.next() for _ in range(4))):
        assert torch.equal(wa, ga) and torch.equal(wv, gv)
    # a position from steps of 8 clips, resumed with steps of 6: back to a step boundary, so
    # every batch is full and the epoch's clips are read once each
    c = data.ShardLoader(ds, 3, rank=0, world_size=2, seed=5)
    c.load_state_dict({"epoch": 0, "index": 8})
    assert c.index == 6
    batches = [c.next()[0] for _ in range(c.steps_per_epoch() - 1)]  # the rest of epoch 0
    assert {len(b) for b in batches} == {3} and c.epoch == 0


def test_repair_within_class_keeps_the_class(tmp_path):
    image, audio, _, _ = make_shards(tmp_path, n=30, frames=1, classes=3)
    ds = data.TokenShards(tmp_path, "train")
    loader = data.ShardLoader(ds, 10, seed=0, repair_within_class=True)
    moved = 0
    for _ in range(6):
        a, v = loader.next()
        for clip, row in zip((a[:, 0] // 100).tolist(), v.numpy()):
            source = int(np.nonzero((image[:, 0] == row).all(1))[0][0])
            assert source % 3 == clip % 3
            moved += source != clip
    assert moved > 30  # most images come from another clip of the class


def test_a_failed_write_leaves_no_shard_visible(tmp_path, monkeypatch):
    make_shards(tmp_path, n=6)
    before = data.read_index(tmp_path)
    real_replace = os.replace

    def killed(src, dst):  # dies when the index is renamed into place, after every shard file
        if os.path.basename(dst) == data.INDEX:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        make_shards(tmp_path, n=5, seed=1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert data.read_index(tmp_path) == before
    ds = data.TokenShards(tmp_path, "train")
    assert len(ds) == 6
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".echoes-tmp-")]
    make_shards(tmp_path, n=5, seed=1)  # the next writer reuses the name
    assert len(data.TokenShards(tmp_path, "train")) == 11


def test_missing_index_and_split_are_one_line_errors(tmp_path):
    from echoes.cli import UserError
    with pytest.raises(UserError, match="no token shards"):
        data.TokenShards(tmp_path, "train")
    make_shards(tmp_path, n=3)
    with pytest.raises(UserError, match="split 'test'"):
        data.TokenShards(tmp_path, "test")
    (tmp_path / "train-00000.audio.npy").write_bytes(b"")  # emptied by a full disk, say
    with pytest.raises(UserError, match="train-00000 is unreadable"):
        data.TokenShards(tmp_path, "train")


def test_a_corrupt_index_is_one_user_error(tmp_path):
    from echoes.cli import UserError
    (tmp_path / data.INDEX).write_text('{"format": ')  # a torn write from another tool
    with pytest.raises(UserError, match="corrupt"):
        data.read_index(tmp_path)


def test_a_shard_sidecar_without_ids_is_one_user_error(tmp_path):
    from echoes.cli import UserError
    make_shards(tmp_path, n=3)
    (tmp_path / "train-00000.json").write_text('{"split": "train"}')
    with pytest.raises(UserError, match="train-00000 is unreadable .*no ids or labels"):
        data.TokenShards(tmp_path, "train")
    (tmp_path / "train-00000.json").unlink()
    with pytest.raises(UserError, match="train-00000 is unreadable \\(FileNotFoundError"):
        data.TokenShards(tmp_path, "train")


def test_ids_past_the_codebook_are_one_user_error(tmp_path):
    from echoes.cli import UserError
    make_shards(tmp_path, n=3)
    ds = data.TokenShards(tmp_path, "train", codebooks=(1000, 1000))
    ds.fetch([0, 1, 2])
    audio_max = int(max(a.max() for a in ds.audio))
    ds.codebooks = (audio_max, 1000)
    with pytest.raises(UserError, match=f"hold audio id {audio_max}, the model's codebook has "
                                        f"{audio_max} codes"):
        ds.fetch([0, 1, 2])


# -----------------------------------------------------------------------------
# the command line: bad input is one line on stderr and exit code 2


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of `python -m echoes.data ARGV`, without a subprocess."""
    return run_command(data.main, argv, capsys)


def test_no_command_prints_the_usage_on_stderr_with_exit_code_2(capsys):
    code, out, err = run_main([], capsys)
    assert code == 2 and not out and err.startswith("usage: python -m echoes.data COMMAND")
    for flag in ("-h", "--help"):
        code, out, err = run_main([flag], capsys)
        assert code == 0 and out.startswith("usage: python -m echoes.data COMMAND") and not err


def test_info_takes_help_or_one_folder(tmp_path, capsys):
    for flag in ("-h", "--help"):
        code, out, err = run_main(["info", flag], capsys)
        assert code == 0 and out.startswith("usage: python -m echoes.data info DIR") and not err
    for argv, want in ((["info"], "error: info needs the shard folder"),
                       (["info", "a", "b"], "error: info takes one shard folder, got 2 (a b)"),
                       (["info", "--all", str(tmp_path)], "error: info takes no option --all")):
        code, out, err = run_main(argv, capsys)
        assert code == 2 and not out and err.startswith(want) and err.count("\n") == 1, argv
    make_shards(tmp_path, n=3)
    code, out, _ = run_main(["info", str(tmp_path)], capsys)
    assert code == 0 and "train: 3 clips" in out


@pytest.mark.parametrize("text, want", [
    (b"\xff\xfe\x00\x01binary", "index.json is corrupt or unreadable \\(UnicodeDecodeError"),
    (b"[1, 2]", "is not an echoes shard index"),
    (b'{"format": "echoes-token-shards", "version": 1}', "index.json is corrupt \\(frames"),
    (b'{"format": "echoes-token-shards", "version": 1, "frames": 1, "image_len": 4, '
     b'"audio_len": 2, "shards": [{"name": "train-00000"}]}', "index.json is corrupt \\(frames"),
    (b'{"format": "echoes-token-shards", "version": 1, "frames": 1, "image_len": 4, '
     b'"audio_len": 2, "shards": [{"name": "train-00000", "split": "train", "n": -5}]}',
     "index.json is corrupt \\(frames"),
    (b'{"format": "echoes-token-shards", "version": 99, "frames": 1, "image_len": 4, '
     b'"audio_len": 2, "shards": []}', "index.json is version 99 of the shard format, this "
     "echoes reads version 1"),
])
def test_a_broken_index_is_one_line_from_info(tmp_path, capsys, text, want):
    (tmp_path / data.INDEX).write_bytes(text)
    code, out, err = run_main(["info", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert re.match(f"error: .*{want}", err), err


def test_prepare_is_also_a_command_of_echoes_data(capsys):
    code, out, err = run_main(["prepare", "--help"], capsys)
    assert code == 0 and out.startswith("usage: python -m echoes.prepare") and not err
    code, _, err = run_main(["prepare", "--videos", "missing-folder"], capsys)
    assert code == 2 and err == "error: --videos 'missing-folder' is not a folder\n", err
