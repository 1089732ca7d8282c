"""A user's text classifier fed dict batches, as Hugging Face-style code writes it: token
embedding, a GRU, and attention pooling over the unpadded tokens; batches of variable-length
sequences padded by the collate function, with an attention mask.

The task: does token 7 occur more often than token 8 in the sequence?
"""

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB, PAD = 32, 0


class TextGRU(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.score = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        h, _ = self.gru(self.embed(input_ids))  # (B, T, H)
        w = self.score(h).squeeze(-1).masked_fill(attention_mask == 0, -1e9).softmax(-1)  # (B, T)
        pooled = (w.unsqueeze(-1) * h).sum(1)  # (B, H)
        return {"logits": self.head(pooled)}


class Counts(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(4, 20, (1,), generator=g))
            ids = torch.randint(1, VOCAB, (length,), generator=g)
            self.items.append((ids, int((ids == 7).sum() > (ids == 8).sum())))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate(samples: list) -> dict:
    longest = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), longest), PAD, dtype=torch.long)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, (seq, _) in enumerate(samples):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in samples])}


def loaders(train: int = 1024, eval: int = 256) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "train": DataLoader(Counts(train, 0), batch_size=32, shuffle=True, collate_fn=collate, generator=g),
        "eval": DataLoader(Counts(eval, 1), batch_size=64, collate_fn=collate),
    }
