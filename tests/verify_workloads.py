"""User workloads (``module:function``) for the CLI tests."""

import torch
from torch import nn

from psgrad.workloads import Workload


class Bag(nn.Module):
    """Mean of token embeddings (padding_idx 0), then a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


def padded_bag(batch_size, device):
    """Embedding with padding tokens: ExpandedWeights and Opacus disagree with the truth here."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (batch_size, 7))
    tokens[:, :2] = 0
    return Workload("padded-bag", Bag().to(device), tokens.to(device), torch.randint(0, 3, (batch_size,)).to(device),
                    nn.CrossEntropyLoss(reduction="none"))
