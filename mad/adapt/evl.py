"""EVL's decoder over cached levels of a frozen image model.

EVL (Lin et al., "Frozen CLIP Models are Efficient Video Learners", ECCV 2022; official
code OpenGVLab/efficient-video-recognition, model.py and vision_transformer.py) is, like
M-adapter, a branch beside a frozen CLIP ViT that never backpropagates into it. It reads
the outputs of the ViT's last L blocks (every token, CLS first) and, for each of them, the
q and k of that block's own attention. Those q and k are a frozen function of the block's
input (the previous block's output): ln_1, then the q/k rows of the in-projection, split
per head. So the cache holds L+1 consecutive levels and the store carries those frozen
weights (`mad extract --branches evl`); `FrozenQK` recomputes q and k here, under no_grad
(README "EVL": bytes and speed against caching q and k themselves).

Input: L+1 levels [B, T, N, D] (N = 1 + H*W), levels[0] the input of the first of the L
blocks, levels[i] the output of block i. Output: logits [B, C].

    query = cls_token                                                     [B, 1, D]
    for block i = 1..L (decoder layer i):
        q, k     = FrozenQK(levels[i-1])           backbone's own, per head [B, T, N, h, D/h]
        features = levels[i]
                   + TemporalConv(levels[i])        depthwise over T, k=3   [B, T, N, D]
                   + temporal_pos_embed[i][t]       one vector per frame
                   + TemporalCrossAttention(q, k)   patches of frame t against frames t-1, t+1
        query    = DecoderLayer(query, features over T x N)   pre-LN cross-attention + MLP
    logits = proj(query): LayerNorm -> Dropout -> Linear

Module and parameter names follow the official code (`decoder.decoder_layers.0.attn.q_proj`,
`decoder.cross_attention.0.w1`, `proj.2`, ...), so its state dict maps onto this one. Where
ours differs from it (README "EVL"): the relative-position mix in `TemporalCrossAttention`
never materialises the [P, P, D] table the official einsum builds (same values and gradients);
q and k are recomputed in float32 from the float16 cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from mad.adapt.branch import BranchConfig, Family, check_positive, register
from mad.adapt.layers import Dropout, remember_autocast, scaled_dot_product
from mad.cache.manifest import TRAINING_KEYS, Manifest, StoreNeed


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, which the official decoder uses."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class FrozenQK(nn.Module):
    """The backbone's attention q and k of each of L blocks, from the block's input: ln_1 -> q/k rows of in_proj.

    Frozen weights as buffers (saved with the model, never trained), filled from the store
    by `load`. Computed under no_grad, in float32 whatever the autocast: the temporal
    cross-attention only reads them, and this is the function the backbone ran.
    """

    def __init__(self, blocks: int, width: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.register_buffer("ln_weight", torch.ones(blocks, width))
        self.register_buffer("ln_bias", torch.zeros(blocks, width))
        self.register_buffer("weight", torch.zeros(blocks, 2 * width, width))  # rows: q, then k
        self.register_buffer("bias", torch.zeros(blocks, 2 * width))

    def load(self, frozen: dict[str, torch.Tensor]) -> None:
        """Weights as the store carries them (`evl_*` arrays of all its EVL blocks): the last L are ours."""
        L = self.weight.shape[0]
        for name, key in (("ln_weight", "evl_ln_1_weight"), ("ln_bias", "evl_ln_1_bias"), ("weight", "evl_qk_weight"),
                          ("bias", "evl_qk_bias")):
            getattr(self, name).copy_(torch.as_tensor(frozen[key])[-L:])

    @torch.no_grad()
    def forward(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, N, D = x.shape  # the block's input
        with torch.autocast(x.device.type, enabled=False):
            x = F.layer_norm(x.float(), (D,), self.ln_weight[block], self.ln_bias[block], self.eps)
            qk = F.linear(x, self.weight[block], self.bias[block])  # [B, T, N, 2D]
        q, k = qk.view(B, T, N, 2, self.heads, D // self.heads).unbind(3)  # 2 x [B, T, N, h, D/h]
        return q, k


def relative_index(side: int) -> torch.Tensor:
    """[P, P] long, P = side^2: for query patch (qi, qj) and key patch (ki, kj), the row of the
    (2 side - 1)^2 relative-position table for their offset (qi - ki, qj - kj)."""
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    i, j = i.flatten(), j.flatten()  # [P]
    di = i[:, None] - i[None, :] + side - 1  # [P, P] in 0..2 side - 2
    dj = j[:, None] - j[None, :] + side - 1
    return di * (2 * side - 1) + dj


class _RelativeMix(torch.autograd.Function):
    """out[n, q] = sum_k attn[n, q, k] * table[index[q, k]]: the official
    einsum('ntqk,qkc->ntqc', attn, table[index]) without its [P, P, C] gathered table
    (118 MB in float32 at ViT-B/16 sizes, per direction and layer, kept for backward).

    For a query patch q, index[q, :] sends each key patch to a different table row, so the
    sum is one matrix product: attn scattered into table rows ([n, P, R], R = (2 side - 1)^2)
    times the table. Large products instead of P small ones (CPU, ViT-B sizes, batch 2: the
    whole EVL step 9.6 s -> 3 s); only `attn` is kept for backward and scattered again there.
    `attn` is a constant (a function of the frozen backbone): only the table gets a gradient.
    """

    generate_vmap_rule = True  # plain torch ops: a stacked sweep (vmap) runs them as they are

    @staticmethod
    def forward(attn, table, index):  # [n, P, P], [R, C], [P, P] long -> [n, P, C]
        return _scatter(attn, index, table.shape[0]) @ table

    @staticmethod
    def setup_context(ctx, inputs, output):
        attn, table, index = inputs
        ctx.save_for_backward(attn, index)
        ctx.table_rows = table.shape[0]
        remember_autocast(ctx)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):  # [n, P, C]
        attn, index = ctx.saved_tensors
        spread = _scatter(attn, index, ctx.table_rows).flatten(0, 1)  # [n*P, R]
        grad_table = spread.t().to(grad.dtype) @ grad.flatten(0, 1)  # [R, C]
        return None, grad_table.float(), None


def _scatter(attn, index, rows):  # [n, P, P] -> [n, P, rows]: attn[n, q, k] placed at column index[q, k]
    n, P, _ = attn.shape
    return attn.new_zeros(n, P, rows).scatter_(2, index.expand(n, P, P), attn)


class TemporalCrossAttention(nn.Module):
    """Each patch of frame t against every patch of frames t-1 and t+1, through the backbone's own q, k.

    softmax over the key patches of q . k / sqrt(d), averaged over the heads, weights a learned
    table over the relative position of the two patches (w1 for t-1, w2 for t+1; zero at
    start): a local motion feature [D] per patch. CLS, frame 0's "previous" and frame T-1's
    "next" get zeros. The attention maps come from frozen q, k: computed under no_grad.
    """

    def __init__(self, side: int, width: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros((2 * side - 1) ** 2, width))  # against frame t-1
        self.w2 = nn.Parameter(torch.zeros((2 * side - 1) ** 2, width))  # against frame t+1
        self.side = side
        self.register_buffer("index", relative_index(side), persistent=False)

    @staticmethod
    @torch.no_grad()
    def attention(q, k):  # [B, T', P, h, c] each -> [B*T', P, P] float32, whatever the autocast
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.float().transpose(2, 3), k.float().transpose(2, 3)  # [B, T', h, P, c]
            attn = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, T', h, P, P]
            return attn.softmax(dim=-1).mean(dim=2).flatten(0, 1)

    def mix(self, attn, table, B):  # [B*T', P, P] -> [B, T', P, D]
        out = _RelativeMix.apply(attn, table, self.index)
        return out.view(B, -1, *out.shape[1:])

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # [B, T, N, h, c] -> [B, T, N, D]
        B, T, N = q.shape[:3]
        assert N == 1 + self.side ** 2, f"{N} tokens is not 1 + {self.side}^2"
        q, k = q[:, :, 1:], k[:, :, 1:]  # patches only
        previous = self.mix(self.attention(q[:, 1:], k[:, :-1]), self.w1, B)  # frames 1..T-1: [B, T-1, P, D]
        following = self.mix(self.attention(q[:, :-1], k[:, 1:]), self.w2, B)  # frames 0..T-2
        # pad (D, N, T): a zero CLS row, and the frame without a neighbour on that side
        return F.pad(previous, (0, 0, 1, 0, 1, 0)) + F.pad(following, (0, 0, 1, 0, 0, 1))


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v projections to `qkv_width` (the official `Attention`):
    xavier-uniform weights, zero biases."""

    def __init__(self, width: int, qkv_width: int, heads: int):
        super().__init__()
        assert qkv_width % heads == 0, f"width {qkv_width} is not divisible by heads {heads}"
        self.heads = heads
        self.q_proj = nn.Linear(width, qkv_width)
        self.k_proj = nn.Linear(width, qkv_width)
        self.v_proj = nn.Linear(width, qkv_width)
        self.out_proj = nn.Linear(qkv_width, width)
        for m in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, q, k, v):  # [B, Lq, D], [B, Lk, D], [B, Lk, D] -> [B, Lq, D]
        B, Lq, Lk, h = q.shape[0], q.shape[1], k.shape[1], self.heads
        q = self.q_proj(q).view(B, Lq, h, -1).transpose(1, 2)  # [B, h, Lq, c]
        k = self.k_proj(k).view(B, Lk, h, -1).transpose(1, 2)
        v = self.v_proj(v).view(B, Lk, h, -1).transpose(1, 2)
        x = scaled_dot_product(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return self.out_proj(x.transpose(1, 2).reshape(B, Lq, -1))


class DecoderLayer(nn.Module):
    """The query cross-attends to the frame features, then an MLP; pre-LN (the official `TransformerDecoderLayer`)."""

    def __init__(self, width: int, qkv_width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.5):
        super().__init__()
        self.attn = Attention(width, qkv_width, heads)
        hidden = round(mlp_ratio * width)
        self.mlp = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(width, hidden)),
            ("act", QuickGELU()),
            ("dropout", Dropout(dropout)),
            ("fc2", nn.Linear(hidden, width)),
        ]))
        for m in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(m.weight)
            nn.init.normal_(m.bias, std=1e-6)
        self.norm1 = nn.LayerNorm(width)  # the query
        self.norm2 = nn.LayerNorm(width)  # before the MLP
        self.norm3 = nn.LayerNorm(width)  # the frame features

    def forward(self, x, y):  # query [B, 1, D], features [B, T*N, D]
        y = self.norm3(y)
        x = x + self.attn(self.norm1(x), y, y)
        return x + self.mlp(self.norm2(x))


class EVLDecoder(nn.Module):
    """L decoder layers, each with the temporal modules of its backbone block, and the learnable query."""

    def __init__(self, frames: int, side: int, layers: int, width: int, qkv_width: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.5, kernel_size: int = 3):
        super().__init__()
        self.decoder_layers = nn.ModuleList(DecoderLayer(width, qkv_width, heads, mlp_ratio, dropout)
                                            for _ in range(layers))
        self.temporal_conv = nn.ModuleList(nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
                                           for _ in range(layers))
        self.temporal_pos_embed = nn.ParameterList(nn.Parameter(torch.zeros(frames, width)) for _ in range(layers))
        self.cross_attention = nn.ModuleList(TemporalCrossAttention(side, width) for _ in range(layers))
        # zeros: the official decoder defines a normal(0.02) init for its query but never calls it
        self.cls_token = nn.Parameter(torch.zeros(width))

    def forward(self, levels: list[torch.Tensor], qk: FrozenQK) -> torch.Tensor:  # L+1 x [B, T, N, D] -> [B, 1, D]
        B, T, N, D = levels[-1].shape
        x = self.cls_token.view(1, 1, D).expand(B, 1, D)
        for i, layer in enumerate(self.decoder_layers):
            q, k = qk(levels[i], i)  # block i's attention, from its input
            features = levels[i + 1].float()  # block i's output
            conv = self.temporal_conv[i](features.permute(0, 2, 3, 1).reshape(B * N, D, T))  # over T per token
            features = (features + conv.view(B, N, D, T).permute(0, 3, 1, 2)
                        + self.temporal_pos_embed[i].view(1, T, 1, D)
                        + self.cross_attention[i](q, k))
            x = layer(x, features.flatten(1, 2))  # [B, T*N, D]
        return x


class EVL(nn.Module):
    """EVL's decoder and head over L+1 cached levels (the last `cfg.depth` blocks and the input of the first)."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        side = math.isqrt(cfg.num_tokens - 1)
        self.depth = cfg.depth
        self.qk = FrozenQK(cfg.depth, cfg.in_width, cfg.qk_heads, cfg.qk_eps)
        self.decoder = EVLDecoder(cfg.num_frames, side, cfg.depth, cfg.in_width, cfg.width, cfg.heads, cfg.mlp_ratio,
                                  cfg.dropout, cfg.kernel_size)
        self.proj = nn.Sequential(nn.LayerNorm(cfg.in_width), Dropout(cfg.dropout),
                                  nn.Linear(cfg.in_width, cfg.num_classes))

    def load_frozen(self, frozen: dict[str, torch.Tensor]) -> None:
        """The backbone weights that give each block's q, k (the store's `frozen/evl_*`)."""
        self.qk.load(frozen)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:  # K >= depth+1 levels [B, T, N, D] -> [B, C]
        levels = levels[-(self.depth + 1):]  # a store's EVL levels may reach further back than this decoder
        x = self.decoder(levels, self.qk)
        return self.proj(x[:, 0])


class EVLFamily(Family):
    """EVL reads float16 levels of its own (the last --evl-layers blocks and the one before) in either storage
    mode, and the frozen weights that recompute their q/k; width, heads and depth 0 come from the store."""

    name = "evl"
    description = "EVL's decoder (Lin et al., ECCV 2022) over the last blocks, q/k recomputed from frozen weights"
    label, trains, benchmarked = "EVL", "EVL decoder", True
    model = EVL
    # EVL's official ViT-B/16 recipe (AdamW 4e-4, weight decay 0.05 as ours, dropout 0.5); width, heads and
    # depth 0: from the store (q/k/v width D, D / 64 heads, one decoder layer per cached EVL block)
    preset = dict(lr=4e-4, dropout=0.5, width=0, heads=0, depth=0)
    stored_as = "evl"
    stores = "the last --evl-layers blocks and the one before, float16, and the frozen weights of their q/k"
    blocks_option = "--evl-layers"
    blocks_help = "--branches evl: the model's last blocks EVL's decoder reads (default 4, the official)."
    start_help = "an official EVL checkpoint (.pth; its decoder and head, the q/k weights from the cache)"
    commands = {"import-evl": "mad.adapt.import_evl:import_evl_command"}
    pair_keys = tuple(k for k in TRAINING_KEYS if k not in ("layers", "storage", "compact"))

    def store_need(self, last_blocks: int | None = None) -> StoreNeed:
        # the official default reads the last 4 blocks
        return StoreNeed(blocks=last_blocks or 4, option=self.blocks_option, frozen="evl_", full_grid=True)

    def levels(self, manifest: Manifest) -> list[int]:
        return list(manifest.branches[self.stored_as]["levels"])

    def from_store(self, manifest: Manifest) -> dict:
        entry = manifest.branches[self.stored_as]
        return {**super().from_store(manifest), "qk_heads": entry["heads"], "qk_eps": entry["ln_eps"]}

    def check(self, cfg: BranchConfig) -> BranchConfig:
        check_positive(cfg, zero_ok=True)
        width = cfg.width or cfg.in_width
        heads = cfg.heads or max(1, width // 64)
        blocks = cfg.num_levels - 1  # the store's levels: the input of its first block, then each block's output
        depth = cfg.depth or blocks
        if blocks < 1:
            raise ValueError("evl needs at least two cached levels (a block's input and its output)")
        side = math.isqrt(cfg.num_tokens - 1)
        if side * side != cfg.num_tokens - 1:
            raise ValueError(f"evl needs a square patch grid; {cfg.num_tokens - 1} patch tokens is not one")
        if depth > blocks:
            raise ValueError(f"depth {depth}: evl reads one cached block per decoder layer and the store holds "
                             f"{blocks}; to serve {depth}, extract with --branches madapter,evl --evl-layers {depth}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if cfg.in_width % cfg.qk_heads:
            raise ValueError(f"level width {cfg.in_width} is not divisible by the backbone's {cfg.qk_heads} heads")
        return cfg.replace(width=width, heads=heads, depth=depth, cell_size=1)

    def build(self, cfg: BranchConfig, frozen: dict | None = None) -> nn.Module:
        model = EVL(cfg)
        if frozen:  # the store carries them; a checkpoint holds them as buffers
            model.load_frozen(frozen)
        return model

    starts_from_file = True  # official EVL checkpoints (mad.adapt.evl_checkpoint)

    def start_from(self, model: nn.Module, path) -> None:
        from mad.adapt.evl_checkpoint import load_official

        load_official(model, path)

    def describe(self, cfg: BranchConfig, parameters: int) -> str:
        return (f"{super().describe(cfg, parameters)}, {cfg.depth} decoder layers (q/k/v width {cfg.width}, "
                f"heads {cfg.heads}) over the last {cfg.depth} cached blocks, their q/k recomputed from frozen "
                "backbone weights")


register(EVLFamily())
