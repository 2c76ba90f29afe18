"""A genus / differentia classifier: visual semantics aligned with a lexical hierarchy.

Paper: "Aligning Visual and Lexical Semantics", Giunchiglia, Bagchi, Diao,
arXiv 2212.06629.  The paper is a methodology paper with no network or code; this
workload is a design choice (WORKLOADS.md §3), following its idea and the authors'
related visual genus/differentia hierarchies (arXiv 2202.08512): an object is
recognised by its *genus* (the parent concept) and its *differentia* (what sets it
apart from the siblings under the same genus), so the classifier is hierarchical:

    p(leaf) = p(genus = parent[leaf]) * softmax_{leaves l' with parent[l'] = parent[leaf]}(z)

where the second factor is a *segment softmax* of the leaf logits within their genus,
written with static-shape scatter ops: a segment max by `scatter_reduce(amax)`,
exp, segment sums by `scatter_add`, gathers back to the leaves, divide; then a gather
of p(genus) by `parent` and a multiply.  The leaf probabilities sum to 1 by
construction.  Loss: cross-entropy at both levels (-log p(genus) - log p(leaf)).

The hierarchy is a small musical-instrument tree (the related paper's ImageNet
subtree), 4 genera and 12 leaves with uneven, interleaved segments, `parent` a
buffer.  Data: synthetic 64x64 images (shapes whose family is the genus and whose
colour/size is the differentia); BatchNorm statistics from a train-mode pass.

Small configuration: [2,3,64,64] -> 4 conv3x3/s2 + BN + ReLU stages (32..256
channels) -> global average pool [2,256] -> genus head [2,4] and leaf head [2,12].

Chains exercised: conv + BN + ReLU; global mean pool; softmax over genera; segment
max (scatter_reduce amax) -> gather -> subtract -> exp -> segment sum (scatter_add)
-> gather -> divide -> multiply; log + nll in the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics

PAPER = "Aligning Visual and Lexical Semantics (arXiv 2212.06629)"
CHAINS = [
    "conv + batchnorm + relu",
    "global mean pool",
    "softmax over genera",
    "segment softmax: scatter_reduce(amax) -> gather -> sub -> exp -> scatter_add -> gather -> div",
    "gather p(genus) by parent * conditional",
    "log + nll at two levels (loss)",
]

GENERA = ["string", "wind", "percussion", "keyboard"]
# (leaf, genus index): interleaved on purpose, uneven segments (3, 4, 3, 2 leaves).
LEAVES = [
    ("violin", 0),
    ("flute", 1),
    ("drum", 2),
    ("piano", 3),
    ("guitar", 0),
    ("trumpet", 1),
    ("cymbal", 2),
    ("harp", 0),
    ("clarinet", 1),
    ("organ", 3),
    ("saxophone", 1),
    ("xylophone", 2),
]


def segment_softmax(logits: torch.Tensor, parent: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of logits [B, L] within each segment of `parent` [L] (values < num_segments)."""
    b = logits.shape[0]
    index = parent[None, :].expand(b, -1)
    seg_max = logits.new_full((b, num_segments), float("-inf"))
    seg_max = seg_max.scatter_reduce(1, index, logits, reduce="amax", include_self=False)
    e = torch.exp(logits - torch.gather(seg_max, 1, index))
    seg_sum = logits.new_zeros(b, num_segments).scatter_add(1, index, e)
    return e / torch.gather(seg_sum, 1, index)


class GenusDifferentiaHead(nn.Module):
    """p(genus) and p(leaf) = p(genus)[parent] * segment-softmax(leaf logits)."""

    def __init__(self, features: int, parent: torch.Tensor, num_genera: int):
        super().__init__()
        self.num_genera = num_genera
        self.register_buffer("parent", parent)
        self.genus = nn.Linear(features, num_genera)
        self.differentia = nn.Linear(features, parent.numel())

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_genus = F.softmax(self.genus(f), dim=-1)
        conditional = segment_softmax(self.differentia(f), self.parent, self.num_genera)
        p_leaf = torch.index_select(p_genus, 1, self.parent) * conditional
        return p_genus, p_leaf


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class VisualLexicalNet(nn.Module):
    def __init__(self, parent: torch.Tensor, num_genera: int, widths=(32, 64, 128, 256)):
        super().__init__()
        stages, cin = [], 3
        for w in widths:
            stages.append(conv_bn_relu(cin, w))
            cin = w
        self.features = nn.Sequential(*stages)
        self.head = GenusDifferentiaHead(cin, parent, num_genera)

    def forward(self, images: torch.Tensor):
        """(p(genus) [B, G], p(leaf) [B, L])."""
        return self.head(self.features(images).mean((2, 3)))


def synthetic_images(leaves: list[int], generator: torch.Generator) -> torch.Tensor:
    """Genus = shape family (ring, bar, disc, grid); leaf = colour and size variant."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    out = []
    for leaf in leaves:
        genus = LEAVES[leaf][1]
        r = 0.35 + 0.1 * (leaf % 3)
        cy, cx = (torch.rand(2, generator=generator) * 0.4 - 0.2).tolist()
        d = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        shape = [
            ((d - r).abs() < 0.08),
            ((xx - cx).abs() < 0.1) & ((yy - cy).abs() < r),
            (d < r),
            (torch.sin(12 * xx) > 0.5) | (torch.sin(12 * yy) > 0.5),
        ][genus].float()
        colour = torch.tensor([leaf % 3 == 0, leaf % 3 == 1, leaf % 3 == 2]).float() + 0.2
        img = shape[None] * colour[:, None, None]
        img = img + 0.1 * torch.randn(3, 64, 64, generator=generator)
        out.append(img)
    x = torch.stack(out)
    return (x - 0.2) / 0.4


def loss_fn(outputs, w: Workload) -> torch.Tensor:
    p_genus, p_leaf = outputs
    genus, leaf = w.targets["genus"], w.targets["leaf"]
    nll_genus = -torch.log(p_genus.gather(1, genus[:, None]).clamp_min(1e-12))
    nll_leaf = -torch.log(p_leaf.gather(1, leaf[:, None]).clamp_min(1e-12))
    return (nll_genus + nll_leaf).mean()


def build(seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    parent = torch.tensor([genus for _, genus in LEAVES])
    model = VisualLexicalNet(parent, len(GENERA))
    with batchnorm_statistics(model):  # from a batch of synthetic images
        model(synthetic_images(list(range(12)) * 2, g))
    leaves = torch.tensor([4, 10])  # guitar (string), saxophone (wind)
    return Workload(
        name="visual_lexical",
        model=model,
        example_inputs=(synthetic_images(leaves.tolist(), g),),
        loss_fn=loss_fn,
        paper=PAPER,
        config="[2,3,64,64] -> 4 conv/BN/ReLU stages -> [2,256]; 4 genera, 12 leaves",
        chains=list(CHAINS),
        targets={"leaf": leaves, "genus": parent[leaves]},
        extras={"genera": GENERA, "leaves": [name for name, _ in LEAVES]},
    )
