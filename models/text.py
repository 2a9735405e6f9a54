"""A small BERT-style text classifier (seed 002's task): token + positional embeddings, a few
post-norm transformer encoder layers with explicit q/k/v/output Linears, a Linear classifier.

Attention is written out with Linear layers (not ``nn.MultiheadAttention``, whose packed
``in_proj_weight`` is no Linear) so that every projection is a factorizable layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from edgecompress.models.registry import register_model


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        context = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, t, d)
        return self.output(context)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, ffn_dim)
        self.act = nn.GELU()
        self.ffn_output = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.ffn_output(self.act(self.intermediate(x))))


class TextClassifier(nn.Module):
    def __init__(self, vocab_size=8192, dim=128, layers=2, heads=4, ffn_dim=512, max_len=128, num_classes=4):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim) for _ in range(layers))
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.token_embedding(ids) + self.position_embedding(positions))
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x[:, 0])  # the first token's state, as BERT's [CLS]


@register_model(input_shape=(1, 64), input_dtype="int64")
def text_classifier() -> nn.Module:
    """BERT-style encoder: vocab 8192, dim 128, 2 layers, 4 heads, 4 classes (token ids in)."""
    return TextClassifier()
