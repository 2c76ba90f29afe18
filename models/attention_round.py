"""Attention Round: post-training quantisation where each weight attends to all levels.

Paper: "Attention Round for Post-Training Quantization", Huabin Diao, Gongyan Li,
Shaoyun Xu, Yuexing Hao, arXiv 2207.03088.  No code was published; this workload
follows the abstract (WORKLOADS.md §9 marks the details UNCONFIRMED):

- Attention Round: a weight w is not only rounded to one of its two neighbouring
  quantisation levels; it may map to every level q_k, with a probability that decays
  as a Gaussian of the distance: p_k = softmax_k(-(w - q_k)^2 / (2 sigma^2)), and the
  quantised weight is sum_k p_k q_k.  This runs inside forward, so that it is a fusion
  chain (broadcast subtract -> square -> scale -> softmax over levels -> weighted sum
  over levels; a compiler should never materialise the [weights x levels] tensor).
  Levels are a per-output-channel uniform grid q_k = s_c k, k in [-2^(b-1), 2^(b-1)-1],
  s_c = max|W_c| / 2^(b-1); sigma is a fraction (0.25) of the grid step.  As sigma -> 0
  this is round-to-nearest.  The paper learns the rounding on calibration data; no
  training runs here, the soft assignment is used as is.
- Mixed precision: per-layer bit-widths from the lossy coding length of the layer's
  weights (Ma et al.): for W reshaped to [m = C_out, n = C_in k k] and RMS-normalised,
  L = (m + n)/2 * logdet(I + n / (m eps^2) W W^T) (slogdet, at factory time); layers
  whose coding length per weight is higher get more bits: b = clamp(round(4 + z),
  2, 6), z the z-score of the layer's coding length per weight among the layers.  (The
  exact rule is not in the abstract: a design choice.)
- Activations: fake-quant with a straight-through estimator, x + (q(x) - x).detach(),
  q(x) = clamp(round(x / s), lo, hi) s, 8 bits, unsigned after ReLUs and signed for the
  input image, ranges calibrated in eager mode and frozen as buffers.
- BatchNorm is folded into the convolutions at factory time (standard PTQ), after its
  statistics are gathered in train mode on synthetic calibration images.

Small configuration: ResNet-18 (CIFAR stem, [2,2,2,2] BasicBlocks) at a quarter of the
usual width (16, 32, 64, 128 channels) on [2,3,32,32]; every conv and the classifier
quantised with Attention Round, bits in [2, 6] (up to 64 levels); 8 calibration images.

Chains exercised: weight / scale -> subtract levels -> square -> scale -> softmax over
levels -> weighted sum -> rescale (Attention Round); activation divide -> round ->
clamp -> multiply -> subtract -> add (STE fake-quant); conv + bias + ReLU + residual;
global average pool; log-softmax / cross-entropy (loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics

PAPER = "Attention Round for Post-Training Quantization (arXiv 2207.03088)"
CHAINS = [
    "attention round: (w/s - levels)^2 -> scale -> softmax over levels -> weighted sum -> * s",
    "activation fake-quant with STE: div, round, clamp, mul, sub, add",
    "conv (+ folded bias) + relu + residual add",
    "global average pool",
    "log_softmax + nll (loss)",
]


def attention_round(w: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, sigma: float) -> torch.Tensor:
    """sum_k softmax_k(-(w - s q_k)^2 / (2 (s sigma)^2)) s q_k, in grid units.

    w [C, ...], scale [C, 1, ...] (per output channel), levels [K] integers, sigma in
    grid steps.
    """
    u = w / scale  # weight in grid units
    d = (u[..., None] - levels) ** 2  # [..., K]
    p = F.softmax(d * (-0.5 / (sigma * sigma)), dim=-1)
    return (p * levels).sum(-1) * scale


def coding_length(w: torch.Tensor, eps: float = 0.5) -> float:
    """Ma et al.'s lossy coding length of the rows of W [m, n] (RMS-normalised), in nats."""
    w = w.detach().reshape(w.shape[0], -1).double()
    w = w / w.pow(2).mean().sqrt()
    m, n = w.shape
    gram = torch.eye(m, dtype=w.dtype) + (n / (m * eps * eps)) * (w @ w.T)
    sign, logdet = torch.linalg.slogdet(gram)
    assert sign > 0
    return float((m + n) / 2 * logdet)


def allocate_bits(scores: list[float], mean_bits: int = 4, lo: int = 2, hi: int = 6) -> list[int]:
    """More bits to layers with more information per weight: mean_bits + z-score, rounded."""
    t = torch.tensor(scores, dtype=torch.float64)
    z = (t - t.mean()) / t.std().clamp_min(1e-12) if len(scores) > 1 else torch.zeros(1)
    return [int(min(hi, max(lo, round(mean_bits + float(v))))) for v in z]


class ActQuant(nn.Module):
    """8-bit activation fake-quant with a straight-through estimator (frozen range)."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        self.mode = "fp"  # "calibrate" records the range; "quant" fake-quantises
        self.register_buffer("amax", torch.tensor(0.0))
        self.register_buffer("amin", torch.tensor(0.0))
        self.signed = False

    def forward(self, x):
        if self.mode == "calibrate":
            self.amax = torch.maximum(self.amax, x.detach().max())
            self.amin = torch.minimum(self.amin, x.detach().min())
        if self.mode != "quant":
            return x
        if self.signed:
            lo, hi = -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        else:
            lo, hi = 0, 2**self.bits - 1
        q = torch.clamp(torch.round(x / self.scale), lo, hi) * self.scale
        return x + (q - x).detach()

    @torch.no_grad()
    def freeze(self) -> None:
        self.signed = bool(self.amin < 0)
        span = torch.maximum(self.amax, -self.amin) if self.signed else self.amax
        levels = 2 ** (self.bits - 1) if self.signed else 2**self.bits - 1
        self.register_buffer("scale", (span / levels).clamp_min(1e-8))
        self.mode = "quant"


class ARLayer(nn.Module):
    """A conv or linear whose weights pass through Attention Round in forward."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, sigma: float = 0.25):
        super().__init__()
        self.layer = layer
        self.act = ActQuant()
        self.sigma = sigma
        self.bits = 0  # 0: full precision (before `quantise`)

    @torch.no_grad()
    def quantise(self, bits: int) -> None:
        self.bits = bits
        w = self.layer.weight
        view = [-1] + [1] * (w.dim() - 1)
        amax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-8)
        self.register_buffer("scale", (amax / 2 ** (bits - 1)).view(view))
        k = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=w.dtype)
        self.register_buffer("levels", k)

    def weight(self) -> torch.Tensor:
        if not self.bits:
            return self.layer.weight
        return attention_round(self.layer.weight, self.scale, self.levels, self.sigma)

    def forward(self, x):
        x = self.act(x)
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            return F.conv2d(x, self.weight(), c.bias, c.stride, c.padding)
        return F.linear(x, self.weight(), self.layer.bias)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
    def __init__(self, widths=(16, 32, 64, 128), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, wd in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(cin, wd, 2 if (i > 0 and j == 0) else 1))
                cin = wd
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """conv followed by eval-mode BN -> one conv with bias."""
    folded = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True
    )
    with torch.no_grad():
        inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded.weight.copy_(conv.weight * inv[:, None, None, None])
        folded.bias.copy_(bn.bias - bn.running_mean * inv)
    return folded


class QBlock(nn.Module):
    def __init__(self, block: BasicBlock):
        super().__init__()
        self.conv1 = ARLayer(_fold(block.conv1, block.bn1))
        self.conv2 = ARLayer(_fold(block.conv2, block.bn2))
        self.shortcut = None if block.shortcut is None else ARLayer(_fold(*block.shortcut))

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class QResNet18(nn.Module):
    """BN-folded ResNet-18 whose every conv / linear is an Attention Round layer."""

    def __init__(self, fp: ResNet18):
        super().__init__()
        self.conv1 = ARLayer(_fold(fp.conv1, fp.bn1))
        self.blocks = nn.Sequential(*(QBlock(b) for b in fp.blocks))
        self.fc = ARLayer(fp.fc)

    def ar_layers(self) -> list[ARLayer]:
        return [m for m in self.modules() if isinstance(m, ARLayer)]

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


def synthetic_images(n: int, g: torch.Generator) -> torch.Tensor:
    """Calibration / example images: smooth colour fields with edges, normalised."""
    low = F.interpolate(
        torch.randn(n, 3, 4, 4, generator=g), size=(32, 32), mode="bicubic", align_corners=False
    )
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    angle = torch.rand(n, generator=g) * math.pi
    edge = (torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy > 0).float()
    return low + edge[:, None] * torch.randn(n, 3, 1, 1, generator=g)


@dataclass(frozen=True)
class AttentionRoundConfig:
    widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    num_classes: int = 10
    sigma: float = 0.25
    mean_bits: int = 4
    min_bits: int = 2
    max_bits: int = 6
    calibration_images: int = 8


@torch.no_grad()
def make_quantised(cfg: AttentionRoundConfig, g: torch.Generator) -> QResNet18:
    fp = ResNet18(cfg.widths, cfg.num_classes)
    calib = synthetic_images(cfg.calibration_images, g)
    with batchnorm_statistics(fp):  # then fold
        fp(calib)
    q = QResNet18(fp).eval()
    layers = q.ar_layers()
    scores = [coding_length(lay.layer.weight) / lay.layer.weight.numel() for lay in layers]
    bits = allocate_bits(scores, cfg.mean_bits, cfg.min_bits, cfg.max_bits)
    for lay in layers:  # activation ranges in full precision
        lay.sigma = cfg.sigma
        lay.act.mode = "calibrate"
    q(calib)
    for lay, b in zip(layers, bits):
        lay.act.freeze()
        lay.quantise(b)
    return q


def loss_fn(logits, w: Workload) -> torch.Tensor:
    return F.cross_entropy(logits, w.targets["labels"])


def build(cfg: AttentionRoundConfig | None = None, seed: int = 0) -> Workload:
    cfg = cfg or AttentionRoundConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = make_quantised(cfg, g)
    x = synthetic_images(2, g)
    bits = [lay.bits for lay in model.ar_layers()]
    return Workload(
        name="attention_round",
        model=model,
        example_inputs=(x,),
        loss_fn=loss_fn,
        paper=PAPER,
        config=(
            f"ResNet-18 widths {list(cfg.widths)} on [2,3,32,32], BN folded, Attention Round "
            f"sigma={cfg.sigma} step, per-layer bits {min(bits)}-{max(bits)} (coding length), A8 STE"
        ),
        chains=list(CHAINS),
        targets={"labels": torch.tensor([1, 8])},
        extras={"bits": bits},
    )
