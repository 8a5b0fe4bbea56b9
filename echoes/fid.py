"""FID of generated images (the paper's Tables 3 and 4, audio -> image and co-generation) as
pytorch-fid computes it (Heusel et al. 2017; `mseitzer/pytorch-fid`, the usual implementation):
Inception v3 pool3 features (2048) of the generated and the real images, and the Frechet
distance between Gaussians fitted to them.

    python -m echoes.fid --generated samples/ --target vggsound_frames/ \\
        --inception pt_inception-2015-12-05-6726825d.pth

- The network: torchvision's Inception v3 with pytorch-fid's changes for the weights ported from
  TensorFlow's FID Inception (`pt_inception-2015-12-05-6726825d.pth`, the Inception3 layout with
  1008 classes, loaded as it is): the average pools of the 35x35, 17x17 and first 8x8 mixed
  blocks leave the padding out of the count, the last 8x8 block max-pools its pool branch. Every
  convolution is conv (no bias) + BatchNorm (eps 1e-3) + ReLU. The features are the global
  average over the last block (pool3), before the classifier.
- The input as pytorch-fid gives it: an image file opened by PIL and converted to RGB, scaled to
  [0, 1] (ToTensor), resized to 299x299 bilinearly (align_corners False), mapped to [-1, 1];
  images go through one at a time, so they may differ in size.
- FID: `echoes.metrics.frechet_distance` of the two sets of features (pytorch-fid takes scipy's
  sqrtm of S_a S_b: the same number up to rounding).

Not here: the paper's IS for audio -> image, which uses Sound2Scene's 50-class classifier.
"""

import dataclasses
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from echoes.cli import (UserError, check_file, load_checkpoint, load_state_strict,
                        parse_settings, pick_device, run_cli, setting)
from echoes.metrics import frechet_distance, list_files
from echoes.tokenizers import read_image_file

# pytorch-fid's image extensions, matched as it globs them (case-sensitive: x.PNG is left out)
IMAGE_EXTS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")

# -----------------------------------------------------------------------------
# the network: Inception v3 as pytorch-fid builds it for the FID weights


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    """The FID blocks' 3x3 average pool: stride 1, padding 1, the padding not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35: 1x1, 5x5, double 3x3, pool
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17: factorised 7x7
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(dbl)))
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)),
                          self.branch7x7x3_4(self.branch7x7x3_3(b7)),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8: expanded 3x3 branches; `max_pool` in the last block
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """forward((B, 3, H, W) in [0, 1]) -> (B, 2048) pool3 features (see the module docstring).
    The classifier `fc` (1008 classes) is kept so that the released file loads as it is."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ... (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048): pool3


def load_inception(path, *, trusted=False):
    """The FID Inception from pytorch-fid's weights file (Inception3 layout), in eval mode.
    Files saved before BatchNorm counted its batches load too."""
    sd = load_checkpoint(path, trusted=trusted, what="FID Inception weights")
    model = FIDInception()
    if isinstance(sd, dict):  # num_batches_tracked does not enter inference
        sd = {**{k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")},
              **{k: v for k, v in sd.items() if not str(k).startswith("AuxLogits.")}}
    return load_state_strict(model, sd, "FID Inception weights", path).eval()


# -----------------------------------------------------------------------------
# images as pytorch-fid reads them, and the command line


def read_fid_image(path):
    """One image file -> (3, H, W) float32 in [0, 1]: PIL's convert("RGB") (an alpha band
    dropped, not composited), then ToTensor's scaling, as pytorch-fid reads it."""
    img = np.asarray(read_image_file(path, lambda f: f.convert("RGB")))  # (H, W, 3) uint8
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


@torch.no_grad()
def image_features(model, paths, device="cpu", progress=False, desc="images"):
    """(N, 2048) float64 numpy pool3 features of the image files, one image at a time."""
    rows = []
    for path in tqdm(paths, desc=desc, unit="image", disable=not progress, dynamic_ncols=True):
        rows.append(model(read_fid_image(path)[None].to(device)).double().cpu().numpy())
    return np.concatenate(rows)  # (N, 2048)


@dataclasses.dataclass
class Settings:
    """`python -m echoes.fid` settings (each one is a --flag; see --help)."""
    generated: str = setting("", "folder of generated images (e.g. sample.py --mode a2i's --out)")
    target: str = setting("", "folder of the real images they are compared with")
    inception: str = setting("", "pytorch-fid's weights pt_inception-2015-12-05-6726825d.pth "
                             "(its GitHub release fid_weights)")
    trust_checkpoints: bool = setting(False, "allow a weights file that needs full unpickling "
                                      "(only for files you trust)")
    device: str = setting("auto", "auto (a GPU when present), cpu, cuda or cuda:N")


def main(argv=None):
    s = parse_settings(Settings, sys.argv[1:] if argv is None else argv,
                       description="FID of generated images against real ones (pytorch-fid's "
                                   "Inception).", prog="python -m echoes.fid")
    gen = list_files(s.generated, "--generated", IMAGE_EXTS, "image", any_case=False)
    tgt = list_files(s.target, "--target", IMAGE_EXTS, "image", any_case=False)
    for path in gen + tgt:  # each one's header: a bad file fails now, not after the others
        read_image_file(path, lambda f: f.size)
    if not s.inception:
        raise UserError("give --inception, pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    check_file(s.inception, "--inception")
    if min(len(gen), len(tgt)) < 2:
        raise UserError("FID needs at least 2 images in each folder")
    device = pick_device(s.device)
    model = load_inception(s.inception, trusted=s.trust_checkpoints).to(device)
    fid = frechet_distance(image_features(model, gen, device, True, "generated"),
                           image_features(model, tgt, device, True, "target"))
    print(f"| generated | target | FID |\n|---|---|---|\n| {len(gen)} | {len(tgt)} | {fid:.3f} |")


if __name__ == "__main__":
    run_cli(main)
