"""ExtremeBERT: pre-LN BERT with sparse masked-LM prediction.

Paper: "ExtremeBERT: A Toolkit for Accelerating Pretraining of Customized BERT",
Rui Pan, Shizhe Diao, Jianlin Chen, Tong Zhang, arXiv 2211.17201.  The toolkit's
model (`extreme-bert/extreme-bert:pretraining/modeling.py`, itself from IntelLabs'
academic-budget-bert) is written here again in plain torch, keeping its tricks:

- pre-LN encoder layers plus a final LayerNorm, no LayerNorm on the embeddings;
- `LinearActivation`: `F.linear` without bias, then a separate bias add + GELU(erf),
  which is the bias+GELU chain the toolkit fuses with a jit-scripted kernel;
- attention as scale (1/sqrt(d_head) = 1/8) + additive mask (-10000) + softmax +
  dropout;
- sparse MLM: only the masked positions are gathered before the LM transform
  (dense + GELU + LN) and the tied decoder.  The toolkit finds them with
  `torch.nonzero(labels + 1)`, whose shape depends on the data; here they arrive as a
  fixed `masked_lm_positions[B, 20]` input, gathered with `index_select`, and unused
  slots carry label -1 (ignored by the loss).

Small configuration (WORKLOADS.md §4): B=2, L=128, hidden 256, 4 layers, 4 heads of
64, FFN 1024, vocabulary 1000, 20 prediction slots per sequence (15% of the real tokens:
19 and 15 in the two sequences, the second of which is padded to 128; unused slots
carry label -1).
The paper's recipe is 24 layers / 1024 hidden / 16 heads / FFN 4096.

Chains exercised: embedding gather + sum; LayerNorm; scale + mask + softmax
(+ dropout, identity in eval); bias + GELU; bias + residual; gather of masked rows;
log-softmax / cross-entropy in the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Workload

PAPER = "ExtremeBERT: A Toolkit for Accelerating Pretraining of Customized BERT (arXiv 2211.17201)"
CHAINS = [
    "embedding gather + sum",
    "layernorm",
    "scale + additive mask + softmax (+ dropout)",
    "bias + gelu(erf)",
    "bias + residual add",
    "gather masked positions",
    "log_softmax + nll (loss)",
]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 1000
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    ffn: int = 1024
    max_positions: int = 128
    type_vocab: int = 2
    dropout: float = 0.1
    attn_dropout: float = 0.1
    ln_eps: float = 1e-12


def bias_gelu(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GELU(y + bias) with the exact (erf) GELU, as the toolkit's `bias_gelu`."""
    return F.gelu(y + bias)


class LinearActivation(nn.Module):
    """`F.linear` without bias, then bias + GELU: the toolkit's fusable pair."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_gelu(self.bias, F.linear(x, self.weight, None))


class Embeddings(nn.Module):
    """word + position + token type, then dropout (no LayerNorm: the pre-LN default)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        for emb in (self.word, self.position, self.token_type):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type(token_type_ids)
        return self.dropout(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads = cfg.heads
        self.d_head = cfg.hidden // cfg.heads
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = nn.Dropout(cfg.attn_dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.d_head).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.d_head))
        probs = self.dropout(F.softmax(scores + additive_mask, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3)
        return ctx.reshape(x.shape)


class Layer(nn.Module):
    """Pre-LN layer: x + drop(W_o attn(LN x)); x + drop(W_2 gelu(W_1 LN x + b_1))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.attention = SelfAttention(cfg)
        self.attn_out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.ln_ffn = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.intermediate = LinearActivation(cfg.hidden, cfg.ffn)
        self.output = nn.Linear(cfg.ffn, cfg.hidden)
        self.out_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn_out(self.attention(self.ln_attn(x), additive_mask)))
        return x + self.out_dropout(self.output(self.intermediate(self.ln_ffn(x))))


class MLMHead(nn.Module):
    """LM transform (dense + GELU + LN), then the decoder tied to the word embedding."""

    def __init__(self, cfg: BertConfig, word_embedding: nn.Embedding):
        super().__init__()
        self.transform = LinearActivation(cfg.hidden, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.word_embedding = word_embedding  # tied, not a copy
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(self.transform(x)), self.word_embedding.weight) + self.bias


class BertForSparseMLM(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.final_ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.mlm = MLMHead(cfg, self.embeddings.word)

    def encode(self, input_ids, token_type_ids, attention_mask) -> torch.Tensor:
        """The final-LN'd sequence output [B, L, H]."""
        mask = attention_mask.to(torch.float32)[:, None, None, :]
        additive_mask = (1.0 - mask) * -10000.0
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, additive_mask)
        return self.final_ln(x)

    def forward(self, input_ids, token_type_ids, attention_mask, masked_lm_positions):
        """MLM logits [B * P, V] for the P = masked_lm_positions.shape[1] slots."""
        seq = self.encode(input_ids, token_type_ids, attention_mask)
        b, n, h = seq.shape
        # Row index of each slot in the flattened [B*L, H] output: a static-shape gather
        # in place of the toolkit's nonzero().
        rows = masked_lm_positions + torch.arange(b, device=seq.device)[:, None] * n
        picked = torch.index_select(seq.reshape(b * n, h), 0, rows.reshape(-1))
        return self.mlm(picked)


def mlm_loss(logits: torch.Tensor, w: Workload) -> torch.Tensor:
    """Cross-entropy over the prediction slots; label -1 marks an unused slot."""
    return F.cross_entropy(logits, w.targets["masked_lm_labels"].reshape(-1), ignore_index=-1)


def make_inputs(cfg: BertConfig, batch: int = 2, seq_len: int = 128, slots: int = 20, seed: int = 0):
    """Synthetic MLM batch: random ids, padded second sequence, 15% masking."""
    g = torch.Generator().manual_seed(seed)
    pad_id, cls_id, sep_id, mask_id, first_word = 0, 2, 3, 4, 5
    lengths = [seq_len, seq_len - 28][:batch] + [seq_len] * max(0, batch - 2)
    input_ids = torch.randint(first_word, cfg.vocab_size, (batch, seq_len), generator=g)
    token_type_ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    attention_mask = torch.zeros(batch, seq_len, dtype=torch.int64)
    positions = torch.zeros(batch, slots, dtype=torch.int64)
    labels = torch.full((batch, slots), -1, dtype=torch.int64)
    for i, length in enumerate(lengths):
        input_ids[i, 0], input_ids[i, length - 1] = cls_id, sep_id
        input_ids[i, length:] = pad_id
        attention_mask[i, :length] = 1
        token_type_ids[i, length // 2 : length] = 1
        # ≈15% of the real tokens, at most slots - 1 so that one slot stays padded.
        n_pred = min(slots - 1, max(1, round(0.15 * (length - 2))))
        chosen = 1 + torch.randperm(length - 2, generator=g)[:n_pred].sort().values
        positions[i, :n_pred] = chosen
        labels[i, :n_pred] = input_ids[i, chosen]
        input_ids[i, chosen] = mask_id
    return (input_ids, token_type_ids, attention_mask, positions), labels


def build(cfg: BertConfig | None = None, seed: int = 0) -> Workload:
    cfg = cfg or BertConfig()
    torch.manual_seed(seed)
    model = BertForSparseMLM(cfg).eval()
    inputs, labels = make_inputs(cfg, seed=seed)
    return Workload(
        name="bert",
        model=model,
        example_inputs=inputs,
        loss_fn=mlm_loss,
        paper=PAPER,
        config=(
            f"B=2 L=128 H={cfg.hidden} {cfg.layers} layers {cfg.heads} heads FFN {cfg.ffn} "
            f"V={cfg.vocab_size}, pre-LN, sparse MLM over 20 slots/sequence"
        ),
        chains=list(CHAINS),
        targets={"masked_lm_labels": labels},
    )
