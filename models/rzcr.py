"""RZCR: zero-shot character recognition by radical extraction and graph reasoning.

Paper: "RZCR: Zero-shot Character Recognition via Radical-based Reasoning", Diao, Shi,
Tang, Shen, Li, Wu, Xu (IJCAI'23), arXiv 2207.05842 (REZCR in its first version).
Written again after `XiaoleiDiao/RZCR:nets/{RIE.py,DSAL.py}` and `KGR.py`:

- RIE, the radical information extractor: a Darknet-53-style backbone (conv3x3 +
  BN + LeakyReLU(0.1); five stages of a stride-2 conv3x3 + BN + LeakyReLU and
  [1, 2, 8, 8, 4] residual blocks of 1x1 halve / 3x3 restore, each BN + LeakyReLU,
  + residual), then DSAL, the dual spatial attention layer: channel mean and max,
  concatenated, globally pooled (max for the first step, average for the second), a
  7x7 conv (on the 1x1 map only its centre tap acts) and a sigmoid that scales the
  features.  The code applies its first step twice and never the second; we apply
  the two steps as the paper describes (`dsal_code_quirk=True` gives the code's).
- Two output projectors: OPr, the YOLO radical head (conv stack -> 3 x (5 + 59)
  channels) and OPs, the structure head (conv stack, global average pool, three
  Linear layers with no activation between them, as in the code, -> 6 structures).
  The code's head convs use `nn.ReLU(0.1)`, which is a plain ReLU (0.1 is `inplace`);
  kept.
- YOLO decode (in the graph): sigmoid(xy) + cell offsets, exp(wh) x anchors,
  sigmoid objectness and radical classes.
- KGR, the knowledge-graph reasoner, as tensor ops (the code queries an rdflib graph
  per candidate with `itertools.product`): the graph is a binary character x radical
  matrix and a one-hot character x structure matrix (buffers); each radical's
  confidence is its best objectness x class score over the boxes (a max); a
  character's confidence is 0.7 x the masked mean of its radicals' confidences +
  0.3 x the probability of its structure (the code's 0.7 / 0.3 fusion; the code takes
  the top structure confidence whatever the character's structure, we take the
  character's own); then top-5 characters.  NMS is not needed for this soft form.

Loss: YOLOv3's (BCE on xy, MSE on wh, BCE on objectness and radical classes, targets
assigned to the best-IoU anchor at factory time) + cross-entropy on the structure.
Data: synthetic characters composed from 59 random stroke "radicals" in the six
structures of `models/glyphs.py`, which give boxes, structure labels and the
knowledge graph (120 characters) for free; BatchNorm statistics from a train-mode pass.

Small configuration (WORKLOADS.md §8): [2,3,128,128] -> backbone at a quarter of the
code's widths (8..256 channels) and shrunk depth ([1,1,2,2,1] residual blocks, 20 convs;
the code: [1,2,8,8,4], 52 convs, `blocks=` restores it) -> [2,256,4,4] ->
OPr [2,192,4,4] and OPs [2,6]; heads at a quarter width ([128, 256] for [512, 1024]);
anchors: YOLOv3's coarse-scale anchors scaled by 128/416.

Chains exercised: conv + BN + LeakyReLU (x20) + residual add; channel mean/max ->
concat -> global max/avg pool -> conv -> sigmoid -> broadcast multiply (DSAL); conv +
BN + ReLU (heads); global average pool; YOLO decode (sigmoid, add grid, exp, multiply
anchors); max over boxes; masked mean via matmul; weighted sum; topk; BCE/MSE/CE (loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics, glyphs

PAPER = "RZCR: Zero-shot Character Recognition via Radical-based Reasoning (arXiv 2207.05842)"
CHAINS = [
    "conv + batchnorm + leaky_relu + residual add (darknet)",
    "channel mean/max -> concat -> global pool -> conv -> sigmoid -> broadcast mul (DSAL)",
    "conv + batchnorm + relu (heads)",
    "global average pool -> linear stack",
    "yolo decode: sigmoid + grid, exp * anchor",
    "max over boxes -> masked mean (matmul / count) -> 0.7/0.3 fusion -> topk (KGR)",
    "bce / mse / cross-entropy (loss)",
]

ANCHORS_416 = [(116, 90), (156, 198), (373, 326)]  # YOLOv3's coarse-scale anchors


def cbl(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)]


class Residual(nn.Module):
    """Darknet block (the code's CBR): 1x1 halve, 3x3 restore, + x."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(*cbl(c, c // 2, 1), *cbl(c // 2, c, 3))

    def forward(self, x):
        return self.body(x) + x


class SpatialGate(nn.Module):
    """One DSAL step: channel mean & max -> global pool -> 7x7 conv -> sigmoid."""

    def __init__(self, pool: str, kernel_size: int = 7):
        super().__init__()
        self.pool = pool
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        s = s.amax((2, 3), keepdim=True) if self.pool == "max" else s.mean((2, 3), keepdim=True)
        return torch.sigmoid(self.conv(s))


class DSAL(nn.Module):
    def __init__(self, code_quirk: bool = False):
        super().__init__()
        self.attention_1 = SpatialGate("max")
        self.attention_2 = SpatialGate("avg")
        self.code_quirk = code_quirk

    def forward(self, x):
        x = x * self.attention_1(x)
        second = self.attention_1 if self.code_quirk else self.attention_2
        return x * second(x)


class Darknet(nn.Module):
    def __init__(self, base: int = 8, blocks=(1, 2, 8, 8, 4), dsal_code_quirk: bool = False):
        super().__init__()
        layers = cbl(3, base, 3)
        c = base
        for n in blocks:
            layers += cbl(c, 2 * c, 3, stride=2)
            c *= 2
            layers += [Residual(c) for _ in range(n)]
        self.body = nn.Sequential(*layers)
        self.dsal = DSAL(dsal_code_quirk)
        self.out_channels = c

    def forward(self, x):
        return self.dsal(self.body(x))


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """The code's head `conv2d`: conv + BN + nn.ReLU(0.1), i.e. a plain ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class KnowledgeGraphReasoner(nn.Module):
    """KGR as tensor ops over the character x radical / structure matrices."""

    def __init__(self, char_radical: torch.Tensor, char_structure: torch.Tensor, topk: int = 5):
        super().__init__()
        self.register_buffer("char_radical", char_radical)  # [C, R] binary
        self.register_buffer("char_structure", char_structure)  # [C, S] one-hot
        self.register_buffer("radical_count", char_radical.sum(1))  # [C]
        self.topk = topk

    def forward(self, radical_conf, structure_prob):
        """radical_conf [B, R], structure_prob [B, S] -> character confidence [B, C]."""
        mean_radical = (radical_conf @ self.char_radical.T) / self.radical_count  # masked mean
        structure = structure_prob @ self.char_structure.T
        return 0.7 * mean_radical + 0.3 * structure


@dataclass(frozen=True)
class RZCRConfig:
    size: int = 128
    base: int = 8
    blocks: tuple[int, ...] = (1, 1, 2, 2, 1)  # the code: (1, 2, 8, 8, 4)
    head: tuple[int, int] = (128, 256)
    num_radicals: int = glyphs.NUM_RADICALS
    num_structures: int = len(glyphs.STRUCTURES)
    num_characters: int = 120
    dsal_code_quirk: bool = False


class RZCR(nn.Module):
    def __init__(self, cfg: RZCRConfig, char_radical: torch.Tensor, char_structure: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        self.backbone = Darknet(cfg.base, cfg.blocks, cfg.dsal_code_quirk)
        c, (f0, f1) = self.backbone.out_channels, cfg.head
        self.num_anchors = len(ANCHORS_416)
        out_r = self.num_anchors * (5 + cfg.num_radicals)
        self.opr = nn.Sequential(
            conv_bn_relu(c, f0, 1),
            conv_bn_relu(f0, f1, 3),
            conv_bn_relu(f1, f0, 1),
            conv_bn_relu(f0, f1, 3),
            conv_bn_relu(f1, f0, 1),
            conv_bn_relu(f0, f1, 3),
            nn.Conv2d(f1, out_r, 1),
        )
        self.ops1 = nn.Sequential(
            conv_bn_relu(c, f0, 1),
            conv_bn_relu(f0, f1, 3),
            conv_bn_relu(f1, f0, 3),
            conv_bn_relu(f0, f0, 3),
            nn.Conv2d(f0, f0, 1),
        )
        self.ops2 = nn.Sequential(nn.Linear(f0, f1), nn.Linear(f1, f0), nn.Linear(f0, cfg.num_structures))
        scale = cfg.size / 416
        self.register_buffer("anchors", torch.tensor(ANCHORS_416, dtype=torch.float32) * scale)
        self.kgr = KnowledgeGraphReasoner(char_radical, char_structure)

    def decode(self, opr: torch.Tensor) -> torch.Tensor:
        """YOLO decode: [B, A*(5+R), H, W] -> [B, A*H*W, 5+R] (xywh px, objectness, classes)."""
        b, _, h, w = opr.shape
        stride = self.cfg.size / h
        p = opr.view(b, self.num_anchors, -1, h, w).permute(0, 1, 3, 4, 2)
        gy = torch.arange(h, dtype=opr.dtype).view(1, 1, h, 1)
        gx = torch.arange(w, dtype=opr.dtype).view(1, 1, 1, w)
        aw = self.anchors[:, 0].view(1, -1, 1, 1)
        ah = self.anchors[:, 1].view(1, -1, 1, 1)
        x = (torch.sigmoid(p[..., 0]) + gx) * stride
        y = (torch.sigmoid(p[..., 1]) + gy) * stride
        bw = torch.exp(p[..., 2]) * aw
        bh = torch.exp(p[..., 3]) * ah
        rest = torch.sigmoid(p[..., 4:])
        out = torch.cat([torch.stack([x, y, bw, bh], -1), rest], -1)
        return out.reshape(b, -1, out.shape[-1])

    def forward(self, images):
        """(OPr raw [B,A(5+R),H,W], structure logits [B,S], character confidence [B,C],
        top-5 confidences [B,5], top-5 character ids [B,5])."""
        x = self.backbone(images)
        opr = self.opr(x)
        structure = self.ops2(self.ops1(x).mean((2, 3)))
        boxes = self.decode(opr)
        radical_conf = (boxes[..., 4:5] * boxes[..., 5:]).amax(1)  # best box per radical
        chars = self.kgr(radical_conf, F.softmax(structure, -1))
        top = torch.topk(chars, self.kgr.topk, dim=-1)
        return opr, structure, chars, top.values, top.indices


# ---------------------------------------------------------------------------
# Synthetic characters and YOLO targets.


def character_table(cfg: RZCRConfig, seed: int = 11):
    """(structure [C], radical ids per character), unique compositions."""
    g = torch.Generator().manual_seed(seed)
    seen, structures, radical_ids = set(), [], []
    while len(structures) < cfg.num_characters:
        s = int(torch.randint(0, cfg.num_structures, (1,), generator=g))
        n = len(glyphs.LAYOUTS[glyphs.STRUCTURES[s]])
        rids = torch.randperm(cfg.num_radicals, generator=g)[:n].tolist()
        if (s, tuple(rids)) not in seen:
            seen.add((s, tuple(rids)))
            structures.append(s)
            radical_ids.append(rids)
    return structures, radical_ids


def _iou_wh(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    inter = torch.minimum(wh[0], anchors[:, 0]) * torch.minimum(wh[1], anchors[:, 1])
    return inter / (wh[0] * wh[1] + anchors[:, 0] * anchors[:, 1] - inter)


def yolo_targets(boxes_per_image, labels_per_image, anchors, grid: int, size: int, num_radicals: int):
    """Assign each ground-truth box to its cell and best-shape anchor: [B, A, H, W, 5+R]."""
    b, a = len(boxes_per_image), anchors.shape[0]
    t = torch.zeros(b, a, grid, grid, 5 + num_radicals)
    stride = size / grid
    for i, (boxes, labels) in enumerate(zip(boxes_per_image, labels_per_image)):
        for (x0, y0, x1, y1), r in zip(boxes, labels):
            cx, cy, w, h = (x0 + x1) / 2 * size, (y0 + y1) / 2 * size, (x1 - x0) * size, (y1 - y0) * size
            best = int(_iou_wh(torch.tensor([w, h]), anchors).argmax())
            gx, gy = min(int(cx / stride), grid - 1), min(int(cy / stride), grid - 1)
            t[i, best, gy, gx, 0] = cx / stride - gx
            t[i, best, gy, gx, 1] = cy / stride - gy
            t[i, best, gy, gx, 2] = torch.log(torch.tensor(w) / anchors[best, 0])
            t[i, best, gy, gx, 3] = torch.log(torch.tensor(h) / anchors[best, 1])
            t[i, best, gy, gx, 4] = 1.0
            t[i, best, gy, gx, 5 + r] = 1.0
    return t


def loss_fn(outputs, w: Workload) -> torch.Tensor:
    """YOLOv3 loss on OPr + cross-entropy on the structure head."""
    opr, structure = outputs[0], outputs[1]
    t = w.targets["yolo"]
    b, a, h, wd, d = t.shape
    p = opr.view(b, a, d, h, wd).permute(0, 1, 3, 4, 2)
    obj = t[..., 4]
    n_obj = obj.sum().clamp_min(1.0)
    bce = F.binary_cross_entropy_with_logits
    loss_xy = (bce(p[..., :2], t[..., :2], reduction="none").sum(-1) * obj).sum() / n_obj
    loss_wh = (0.5 * ((p[..., 2:4] - t[..., 2:4]) ** 2).sum(-1) * obj).sum() / n_obj
    loss_conf = bce(p[..., 4], obj, reduction="sum") / n_obj
    loss_cls = (bce(p[..., 5:], t[..., 5:], reduction="none").sum(-1) * obj).sum() / n_obj
    return loss_xy + loss_wh + loss_conf + loss_cls + F.cross_entropy(structure, w.targets["structure"])


def build(cfg: RZCRConfig | None = None, seed: int = 0) -> Workload:
    cfg = cfg or RZCRConfig()
    table = glyphs.radicals()
    structures, radical_ids = character_table(cfg)
    char_radical = torch.zeros(cfg.num_characters, cfg.num_radicals)
    for c, rids in enumerate(radical_ids):
        char_radical[c, rids] = 1.0
    char_structure = F.one_hot(torch.tensor(structures), cfg.num_structures).float()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = RZCR(cfg, char_radical, char_structure)

    def render(chars):
        imgs, boxes = [], []
        for c in chars:
            clean, bx = glyphs.compose(structures[c], radical_ids[c], table, cfg.size)
            imgs.append(glyphs.degrade(clean, g, strength=0.5))
            boxes.append(bx)
        return torch.stack(imgs), boxes

    with batchnorm_statistics(model):  # from a batch of characters
        model(render(list(range(0, cfg.num_characters, 15)))[0])
    chars = [7, 42]
    images, boxes = render(chars)
    grid = cfg.size // 32
    yolo = yolo_targets(
        boxes, [radical_ids[c] for c in chars], model.anchors, grid, cfg.size, cfg.num_radicals
    )
    return Workload(
        name="rzcr",
        model=model,
        example_inputs=(images,),
        loss_fn=loss_fn,
        paper=PAPER,
        config=(
            f"[2,3,{cfg.size},{cfg.size}] Darknet blocks {list(cfg.blocks)} base width {cfg.base} "
            f"-> OPr [2,{3 * (5 + cfg.num_radicals)},{grid},{grid}] + OPs [2,{cfg.num_structures}]; "
            f"KGR over {cfg.num_characters} characters x {cfg.num_radicals} radicals"
        ),
        chains=list(CHAINS),
        targets={
            "yolo": yolo,
            "structure": torch.tensor([structures[c] for c in chars]),
            "character": torch.tensor(chars),
        },
        extras={"structures": structures, "radical_ids": radical_ids},
    )
