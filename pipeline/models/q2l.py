"""Query2Label (Liu et al. 2021) on a ResNet-50, as IGNORE and PLC+LAC use it at 448 px.

* Backbone: torchvision ResNet-50 with FrozenBatchNorm2d (statistics and affine fixed); conv1/bn1 and
  layer1 frozen, layer2-4 trainable. Its layer4 output ``src`` (B, 2048, h, w) feeds the transformer.
* No input projection while ``hidden_dim`` equals the backbone's 2048 channels (a 1x1 conv otherwise,
  which only the tiny test variants use).
* Fixed 2-D sine position encoding (normalised, scale 2*pi, temperature 10000, hidden_dim/2 features per
  axis, y first, sin/cos interleaved), computed for the actual feature size of each input, so any input
  whose sides are multiples of 32 works.
* Transformer, post-norm, ReLU FFN, dropout 0.1: 1 encoder layer (self-attention with the position
  added to queries and keys); 2 decoder layers *without* self-attention (cross-attention with
  query = tgt + label query embedding, key = memory + pos, value = memory; then FFN); a final decoder
  LayerNorm. The target starts at zeros; the C label queries are a learned ``nn.Embedding`` (N(0, 1)).
  Transformer matrices get Xavier-uniform init.
* Head: group-wise linear, logit_c = <W_c, h_c> + b_c, W and b ~ U(+-1/sqrt(d)).

CAM (for IGNORE): the last decoder layer's head-averaged cross-attention of each label query over the
h*w locations, reshaped to (B, C, h, w), times the channel mean of ``src``. In train mode the attention
weights are the ones ``nn.MultiheadAttention`` returns (after its dropout).

``embeddings`` (B, C, d): the decoder outputs; with ``projector_dim`` > 0 (PLC+LAC) they pass through a
projector Linear(d, d) -> ReLU -> Linear(d, projector_dim) and are L2-normalised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from pipeline.contracts import ModelOutput
from pipeline.errors import SpmlError
from pipeline.models import register_model
from pipeline.models.resnet50 import RESNET50_LAYERS, build_resnet_trunk, trunk_features
from pipeline.models.weights import RESNET50_IMAGENET1K_V1_SHA256

BACKBONE_CHANNELS = 2048


def sine_position_encoding(h: int, w: int, dim: int, device, dtype=torch.float32,
                           temperature: float = 10000.0) -> torch.Tensor:
    """(h*w, dim) DETR-style normalised sine encoding: dim/2 features for y, then dim/2 for x."""
    if dim % 4:
        raise SpmlError(f"q2l hidden_dim {dim} must be a multiple of 4 for the sine position encoding")
    half = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    k = torch.arange(half, device=device, dtype=torch.float32)
    freq = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / half)

    def encode(v: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, half): sin at even, cos at odd channels
        angles = v[:, None] / freq
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, half)
    pos_x = encode(x)[None, :, :].expand(h, w, half)
    return torch.cat((pos_y, pos_x), dim=2).reshape(h * w, dim).to(dtype)


class _FFN(nn.Module):
    def __init__(self, d: int, ffn: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = _FFN(d, ffn, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src, pos):
        qk = src + pos
        attn = self.self_attn(qk, qk, src, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(src + self.dropout2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Cross-attention + FFN (Q2L's decoder with its self-attention removed)."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = _FFN(d, ffn, dropout)
        self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, memory, pos, query_pos, need_weights: bool):
        attn, weights = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=need_weights,
                                        average_attn_weights=True)
        tgt = self.norm2(tgt + self.dropout2(attn))
        tgt = self.norm3(tgt + self.dropout3(self.ffn(tgt)))
        return tgt, weights


class GroupWiseLinear(nn.Module):
    def __init__(self, num_classes: int, d: int):
        super().__init__()
        bound = 1 / math.sqrt(d)
        self.weight = nn.Parameter(torch.empty(1, num_classes, d).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(1, num_classes).uniform_(-bound, bound))

    def forward(self, h):  # (B, C, d) -> (B, C)
        return (self.weight * h).sum(-1) + self.bias


@register_model("q2l")
class Query2Label(nn.Module):
    def __init__(self, num_classes: int, weights: str | None = "none",
                 weights_sha256: str = RESNET50_IMAGENET1K_V1_SHA256, hidden_dim: int = 2048,
                 num_heads: int = 4, dim_feedforward: int = 8192, enc_layers: int = 1, dec_layers: int = 2,
                 dropout: float = 0.1, projector_dim: int = 0,
                 layers: list[int] | tuple[int, ...] = RESNET50_LAYERS, width_per_group: int = 64):
        super().__init__()
        if hidden_dim % num_heads:
            raise SpmlError(f"q2l hidden_dim {hidden_dim} must be divisible by num_heads {num_heads}")
        self.trunk = build_resnet_trunk(layers, width_per_group, FrozenBatchNorm2d, weights, weights_sha256, "q2l")
        for name, p in self.trunk.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
        self.input_proj = (nn.Identity() if hidden_dim == BACKBONE_CHANNELS
                           else nn.Conv2d(BACKBONE_CHANNELS, hidden_dim, kernel_size=1))
        self.encoder = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, dim_feedforward, dropout)
                                     for _ in range(enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout)
                                     for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        for module in (self.encoder, self.decoder, self.decoder_norm):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.query_embed = nn.Embedding(num_classes, hidden_dim)
        self.fc = GroupWiseLinear(num_classes, hidden_dim)
        self.projector = (nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, projector_dim)) if projector_dim > 0 else None)
        self.hidden_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> ModelOutput:
        src = trunk_features(self.trunk, x)  # (B, 2048, h, w), post-ReLU
        b, _, h, w = src.shape
        memory = self.input_proj(src).flatten(2).transpose(1, 2)  # (B, h*w, d)
        pos = sine_position_encoding(h, w, self.hidden_dim, memory.device, memory.dtype)[None]
        for layer in self.encoder:
            memory = layer(memory, pos)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        weights = None
        for i, layer in enumerate(self.decoder):
            tgt, weights = layer(tgt, memory, pos, query_pos, need_weights=i == len(self.decoder) - 1)
        hs = self.decoder_norm(tgt)  # (B, C, d)
        logits = self.fc(hs)
        cam = weights.reshape(b, -1, h, w) * src.mean(dim=1, keepdim=True).to(weights.dtype)
        embeddings = hs if self.projector is None else F.normalize(self.projector(hs), dim=-1)
        return ModelOutput(logits, cam, embeddings)

    def parameter_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        trunk = [p for p in self.trunk.parameters() if p.requires_grad]
        trunk_ids = {id(p) for p in self.trunk.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in trunk_ids]
        return [{"params": trunk, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]
