"""A small Vision Transformer written as timm's ``VisionTransformer`` is (timm needs
torchvision, which cannot be installed here, BRIEF §6): a Conv2d patch embedding, a
class token and learned positions, pre-norm blocks with a fused qkv Linear, attention
dropout applied inside ``scaled_dot_product_attention`` (gated on the attention
module's own ``training`` flag, as timm's fused attention is), an MLP, and
stochastic depth (``DropPath``, random per sample in training mode) with rates rising
linearly to ``drop_path_rate``. Trained on the digits as 1×8×8 images."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from models import Classifier

from .common import MODEL_SEED, digit_images, shuffled_loader

DEPTH = 2


class DropPath(nn.Module):
    """timm's stochastic depth: in training mode, zero a sample's residual branch with
    probability ``drop_prob`` and scale the kept ones by 1/(1 − drop_prob)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)  # only its rate is read (timm's fused path)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.attn_drop.p if self.training else 0.0
        x = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.proj(x.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 32,
        depth: int = DEPTH,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        attn_drop_rate: float = 0.1,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch_size) ** 2 + 1, embed_dim) * 0.02)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # timm's stochastic depth decay rule
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, attn_drop_rate, r) for r in rates))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


#: Every Linear and the patch-embedding convolution.
NFA_LAYERS = (
    ("net.patch_embed",)
    + tuple(f"net.blocks.{i}.{name}" for i in range(DEPTH) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    + ("net.head",)
)
NFA_OPTIONS: dict = {}


def build(stochastic: bool = True, batch_size: int = 32) -> tuple[Classifier, DataLoader]:
    """The module (AdamW, lr 1e-3) and a digits loader; ``stochastic=False``: attention dropout
    and drop-path rates 0."""
    rate = 0.1 if stochastic else 0.0
    torch.manual_seed(MODEL_SEED)
    module = Classifier(VisionTransformer(attn_drop_rate=rate, drop_path_rate=rate), "adamw", lr=1e-3)
    return module, shuffled_loader(digit_images(), batch_size)
