"""MolCPT: a GIN molecule encoder prompted with its BRICS motifs.

Paper: "MolCPT: Molecule Continuous Prompt Tuning to Generalize Molecular
Representation Learning", Diao, Zhou, Liu, Huang, Hu (WSDM'24), arXiv 2212.10614.
Written again in plain torch after the paper's code (`CameronDiao/GraphCL:
transferLearning_MoleculeNet_PPI/chem/model_motif.py`, itself on pretrain-gnns):

- GIN backbone: atom embedding (type 120 + chirality 3); per layer, self-loops with
  bond type 4, bond embedding (type 6 + direction 3), message x[src] + bond embedding
  summed into dst with `index_add` (in place of PyG's MessagePassing), MLP
  d -> 2d -> d, BatchNorm1d, ReLU except after the last layer, dropout.
- Global mean pool (segment sum by `index_add`, divided by the node count).
- Motif prompt: the motif vocabulary comes from rdkit BRICS (falling back to a
  ring/bond tree decomposition for molecules with no BRICS bond), computed at factory
  time.  Each motif's embedding is initialised, as in the paper, with the backbone's
  pooled embedding of that motif's subgraph.  Per batch, the motif embeddings are
  gathered into [B, Mmax, d] with a mask, encoded (Linear + LayerNorm) and attended by
  the detached graph embedding in a 4-head MAB (masked softmax, residual, LN, FFN,
  LN), decoded by a Linear, added to the graph embedding and L2-normalised, then a
  Linear classifier (2 classes, cross-entropy).
- Deliberate choice: the code's MAB takes `torch.softmax(score, 1)` over the
  size-one query axis, so every attention weight is 1 and the "attention" sums all
  slots, padding included.  We use the intended softmax over the motif axis
  (`softmax_dim=-1`); `softmax_dim=1` reproduces the quirk.
- The code concatenates graph and motif representations before normalising; the
  paper's prompt *augments* the graph representation, which we write as a sum
  (`combine="add"`, the default; `combine="concat"` is the code's variant).

rdkit is optional: without it, the factory reads the same tables (atom/bond features,
motif cliques, vocabulary) from `models/data/molcpt_motifs.json`, which
`python -m models.molcpt` regenerates with rdkit.  The backbone has no pre-trained
weights offline (GraphCL's are a download): weights are seeded and BatchNorm's
running statistics come from one train-mode pass over the 32 shipped molecules.

Small configuration (WORKLOADS.md §1): B=2 molecules (diclofenac + warfarin: 42
atoms, 90 directed bonds), 3 GIN layers, d=64, 4 heads; the paper uses 5 layers, d=300.

Chains exercised: embedding gather + add; gather x[src] + bond embedding + index_add;
Linear-ReLU-Linear; BN + ReLU; segment mean; masked softmax; LayerNorm; residuals;
L2-normalise; log-softmax / cross-entropy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload, batchnorm_statistics

PAPER = (
    "MolCPT: Molecule Continuous Prompt Tuning to Generalize Molecular Representation "
    "Learning (arXiv 2212.10614)"
)
CHAINS = [
    "atom/bond embedding gather + add",
    "gather x[src] + bond embedding + index_add (message passing)",
    "linear-relu-linear (GIN MLP)",
    "batchnorm + relu",
    "segment mean pool (index_add / count)",
    "masked softmax over motifs",
    "layernorm + residual",
    "l2 normalise",
    "log_softmax + nll (loss)",
]

DATA = Path(__file__).with_name("data")
SMILES_FILE = DATA / "molcpt.smi"
MOTIF_FILE = DATA / "molcpt_motifs.json"

NUM_ATOM_TYPE, NUM_CHIRALITY = 120, 3
NUM_BOND_TYPE, NUM_BOND_DIRECTION = 6, 3
SELF_LOOP_BOND = 4
BATCH = ("diclofenac", "warfarin")


# ---------------------------------------------------------------------------
# Offline part: molecules -> graphs and motifs (rdkit, or the shipped table).


def read_smiles() -> list[tuple[str, str]]:
    rows = []
    for line in SMILES_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, smi = line.split("\t")
            rows.append((name, smi))
    return rows


def _featurise(mol) -> tuple[list[list[int]], list[list[int]]]:
    """pretrain-gnns features: atoms [Z-1, chirality], directed bonds [s, d, type, dir]."""
    from rdkit import Chem

    chir = [Chem.ChiralType.CHI_UNSPECIFIED, Chem.ChiralType.CHI_TETRAHEDRAL_CW]
    chir.append(Chem.ChiralType.CHI_TETRAHEDRAL_CCW)
    btypes = [Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE]
    btypes.append(Chem.BondType.AROMATIC)
    bdirs = [Chem.BondDir.NONE, Chem.BondDir.ENDUPRIGHT, Chem.BondDir.ENDDOWNRIGHT]
    atoms = []
    for a in mol.GetAtoms():
        c = a.GetChiralTag()
        atoms.append([a.GetAtomicNum() - 1, chir.index(c) if c in chir else 0])
    edges = []
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        t, d = btypes.index(b.GetBondType()), b.GetBondDir()
        d = bdirs.index(d) if d in bdirs else 0
        edges += [[i, j, t, d], [j, i, t, d]]
    return atoms, edges


def _cliques(mol) -> list[list[int]]:
    """BRICS fragments (atom sets); without BRICS bonds, rings and non-ring bonds."""
    from rdkit.Chem import BRICS

    n = mol.GetNumAtoms()
    broken = {tuple(sorted(pair)) for pair, _ in BRICS.FindBRICSBonds(mol)}
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        if (min(i, j), max(i, j)) not in broken:
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    cliques = sorted(groups.values())
    if len(cliques) > 1 or n < 3:
        return cliques
    # tree_decomp fallback (junction-tree style, without the merging of bridged rings)
    rings = [set(r) for r in mol.GetRingInfo().AtomRings()]
    merged: list[set[int]] = []
    for r in rings:
        for m in merged:
            if len(m & r) > 2:
                m |= r
                break
        else:
            merged.append(set(r))
    out = [sorted(m) for m in merged]
    for b in mol.GetBonds():
        if not b.IsInRing():
            out.append(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx())))
    return sorted(out) or cliques


def motif_table_from_rdkit() -> dict:
    """Everything the workload needs from rdkit, as plain JSON-able data."""
    from rdkit import Chem

    molecules, vocab = [], {}
    for name, smi in read_smiles():
        mol = Chem.MolFromSmiles(smi)
        atoms, edges = _featurise(mol)
        cliques = _cliques(mol)
        motif_smiles = [Chem.MolFragmentToSmiles(mol, atomsToUse=c) for c in cliques]
        for s in motif_smiles:
            vocab.setdefault(s, None)
        molecules.append(
            {
                "name": name,
                "smiles": smi,
                "atoms": atoms,
                "edges": edges,
                "cliques": cliques,
                "motifs": motif_smiles,
            }
        )
    vocab_list = sorted(vocab)
    index = {s: i for i, s in enumerate(vocab_list)}
    for m in molecules:
        m["motif_ids"] = [index[s] for s in m.pop("motifs")]
    # The subgraph that stands for each motif: its first occurrence.
    first: dict[int, list[int]] = {}
    for mi, m in enumerate(molecules):
        for ci, v in enumerate(m["motif_ids"]):
            first.setdefault(v, [mi, ci])
    return {
        "source": "rdkit BRICS (tree_decomp fallback) over models/data/molcpt.smi",
        "vocab": vocab_list,
        "representative": [first[v] for v in range(len(vocab_list))],
        "molecules": molecules,
    }


def load_motif_table(use_rdkit: bool | None = None) -> dict:
    """The motif table: computed with rdkit if importable (or asked), else shipped."""
    if use_rdkit is None:
        try:
            import rdkit  # noqa: F401

            use_rdkit = True
        except ImportError:
            use_rdkit = False
    if use_rdkit:
        return motif_table_from_rdkit()
    return json.loads(MOTIF_FILE.read_text())


def batch_graphs(mols: list[dict], subsets: list[list[int]] | None = None):
    """Disjoint union of (sub)graphs: x [N,2], edge_index [2,E], edge_attr [E,2], batch [N]."""
    xs, eis, eas, bs, offset = [], [], [], [], 0
    for g, m in enumerate(mols):
        keep = subsets[g] if subsets is not None else list(range(len(m["atoms"])))
        local = {a: i for i, a in enumerate(keep)}
        xs += [m["atoms"][a] for a in keep]
        for s, d, t, r in m["edges"]:
            if s in local and d in local:
                eis.append([local[s] + offset, local[d] + offset])
                eas.append([t, r])
        bs += [g] * len(keep)
        offset += len(keep)
    x = torch.tensor(xs, dtype=torch.int64)
    edge_index = torch.tensor(eis, dtype=torch.int64).reshape(-1, 2).T.contiguous()
    edge_attr = torch.tensor(eas, dtype=torch.int64).reshape(-1, 2)
    return x, edge_index, edge_attr, torch.tensor(bs, dtype=torch.int64)


def pad_motifs(mols: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """to_dense_batch done offline: motif ids [B, Mmax] (pad 0) and mask [B, Mmax]."""
    width = max(len(m["motif_ids"]) for m in mols)
    ids = torch.zeros(len(mols), width, dtype=torch.int64)
    mask = torch.zeros(len(mols), width, dtype=torch.bool)
    for i, m in enumerate(mols):
        ids[i, : len(m["motif_ids"])] = torch.tensor(m["motif_ids"])
        mask[i, : len(m["motif_ids"])] = True
    return ids, mask


# ---------------------------------------------------------------------------
# The model (traced part).


def gin_aggregate(x, edge_index, edge_emb):
    """sum over edges (s -> d) of x[s] + edge_emb, into d: gather + add + index_add."""
    src, dst = edge_index[0], edge_index[1]
    message = torch.index_select(x, 0, src) + edge_emb
    return torch.zeros_like(x).index_add(0, dst, message)


class GINConv(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.bond_type = nn.Embedding(NUM_BOND_TYPE, d)
        self.bond_dir = nn.Embedding(NUM_BOND_DIRECTION, d)
        nn.init.xavier_uniform_(self.bond_type.weight)
        nn.init.xavier_uniform_(self.bond_dir.weight)

    def forward(self, x, edge_index, edge_attr):
        n = x.shape[0]
        loops = torch.arange(n, device=x.device)
        edge_index = torch.cat([edge_index, torch.stack([loops, loops])], dim=1)
        loop_attr = torch.stack([torch.full_like(loops, SELF_LOOP_BOND), torch.zeros_like(loops)], 1)
        edge_attr = torch.cat([edge_attr, loop_attr], dim=0)
        edge_emb = self.bond_type(edge_attr[:, 0]) + self.bond_dir(edge_attr[:, 1])
        return self.mlp(gin_aggregate(x, edge_index, edge_emb))


class GIN(nn.Module):
    def __init__(self, layers: int, d: int, dropout: float):
        super().__init__()
        self.atom_type = nn.Embedding(NUM_ATOM_TYPE, d)
        self.chirality = nn.Embedding(NUM_CHIRALITY, d)
        nn.init.xavier_uniform_(self.atom_type.weight)
        nn.init.xavier_uniform_(self.chirality.weight)
        self.convs = nn.ModuleList(GINConv(d) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(layers))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, edge_index, edge_attr):
        h = self.atom_type(x[:, 0]) + self.chirality(x[:, 1])
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h, edge_index, edge_attr))
            if i < len(self.convs) - 1:  # no ReLU after the last layer
                h = F.relu(h)
            h = self.dropout(h)
        return h


def mean_pool(h: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    """Segment mean of node rows per graph (global_mean_pool) via index_add."""
    sums = h.new_zeros(num_graphs, h.shape[1]).index_add(0, batch, h)
    counts = h.new_zeros(num_graphs).index_add(0, batch, torch.ones_like(batch, dtype=h.dtype))
    return sums / counts.clamp_min(1.0)[:, None]


class MAB(nn.Module):
    """Multihead attention block of Set Transformer, as in MolCPT's motif pooling."""

    def __init__(self, d: int, heads: int, layer_norm: bool = True, softmax_dim: int = -1):
        super().__init__()
        self.d, self.heads, self.softmax_dim = d, heads, softmax_dim
        self.fc_q, self.fc_k, self.fc_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc_o = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.ln0 = nn.LayerNorm(d) if layer_norm else nn.Identity()
        self.ln1 = nn.LayerNorm(d) if layer_norm else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # [B, n, d] -> [heads*B, n, d/heads], head-major like cat(split(.., 2), 0)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.d // self.heads).permute(2, 0, 1, 3).flatten(0, 1)

    def attention(self, q, k, mask):
        """Attention weights [heads*B, nq, nk]; padded motif slots get 0 weight."""
        score = torch.bmm(self._heads(self.fc_q(q)), self._heads(self.fc_k(k)).transpose(1, 2))
        score = score / math.sqrt(self.d)  # the code scales by sqrt(dim_V), not sqrt(d_head)
        keep = mask[:, None, :].repeat(self.heads, 1, 1)
        score = torch.where(keep, score, torch.full_like(score, -torch.finfo(score.dtype).max))
        return F.softmax(score, dim=self.softmax_dim)

    def forward(self, q, k, mask):
        b, nq, _ = q.shape
        a = self.attention(q, k, mask)
        ctx = torch.bmm(a, self._heads(self.fc_v(k)))  # [heads*B, nq, d/heads]
        ctx = ctx.view(self.heads, b, nq, -1).permute(1, 2, 0, 3).reshape(b, nq, self.d)
        out = self.ln0(q + self.fc_o(ctx))
        return self.ln1(out + self.ffn(out))


@dataclass(frozen=True)
class MolCPTConfig:
    layers: int = 3
    d: int = 64
    heads: int = 4
    num_classes: int = 2
    dropout: float = 0.5
    softmax_dim: int = -1  # 1 reproduces the code's quirk
    combine: str = "add"  # or "concat", as in model_motif.py


class MolCPT(nn.Module):
    def __init__(self, cfg: MolCPTConfig, num_motifs: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        self.gnn = GIN(cfg.layers, d, cfg.dropout)
        self.motif_embedding = nn.Embedding(num_motifs, d)  # "clique_embedding"
        self.motif_enc = nn.Linear(d, d)
        self.motif_norm = nn.LayerNorm(d)
        self.motif_pool = MAB(d, cfg.heads, layer_norm=True, softmax_dim=cfg.softmax_dim)
        self.motif_dec = nn.Linear(d, d)
        width = 2 * d if cfg.combine == "concat" else d
        self.head = nn.Linear(width, cfg.num_classes)

    def prompt(self, graph, motif_ids, motif_mask):
        """The motif prompt [B, d] for graph embeddings [B, d]."""
        m = self.motif_norm(self.motif_enc(self.motif_embedding(motif_ids)))
        m = self.motif_pool(graph.detach()[:, None, :], m, motif_mask)
        return self.motif_dec(m)[:, 0]

    def forward(self, x, edge_index, edge_attr, batch, motif_ids, motif_mask):
        """(graph embedding [B, d], class logits [B, classes])."""
        h = self.gnn(x, edge_index, edge_attr)
        graph = mean_pool(h, batch, motif_ids.shape[0])
        motif = self.prompt(graph, motif_ids, motif_mask)
        if self.cfg.combine == "concat":
            rep = torch.cat([graph, motif], dim=1)
        else:
            rep = graph + motif
        # F.normalize(rep, dim=1), written out: rep / max(||rep||, eps)
        rep = rep / torch.sqrt((rep * rep).sum(1, keepdim=True)).clamp_min(1e-12)
        return graph, self.head(rep)


def loss_fn(outputs, w: Workload) -> torch.Tensor:
    return F.cross_entropy(outputs[1], w.targets["labels"])


@torch.no_grad()
def _calibrate_and_init(model: MolCPT, table: dict) -> None:
    """BN running stats from the shipped molecules; motif embeddings from their subgraphs."""
    mols = table["molecules"]
    x, ei, ea, batch = batch_graphs(mols)
    with batchnorm_statistics(model.gnn):  # the cumulative average over two passes
        for _ in range(2):
            model.gnn(x, ei, ea)
    reps = table["representative"]
    subs = [mols[mi]["cliques"][ci] for mi, ci in reps]
    x, ei, ea, batch = batch_graphs([mols[mi] for mi, _ in reps], subs)
    model.motif_embedding.weight.copy_(mean_pool(model.gnn(x, ei, ea), batch, len(reps)))


def build(cfg: MolCPTConfig | None = None, seed: int = 0, use_rdkit: bool | None = None) -> Workload:
    cfg = cfg or MolCPTConfig()
    table = load_motif_table(use_rdkit)
    torch.manual_seed(seed)
    model = MolCPT(cfg, num_motifs=len(table["vocab"]))
    _calibrate_and_init(model, table)
    model.eval()
    by_name = {m["name"]: m for m in table["molecules"]}
    mols = [by_name[n] for n in BATCH]
    x, edge_index, edge_attr, batch = batch_graphs(mols)
    motif_ids, motif_mask = pad_motifs(mols)
    labels = torch.tensor([1, 0])
    return Workload(
        name="molcpt",
        model=model,
        example_inputs=(x, edge_index, edge_attr, batch, motif_ids, motif_mask),
        loss_fn=loss_fn,
        paper=PAPER,
        config=(
            f"B=2 molecules ({'+'.join(BATCH)}; N={x.shape[0]} atoms, E={edge_index.shape[1]} "
            f"directed bonds), GIN {cfg.layers} layers d={cfg.d}, {len(table['vocab'])} BRICS "
            f"motifs, MAB {cfg.heads} heads"
        ),
        chains=list(CHAINS),
        targets={"labels": labels},
        extras={"motif_table": table},
    )


if __name__ == "__main__":  # regenerate the shipped motif table (needs rdkit)
    MOTIF_FILE.write_text(json.dumps(motif_table_from_rdkit(), separators=(",", ":")) + "\n")
    print(f"wrote {MOTIF_FILE}")
