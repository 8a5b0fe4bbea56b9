"""echoes/fid.py: the FID Inception against pytorch-fid's (tests/reference/fid_eval.pt, made by
running pytorch-fid 0.3.0 with torchvision's Inception v3 blocks), the image reading, the command
line."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import recipe_weights, run_command
from echoes import fid

REFERENCE = Path(__file__).parent / "reference" / "fid_eval.pt"


@pytest.fixture(scope="module")
def ref():
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Recipe weights saved as pytorch-fid releases its weights (the Inception3 state dict)."""
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(recipe_weights(fid.FIDInception()), path)
    return path


def test_the_inception_is_pytorch_fids(ref, released, one_thread):
    assert list(fid.FIDInception().state_dict()) == ref["keys"].split("\n")
    model = fid.load_inception(released)
    with torch.no_grad():
        pool3 = model(ref["images"])  # (3, 3, 64, 80): resized to 299 inside
    torch.testing.assert_close(pool3, ref["pool3"], rtol=1e-5, atol=1e-5)
    assert fid.frechet_distance(ref["fd_a"].numpy(), ref["fd_b"].numpy()) == pytest.approx(
        float(ref["fid"]), rel=1e-9)
    # weights saved before BatchNorm counted its batches load too
    old = {k: v for k, v in torch.load(released, weights_only=True).items()
           if not k.endswith("num_batches_tracked")}
    torch.save(old, released.with_name("old.pth"))
    fid.load_inception(released.with_name("old.pth"))


def test_images_are_read_as_pytorch_fid_reads_them(tmp_path):
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # red, fully transparent: convert("RGB") keeps the red
    Image.fromarray(rgba).save(tmp_path / "a.png")
    x = fid.read_fid_image(tmp_path / "a.png")
    assert x.shape == (3, 5, 7) and torch.allclose(x[0], torch.full((5, 7), 200 / 255))
    Image.fromarray(np.full((4, 4), 51, np.uint8)).save(tmp_path / "grey.png")
    assert torch.allclose(fid.read_fid_image(tmp_path / "grey.png"), torch.full((3, 4, 4), 0.2))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(fid.UserError, match="is not an image file this reads"):
        fid.read_fid_image(tmp_path / "bad.png")


def test_command_line(tmp_path, capsys, released, one_thread):
    rng = np.random.default_rng(0)
    for folder, sizes in (("gen", [(32, 40), (48, 48), (20, 30)]), ("real", [(64, 64)] * 3)):
        (tmp_path / folder).mkdir()
        for i, (h, w) in enumerate(sizes):  # sizes may differ: one image at a time
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "gen" / "notes.txt").write_text("not an image: passed over")
    (tmp_path / "gen" / "UPPER.PNG").write_text("pytorch-fid's glob passes it over too")
    flags = ["--generated", tmp_path / "gen", "--target", tmp_path / "real", "--inception",
             released, "--device", "cpu"]
    code, out, err = run_command(fid.main, flags, capsys)
    assert code == 0, err
    head, _, row = out.splitlines()[:3]
    assert head == "| generated | target | FID |" and row.startswith("| 3 | 3 | ")
    assert float(row.split("|")[3]) > 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    for name in ("a.png", "x.png"):
        (tmp_path / "bad" / name).write_bytes((tmp_path / "real" / "0.png").read_bytes()
                                              if name == "a.png" else b"junk")
    for argv, want in [
            (flags[:4], "give --inception"),
            (["--generated", tmp_path / "empty", *flags[2:]], "holds no image files"),
            (["--generated", tmp_path / "none", *flags[2:]], "is not a folder"),
            ([*flags[:4], "--inception", tmp_path / "gen" / "0.png"], "FID Inception weights"),
            (["--generated", tmp_path / "gen", "--target", tmp_path / "bad", *flags[4:]],
             "bad" + os.sep + "x.png is not an image file"),  # before any image is run
    ]:
        code, _, err = run_command(fid.main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and want in err, err
