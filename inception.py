"""The Inception-v3 network of FID, with the weights that published FID numbers use.

FID (Heusel et al. 2017) is only comparable across papers when it is computed on the same
network: the TensorFlow Inception-v3 graph of 2015-12-05, whose pool3 layer (2048-d) gives the
features. `FIDInception` is that graph exactly as pytorch-fid (Seitzer, "pytorch-fid: FID
score for PyTorch", v0.3.0) ports it, so its weight file, pt_inception-2015-12-05-6726825d.pth,
loads with strict key matching. Two details differ from torchvision's Inception-v3, and both
change the features: average pools ignore the zero padding (TensorFlow's mean), and Mixed_7c's
pool branch is a *max* pool. `load_inception` loads the weights and says in one line what is
wrong when they are missing or are another file.

Attribute names follow pytorch-fid / torchvision, because the state_dict keys (e.g.
"Mixed_5b.branch5x5_1.conv.weight") must match the weight file.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = os.path.basename(FID_WEIGHTS_URL)


class WeightsError(Exception):
    """The FID Inception weights are missing or not the expected file; one line."""


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool3x3(x, kind):
    # TensorFlow's average pool ignores the zero padding in its mean: count_include_pad=False.
    # (torchvision's own Inception counts it, one of the ways its FID numbers differ.)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool3x3(x, "avg"))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = conv(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_pool3x3(x, "avg"))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                     self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) whose 3x3 convolutions split into parallel 1x3 and 3x1."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "avg" in Mixed_7b; the FID graph has a *max* pool in Mixed_7c
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(_pool3x3(x, self.pool))], 1)


class FIDInception(nn.Module):
    """Inception-v3 of FID; forward(x in [-1, 1], [B, 3, 299, 299]) -> pool3 features [B, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # The 1008-class logits layer is in the weight file, so it is here for strict loading;
        # FID never uses it (and the offline copy of the weights stores it as NaN).
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # 147x147
        x = F.max_pool2d(x, 3, stride=2)                                       # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # 71x71
        x = F.max_pool2d(x, 3, stride=2)                                       # 35x35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                       # ... 8x8
        return x.mean(dim=(2, 3))  # pool3: the average over the final 8x8 map


def load_inception(weights=None, device="cpu"):
    """FIDInception in eval mode with pytorch-fid's weights, from the file `weights` or, by
    default, from the torch hub cache (downloaded there from pytorch-fid's release if absent)."""
    where = weights or os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)
    hint = (f"expected pytorch-fid's Inception state_dict; without internet, copy {FID_WEIGHTS_FILE} "
            f"into {os.path.dirname(where) if weights is None else 'the torch hub cache'} or "
            f"pass --inception PATH")
    if weights is not None and not os.path.isfile(weights):
        raise WeightsError(f"FID Inception weights not found at {weights} ({hint})")
    try:
        if weights is None:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=False,
                                                       map_location="cpu", weights_only=True)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/foreign files and failed downloads raise many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot load FID Inception weights {FID_WEIGHTS_FILE} from {where}: "
                           f"{reason} ({hint})") from None
    model = FIDInception()
    expected = model.state_dict()
    if not isinstance(state, dict):
        raise WeightsError(f"{where} does not hold a state_dict ({hint})")
    problems = ([f"missing {k}" for k in expected if k not in state]
                + [f"unexpected {k}" for k in state if k not in expected]
                + [f"wrong shape {k}" for k in expected
                   if k in state and tuple(state[k].shape) != expected[k].shape])
    if problems:
        raise WeightsError(f"{where} is not the FID Inception state_dict: {len(problems)} "
                           f"key problem(s), first: {problems[0]} ({hint})")
    model.load_state_dict(state, strict=True)
    # channels_last makes these convolutions 1.4-1.6x faster on CPU, with the same features to
    # float32 rounding (tests/test_evaluate.py compares them with pytorch-fid's own).
    return model.eval().to(device, memory_format=torch.channels_last)
