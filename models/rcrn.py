"""RCRN: real-world character image restoration from the image and its skeleton.

Paper: "RCRN: Real-world Character Image Restoration Network via Skeleton
Extraction", Shi, Diao, Tang, Li, Xing, Xu (ACM MM'22), arXiv 2207.07795.  The
network has two parts: a skeleton extractor (SENet) and a character image restorer
(CIRNet) that "reconstructs clean images from degraded character images and their
skeletons".  CIRNet is written again after the authors' pipeline code
(`daqians/LowLevelVision-Pipeline-pytorch:models/model_RCRN.py`, `CIRNet_CNN`):

- init: conv3x3 + InstanceNorm + LeakyReLU(0.2);
- multi-scale residual ("MsR") down blocks: three parallel pre-activation branches
  (BN -> ReLU -> conv3x3 with dilation 1, 2, 3) over the same input, concatenated,
  then BN -> ReLU -> conv4x4/s2 -> InstanceNorm -> LeakyReLU (+ dropout);
- mid: conv4x4/s2 + LeakyReLU; up blocks mirror the down blocks with ConvTranspose
  4x4/s2 + InstanceNorm + ReLU and U-Net skip concatenations;
- final: nearest upsample x2, zero pad (1,0,1,0), conv4x4, Tanh.

No SENet code was published (WORKLOADS.md §7 marks its design UNCONFIRMED).  We read
it as the abstract describes it: a U-Net of the same MsR blocks, narrower, predicting
the one-channel skeleton (Tanh), and CIRNet takes the degraded image concatenated
with that skeleton (4 input channels).  The discriminator is the pipeline's
`Discriminator_CNN` (MsR blocks over the concatenated image pair) and only enters
the loss: LSGAN generator term MSE(D(restored, degraded), 1) + 100 L1 on the image +
100 L1 on the skeleton.  The pipeline's 0.05 VGG term needs downloaded weights and
is dropped.  Data: synthetic stroke glyphs with mixed degradations
(`models/glyphs.py`); BatchNorm statistics from train-mode passes over such glyphs.

Small configuration: [2,3,64,64]; CIRNet at half the code's widths (init 32, down
64/128/256 at 32^2/16^2/8^2, mid 256 at 4^2, MsR branches of 16 channels; the code uses
64/128/256/512 and 32-channel branches); SENet at a quarter (16/32/64/128, branches
of 8); discriminator at half width.  Dropout modules are present (identity in eval).

Chains exercised: three BN + ReLU passes over one input (the MsR branches); concat;
BN + ReLU before the strided conv; InstanceNorm + LeakyReLU / ReLU; skip concat;
upsample + pad; Tanh; L1 / MSE (loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics, glyphs

PAPER = "RCRN: Real-world Character Image Restoration Network via Skeleton Extraction (arXiv 2207.07795)"
CHAINS = [
    "3x (batchnorm + relu) over one input -> dilated convs (MsR branches)",
    "concat -> batchnorm + relu -> strided conv",
    "instancenorm + leaky_relu / relu",
    "skip concat (u-net)",
    "nearest upsample + zero pad -> conv -> tanh",
    "l1 + mse (loss)",
]


def conv_inception(cin: int, cout: int, dilation: int) -> nn.Sequential:
    """Pre-activation branch: BN -> ReLU -> conv3x3 (dilation d, padding d)."""
    return nn.Sequential(
        nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, 1, dilation, bias=False, dilation=dilation)
    )


class MsR(nn.Module):
    """The multi-scale residual front: three dilated pre-activation branches, concatenated."""

    def __init__(self, cin: int, branch: int):
        super().__init__()
        self.branches = nn.ModuleList(conv_inception(cin, branch, d) for d in (1, 2, 3))

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class MsRDown(nn.Module):
    def __init__(self, cin, cout, branch, normalize=True, dropout=0.0):
        super().__init__()
        self.msr = MsR(cin, branch)
        layers = [nn.BatchNorm2d(3 * branch), nn.ReLU(), nn.Conv2d(3 * branch, cout, 4, 2, 1, bias=False)]
        if normalize:
            layers.append(nn.InstanceNorm2d(cout))
        layers.append(nn.LeakyReLU(0.2))
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(self.msr(x))


class MsRUp(nn.Module):
    def __init__(self, cin, cout, branch, dropout=0.0):
        super().__init__()
        self.msr = MsR(cin, branch)
        layers = [
            nn.BatchNorm2d(3 * branch),
            nn.ReLU(),
            nn.ConvTranspose2d(3 * branch, cout, 4, 2, 1, bias=False),
            nn.InstanceNorm2d(cout),
            nn.ReLU(),
        ]
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x, skip):
        return torch.cat([self.model(self.msr(x)), skip], 1)


class MsRUNet(nn.Module):
    """CIRNet_CNN's U-Net at base width w (the code: w=64, branch=32)."""

    def __init__(self, cin: int, cout: int, w: int, branch: int):
        super().__init__()
        self.ini = nn.Sequential(
            nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.InstanceNorm2d(w), nn.LeakyReLU(0.2)
        )
        self.down1 = MsRDown(w, 2 * w, branch, normalize=False)
        self.down2 = MsRDown(2 * w, 4 * w, branch)
        self.down3 = MsRDown(4 * w, 8 * w, branch, dropout=0.5)
        self.mid = nn.Sequential(
            nn.Conv2d(8 * w, 8 * w, 4, 2, 1, bias=False), nn.LeakyReLU(0.2), nn.Dropout(0.5)
        )
        self.up1 = MsRUp(8 * w, 8 * w, branch, dropout=0.5)
        self.up2 = MsRUp(16 * w, 4 * w, branch)
        self.up3 = MsRUp(8 * w, 2 * w, branch)
        self.final = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.ZeroPad2d((1, 0, 1, 0)),
            nn.Conv2d(4 * w, cout, 4, padding=1),
            nn.Tanh(),
        )

    def forward(self, x):
        ini = self.ini(x)
        d1 = self.down1(ini)
        d2 = self.down2(d1)
        d3 = self.down3(d2)
        u1 = self.up1(self.mid(d3), d3)
        u2 = self.up2(u1, d2)
        return self.final(self.up3(u2, d1))


class Discriminator(nn.Module):
    """Discriminator_CNN: MsR blocks over the concatenated image pair -> patch scores."""

    def __init__(self, channels: int, w: int, branch: int):
        super().__init__()
        self.blocks = nn.Sequential(
            MsRDown(2 * channels, w, branch, normalize=False),
            MsRDown(w, 2 * w, branch),
            MsRDown(2 * w, 4 * w, branch),
            MsRDown(4 * w, 8 * w, branch),
            nn.ZeroPad2d((1, 0, 1, 0)),
            nn.Conv2d(8 * w, 1, 4, padding=1, bias=False),
        )

    def forward(self, a, b):
        return self.blocks(torch.cat([a, b], 1))


@dataclass(frozen=True)
class RCRNConfig:
    size: int = 64
    cir_width: int = 32
    cir_branch: int = 16
    se_width: int = 16
    se_branch: int = 8
    disc_width: int = 32
    disc_branch: int = 16


class RCRN(nn.Module):
    """SENet (skeleton) then CIRNet (image + skeleton -> clean image)."""

    def __init__(self, cfg: RCRNConfig):
        super().__init__()
        self.senet = MsRUNet(3, 1, cfg.se_width, cfg.se_branch)
        self.cirnet = MsRUNet(4, 3, cfg.cir_width, cfg.cir_branch)

    def forward(self, degraded):
        """(restored image [B,3,H,W], skeleton [B,1,H,W]), both in [-1, 1]."""
        skeleton = self.senet(degraded)
        return self.cirnet(torch.cat([degraded, skeleton], 1)), skeleton


def loss_fn(outputs, w: Workload) -> torch.Tensor:
    """LSGAN generator term + 100 L1 (image) + 100 L1 (skeleton); no VGG term offline."""
    restored, skeleton = outputs
    disc = w.extras["discriminator"]
    score = disc(restored, w.example_inputs[0])
    adversarial = F.mse_loss(score, torch.ones_like(score))
    return (
        adversarial
        + 100 * F.l1_loss(restored, w.targets["clean"])
        + 100 * F.l1_loss(skeleton, w.targets["skeleton"])
    )


def _bn_statistics(module: nn.Module, *batches) -> None:
    with batchnorm_statistics(module):
        module(*batches)


def build(cfg: RCRNConfig | None = None, seed: int = 0) -> Workload:
    cfg = cfg or RCRNConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = RCRN(cfg)
    disc = Discriminator(3, cfg.disc_width, cfg.disc_branch)
    calib, calib_clean, _ = glyphs.glyph_batch(2, cfg.size, g)
    _bn_statistics(model, calib)
    _bn_statistics(disc, calib_clean, calib)
    noisy, clean, skeleton = glyphs.glyph_batch(2, cfg.size, g)
    return Workload(
        name="rcrn",
        model=model,
        example_inputs=(noisy,),
        loss_fn=loss_fn,
        paper=PAPER,
        config=(
            f"[2,3,{cfg.size},{cfg.size}]; SENet MsR U-Net width {cfg.se_width} -> skeleton; "
            f"CIRNet MsR U-Net width {cfg.cir_width} on image+skeleton (4 ch); half-width discriminator"
        ),
        chains=list(CHAINS),
        targets={"clean": clean, "skeleton": skeleton[:, :1]},
        extras={"discriminator": disc},
    )
