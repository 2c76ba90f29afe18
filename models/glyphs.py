"""Synthetic character images for the CharFormer, RCRN and RZCR workloads.

No glyph data set or font is downloaded: characters are drawn from straight strokes
(segments in the unit square), which gives for free what the papers' data loaders
compute with Otsu thresholding + `skimage.skeletonize` (the one-pixel skeleton) and
what RZCR's annotations hold (radical boxes and the structure of the character).

- `render(strokes, size)`: the clean image (dark ink on light paper) and its skeleton;
- `degrade(clean, g)`: the real-world damage the restoration papers target, mixed:
  Gaussian noise, ink stains, faded strokes and a blur;
- `random_strokes(g, n)`: a random glyph;
- RZCR's radicals and layouts: `RADICALS` (59 stroke patterns), `LAYOUTS` (6
  structures with their radical boxes) and `compose(...)`.

Images are float32 in [-1, 1] ([B, 3, H, W], paper ~ +1, ink ~ -1); everything is
seeded through a `torch.Generator`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Stroke = tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]


def _segment_distance(strokes: list[Stroke], size: int) -> torch.Tensor:
    """Distance (pixels) from each pixel centre to the nearest stroke: [size, size]."""
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    best = torch.full((size, size), float("inf"))
    for x0, y0, x1, y1 in strokes:
        dx, dy = x1 - x0, y1 - y0
        t = ((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-9)
        t = t.clamp(0, 1)
        d = torch.sqrt((xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2)
        best = torch.minimum(best, d)
    return best * size


def render(strokes: list[Stroke], size: int = 64, width: float = 2.5):
    """(clean [3,H,W], skeleton [3,H,W]) in [-1, 1]: ink -1 on paper +1."""
    d = _segment_distance(strokes, size)
    ink = (1.0 - (d - width / 2).clamp(0, 1)).clamp(0, 1)  # anti-aliased stroke
    skel = (d <= 0.71).float()  # 8-connected one-pixel centre line
    clean = (1.0 - 2.0 * ink).expand(3, size, size).clone()
    skeleton = (1.0 - 2.0 * skel).expand(3, size, size).clone()
    return clean, skeleton


def degrade(clean: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Mixed real-world degradation of a clean [3,H,W] image (stains, fading, noise, blur)."""
    _, h, w = clean.shape
    img = clean.clone()
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):  # ink stains / foxing
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        ry, rx = (torch.rand(2, generator=g) * 8 + 3).tolist()
        blob = torch.exp(-(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2))
        img = img - strength * 0.9 * blob * torch.tensor([0.8, 0.9, 1.0])[:, None, None]
    fade = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(h, w), mode="bilinear")[0]
    img = torch.where(clean < 0, img + strength * 1.2 * fade * (img < 0), img)  # faded ink
    img = img + strength * 0.25 * torch.randn(img.shape, generator=g)  # sensor noise
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    img = F.conv2d(F.pad(img[None], (1, 1, 1, 1), mode="replicate"), k, groups=3)[0]
    return img.clamp(-1, 1)


def random_strokes(g: torch.Generator, n: int | None = None, box=(0.15, 0.15, 0.85, 0.85)) -> list[Stroke]:
    """n horizontal / vertical / diagonal strokes inside box (x0, y0, x1, y1)."""
    if n is None:
        n = int(torch.randint(3, 8, (1,), generator=g))
    bx0, by0, bx1, by1 = box
    out = []
    for _ in range(n):
        kind = int(torch.randint(0, 4, (1,), generator=g))
        a, b, c = torch.rand(3, generator=g).tolist()
        lo, hi = min(a, b), max(a, b)
        hi = max(hi, lo + 0.3)
        if kind == 0:  # horizontal
            s = (lo, c, min(hi, 1.0), c)
        elif kind == 1:  # vertical
            s = (c, lo, c, min(hi, 1.0))
        elif kind == 2:  # falling diagonal
            s = (lo, lo, min(hi, 1.0), min(hi, 1.0))
        else:  # rising diagonal
            s = (lo, min(hi, 1.0), min(hi, 1.0), lo)
        x0, y0, x1, y1 = s
        out.append(
            (
                bx0 + x0 * (bx1 - bx0),
                by0 + y0 * (by1 - by0),
                bx0 + x1 * (bx1 - bx0),
                by0 + y1 * (by1 - by0),
            )
        )
    return out


def glyph_batch(n: int, size: int, g: torch.Generator):
    """(noisy, clean, skeleton) [n, 3, size, size] for n random glyphs."""
    noisy, clean, skel = [], [], []
    for _ in range(n):
        c, s = render(random_strokes(g), size)
        noisy.append(degrade(c, g))
        clean.append(c)
        skel.append(s)
    return torch.stack(noisy), torch.stack(clean), torch.stack(skel)


# ---------------------------------------------------------------------------
# RZCR: radicals, structures, characters.

NUM_RADICALS = 59
# The six structure classes and their radical boxes (x0, y0, x1, y1) in the unit square.
LAYOUTS: dict[str, list[tuple[float, float, float, float]]] = {
    "single": [(0.1, 0.1, 0.9, 0.9)],
    "left_right": [(0.05, 0.1, 0.48, 0.9), (0.52, 0.1, 0.95, 0.9)],
    "top_bottom": [(0.1, 0.05, 0.9, 0.48), (0.1, 0.52, 0.9, 0.95)],
    "surround": [(0.05, 0.05, 0.95, 0.95), (0.3, 0.3, 0.7, 0.7)],
    "left_middle_right": [(0.03, 0.1, 0.34, 0.9), (0.35, 0.1, 0.65, 0.9), (0.66, 0.1, 0.97, 0.9)],
    "top_middle_bottom": [(0.1, 0.03, 0.9, 0.34), (0.1, 0.35, 0.9, 0.65), (0.1, 0.66, 0.9, 0.97)],
}
STRUCTURES = list(LAYOUTS)


def radicals(seed: int = 7) -> list[list[Stroke]]:
    """59 random radical stroke patterns (2-4 strokes each, unit square), fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(NUM_RADICALS):
        strokes = random_strokes(g, int(torch.randint(2, 5, (1,), generator=g)), box=(0.05, 0.05, 0.95, 0.95))
        out.append(strokes)
    return out


def compose(structure: int, radical_ids: list[int], table: list[list[Stroke]], size: int = 64):
    """A character: its radicals drawn in the structure's boxes.

    Returns (clean [3,H,W], boxes [(x0, y0, x1, y1) in [0,1]] per radical).
    """
    boxes = LAYOUTS[STRUCTURES[structure]]
    assert len(radical_ids) == len(boxes)
    strokes = []
    for rid, (x0, y0, x1, y1) in zip(radical_ids, boxes):
        for a, b, c, d in table[rid]:
            strokes.append((x0 + a * (x1 - x0), y0 + b * (y1 - y0), x0 + c * (x1 - x0), y0 + d * (y1 - y0)))
    clean, _ = render(strokes, size, width=2.0)
    return clean, boxes
