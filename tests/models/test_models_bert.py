"""ExtremeBERT's defining pieces: masking, bias+GELU, sparse MLM gather, tied decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.bert import LinearActivation


def test_attention_mask_masks(workload):
    w = workload("bert")
    ids, types, mask, pos = w.example_inputs
    assert (mask[1] == 0).any(), "the example batch must have padding"
    padded = mask == 0
    perturbed = ids.clone()
    perturbed[padded] = torch.randint(5, w.model.cfg.vocab_size, (int(padded.sum()),))
    assert not torch.equal(perturbed, ids)
    with torch.no_grad():
        base = w.model(ids, types, mask, pos)
        after = w.model(perturbed, types, mask, pos)
    torch.testing.assert_close(after, base, rtol=0, atol=1e-5)


def test_unmasked_tokens_do_matter(workload):
    w = workload("bert")
    ids, types, mask, pos = w.example_inputs
    perturbed = ids.clone()
    perturbed[1, 10] = (ids[1, 10] + 7) % w.model.cfg.vocab_size
    with torch.no_grad():
        diff = (w.model(perturbed, types, mask, pos) - w.model(ids, types, mask, pos)).abs()
    assert diff.max() > 1e-3


def test_float_attention_mask_is_the_same(workload):
    w = workload("bert")
    ids, types, mask, pos = w.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(w.model(ids, types, mask.float(), pos), w.forward())


def test_linear_activation_is_bias_then_erf_gelu():
    torch.manual_seed(1)
    la = LinearActivation(16, 32)
    with torch.no_grad():
        la.bias.normal_()
    x = torch.randn(3, 5, 16)
    y = x @ la.weight.T + la.bias
    want = y * 0.5 * (1.0 + torch.erf(y / math.sqrt(2.0)))
    torch.testing.assert_close(la(x), want)


def test_sparse_mlm_equals_dense_then_gather(workload):
    w = workload("bert")
    ids, types, mask, pos = w.example_inputs
    with torch.no_grad():
        dense = w.model.mlm(w.model.encode(ids, types, mask))  # [B, L, V]
        want = torch.stack([dense[b, pos[b]] for b in range(ids.shape[0])]).flatten(0, 1)
        torch.testing.assert_close(w.forward(), want, rtol=1e-5, atol=1e-5)


def test_decoder_is_tied_and_loss_ignores_padded_slots(workload):
    w = workload("bert")
    assert w.model.mlm.word_embedding.weight is w.model.embeddings.word.weight
    labels = w.targets["masked_lm_labels"]
    assert (labels == -1).any() and (labels >= 0).sum() > 20
    logits = w.forward()
    keep = labels.reshape(-1) >= 0
    want = -F.log_softmax(logits[keep], -1).gather(1, labels.reshape(-1)[keep, None]).mean()
    torch.testing.assert_close(w.loss(logits), want)
    # Labels are the original tokens at positions that now hold [MASK] (id 4).
    ids, _, _, pos = w.example_inputs
    real = labels >= 0
    assert (ids.gather(1, pos)[real] == 4).all()
