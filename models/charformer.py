"""CharFormer: glyph-fusion, attention-based character image denoising.

Paper: "CharFormer: A Glyph Fusion based Attentive Framework for High-precision
Character Image Denoising", Shi, Diao, Shi, Tang, Chi, Li, Xu (ACM MM'22),
arXiv 2207.07798.  Written again in plain torch after `daqians/CharFormer:models/
{model_CharFormer.py,FusedAttention.py}`, with einops' `rearrange` replaced by
view/permute:

- input projection conv3x3 + GELU, cloned into two streams;
- each CharFormer block (CFB) runs
  - RSAB (attention stream): pre-norm with a hand-written channel LayerNorm
    ((x - mean) / (std + eps) * g + b over channels), window attention (1x1-conv q
    and kv; windows of w x w pixels; at up-blocks the skip is concatenated with the
    input along the batch for k/v, so each window attends to itself and the same
    window of the skip; scale; softmax) + residual, a conv FFN (1x1, 3x3 to 128,
    GELU, 1x1) + residual, and an outer 1x1 conv + residual;
  - GSNB (glyph stream): [concat skip, 1x1 ConvTranspose] conv3x3 + BN + ReLU,
    conv1x1 + BN + ReLU, + x;
  - fusion: CBAM on the sum of both streams (channel attention from max- and
    avg-pooled features through a shared MLP and a sigmoid; spatial attention from
    the channel max and mean through a 7x7 conv and a sigmoid) + residual, added back
    to both streams;
- a shared conv4x4/s2 downsamples both streams, a shared ConvTranspose 2x2
  upsamples them; outputs: the denoised image (from the attention stream) and the
  glyph/skeleton image (from the glyph stream).

Loss (train.py): 100 L1 + 0.05 VGG on the image and 100 L1 + VGG on the skeleton.  The
VGG terms need downloaded ImageNet weights, so this workload keeps the two L1 terms.
Data: synthetic stroke glyphs with mixed degradations and their exact skeletons
(`models/glyphs.py`); BatchNorm statistics from train-mode passes over such glyphs.

Small configuration (WORKLOADS.md §6): dim 16, 2 stages (64^2 -> 32^2 -> 16^2 mid block
at 64 channels), RSAB depth 1, GSNB depth 2, 2 heads of 16, window 8, FFN width 128,
input [2,3,64,64] (train.py: 4 stages, depth 3, 8 heads of 64, window 16, 256^2).

Chains exercised: conv + GELU; channel LayerNorm (mean, var, sqrt, sub, div, affine);
window partition permutes; scale + softmax; residual adds; GELU; BN + ReLU; CBAM
(max/avg pool, MLP, add, sigmoid, broadcast multiply; channel max/mean, concat, 7x7
conv, sigmoid, multiply); L1 (loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics, glyphs

PAPER = (
    "CharFormer: A Glyph Fusion based Attentive Framework for High-precision Character "
    "Image Denoising (arXiv 2207.07798)"
)
CHAINS = [
    "conv + gelu",
    "channel layernorm (mean, var, sqrt, sub, div, scale, shift)",
    "window partition / merge (view + permute)",
    "scale + softmax (window attention)",
    "residual add",
    "batchnorm + relu (glyph stream)",
    "cbam: max/avg pool -> mlp -> add -> sigmoid -> broadcast mul",
    "cbam: channel max/mean -> concat -> conv7x7 -> sigmoid -> mul",
    "l1 (loss)",
]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, H, W], written out as in the code."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x):
        std = torch.var(x, dim=1, unbiased=False, keepdim=True).sqrt()
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (std + self.eps) * self.g + self.b


def window_partition(t: torch.Tensor, heads: int, w: int) -> torch.Tensor:
    """'b (h c) (x w1) (y w2) -> (b h x y) (w1 w2) c' as view + permute."""
    b, hc, hh, ww = t.shape
    c, nx, ny = hc // heads, hh // w, ww // w
    t = t.view(b, heads, c, nx, w, ny, w).permute(0, 1, 3, 5, 4, 6, 2)
    return t.reshape(b * heads * nx * ny, w * w, c)


def window_merge(t: torch.Tensor, b: int, heads: int, w: int, hh: int, ww: int) -> torch.Tensor:
    """'(b h x y) (w1 w2) c -> b (h c) (x w1) (y w2)' as view + permute."""
    c, nx, ny = t.shape[-1], hh // w, ww // w
    t = t.view(b, heads, nx, ny, w, w, c).permute(0, 1, 6, 2, 4, 3, 5)
    return t.reshape(b, heads * c, hh, ww)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int, window: int):
        super().__init__()
        self.scale, self.heads, self.window = dim_head**-0.5, heads, window
        inner = dim_head * heads
        self.to_q = nn.Conv2d(dim, inner, 1, bias=False)
        self.to_kv = nn.Conv2d(dim, inner * 2, 1, bias=False)
        self.to_out = nn.Conv2d(inner, dim, 1)

    def forward(self, x, skip=None):
        b, _, hh, ww = x.shape
        h, w = self.heads, self.window
        q = self.to_q(x)
        kv_input = x if skip is None else torch.cat([x, skip], 0)
        k, v = self.to_kv(kv_input).chunk(2, dim=1)
        q, k, v = (window_partition(t, h, w) for t in (q, k, v))
        if skip is not None:  # '(r b) n d -> b (r n) d', r = 2: own window + skip's window
            k, v = (t.view(2, -1, *t.shape[1:]).permute(1, 0, 2, 3).flatten(1, 2) for t in (k, v))
        attn = (torch.bmm(q, k.transpose(1, 2)) * self.scale).softmax(dim=-1)
        out = window_merge(torch.bmm(attn, v), b, h, w, hh, ww)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.project_in = nn.Conv2d(dim, dim, 1)
        self.project_out = nn.Sequential(
            nn.Conv2d(dim, out_dim, 3, padding=1), nn.GELU(), nn.Conv2d(out_dim, dim, 1)
        )

    def forward(self, x):
        return self.project_out(self.project_in(x))


class RSAB(nn.Module):
    """Residual self-attention block (attention stream)."""

    def __init__(self, dim, depth, dim_head, heads, window, ffn_dim=128):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    ChannelLayerNorm(dim),
                    WindowAttention(dim, dim_head, heads, window),
                    ChannelLayerNorm(dim),
                    FeedForward(dim, ffn_dim),
                ]
            )
            for _ in range(depth)
        )
        self.outer_conv = nn.Conv2d(dim, dim, 1)

    def forward(self, x, skip=None):
        for i, (norm1, attn, norm2, ff) in enumerate(self.layers):
            x = attn(norm1(x), skip=skip if i == 0 else None) + x
            x = ff(norm2(x)) + x
        return self.outer_conv(x) + x


class GSNB(nn.Module):
    """Glyph stream block: [skip concat + 1x1 ConvTranspose] conv/BN/ReLU x2 + residual."""

    def __init__(self, dim: int, out_dim: int, depth: int = 2):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(dim * 2, dim, 1)
        if depth == 1:
            self.conv = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(dim, out_dim, 3, padding=1),
                nn.BatchNorm2d(out_dim),
                nn.ReLU(),
                nn.Conv2d(out_dim, dim, 1),
                nn.BatchNorm2d(dim),
                nn.ReLU(),
            )

    def forward(self, x, skip=None):
        if skip is not None:
            x = self.upsample(torch.cat([x, skip], 1))
        return self.conv(x) + x


class CBAM(nn.Module):
    """FusedAttentionBlock: channel then spatial attention, plus the residual."""

    def __init__(self, channel: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channel // reduction, 1)
        self.se = nn.Sequential(
            nn.Conv2d(channel, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channel, 1, bias=False)
        )
        self.spatial = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        mx = x.amax((2, 3), keepdim=True)
        avg = x.mean((2, 3), keepdim=True)
        out = x * torch.sigmoid(self.se(mx) + self.se(avg))
        pooled = torch.cat([out.amax(1, keepdim=True), out.mean(1, keepdim=True)], 1)
        out = out * torch.sigmoid(self.spatial(pooled))
        return out + x


class CFB(nn.Module):
    def __init__(self, dim, depth_rsab, depth_gsnb, dim_head, heads, window, reduction=16):
        super().__init__()
        self.fused = CBAM(dim, reduction)
        self.rsab = RSAB(dim, depth_rsab, dim_head, heads, window)
        self.gsnb = GSNB(dim, dim * 4, depth_gsnb)

    def forward(self, r, g, skip_r=None, skip_g=None):
        r = self.rsab(r, skip_r)
        g = self.gsnb(g, skip_g)
        fused = self.fused(r + g)
        return r + fused, g + fused


@dataclass(frozen=True)
class CharFormerConfig:
    dim: int = 16
    stages: int = 2
    depth_rsab: int = 1
    depth_gsnb: int = 2
    heads: int = 2
    dim_head: int = 16
    window: int = 8
    channels: int = 3
    size: int = 64


class CharFormer(nn.Module):
    def __init__(self, cfg: CharFormerConfig):
        super().__init__()
        assert (cfg.size >> cfg.stages) % cfg.window == 0, "H / 2^stages must divide by the window"
        dim = cfg.dim
        blk = dict(
            depth_rsab=cfg.depth_rsab,
            depth_gsnb=cfg.depth_gsnb,
            dim_head=cfg.dim_head,
            heads=cfg.heads,
            window=cfg.window,
        )
        self.project_in = nn.Sequential(nn.Conv2d(cfg.channels, dim, 3, padding=1), nn.GELU())
        self.project_out = nn.Conv2d(dim, cfg.channels, 3, padding=1)
        self.feature_corrector = nn.Conv2d(dim, cfg.channels, 3, padding=1)
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for _ in range(cfg.stages):
            self.downs.append(
                nn.ModuleList([CFB(dim, **blk), nn.Conv2d(dim, dim * 2, 4, stride=2, padding=1)])
            )
            self.ups.append(nn.ModuleList([nn.ConvTranspose2d(dim * 2, dim, 2, stride=2), CFB(dim, **blk)]))
            dim *= 2
        self.mid = CFB(dim, **blk)

    def forward(self, x):
        """(denoised image [B,3,H,W], glyph / skeleton image [B,3,H,W])."""
        r = self.project_in(x)
        g = torch.clone(r)
        skips = []
        for block, down in self.downs:
            r, g = block(r, g)
            skips.append((r, g))
            r, g = down(r), down(g)  # one downsampling conv shared by both streams
        r, g = self.mid(r, g)
        for (up, block), (sr, sg) in zip(reversed(self.ups), reversed(skips)):
            r, g = block(up(r), up(g), skip_r=sr, skip_g=sg)
        return self.project_out(r), self.feature_corrector(g)


def loss_fn(outputs, w: Workload) -> torch.Tensor:
    """100 L1 on the image + 100 L1 on the skeleton (the VGG terms need downloads)."""
    image, glyph = outputs
    return 100 * F.l1_loss(image, w.targets["clean"]) + 100 * F.l1_loss(glyph, w.targets["skeleton"])


def build(cfg: CharFormerConfig | None = None, seed: int = 0) -> Workload:
    cfg = cfg or CharFormerConfig()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = CharFormer(cfg)
    with batchnorm_statistics(model):  # from degraded glyphs
        model(glyphs.glyph_batch(4, cfg.size, g)[0])
    noisy, clean, skeleton = glyphs.glyph_batch(2, cfg.size, g)
    return Workload(
        name="charformer",
        model=model,
        example_inputs=(noisy,),
        loss_fn=loss_fn,
        paper=PAPER,
        config=(
            f"[2,3,{cfg.size},{cfg.size}] dim {cfg.dim}, {cfg.stages} stages, RSAB depth {cfg.depth_rsab}, "
            f"GSNB depth {cfg.depth_gsnb}, {cfg.heads} heads x {cfg.dim_head}, window {cfg.window}"
        ),
        chains=list(CHAINS),
        targets={"clean": clean, "skeleton": skeleton},
    )
