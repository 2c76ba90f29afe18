"""RFFS-Net: receptive-field fusion and stratification for airborne laser scanning.

Paper: "Beyond single receptive field: A receptive field fusion-and-stratification
network for airborne laser scanning point cloud classification", Mao, Chen, Diao,
Sun, Lu, Fu, Weinmann, ISPRS J. P&RS 188 (2022), arXiv 2207.10278.  Written again in
plain torch after `WingkeungM/RFFS-Net:model/{rffsnet.py,rffsnet_util.py}` (on
PointConv), keeping its structure:

- encoder: three DensitySetAbstraction (PointConv) stages.  Each computes a Gaussian
  kernel density of its input points (square distances as matmul + broadcast adds,
  exp, mean), a DensityNet (1x1 conv + BN stack) giving an inverse-density scale,
  groups the k nearest neighbours of its sampled centres (gather, subtract the
  centre, concatenate features), runs a 1x1-conv + BN + ReLU MLP, weights the
  neighbours with a WeightNet on density-scaled relative positions (a matmul over
  the k neighbours) and ends with Linear + BN + ReLU;
- DAGFusion on the coarsest points: four dilated graph convolutions (DGConv: the
  neighbours at dilation r are every chunk of r-1+4 sorted neighbours minus its first
  r-1; gather, subtract the centre, 1x1 conv + BN + ReLU, max over neighbours) and four
  annular dilated convolutions (ADConv: the centre plus the ring of sorted neighbours
  [(r-1)k, rk-1)), each densely concatenated on its inputs, then concat + Conv1d +
  BN + ReLU;
- decoders: three feature-propagation modules (three nearest known points, inverse
  distance weights 1/(d+1e-8) normalised, weighted gather-sum, concat the skip, 1x1
  conv + BN + ReLU), a head 1x1 convs + BN + ReLU (+ dropout) to class logits, and the
  multi-level decoders on the three coarse levels (two branches, concat, conv,
  log_softmax): the receptive-field *stratification*;
- MRFALoss: class-weighted cross-entropy on the full-resolution output plus 0.3 x the
  weighted cross-entropy of each level's decoder against labels subsampled by that
  level's sampling indices; class weights (max/freq)^(1/3) from the code's Vaihingen
  training counts.

Data-dependent steps run at factory time and reach the model as index inputs:
farthest point sampling (deterministic start at point 0; the code starts at random),
kNN for grouping, the sorted neighbour lists for DGConv / ADConv, and the three
nearest neighbours for interpolation (their distances are recomputed in the graph).
The code's neighbour search for DAGFusion is `ball_query(radius=16, ...)`, which
returns the first in-radius points in index order; we use distance-sorted neighbours,
which is what "dilated" and "annular" mean in the paper.  The code's DensityNet never
takes its sigmoid branch (`if i == len(convs)` is never true); we apply the intended
sigmoid + 0.5 (`density_sigmoid=False` gives the code's all-ReLU stack).

Data: a synthetic airborne laser scan in numpy (`synthetic_scene`): a gently sloping
ground of roads (impervious) and grass (low vegetation), box buildings (roofs and
facades), trees (crowns and trunks), shrubs, cars, a fence and sagging powerlines,
i.e. the nine Vaihingen classes; features are centred xyz, normalised xyz, intensity
and a return count (the code's 3 + 5 channels).

Small configuration (WORKLOADS.md §5, shrunk to run in about a second on CPU):
B=2 blocks of N=1024 points (the paper: 4096), SA stages 256/128/64 points with k=16
(paper 1024/256/128, k=32), MLP widths halved (32,32,64 / 64,64,128 / 128,128,256),
DAGFusion on 64 points with dilations [1,2,4,8], DGConv k=16 and ADConv k=8 (the rate-8
ring then uses every point, as the paper's k=16 does with 128 points), decoders halved.

Chains exercised: square distance -> exp -> mean (density); conv/BN/ReLU/sigmoid
(DensityNet); gather + subtract + concat (grouping); conv + BN + ReLU; broadcast
multiply by density; matmul; linear + BN + ReLU; gather - centre -> conv + BN + ReLU ->
max (DGConv/ADConv); dense concat; inverse-distance normalise + weighted gather-sum
(interpolation); log_softmax; weighted nll (loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics

PAPER = (
    "Beyond single receptive field: A receptive field fusion-and-stratification network "
    "for airborne laser scanning point cloud classification (RFFS-Net, arXiv 2207.10278)"
)
CHAINS = [
    "square distance (matmul + broadcast add) -> exp -> mean (kernel density)",
    "conv1d + batchnorm + relu / sigmoid (DensityNet)",
    "gather neighbours - centre + concat (grouping)",
    "conv2d 1x1 + batchnorm + relu",
    "density scale broadcast multiply -> WeightNet",
    "linear + batchnorm + relu",
    "gather - centre -> conv + batchnorm + relu -> max over neighbours (DGConv / ADConv)",
    "inverse-distance weights normalise + weighted gather-sum (interpolation)",
    "log_softmax (multi-level decoders)",
    "class-weighted nll (MRFA loss)",
]

CLASSES = [
    "Powerline",
    "Low_vegetation",
    "Impervious_surfaces",
    "Car",
    "Fence",
    "Roof",
    "Facade",
    "Shrub",
    "Tree",
]
# The code's Vaihingen training counts per class, turned into (max/freq)^(1/3) weights.
TRAIN_COUNTS = [546, 180850, 193723, 4614, 12070, 152045, 27250, 47605, 135173]


def class_weights(counts=TRAIN_COUNTS) -> torch.Tensor:
    freq = torch.tensor(counts, dtype=torch.float64)
    freq = freq / freq.sum()
    return (freq.max() / freq).pow(1 / 3).float()


# ---------------------------------------------------------------------------
# Synthetic airborne laser scan (numpy).


def synthetic_scene(rng: np.random.Generator, n: int, block: float = 30.0):
    """A block of n ALS points: (points [n, 8] float32, labels [n] int64).

    Channels: centred xyz (m), xyz normalised to [0, 1], intensity, return count.
    """
    half = block / 2

    def ground_z(x, y):
        return 0.02 * x + 0.01 * y

    fractions = {"roof": 0.15, "facade": 0.06, "tree": 0.15, "shrub": 0.05, "car": 0.04}
    fractions |= {"fence": 0.04, "powerline": 0.03}
    counts = {k: int(round(v * n)) for k, v in fractions.items()}
    counts["ground"] = n - sum(counts.values())
    parts = []  # (xyz [m, 3], class id, intensity mean, returns)

    # Ground: a road band (impervious) across grass (low vegetation).
    m = counts["ground"]
    x, y = rng.uniform(-half, half, m), rng.uniform(-half, half, m)
    z = ground_z(x, y) + rng.normal(0, 0.05, m)
    road_y = rng.uniform(-8, 8)
    road = np.abs(y - road_y) < 3.5
    parts.append((np.stack([x, y, z], 1)[road], 2, 0.35, 1))
    parts.append((np.stack([x, y, z], 1)[~road], 1, 0.55, 1))

    # Two box buildings: flat or gabled roofs and four facades.
    centres = [(-8.0, 9.0 if road_y < 0 else -9.0), (8.0, 9.0 if road_y < 0 else -9.0)]
    roof_m, facade_m = counts["roof"], counts["facade"]
    for bi, (cx, cy) in enumerate(centres):
        sx, sy, h = rng.uniform(6, 9), rng.uniform(5, 8), rng.uniform(5, 9)
        k = roof_m // 2 if bi == 0 else roof_m - roof_m // 2
        rx, ry = cx + rng.uniform(-sx / 2, sx / 2, k), cy + rng.uniform(-sy / 2, sy / 2, k)
        gable = 0.4 * (sx / 2 - np.abs(rx - cx)) if bi == 1 else 0.0
        rz = ground_z(cx, cy) + h + gable + rng.normal(0, 0.05, k)
        parts.append((np.stack([rx, ry, rz], 1), 5, 0.7, 1))
        k = facade_m // 2 if bi == 0 else facade_m - facade_m // 2
        t = rng.uniform(0, 2 * (sx + sy), k)  # position along the perimeter
        fx = np.where(t < sx, cx - sx / 2 + t, np.where(t < sx + sy, cx + sx / 2, 0.0))
        fx = np.where(t >= sx + sy, np.where(t < 2 * sx + sy, cx + sx / 2 - (t - sx - sy), cx - sx / 2), fx)
        fy = np.where(t < sx, cy - sy / 2, np.where(t < sx + sy, cy - sy / 2 + (t - sx), 0.0))
        fy = np.where(
            t >= sx + sy, np.where(t < 2 * sx + sy, cy + sy / 2, cy + sy / 2 - (t - 2 * sx - sy)), fy
        )
        fz = ground_z(cx, cy) + rng.uniform(0, h, k)
        parts.append((np.stack([fx, fy, fz], 1), 6, 0.45, 2))

    # Trees: spherical crowns (upper half) on trunks; shrubs: small spheres.
    def spheres(total, centres_r, cls, inten, returns, upper=True):
        per = np.full(len(centres_r), total // len(centres_r))
        per[: total - per.sum()] += 1
        for (cx, cy, cz, r), k in zip(centres_r, per):
            v = rng.normal(size=(k, 3))
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            if upper:
                v[:, 2] = np.abs(v[:, 2]) - 0.3
            p = np.array([cx, cy, cz]) + v * r * rng.uniform(0.7, 1.0, (k, 1))
            parts.append((p, cls, inten, returns))

    trees = [(rng.uniform(-13, 13), road_y + s * rng.uniform(5, 7), 0, rng.uniform(2, 3)) for s in (-1, 1, 1)]
    trees = [(x, y, ground_z(x, y) + rng.uniform(5, 7), r) for x, y, _, r in trees]
    spheres(counts["tree"], trees, 8, 0.3, 3)
    shrubs = [
        (rng.uniform(-14, 14), road_y + s * rng.uniform(4, 6), 0, rng.uniform(0.6, 1.0)) for s in (-1, 1, -1)
    ]
    shrubs = [(x, y, ground_z(x, y) + 0.7, r) for x, y, _, r in shrubs]
    spheres(counts["shrub"], shrubs, 7, 0.4, 2, upper=False)

    # Cars: small boxes on the road (top and sides).
    m = counts["car"]
    for ci in range(2):
        k = m // 2 if ci == 0 else m - m // 2
        cx, cy = rng.uniform(-12, 12), road_y + (1.5 if ci else -1.5)
        px, py = cx + rng.uniform(-2, 2, k), cy + rng.uniform(-0.9, 0.9, k)
        pz = ground_z(cx, cy) + np.where(rng.random(k) < 0.6, 1.5, rng.uniform(0.3, 1.5, k))
        parts.append((np.stack([px, py, pz], 1), 3, 0.8, 1))

    # A fence along the far side of the road.
    m = counts["fence"]
    fx = rng.uniform(-10, 2, m)
    fy = np.full(m, road_y + 4.5)
    fz = ground_z(fx, fy) + rng.uniform(0, 1.2, m)
    parts.append((np.stack([fx, fy, fz], 1), 4, 0.5, 2))

    # Three sagging powerlines crossing the block at ~12 m.
    m = counts["powerline"]
    px = rng.uniform(-half, half, m)
    wire = rng.integers(0, 3, m)
    py = 2.0 * wire - 2.0 + 0.1 * px
    pz = 12.0 + 0.004 * px**2 + 0.3 * wire
    parts.append((np.stack([px, py, pz], 1), 0, 0.2, 4))

    xyz = np.concatenate([p for p, *_ in parts]).astype(np.float64)
    labels = np.concatenate([np.full(len(p), c) for p, c, *_ in parts])
    intensity = np.concatenate([np.clip(rng.normal(i, 0.08, len(p)), 0, 1) for p, _, i, _ in parts])
    returns = np.concatenate([np.full(len(p), r, dtype=np.float64) for p, *_, r in parts])
    order = rng.permutation(n)
    xyz, labels, intensity, returns = xyz[order], labels[order], intensity[order], returns[order]
    centred = xyz - np.array([0.0, 0.0, xyz[:, 2].min()])
    normalised = (xyz - xyz.min(0)) / np.maximum(xyz.max(0) - xyz.min(0), 1e-6)
    feats = np.concatenate([centred, normalised, intensity[:, None], returns[:, None] / 4], 1)
    return feats.astype(np.float32), labels.astype(np.int64)


# ---------------------------------------------------------------------------
# Geometry shared by the factory (index search) and the graph (distances, gathers).


def square_distance(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """[B, N, 3] x [B, M, 3] -> [B, N, M] squared distances (matmul + broadcast adds)."""
    dist = -2 * torch.matmul(src, dst.permute(0, 2, 1))
    dist = dist + torch.sum(src**2, -1)[:, :, None]
    return dist + torch.sum(dst**2, -1)[:, None, :]


def index_points(points: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """points [B, N, C], idx [B, *S] -> [B, *S, C], as one flat `index_select`."""
    b, n, c = points.shape
    offset = (torch.arange(b, device=idx.device) * n).view([b] + [1] * (idx.dim() - 1))
    flat = torch.index_select(points.reshape(b * n, c), 0, (idx + offset).reshape(-1))
    return flat.view(list(idx.shape) + [c])


@torch.no_grad()
def farthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """[B, N, 3] -> [B, npoint] indices; starts at point 0 (factory time only)."""
    b, n, _ = xyz.shape
    centroids = torch.zeros(b, npoint, dtype=torch.int64)
    distance = torch.full((b, n), 1e10, dtype=xyz.dtype)
    farthest = torch.zeros(b, dtype=torch.int64)
    rows = torch.arange(b)
    for i in range(npoint):
        centroids[:, i] = farthest
        dist = torch.sum((xyz - xyz[rows, farthest][:, None, :]) ** 2, -1)
        distance = torch.minimum(distance, dist)
        farthest = distance.argmax(-1)
    return centroids


@torch.no_grad()
def sorted_neighbours(xyz: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest points of xyz to each query, nearest first: [B, S, k]."""
    return torch.topk(square_distance(queries, xyz), k, dim=-1, largest=False, sorted=True)[1]


def dilated_graph_index(neigh: torch.Tensor, k: int, rate: int, step: int = 4) -> torch.Tensor:
    """GraphDilatedKNN: from chunks of (rate-1+step) sorted neighbours keep the last `step`."""
    chunk = rate - 1 + step
    keep = [c * chunk + (rate - 1) + j for c in range(k // step) for j in range(step)]
    return neigh[..., keep]


def annular_index(neigh: torch.Tensor, k: int, rate: int) -> torch.Tensor:
    """AnnularDilatedKNN: the centre plus the ring [(rate-1)k, rate*k - 1)."""
    if rate == 1:
        return neigh[..., :k]
    return torch.cat([neigh[..., :1], neigh[..., (rate - 1) * k : rate * k - 1]], -1)


# ---------------------------------------------------------------------------
# The model.


@dataclass(frozen=True)
class RFFSConfig:
    num_points: int = 1024
    npoints: tuple[int, int, int] = (256, 128, 64)
    nsample: int = 16
    mlps: tuple = ((32, 32, 64), (64, 64, 128), (128, 128, 256))
    bandwidths: tuple[float, float, float] = (1.0, 2.0, 4.0)
    fp_out: tuple[int, int, int] = (256, 192, 64)  # up3, up2, up1 (paper 512, 384, 128)
    head: tuple[int, int] = (64, 32)  # paper 128, 64
    decoder_mid: tuple[int, int] = (32, 64)  # paper 64, 128
    dg_k: int = 16
    ad_k: int = 8
    rates: tuple[int, ...] = (1, 2, 4, 8)
    in_features: int = 5
    num_classes: int = 9
    dropout: float = 0.6
    density_sigmoid: bool = True  # False: the code's all-ReLU DensityNet


def compute_density(xyz: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Gaussian kernel density of each point among its level: [B, N]."""
    sq = square_distance(xyz, xyz)
    return (torch.exp(-sq / (2.0 * bandwidth * bandwidth)) / (2.5 * bandwidth)).mean(-1)


class DensityNet(nn.Module):
    def __init__(self, hidden=(8, 8), sigmoid: bool = True):
        super().__init__()
        chans = [1, *hidden, 1]
        self.convs = nn.ModuleList(nn.Conv1d(a, b, 1) for a, b in zip(chans, chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(b) for b in chans[1:])
        self.sigmoid = sigmoid

    def forward(self, density: torch.Tensor) -> torch.Tensor:
        s = density[:, None, :]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            s = bn(conv(s))
            last = i == len(self.convs) - 1
            s = torch.sigmoid(s) + 0.5 if (last and self.sigmoid) else F.relu(s)
        return s  # [B, 1, N]


class WeightNet(nn.Module):
    def __init__(self, cin=3, cout=16, hidden=(8, 8)):
        super().__init__()
        chans = [cin, *hidden, cout]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(chans, chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in chans[1:])

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        return x


class DensitySetAbstraction(nn.Module):
    """PointConv stage on precomputed sampling (fps) and grouping (knn) indices."""

    def __init__(self, cin: int, mlp, bandwidth: float, density_sigmoid: bool):
        super().__init__()
        self.bandwidth = bandwidth
        self.densitynet = DensityNet(sigmoid=density_sigmoid)
        chans = [cin, *mlp]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(chans, chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in chans[1:])
        self.weightnet = WeightNet(3, 16)
        self.linear = nn.Linear(16 * mlp[-1], mlp[-1])
        self.bn_linear = nn.BatchNorm1d(mlp[-1])

    def forward(self, xyz, points, fps_idx, knn_idx):
        """xyz [B,N,3], points [B,N,D] -> new_xyz [B,S,3], new_points [B,S,D']."""
        b, s, k = knn_idx.shape
        density_scale = self.densitynet(compute_density(xyz, self.bandwidth))  # [B,1,N]
        new_xyz = index_points(xyz, fps_idx)  # [B,S,3]
        grouped_xyz_norm = index_points(xyz, knn_idx) - new_xyz[:, :, None, :]  # [B,S,k,3]
        grouped = torch.cat([grouped_xyz_norm, index_points(points, knn_idx)], -1)
        grouped_density = index_points(density_scale.permute(0, 2, 1), knn_idx)  # [B,S,k,1]
        x = grouped.permute(0, 3, 2, 1)  # [B, C, k, S]
        for conv, bn in zip(self.convs, self.bns):
            x = F.relu(bn(conv(x)))
        rel = (grouped_xyz_norm * grouped_density).permute(0, 3, 2, 1)  # [B,3,k,S]
        weights = self.weightnet(rel)  # [B,16,k,S]
        x = torch.matmul(x.permute(0, 3, 1, 2), weights.permute(0, 3, 2, 1))  # [B,S,C,16]
        x = self.linear(x.reshape(b, s, -1))
        # contiguous(): BatchNorm's fake-tensor strides for a permuted input differ from
        # the real kernel's, which would turn a later reshape into an invalid view.
        x = F.relu(self.bn_linear(x.permute(0, 2, 1).contiguous()))
        return new_xyz, x.permute(0, 2, 1)


class NeighbourConv(nn.Module):
    """DGConv / ADConv body: gather neighbours - centre -> conv + BN + ReLU -> max."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """features [B,N,C], idx [B,N,k] -> [B,N,C']."""
        grouped = index_points(features, idx).permute(0, 3, 1, 2)  # [B,C,N,k]
        grouped = grouped - features.permute(0, 2, 1)[..., None]
        return F.relu(self.bn(self.conv(grouped))).amax(-1).permute(0, 2, 1)


class DAGFusion(nn.Module):
    def __init__(self, cin: int, cout: int, rates):
        super().__init__()
        q = cout // 4
        self.dgconv = nn.ModuleList(NeighbourConv(cin + i * q, q) for i in range(len(rates)))
        self.adconv = nn.ModuleList(NeighbourConv(cin + i * q, q) for i in range(len(rates)))
        self.conv = nn.Conv1d(2 * q * len(rates), cout, 1)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, features, dg_idx, ad_idx):
        """features [B,N,C]; dg_idx [B,N,R,k1], ad_idx [B,N,R,k2] -> [B,N,C']."""
        branches = []
        for convs, idx in ((self.dgconv, dg_idx), (self.adconv, ad_idx)):
            feat, outs = features, []
            for r, conv in enumerate(convs):
                out = conv(feat, idx[:, :, r])
                feat = torch.cat([feat, out], -1)  # dense connection
                outs.append(out)
            branches.append(torch.cat(outs, -1))
        fused = torch.cat(branches, -1).permute(0, 2, 1)
        return F.relu(self.bn(self.conv(fused))).permute(0, 2, 1)


def three_interpolate(unknown, known, known_feats, nn_idx):
    """Inverse-distance interpolation from the 3 nearest known points: [B, C, n].

    unknown [B,n,3], known [B,M,3], known_feats [B,C,M], nn_idx [B,n,3] (three_nn's
    indices, precomputed; the distances are recomputed here as three_nn returns them).
    """
    d = torch.sqrt(((unknown[:, :, None, :] - index_points(known, nn_idx)) ** 2).sum(-1))
    recip = 1.0 / (d + 1e-8)
    weight = recip / recip.sum(2, keepdim=True)  # [B,n,3]
    gathered = index_points(known_feats.permute(0, 2, 1), nn_idx)  # [B,n,3,C]
    return (gathered * weight[..., None]).sum(2).permute(0, 2, 1)


class FeaturePropagation(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, unknown, known, unknown_feats, known_feats, nn_idx):
        """Interpolate known_feats [B,C2,M] at unknown [B,n,3], concat the skip, MLP."""
        interpolated = three_interpolate(unknown, known, known_feats, nn_idx)
        x = torch.cat([interpolated, unknown_feats], 1)[..., None]
        return F.relu(self.bn(self.conv(x)))[..., 0]


class LevelDecoder(nn.Module):
    def __init__(self, cin: int, num_classes: int, mid, dropout: float):
        super().__init__()
        self.branch1 = nn.Sequential(nn.Conv1d(cin, mid[0], 1), nn.BatchNorm1d(mid[0]))
        self.branch2 = nn.Sequential(nn.Conv1d(cin, mid[1], 1), nn.BatchNorm1d(mid[1]))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv1d(mid[0] + mid[1], num_classes, 1)

    def forward(self, x):
        x = torch.cat([F.relu(self.branch1(x)), F.relu(self.branch2(x))], 1)
        return F.log_softmax(self.out(self.drop(x)), dim=1).permute(0, 2, 1)


class RFFSNet(nn.Module):
    def __init__(self, cfg: RFFSConfig):
        super().__init__()
        self.cfg = cfg
        (m1, m2, m3), d = cfg.mlps, cfg.density_sigmoid
        self.sa1 = DensitySetAbstraction(cfg.in_features + 3, m1, cfg.bandwidths[0], d)
        self.sa2 = DensitySetAbstraction(m1[-1] + 3, m2, cfg.bandwidths[1], d)
        self.sa3 = DensitySetAbstraction(m2[-1] + 3, m3, cfg.bandwidths[2], d)
        c3 = m3[-1]
        self.dagfusion = DAGFusion(c3, c3, cfg.rates)
        u3, u2, u1 = cfg.fp_out
        self.up3 = FeaturePropagation(c3 + m2[-1], u3)
        self.up2 = FeaturePropagation(u3 + m1[-1], u2)
        self.up1 = FeaturePropagation(u2 + cfg.in_features, u1)
        self.decoders = nn.ModuleList(
            LevelDecoder(c, cfg.num_classes, cfg.decoder_mid, cfg.dropout) for c in (c3, u3, u2)
        )
        h1, h2 = cfg.head
        self.fc1, self.bn1 = nn.Conv1d(u1, h1, 1, bias=False), nn.BatchNorm1d(h1)
        self.fc2, self.bn2 = nn.Conv1d(h1, h2, 1, bias=False), nn.BatchNorm1d(h2)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc3 = nn.Conv1d(h2, cfg.num_classes, 1)

    def forward(self, points, fps1, knn1, fps2, knn2, fps3, knn3, dg_idx, ad_idx, nn1, nn2, nn3):
        """(logits [B,N,K], level decoders' log-probs [B,S3,K], [B,S2,K], [B,S1,K])."""
        xyz, feats = points[..., :3], points[..., 3:]
        l1_xyz, l1 = self.sa1(xyz, feats, fps1, knn1)
        l2_xyz, l2 = self.sa2(l1_xyz, l1, fps2, knn2)
        l3_xyz, l3 = self.sa3(l2_xyz, l2, fps3, knn3)
        l3 = self.dagfusion(l3, dg_idx, ad_idx)  # [B,S3,C]
        l3 = l3.permute(0, 2, 1)
        l2 = self.up3(l2_xyz, l3_xyz, l2.permute(0, 2, 1), l3, nn3)  # [B,C,S2]
        l1 = self.up2(l1_xyz, l2_xyz, l1.permute(0, 2, 1), l2, nn2)  # [B,C,S1]
        up = self.up1(xyz, l1_xyz, feats.permute(0, 2, 1), l1, nn1)  # [B,C,N]
        levels = [dec(x) for dec, x in zip(self.decoders, (l3, l2, l1))]
        x = self.drop(F.relu(self.bn1(self.fc1(up))))
        x = self.drop(F.relu(self.bn2(self.fc2(x))))
        return (self.fc3(x).permute(0, 2, 1), *levels)


# ---------------------------------------------------------------------------
# Factory.


@torch.no_grad()
def precompute_indices(points: torch.Tensor, cfg: RFFSConfig) -> dict[str, torch.Tensor]:
    """All the data-dependent index tensors the model takes, from the raw points."""
    xyz = points[..., :3]
    out, level_xyz = {}, [xyz]
    for i, s in enumerate(cfg.npoints, start=1):
        src = level_xyz[-1]
        fps = farthest_point_sample(src, s)
        centres = index_points(src, fps)
        out[f"fps{i}"] = fps
        out[f"knn{i}"] = sorted_neighbours(src, centres, cfg.nsample)
        level_xyz.append(centres)
    l3 = level_xyz[3]
    need = max(max(cfg.dg_k // 4 * (r + 3) for r in cfg.rates), cfg.ad_k * max(cfg.rates))
    assert need <= l3.shape[1], f"DAGFusion needs {need} neighbours, level 3 has {l3.shape[1]}"
    neigh = sorted_neighbours(l3, l3, need)
    out["dg_idx"] = torch.stack([dilated_graph_index(neigh, cfg.dg_k, r) for r in cfg.rates], 2)
    out["ad_idx"] = torch.stack([annular_index(neigh, cfg.ad_k, r) for r in cfg.rates], 2)
    for i in (1, 2, 3):  # the 3 nearest known (coarser) points of each finer point
        out[f"nn{i}"] = sorted_neighbours(level_xyz[i], level_xyz[i - 1], 3)
    return out


INPUT_ORDER = ["fps1", "knn1", "fps2", "knn2", "fps3", "knn3", "dg_idx", "ad_idx", "nn1", "nn2", "nn3"]


def make_batch(cfg: RFFSConfig, seeds=(0, 1)):
    feats, labels = zip(*(synthetic_scene(np.random.default_rng(s), cfg.num_points) for s in seeds))
    points = torch.from_numpy(np.stack(feats))
    labels = torch.from_numpy(np.stack(labels))
    idx = precompute_indices(points, cfg)
    return points, labels, idx


def mrfa_loss(outputs, w: Workload) -> torch.Tensor:
    """MRFALoss: weighted CE at full resolution + 0.3 x weighted CE at each level."""
    logits, *levels = outputs
    weight = w.targets["class_weights"]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w.targets["labels"].reshape(-1), weight)
    for out, key in zip(levels, ("labels_l3", "labels_l2", "labels_l1")):
        loss = loss + 0.3 * F.cross_entropy(
            out.reshape(-1, out.shape[-1]), w.targets[key].reshape(-1), weight
        )
    return loss


def build(cfg: RFFSConfig | None = None, seed: int = 0) -> Workload:
    cfg = cfg or RFFSConfig()
    points, labels, idx = make_batch(cfg)
    inputs = (points, *(idx[k].contiguous() for k in INPUT_ORDER))
    torch.manual_seed(seed)
    model = RFFSNet(cfg)
    with batchnorm_statistics(model):  # from train-mode passes over the scene
        model(*inputs)
        other_points, _, other_idx = make_batch(cfg, seeds=(2, 3))
        model(other_points, *(other_idx[k].contiguous() for k in INPUT_ORDER))
    l1 = labels.gather(1, idx["fps1"])
    l2 = l1.gather(1, idx["fps2"])
    l3 = l2.gather(1, idx["fps3"])
    return Workload(
        name="rffs_net",
        model=model,
        example_inputs=inputs,
        loss_fn=mrfa_loss,
        paper=PAPER,
        config=(
            f"B=2 synthetic ALS blocks of {cfg.num_points} points, SA {cfg.npoints} k={cfg.nsample}, "
            f"half widths, DAGFusion rates {list(cfg.rates)} (DG k={cfg.dg_k}, AD k={cfg.ad_k}), 9 classes"
        ),
        chains=list(CHAINS),
        targets={
            "labels": labels,
            "labels_l1": l1,
            "labels_l2": l2,
            "labels_l3": l3,
            "class_weights": class_weights(),
        },
        extras={"classes": CLASSES},
    )
