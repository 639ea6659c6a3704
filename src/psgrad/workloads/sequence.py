"""Sequence workloads on random token ids: an LSTM text classifier, a Transformer encoder classifier and a
tiny GPT-2 language model (the last behind the ``hf`` extra)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import require
from .base import Workload, seeded

SEQUENCE = 128


def _tokens(batch_size: int, vocab: int, classes: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    g = seeded(1)
    ids = torch.randint(0, vocab, (batch_size, SEQUENCE), generator=g)
    targets = ids if classes is None else torch.randint(0, classes, (batch_size,), generator=g)
    return ids.to(device), targets.to(device)


class LSTMClassifier(nn.Module):
    """Embedding, one LSTM layer, a linear head on the last hidden state."""

    def __init__(self, vocab: int = 20_000, embed: int = 100, hidden: int = 100, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: Tensor) -> Tensor:
        _, (h, _) = self.lstm(self.embed(ids))
        return self.head(h[-1])


def lstm_text(batch_size: int, device: torch.device) -> Workload:
    """Text classification with an LSTM: vocabulary 20k, embedding 100, one LSTM layer of 100, 2 classes,
    sequences of 128 tokens (2.1M parameters, 2M of them in the embedding)."""
    torch.manual_seed(0)
    ids, y = _tokens(batch_size, 20_000, 2, device)
    return Workload("lstm-text", LSTMClassifier().to(device).eval(), ids, y, nn.CrossEntropyLoss(reduction="none"))


class EncoderClassifier(nn.Module):
    """Token embedding, ``nn.TransformerEncoder`` (batch first), mean over the sequence, linear head."""

    def __init__(self, vocab: int = 8192, dim: int = 256, heads: int = 4, ff: int = 1024, layers: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def transformer(batch_size: int, device: torch.device) -> Workload:
    """``nn.TransformerEncoder`` classifier: vocabulary 8192, width 256, 4 heads, feed-forward 1024, 4 layers,
    dropout 0, sequences of 128 tokens, mean-pooled, 10 classes (5.3M parameters)."""
    torch.manual_seed(0)
    ids, y = _tokens(batch_size, 8192, 10, device)
    return Workload("transformer", EncoderClassifier().to(device).eval(), ids, y,
                    nn.CrossEntropyLoss(reduction="none"))


class CausalLM(nn.Module):
    """A Hugging Face causal language model called on token ids, returning the logits ``[B, T, V]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def causal_lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-sample causal LM loss ``[B]``: the mean over positions of the cross-entropy of the next token."""
    pred, target = logits[:, :-1], ids[:, 1:]
    losses = nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return losses.view(target.shape).mean(1)


def gpt2_tiny(batch_size: int, device: torch.device) -> Workload:
    """A 2-layer GPT-2 (width 128, 4 heads, vocabulary 8192, 128 positions, eager attention, dropout 0) on
    sequences of 128 tokens, with the per-sample causal LM loss (1.5M parameters; the output layer is tied
    to the token embedding). Needs the ``hf`` extra."""
    transformers = require("transformers", "hf", "the gpt2-tiny workload")
    config = transformers.GPT2Config(
        vocab_size=8192, n_positions=SEQUENCE, n_embd=128, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = CausalLM(transformers.GPT2LMHeadModel(config))
    ids, _ = _tokens(batch_size, 8192, None, device)
    return Workload("gpt2-tiny", model.to(device).eval(), ids, ids, causal_lm_loss)
