"""BT-Adapter: the temporal branch that the QA weights add to the last EVA blocks (eva_btadapter_g).

The main ViT runs per frame. Over its last `depth` blocks a side branch carries one sequence per video,
patches laid out patch-major (`(p t)`): a temporal attention over the T frames of each patch, then an EVA
block whose attention runs per frame. The branch's output is averaged with the main ViT's at the end.
The blocks are `transformers`' InstructBLIP vision layers; only the wiring is ours.

LayerNorm eps as the original: the temporal blocks use 1e-6 (`partial(nn.LayerNorm, eps=1e-6)`, the EVA
blocks' value), the spatial ones `nn.LayerNorm`'s default 1e-5 (`Block(norm_layer=nn.LayerNorm)`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import InstructBlipVisionConfig
from transformers.models.instructblip.modeling_instructblip import (
    InstructBlipAttention,
    InstructBlipEncoderLayer,
)

TEMPORAL_LAYER_NORM_EPS = 1e-6
SPATIAL_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the original's spatial blocks keep


class BTAdapterTemporal(nn.Module):
    """Attention over time for every patch; `temporal_fc` starts at zero so the branch starts as identity."""

    def __init__(self, config: InstructBlipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=TEMPORAL_LAYER_NORM_EPS)
        self.self_attn = InstructBlipAttention(config)
        self.temporal_fc = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x: (B, 1 + P·T, C), patches laid out (p t)
        cls, patches = x[:, :1], x[:, 1:]
        b, pt, c = patches.shape
        seq = patches.reshape(b * (pt // num_frames), num_frames, c)  # (B·P, T, C)
        out, _ = self.self_attn(self.layer_norm1(seq))
        out = self.temporal_fc(out).reshape(b, pt, c)
        return torch.cat([cls, patches + out], dim=1)


class BTAdapterSpatial(InstructBlipEncoderLayer):
    """An EVA block whose attention runs per frame over the branch's (p t) layout; CLS is shared."""

    def __init__(self, config: InstructBlipVisionConfig):
        spatial = copy.deepcopy(config)
        spatial.layer_norm_eps = SPATIAL_LAYER_NORM_EPS
        super().__init__(spatial)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        b, pt, c = x[:, 1:].shape
        t, p = num_frames, pt // num_frames
        cls = x[:, :1].unsqueeze(1).expand(b, t, 1, c).reshape(b * t, 1, c)
        patches = x[:, 1:].reshape(b, p, t, c).transpose(1, 2).reshape(b * t, p, c)  # (B·T, P, C)
        out, _ = self.self_attn(self.layer_norm1(torch.cat([cls, patches], dim=1)))
        out_cls = out[:, :1].reshape(b, t, 1, c).mean(1)
        out_patches = out[:, 1:].reshape(b, t, p, c).transpose(1, 2).reshape(b, pt, c)
        x = x + torch.cat([out_cls, out_patches], dim=1)
        return x + self.mlp(self.layer_norm2(x))


class BTAdapter(nn.Module):
    def __init__(self, config: InstructBlipVisionConfig, depth: int, max_frames: int):
        super().__init__()
        self.depth = depth
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.temporal_position = nn.Embedding(max_frames, config.hidden_size)
        self.temporal = nn.ModuleList([BTAdapterTemporal(config) for _ in range(depth)])
        self.spatial = nn.ModuleList([BTAdapterSpatial(config) for _ in range(depth)])

    def init_branch(self, x: torch.Tensor, position_embedding: torch.Tensor) -> torch.Tensor:
        # x: (B, T, 1 + P, C) main ViT tokens → branch input (B, 1 + P·T, C)
        b, t, _, c = x.shape
        cls_main = x[:, :, 0].mean(1, keepdim=True)  # (B, 1, C)
        cls_branch = (self.cls_token + position_embedding[:, :1]).expand(b, 1, c)
        patches = x[:, :, 1:] + position_embedding[:, 1:].unsqueeze(0)  # (B, T, P, C)
        patches = patches + self.temporal_position.weight[:t][None, :, None]
        patches = patches.transpose(1, 2).reshape(b, -1, c)  # (B, P·T, C)
        return torch.cat([(cls_main + cls_branch) / 2, patches], dim=1)

    def step(
        self, x: torch.Tensor, branch: torch.Tensor | None, index: int, num_frames: int,
        position_embedding: torch.Tensor,
    ) -> torch.Tensor:
        # x: (B·T, 1 + P, C) output of a main block; branch: (B, 1 + P·T, C) or None at the first step
        bt, l, c = x.shape
        x = x.reshape(bt // num_frames, num_frames, l, c)
        if branch is None:
            branch = self.init_branch(x, position_embedding)
        else:
            cls_main = x[:, :, 0].mean(1, keepdim=True)
            patches = x[:, :, 1:].transpose(1, 2).reshape(x.shape[0], -1, c)
            branch = torch.cat([cls_main, patches], dim=1) + branch
        branch = self.temporal[index](branch, num_frames)
        return self.spatial[index](branch, num_frames)

    @staticmethod
    def merge(x: torch.Tensor, branch: torch.Tensor, num_frames: int) -> torch.Tensor:
        # (main + branch) / 2 back in the main's per-frame layout (B·T, 1 + P, C)
        bt, l, c = x.shape
        b = bt // num_frames
        cls = branch[:, :1].expand(b, num_frames, c).reshape(bt, 1, c)
        patches = branch[:, 1:].reshape(b, l - 1, num_frames, c).transpose(1, 2).reshape(bt, l - 1, c)
        return (x + torch.cat([cls, patches], dim=1)) / 2
