"""Compact stores: what the branch reads of each level, in 8 bits, one byte record per (video, view).

The branch's first steps are parameter-free (`mad.cache.inputs`): LayerNorm without
affine, averaging into cells, cosine matches of every patch to its neighbours in the
previous frame, and the raw CLS token and token mean that the baselines read. A
compact store holds their results instead of every token, so it fixes the cell size,
the correlation radius and its channel groups (recorded in the manifest).

Values (measured on tokens with injected outlier channels and high-norm tokens,
README "Compact stores"):
    cells       the patch cells (not the CLS: its normalised form is recomputed from
                `cls` when decoding), int8, x ~= q * token_scale[t, n] * channel_scale[d]:
                absmax scales in float16, per token and per channel of the chunk. A scale
                per token only lets a few 50-100x channels eat the range of the others.
    similarity  uint8 per (frame, patch) row: x ~= low + q * step (float16 low and step)
    cls, mean   float16 (raw, so outliers stay exact; they are small)
No lossless codec: on ViT-B/16 tokens zstd saved 2% of a record and halved the reads
(README "Compact stores").

A record is the fields below, concatenated in this order per level, each padded to an
even byte count, so any float16 field starts at an even offset. The layout is a list
of (name, dtype, shape) in the manifest: a reader needs nothing else to decode it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

VALUES = "int8-token-channel"  # the manifest's name for the value format above
_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "float16": torch.float16}
_BYTES = {"int8": 1, "uint8": 1, "float16": 2}


def record_layout(num_levels: int, frames: int, cells: int, patches: int, width: int, match_features: int
                  ) -> list[dict]:
    """[(name, dtype, shape, offset)] of one record; `cells` = 1 + the cells (the CLS row is not stored),
    `match_features` = groups x offsets (0: no correlation stored)."""
    fields = []
    for k in range(num_levels):
        fields += [(f"cells{k}", "int8", [frames, cells - 1, width]),
                   (f"cells{k}_token_scale", "float16", [frames, cells - 1]),
                   (f"cells{k}_channel_scale", "float16", [width]),
                   (f"cls{k}", "float16", [frames, width]),
                   (f"mean{k}", "float16", [frames, width])]
        if match_features:
            fields += [(f"similarity{k}", "uint8", [frames, patches, match_features]),
                       (f"similarity{k}_low", "float16", [frames, patches]),
                       (f"similarity{k}_step", "float16", [frames, patches])]
    layout, offset = [], 0
    for name, dtype, shape in fields:
        layout.append({"name": name, "dtype": dtype, "shape": shape, "offset": offset})
        size = math.prod(shape) * _BYTES[dtype]
        offset += size + size % 2
    return layout


def record_bytes(layout: list[dict]) -> int:
    last = layout[-1]
    size = math.prod(last["shape"]) * _BYTES[last["dtype"]]
    return last["offset"] + size + size % 2


def quantize_cells(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., T, N, D] float -> (int8 codes, float16 token scale [..., T, N], float16 channel scale [..., D])."""
    x = x.float()
    channel = x.abs().amax(dim=(-3, -2)).clamp_min(1e-8)  # [..., D]
    channel = channel.half().float().clamp_min(6e-8)  # the scale as stored
    y = x / channel[..., None, None, :]
    token = (y.abs().amax(dim=-1) / 127).clamp_min(1e-8).half().float().clamp_min(6e-8)  # [..., T, N]
    codes = torch.round(y / token[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, token.half(), channel.half()


def dequantize_cells(codes, token_scale, channel_scale, dtype=torch.float16) -> torch.Tensor:
    x = codes.float().mul_(token_scale.float()[..., None]).mul_(channel_scale.float()[..., None, None, :])
    return x.to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., F] float -> (uint8 codes, float16 low [...], float16 step [...]): x ~= low + q * step."""
    x = x.float()
    low = x.amin(dim=-1).half().float()
    step = ((x.amax(dim=-1) - low) / 255).clamp_min(1e-6).half().float()
    codes = torch.round((x - low[..., None]) / step[..., None]).clamp_(0, 255).to(torch.uint8)
    return codes, low.half(), step.half()


def dequantize_rows(codes, low, step) -> torch.Tensor:
    return codes.float().mul_(step.float()[..., None]).add_(low.float()[..., None])


def encode(inputs, layout: list[dict]) -> torch.Tensor:
    """BranchInputs of n video-views (each field [n, ...]) -> uint8 records [n, R], on the inputs' device."""
    n = inputs.cells[0].shape[0]
    fields = {}
    for k in range(len(inputs.cells)):
        fields[f"cells{k}"], fields[f"cells{k}_token_scale"], fields[f"cells{k}_channel_scale"] = \
            quantize_cells(inputs.cells[k][:, :, 1:])  # the CLS row is recomputed from `cls`
        fields[f"cls{k}"] = inputs.cls[k].half()
        fields[f"mean{k}"] = inputs.token_mean[k].half()
        if inputs.similarity is not None:
            B, T, H, W, KG, S = inputs.similarity.shape
            groups = KG // len(inputs.cells)
            level = inputs.similarity[..., k * groups:(k + 1) * groups, :].reshape(B, T, H * W, groups * S)
            fields[f"similarity{k}"], fields[f"similarity{k}_low"], fields[f"similarity{k}_step"] = \
                quantize_rows(level)
    records = torch.zeros(n, record_bytes(layout), dtype=torch.uint8, device=inputs.cells[0].device)
    for field in layout:
        data = fields[field["name"]].contiguous().view(torch.uint8).reshape(n, -1)
        records[:, field["offset"]:field["offset"] + data.shape[1]] = data
    return records


def decode(records: torch.Tensor, layout: list[dict], num_levels: int, side: int, groups: int):
    """uint8 records [B, R] -> BranchInputs (cells float16, the rest float32), on the records' device."""
    from mad.cache.inputs import BranchInputs

    B = records.shape[0]
    fields = {}
    for field in layout:
        size = math.prod(field["shape"]) * _BYTES[field["dtype"]]
        raw = records[:, field["offset"]:field["offset"] + size].contiguous()
        fields[field["name"]] = raw.view(_DTYPES[field["dtype"]]).reshape(B, *field["shape"])
    cells, cls, token_mean, similarity = [], [], [], []
    for k in range(num_levels):
        cls.append(fields[f"cls{k}"].float())
        normed_cls = F.layer_norm(cls[-1], cls[-1].shape[-1:]).half()[:, :, None]  # [B, T, 1, D]
        cells.append(torch.cat([normed_cls, dequantize_cells(fields[f"cells{k}"], fields[f"cells{k}_token_scale"],
                                                             fields[f"cells{k}_channel_scale"])], dim=2))
        token_mean.append(fields[f"mean{k}"].float())
        if f"similarity{k}" in fields:
            rows = dequantize_rows(fields[f"similarity{k}"], fields[f"similarity{k}_low"],
                                   fields[f"similarity{k}_step"])  # [B, T, P, G*S]
            T = rows.shape[1]
            similarity.append(rows.view(B, T, side, side, groups, -1))
    return BranchInputs(cells=cells, cls=cls, token_mean=token_mean,
                        similarity=torch.cat(similarity, dim=-2) if similarity else None)
