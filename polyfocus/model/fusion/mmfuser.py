"""MMFuser (Cao et al. 2024, arXiv 2410.11829): the layer LLaVA reads (the query) refines itself with details from
shallower layers of the same vision tower (keys/values), through deformable attention; spec mmfuser.md §3.

    q  = hidden_states[query_layer]                        [B, H*W, C]   (CLIP-L/336: block 23, 24x24 patches)
    kv = concat(hidden_states[l] for l in kv_layers)        [B, L*H*W, C] (blocks 3, 8, 13, 18)
    ca = cross_attn(query_norm(q), feat_norm(kv))           deep queries sample the shallow maps (L levels)
    sa = self_attn(norm1(ca), norm1(ca))                    one level: the cross-attention output itself
    out = q + gamma1 * (ca + gamma2 * sa)                   gamma1 = gamma2 = 0 at init: out == q exactly

So at initialisation the model is the plain LLaVA model, bit for bit. No FFN, dropout or positional embedding,
as in the reference code. Attribute names are the reference's (`MSCrossAttnBlock`), so its checkpoints load by
name (polyfocus/checkpoints/).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from polyfocus.model.fusion.deformable_attention import MultiScaleDeformableAttention, centre_grid

LAYER_NORM_EPS = 1e-6  # the reference's norm_layer


class MMFuser(nn.Module):
    def __init__(self, dim: int, grid: tuple[int, int], query_layer: int, kv_layers: list[int], num_heads: int = 16,
                 num_points: int = 4, has_cls: bool = True, keep_cls: bool = False):
        """dim: the tower's width; grid: (H, W) of its patch map; query_layer / kv_layers: indices into the tower's
        hidden states; has_cls: the tower's sequence starts with a CLS token; keep_cls: put it back in front of
        the output ("cls_patch"), unchanged (the fuser works on the patch map only)."""
        super().__init__()
        self.grid, self.query_layer, self.kv_layers = tuple(grid), query_layer, list(kv_layers)
        self.has_cls, self.keep_cls = has_cls, keep_cls
        self.cross_attn = MultiScaleDeformableAttention(dim, num_heads, len(kv_layers), num_points)
        self.query_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.gamma1 = nn.Parameter(torch.zeros(dim))
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)  # before the self-attention (the reference's name)
        self.self_attn = MultiScaleDeformableAttention(dim, num_heads, 1, num_points)
        self.gamma2 = nn.Parameter(torch.zeros(dim))
        self._reset_parameters()

    @classmethod
    def from_config(cls, config) -> MMFuser:
        query_layer, kv_layers = config.mmfuser_layers()
        side = config.vision_config.image_size // config.vision_config.patch_size
        return cls(config.vision_config.hidden_size, (side, side), query_layer, kv_layers,
                   config.mmfuser_num_heads, config.mmfuser_num_points, has_cls=config.vision_has_cls,
                   keep_cls=config.vision_has_cls and config.mm_vision_select_feature == "cls_patch")

    def _reset_parameters(self):
        """The block's own tensors: LayerNorms 1/0 and both gammas 0 (the two attentions reset themselves: together
        this is the reference's net init). transformers' `init` skips tensors loaded from a checkpoint."""
        for norm in (self.query_norm, self.feat_norm, self.norm1):
            init.ones_(norm.weight)
            init.zeros_(norm.bias)
        init.zeros_(self.gamma1)
        init.zeros_(self.gamma2)

    def forward(self, tower) -> torch.Tensor:
        """The tower's hidden states (model/vision.py's TowerOutputs; only the layers read, cached when the tower is
        frozen) → [B, N, C] (see `fuse`)."""
        layers = [self.query_layer, *self.kv_layers]
        return self.fuse(dict(zip(layers, tower.states(layers).unbind(1))))

    def fuse(self, hidden_states: tuple[torch.Tensor, ...] | dict[int, torch.Tensor]) -> torch.Tensor:
        """The tower's hidden states (embeddings, layer 1, ..., each [B, T, C]; or {layer: state} of the layers read)
        → [B, N, C], N = H*W (+1 with CLS kept): what the projector reads in place of hidden_states[query_layer]."""
        height, width = self.grid
        first = 1 if self.has_cls else 0  # the patch map starts after the CLS token
        dtype = self.gamma1.dtype
        query = hidden_states[self.query_layer].to(dtype)  # [B, T, C]
        cls_token, query = query[:, :first], query[:, first:]  # [B, 1 or 0, C], [B, H*W, C]
        if query.shape[1] != height * width:
            raise ValueError(f"MMFuser expects a {height}x{width} patch map ({height * width} tokens), the tower gave "
                             f"{query.shape[1]}: are the images the size of vision_config.image_size?")
        # the key/value levels in the listed order, concatenated: [B, L*H*W, C]
        memory = torch.cat([hidden_states[layer][:, first:].to(dtype) for layer in self.kv_layers], dim=1)
        # [1, H*W, 1, 2], broadcast over the levels (all share the grid); fp32 at least, as the sampling
        reference = centre_grid(height, width, device=query.device, dtype=torch.promote_types(dtype, torch.float32))

        # (a) deformable cross-attention: each patch of the deep layer samples the shallow maps around itself.
        attn = self.cross_attn(self.query_norm(query), reference, self.feat_norm(memory),
                               [(height, width)] * len(self.kv_layers))  # [B, H*W, C]
        # (b) deformable self-attention over the cross-attention output (one level).
        normed = self.norm1(attn)
        attn = attn + self.gamma2 * self.self_attn(normed, reference, normed, [(height, width)])
        fused = query + self.gamma1 * attn  # residual onto the raw (un-normed) query layer
        return torch.cat([cls_token, fused], dim=1) if self.keep_cls else fused
