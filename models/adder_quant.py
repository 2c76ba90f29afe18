"""Adder ResNet-20 with the post-training quantisation of "Redistribution of Weights
and Activations for AdderNet Quantization".

Paper: Nie, Han, Diao, Liu, Wu, Wang, NeurIPS'22, arXiv 2212.10200.  Written again in
torch after the official MindSpore code (`mindspore-ai/models:research/cv/AdderQuant/
{adder_quant.py,res20_adder.py}`) and the base adder layer of `huawei-noah/AdderNet`:

- adder layer: out = -sum_j |X_col - W_col| over the unfolded input, where unfold is
  a zero pad + one gather of the k*k shifted windows (the code's `unfold` copies k*k
  strided slices: same columns, smaller graph), and the subtract-abs-sum is a
  broadcast over [Cout, Cin*k*k, L*B] (the code's layout) followed by a reduction;
- offline (factory time): filters are clustered by their max |w| into 4 groups with a
  1-D k-means (Lloyd's algorithm in torch; the code uses sklearn), so each group
  shares one scale (intra-group sharing, inter-group independent scales);
- calibration in eager mode (the code's `counting` flag): each layer's activation
  range is the running max over calibration batches of |x|'s ~0.9994 quantile, taken
  by `sort` exactly as the code does (`int((round(n*0.9997)-1)*0.9997)`): the
  *outlier clamp* for activations;
- per group g, the *lossless range clamp* for weights: if max|w| exceeds the
  activation range, s_g = act_range, weights are clipped to [-s_g, s_g] and a bias
  -sum(max(|w| - s_g, 0)) is added, which leaves the output unchanged for activations
  in [0, s_g]; otherwise s_g = max|w| of the group;
- weights w_q = clamp(round(w (2^b-1) / (2 s_g)), -2^(b-1), 2^(b-1)-1) * 2 s_g /
  (2^b-1), computed once at freeze time (they are constants);
- forward (traced): per group, activations a_q = clamp(round(x (2^b-1) / s_g), 0,
  2^b-1) * s_g / (2^b-1) (G-way activation fake-quant), adder, + bias;
  the groups are concatenated and channels put back in their original order (a
  gather with the inverse permutation, the code's `original_order`).

All scales, clipped weights, biases and permutations are frozen as buffers before
tracing.  No pre-trained CIFAR weights offline: weights are seeded (Kaiming normal,
fan_out, as the code) and BatchNorm's running statistics come from train-mode passes
over synthetic calibration images, so that the network computes something non-trivial.

Small configuration (WORKLOADS.md §2): adder ResNet-20 on [2,3,32,32] (stem conv
3->16, 3x3 BasicBlocks of 16@32^2, 32@16^2, 64@8^2, 1x1 adder shortcuts, avgpool 8,
1x1 conv 64->10, BN), 4 k-means groups, 4-bit weights and activations (the paper's
headline; the code's default is 8), 4 synthetic calibration images.

Chains exercised: pad + gather unfold -> broadcast subtract -> abs -> sum (the adder);
G-way activation fake-quant (mul, round, clamp, mul) + gather by group; bias add;
concat + channel gather; BN + ReLU + residual; avg-pool; log-softmax/cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics

PAPER = "Redistribution of Weights and Activations for AdderNet Quantization (arXiv 2212.10200)"
CHAINS = [
    "pad + gather unfold (im2col)",
    "broadcast subtract -> abs -> sum (adder)",
    "activation fake-quant per group (mul, round, clamp, mul) + gather by group",
    "extra bias add + channel gather (original order)",
    "batchnorm + relu + residual add",
    "avg-pool",
    "log_softmax + nll (loss)",
]


def unfold_index(c: int, h: int, w: int, k: int, stride: int = 1, pad: int = 0) -> torch.Tensor:
    """Flat index into the padded [C, H+2p, W+2p] image of each im2col entry.

    col[(c, dy, dx), (oy, ox)] = x_pad[c, oy*stride + dy, ox*stride + dx].
    """
    hp, wp = h + 2 * pad, w + 2 * pad
    oh, ow = (hp - k) // stride + 1, (wp - k) // stride + 1
    ch = torch.arange(c).view(c, 1, 1, 1, 1)
    dy = torch.arange(k).view(1, k, 1, 1, 1)
    dx = torch.arange(k).view(1, 1, k, 1, 1)
    oy = torch.arange(oh).view(1, 1, 1, oh, 1) * stride
    ox = torch.arange(ow).view(1, 1, 1, 1, ow) * stride
    return ((ch * hp + oy + dy) * wp + ox + dx).reshape(-1)


def unfold(
    x: torch.Tensor, k: int, stride: int = 1, pad: int = 0, index: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*k*k, L] (im2col): zero pad, then one gather.

    The code's `unfold` copies k*k strided slices; the same columns are read here with
    one `index_select` (index from `unfold_index`, frozen as a buffer in the layers),
    which keeps the traced graph small.
    """
    b, c, h, w = x.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    if index is None:
        index = unfold_index(c, h, w, k, stride, pad).to(x.device)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    cols = torch.index_select(x.reshape(b, -1), 1, index)
    return cols.view(b, c * k * k, oh * ow)


def adder2d(x: torch.Tensor, w: torch.Tensor, stride: int = 1, pad: int = 0) -> torch.Tensor:
    """AdderNet's l1 "convolution": out[b,o,p] = -sum_j |x_col[b,j,p] - w[o,j]|."""
    b, _, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    x_col = unfold(x, k, stride, pad).permute(1, 2, 0).reshape(-1, oh * ow * b)  # [J, L*B]
    w_col = w.reshape(o, -1)  # [O, J]
    out = -(w_col[:, :, None] - x_col[None, :, :]).abs().sum(1)  # [O, L*B]
    return out.view(o, oh, ow, b).permute(3, 0, 1, 2)


def fake_quant_weight(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric b-bit grid of step 2s/(2^b-1) on [-s, s]."""
    levels = 2.0**bits - 1
    q = torch.clamp(torch.round(w * levels / s / 2), -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    return q * 2 * s / levels


def fake_quant_act(x: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned b-bit grid of step s/(2^b-1) on [0, s]: activations above s are clamped."""
    levels = 2.0**bits - 1
    return torch.clamp(torch.round(x * levels / s), 0, levels) * s / levels


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 100) -> torch.Tensor:
    """Lloyd's k-means on scalars, quantile-initialised (deterministic); labels [n]."""
    centres = torch.quantile(values, (torch.arange(k, dtype=values.dtype) + 0.5) / k)
    labels = torch.zeros_like(values, dtype=torch.int64)
    for _ in range(iters):
        labels = (values[:, None] - centres[None, :]).abs().argmin(1)
        new = torch.stack(
            [values[labels == j].mean() if (labels == j).any() else centres[j] for j in range(k)]
        )
        if torch.equal(new, centres):
            break
        centres = new
    # Relabel clusters in increasing centre order, so group 0 holds the smallest filters.
    rank = torch.argsort(torch.argsort(centres))
    return rank[labels]


def activation_range(x: torch.Tensor, select: float = 0.9997) -> torch.Tensor:
    """The code's outlier-clamped range: a high quantile of |x| found by sorting."""
    flat = x.reshape(-1).abs().sort().values
    index = int((round(flat.numel() * select) - 1) * select)
    return flat[index]


class QAdder2d(nn.Module):
    """Adder layer with k-means group-shared scales (`QAdder2dKmeansGroupShare`).

    Modes: "fp" (full precision), "calibrate" (fp, and record the activation range:
    the code's `counting`), "quant" (after `freeze`: the traced form).
    """

    def __init__(self, cin, cout, k, stride=1, pad=0, bits_w=4, bits_a=4, groups=4):
        super().__init__()
        self.k, self.stride, self.pad = k, stride, pad
        self.bits_w, self.bits_a, self.groups = bits_w, bits_a, groups
        # Trained adder filters are Laplacian and wider than the activations (the paper's
        # premise for the range clamp); per-filter widths vary, which k-means then groups.
        width = torch.exp(torch.empty(cout, 1, 1, 1).uniform_(-1.5, 0.0))
        laplace = torch.distributions.Laplace(0.0, 1.0).sample((cout, cin, k, k))
        self.weight = nn.Parameter(laplace * width)
        self.mode = "fp"
        self.register_buffer("act_range", torch.tensor(0.0))
        self.group_sizes: list[int] = []
        self.clipped: list[bool] = []

    @torch.no_grad()
    def freeze(self) -> None:
        """k-means groups, per-group scales, clipped weights and extra biases -> buffers."""
        cout = self.weight.shape[0]
        act_range = self.act_range.clamp_min(1e-3)
        w_max = self.weight.reshape(cout, -1).abs().amax(1)
        labels = kmeans_1d(w_max, self.groups)
        perm = torch.cat([torch.nonzero(labels == g)[:, 0] for g in range(self.groups)])
        assert all((labels == g).any() for g in range(self.groups)), "empty k-means group"
        self.group_sizes = [int((labels == g).sum()) for g in range(self.groups)]
        w = self.weight[perm]
        scales, extra_bias, self.clipped = [], torch.zeros(cout), []
        start = 0
        for size in self.group_sizes:
            wg = w[start : start + size]
            if wg.abs().max() > act_range:  # lossless range clamp
                s = act_range
                extra_bias[start : start + size] = -(wg.abs() - s).clamp_min(0).sum((1, 2, 3))
                w[start : start + size] = wg.clamp(-s, s)
                self.clipped.append(True)
            else:
                s = wg.abs().max()
                self.clipped.append(False)
            scales.append(s)
            start += size
        self.register_buffer("col_index", unfold_index(*self.input_chw, self.k, self.stride, self.pad))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.register_buffer("w_grouped", w.clone())
        self.register_buffer("scales", torch.stack(scales))
        sizes = torch.tensor(self.group_sizes)
        channel_scale = torch.repeat_interleave(self.scales, sizes)
        self.register_buffer("channel_group", torch.repeat_interleave(torch.arange(len(sizes)), sizes))
        self.register_buffer("channel_scale", channel_scale.view(-1, 1, 1, 1))
        # The weights are constants: quantise them once (the code re-quantises them in
        # every forward, which a compiler would constant-fold anyway).
        self.register_buffer("w_quant", fake_quant_weight(w, self.channel_scale, self.bits_w))
        self.register_buffer("extra_bias", extra_bias)
        self.mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "calibrate":
            self.act_range = torch.maximum(self.act_range, activation_range(x))
            self.input_chw = tuple(x.shape[1:])
        if self.mode != "quant":
            return adder2d(x, self.weight, self.stride, self.pad)
        # Fake-quant is element-wise and fq(0) = 0, so it commutes with the zero-padded
        # unfold: unfold once, quantise the columns once per group scale (G-way
        # activation fake-quant, [G, J, L*B]), take the filters quantised with their
        # group's scale at freeze time, and let each filter read its own group's
        # columns (a gather over the
        # group axis: the code's per-group loop + concat, in one adder); add the
        # range-clamp biases and gather channels back to their original order.
        b, _, h, wd = x.shape
        oh = (h + 2 * self.pad - self.k) // self.stride + 1
        ow = (wd + 2 * self.pad - self.k) // self.stride + 1
        x_col = unfold(x, self.k, self.stride, self.pad, self.col_index)
        x_col = x_col.permute(1, 2, 0).reshape(-1, oh * ow * b)  # [J, L*B]
        a_all = fake_quant_act(x_col[None], self.scales[:, None, None], self.bits_a)
        a = torch.index_select(a_all, 0, self.channel_group)  # [O, J, L*B]
        w = self.w_quant.reshape(self.w_quant.shape[0], -1, 1)  # [O, J, 1], group order
        out = -(w - a).abs().sum(1)  # [O, L*B]
        if any(self.clipped):
            out = out + self.extra_bias[:, None]
        out = out.view(-1, oh, ow, b).permute(3, 0, 1, 2)
        return torch.index_select(out, 1, self.inv_perm)  # the code's original_order


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, qargs: dict):
        super().__init__()
        self.conv1 = QAdder2d(cin, cout, 3, stride, 1, **qargs)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = QAdder2d(cout, cout, 3, 1, 1, **qargs)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(QAdder2d(cin, cout, 1, stride, 0, **qargs), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


@dataclass(frozen=True)
class AdderQuantConfig:
    blocks: tuple[int, int, int] = (3, 3, 3)
    widths: tuple[int, int, int] = (16, 32, 64)
    num_classes: int = 10
    bits_w: int = 4
    bits_a: int = 4
    groups: int = 4
    calibration_images: int = 4


class AdderResNet20(nn.Module):
    def __init__(self, cfg: AdderQuantConfig):
        super().__init__()
        qargs = {"bits_w": cfg.bits_w, "bits_a": cfg.bits_a, "groups": cfg.groups}
        self.conv1 = nn.Conv2d(3, cfg.widths[0], 3, 1, 1, bias=False)  # a normal conv
        self.bn1 = nn.BatchNorm2d(cfg.widths[0])
        layers, cin = [], cfg.widths[0]
        for i, (n, width) in enumerate(zip(cfg.blocks, cfg.widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1, qargs))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Conv2d(cin, cfg.num_classes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg.num_classes)

    def adders(self) -> list[QAdder2d]:
        return [m for m in self.modules() if isinstance(m, QAdder2d)]

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.avg_pool2d(x, 8)
        return self.bn2(self.fc(x)).flatten(1)


def synthetic_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """CIFAR-like stand-ins: smooth random colour fields plus a few blobs, normalised."""
    low = torch.randn(n, 3, 4, 4, generator=generator)
    img = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in range(n):
        cy, cx, r = (torch.rand(3, generator=generator) * torch.tensor([32, 32, 8]) + 4).tolist()
        img[i] += 1.5 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).float()
    return (img - img.mean((0, 2, 3), keepdim=True)) / img.std((0, 2, 3), keepdim=True)


@torch.no_grad()
def calibrate(model: AdderResNet20, images: torch.Tensor) -> None:
    """BN statistics, then activation ranges (eager), then k-means + scales (frozen)."""
    with batchnorm_statistics(model):
        for chunk in images.split(4):
            model(chunk)
    for layer in model.adders():
        layer.mode = "calibrate"
    for chunk in images.split(4):
        model(chunk)
    for layer in model.adders():
        layer.freeze()


def loss_fn(logits, w: Workload) -> torch.Tensor:
    return F.cross_entropy(logits, w.targets["labels"])


def build(cfg: AdderQuantConfig | None = None, seed: int = 0) -> Workload:
    cfg = cfg or AdderQuantConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = AdderResNet20(cfg)
    calibrate(model, synthetic_images(cfg.calibration_images, g))
    model.eval()
    x = synthetic_images(2, g)
    return Workload(
        name="adder_quant",
        model=model,
        example_inputs=(x,),
        loss_fn=loss_fn,
        paper=PAPER,
        config=(
            f"adder ResNet-20 on [2,3,32,32], W{cfg.bits_w}A{cfg.bits_a} PTQ, {cfg.groups} "
            f"k-means groups/layer, {cfg.calibration_images} calibration images"
        ),
        chains=list(CHAINS),
        targets={"labels": torch.tensor([3, 7])},
    )
