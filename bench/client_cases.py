"""The cases of the client benchmark (``bench/clients.py``): models people run, built from configs
(no download), plus the small graphs stitch loses on and the nine workloads of ``models/``.

A case is named ``family/variant/dtype/mode`` (``bert/b8/bf16/infer``). Its ``make()`` builds, under
a fixed seed, ``(model, inputs, loss)``: ``model`` is an ``nn.Module`` called as ``model(*inputs)``,
``loss(out)`` turns its output into a scalar for a training step (``None`` for inference-only
cases). Models are built in float32 and then cast; integer inputs (token ids, edge indices) keep
their dtype. ``quick`` cases use tiny configs and run under ``--quick``; the others are base-like.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}


@dataclass
class Case:
    name: str  # family/variant/dtype/mode
    family: str  # hf | cnn | gnn | mlp | small | workload
    make: Callable[[], tuple[nn.Module, tuple, Callable | None]]
    mode: str  # infer | train
    dtype: torch.dtype
    quick: bool
    note: str = ""  # the config, for the table
    optimizer: bool = False  # the training step includes an SGD update (a training loop)


def _cast(model: nn.Module, inputs: tuple, dtype: torch.dtype):
    model = model.to(dtype)
    inputs = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                   for t in inputs)
    return model, inputs


def _mean_loss(out) -> torch.Tensor:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().square().mean() for t in leaves)


# -- HF transformers, from configs ---------------------------------------------------------------
class LastHidden(nn.Module):
    """An HF model returning its ``last_hidden_state`` (a tensor, not a ModelOutput)."""

    def __init__(self, model: nn.Module, key: str = "last_hidden_state"):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, *args):
        return getattr(self.model(*args), self.key)


def _bert(tiny: bool):
    from transformers import BertConfig, BertModel

    if tiny:
        cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, max_position_embeddings=128)
    else:  # bert-base widths, 4 of its 12 layers (compile time on 2 cores)
        cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=4,
                         num_attention_heads=12, intermediate_size=3072)
    return LastHidden(BertModel(cfg, add_pooling_layer=False)), cfg.vocab_size


def _gpt2(tiny: bool):
    from transformers import GPT2Config, GPT2Model

    if tiny:
        cfg = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=2, n_positions=128)
    else:  # gpt2 (124M) widths, 4 of its 12 layers
        cfg = GPT2Config(n_embd=768, n_layer=4, n_head=12)
    cfg.use_cache = False
    return LastHidden(GPT2Model(cfg)), cfg.vocab_size


class T5Wrap(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, dec):
        return self.model(input_ids=ids, decoder_input_ids=dec).last_hidden_state


def _t5(tiny: bool):
    from transformers import T5Config, T5Model

    if tiny:
        cfg = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    else:  # t5-small's own config
        cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)
    cfg.use_cache = False
    return T5Wrap(T5Model(cfg)), cfg.vocab_size


def _vit(tiny: bool):
    from transformers import ViTConfig, ViTModel

    if tiny:
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128)
    else:  # vit-base widths at 224, 4 of its 12 layers
        cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=4,
                        num_attention_heads=12, intermediate_size=3072)
    return LastHidden(ViTModel(cfg, add_pooling_layer=False)), cfg.image_size


def hf_case(kind: str, tiny: bool, batch: int, dtype: torch.dtype, train: bool):
    def make():
        torch.manual_seed(0)
        seq = 16 if tiny else 128
        if kind == "vit":
            model, size = _vit(tiny)
            inputs = (torch.randn(batch, 3, size, size),)
        else:
            model, vocab = {"bert": _bert, "gpt2": _gpt2, "t5": _t5}[kind](tiny)
            ids = torch.randint(0, vocab, (batch, seq))
            inputs = (ids, ids[:, : seq // 2].clone()) if kind == "t5" else (ids,)
        model.train(False)  # no dropout, also in the training step: outputs comparable
        model, inputs = _cast(model, inputs, dtype)
        return model, inputs, _mean_loss if train else None
    return make


# -- a ResNet-18-like CNN (torchvision does not load with this torch) ----------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (stem, 4 stages of 2 basic blocks, pool, fc), width ``w``."""

    def __init__(self, w: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], w
        for k, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            layers += [BasicBlock(cin, cout, 1 if k == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet_case(tiny: bool, batch: int, dtype: torch.dtype, train: bool):
    def make():
        torch.manual_seed(0)
        model = ResNet18(16, 10) if tiny else ResNet18()
        size = 32 if tiny else 224
        model.train(train)  # batch statistics in the training step, running ones in inference
        model, inputs = _cast(model, (torch.randn(batch, 3, size, size),), dtype)
        return model, inputs, _mean_loss if train else None
    return make


# -- PyG GIN, GAT and EdgeConv ------------------------------------------------------------------
class EdgeConvNet(nn.Module):
    """DGCNN's block on a fixed graph: two EdgeConv layers (an MLP on [x_i, x_j - x_i] per edge,
    max over each node's incoming edges), a gather, a per-edge MLP and a scatter-max each."""

    def __init__(self, feat: int, hidden: int, out: int):
        super().__init__()
        from torch_geometric.nn import EdgeConv

        self.c1 = EdgeConv(nn.Sequential(nn.Linear(2 * feat, hidden), nn.ReLU(),
                                         nn.Linear(hidden, hidden)), aggr="max")
        self.c2 = EdgeConv(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(),
                                         nn.Linear(hidden, out)), aggr="max")

    def forward(self, x, edge_index):
        return self.c2(self.c1(x, edge_index).relu(), edge_index)


def gnn_case(kind: str, nodes: int, edges: int, feat: int, dtype: torch.dtype, train: bool):
    def make():
        from torch_geometric.nn.models import GAT, GIN

        torch.manual_seed(0)
        if kind == "gin":
            model = GIN(feat, 64, num_layers=3, out_channels=16)
        elif kind == "edgeconv":
            model = EdgeConvNet(feat, 64, 16)
        else:
            model = GAT(feat, 64, num_layers=2, out_channels=16, heads=4)
        model.train(False)
        x = torch.randn(nodes, feat)
        edge_index = torch.randint(0, nodes, (2, edges))
        model, inputs = _cast(model, (x, edge_index), dtype)
        return model, inputs, _mean_loss if train else None
    return make


# -- a small MLP training loop -------------------------------------------------------------------
def mlp_case(batch: int, width: int, dtype: torch.dtype):
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.LayerNorm(4 * width),
                              nn.Linear(4 * width, width), nn.ReLU(), nn.Linear(width, 10))
        x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
        model, (x,) = _cast(model, (x,), dtype)

        class WithLoss(nn.Module):  # the loss inside the compiled module, as training code has it
            def __init__(self):
                super().__init__()
                self.net = model

            def forward(self, x, y):
                return F.cross_entropy(self.net(x).float(), y)

        return WithLoss(), (x, y), lambda out: out
    return make


# -- small graphs stitch loses on today ----------------------------------------------------------
class Fn(nn.Module):
    def __init__(self, fn, params: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.fn = fn
        for k, v in (params or {}).items():
            self.register_parameter(k, nn.Parameter(v))

    def forward(self, *xs):
        return self.fn(self, *xs)


def _fake_quant(m, x):
    return torch.fake_quantize_per_tensor_affine(x.float(), 0.05, 3, -128, 127).to(x.dtype)


def _quant_dequant(m, x):  # hand-written int8 round trip with a per-row scale
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-6) / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def _rms_norm(m, x):
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * m.w


SMALL = {
    # name: (function, parameter shapes from (rows, cols), input shapes from (rows, cols))
    "broadcast_chain": (lambda m, x, r, c: ((x + r[:, None]) * c[None, :] - 1.5).relu() + x.sigmoid(),
                        lambda R, C: {}, lambda R, C: [(R, C), (R,), (C,)]),
    "masked_fill": (lambda m, x, mask: x.masked_fill(mask, float("-inf")).softmax(-1),
                    lambda R, C: {}, lambda R, C: [(R, C), "mask"]),
    "fake_quant": (_fake_quant, lambda R, C: {}, lambda R, C: [(R, C)]),
    "quant_dequant": (_quant_dequant, lambda R, C: {}, lambda R, C: [(R, C)]),
    "group_norm": (lambda m, x: F.group_norm(x, 4, m.w, m.b),
                   lambda R, C: {"w": (16,), "b": (16,)},
                   lambda R, C: [(R // 8 if R > 64 else R, 16, C // 16, 8)]),
    "rms_norm": (_rms_norm, lambda R, C: {"w": (C,)}, lambda R, C: [(R, C)]),
    "silu_mul": (lambda m, a, b: F.silu(a) * b, lambda R, C: {}, lambda R, C: [(R, C), (R, C)]),
}


def small_case(kind: str, rows: int, cols: int, dtype: torch.dtype):
    fn, params, shapes = SMALL[kind]

    def make():
        g = torch.Generator().manual_seed(0)
        inputs = []
        for s in shapes(rows, cols):
            if s == "mask":
                inputs.append(torch.rand(rows, cols, generator=g) < 0.2)
            else:
                inputs.append(torch.randn(*s, generator=g) * 2)
        ps = {k: torch.randn(*s, generator=g) for k, s in params(rows, cols).items()}
        model, inputs = _cast(Fn(fn, ps), tuple(inputs), dtype)
        return model.train(False), inputs, None
    return make


# -- the nine workloads of models/ ---------------------------------------------------------------
def workload_case(name: str, train: bool):
    def make():
        import models

        w = models.get(name)
        return w.model, tuple(w.example_inputs), ((lambda out: w.loss_fn(out, w)) if train else None)
    return make


# ``--quick``: one or two of each family, tiny configs (under 3 minutes on 2 quiet cores)
QUICK = {
    "bert-tiny/b1/f32/infer", "gpt2-tiny/b8/f32/infer", "t5-tiny/b1/f32/infer", "vit-tiny/b8/f32/infer",
    "bert-tiny/b1/bf16/infer", "resnet18-tiny/b8/f32/infer", "gin/n100/f32/infer", "gat/n100/f32/infer",
    "mlp/b32/f32/train", "broadcast_chain/small/f32/infer", "masked_fill/small/f32/infer",
    "fake_quant/small/f32/infer", "quant_dequant/small/f32/infer", "group_norm/small/f32/infer",
    "rms_norm/small/f32/infer", "silu_mul/small/f32/infer", "silu_mul/large/f32/infer",
    "masked_fill/large/f32/infer", "rms_norm/small/bf16/infer",
    # float16 and float64 too: client code brings both
    "bert-tiny/b1/f16/infer", "silu_mul/small/f16/infer", "broadcast_chain/small/f64/infer",
    "mlp/b32/f64/train",
}


def all_cases() -> list[Case]:
    cases: list[Case] = []

    def add(name, family, make, mode, dt, tiny, note="", optimizer=False):
        """``tiny``: a tiny config (quick to compile); ``--quick`` runs the ones in QUICK."""
        full = f"{name}/{dt}/{mode}"
        cases.append(Case(full, family, make, mode, DTYPES[dt], full in QUICK, note, optimizer))

    for dt in DTYPES:
        for kind in ("bert", "gpt2", "t5", "vit"):
            for b in (1, 8):  # tiny configs for --quick, base-like widths for the full run
                add(f"{kind}-tiny/b{b}", "hf", hf_case(kind, True, b, DTYPES[dt], False), "infer", dt,
                    True, "tiny config, seq 16 (vit 32x32)")
                add(f"{kind}/b{b}", "hf", hf_case(kind, False, b, DTYPES[dt], False), "infer", dt,
                    False, "base widths, 4 layers, seq 128 (vit 224x224)" if kind != "t5" else
                    "t5-small config, seq 128")
        add("bert-tiny/b8", "hf", hf_case("bert", True, 8, DTYPES[dt], True), "train", dt, dt == "f32",
            "tiny config, seq 16")
        for b in (1, 8):
            add(f"resnet18-tiny/b{b}", "cnn", resnet_case(True, b, DTYPES[dt], False), "infer", dt, True,
                "width 16, 32x32")
            add(f"resnet18/b{b}", "cnn", resnet_case(False, b, DTYPES[dt], False), "infer", dt, False,
                "resnet18 widths, 224x224")
        add("resnet18-tiny/b8", "cnn", resnet_case(True, 8, DTYPES[dt], True), "train", dt, dt == "f32",
            "width 16, 32x32, batch-norm statistics")
        for kind in ("gin", "gat", "edgeconv"):
            add(f"{kind}/n100", "gnn", gnn_case(kind, 100, 400, 32, DTYPES[dt], False), "infer", dt,
                True, "100 nodes, 400 edges, 32 features")
            add(f"{kind}/n20k", "gnn", gnn_case(kind, 20_000, 200_000, 64, DTYPES[dt], False), "infer",
                dt, dt == "f32", "20k nodes, 200k edges, 64 features")
        for kind in ("gin", "edgeconv"):  # a GNN training step: gathers' gradients are scatters
            add(f"{kind}/n100", "gnn", gnn_case(kind, 100, 400, 32, DTYPES[dt], True), "train", dt,
                dt == "f32", "100 nodes, 400 edges, 32 features")
            add(f"{kind}/n20k", "gnn", gnn_case(kind, 20_000, 200_000, 64, DTYPES[dt], True), "train",
                dt, dt == "f32", "20k nodes, 200k edges, 64 features")
        for b, w in ((32, 64), (1024, 256)):
            add(f"mlp/b{b}", "mlp", mlp_case(b, w, DTYPES[dt]), "train", dt, True,
                f"3 linears, width {w}, SGD step", optimizer=True)
        for kind in SMALL:
            cols = 67 if kind != "group_norm" else 64
            add(f"{kind}/small", "small", small_case(kind, 8, cols, DTYPES[dt]), "infer", dt, True,
                "8x67 (group_norm 8x16x4x8)")
            add(f"{kind}/large", "small", small_case(kind, 2048, 1024, DTYPES[dt]), "infer", dt,
                dt == "f32", "2048x1024 (group_norm 256x16x64x8)")
    import models

    for name in models.names():
        for mode in ("infer", "train"):
            add(f"wl.{name}", "workload", workload_case(name, mode == "train"), mode, "f32", False,
                "models/ workload")
    return cases
