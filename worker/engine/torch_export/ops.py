"""The functions our lowerings call in place of a quantized layer, written in core ATen ops only.

A graph rewritten to call them is exported again, so the `.pt2` holds their ATen ops, never a
reference to this module: the artifact loads with plain torch. Layer metrics look them up by
identity (layer_sqnr.LAYER_CALLS), which is why they live apart from the rewrites that place them.
"""

from __future__ import annotations

import torch

EPS = 2.0**-12  # the X86 quantizer's activation eps
# K covered by one packed tile of the CUDA int4 layout: inner_k_tiles (8, torchao's fixed choice) x 16
TINYGEMM_K_TILE = 128


def dynamic_int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b with W int8 [N, K] (per-channel scales) and x quantized to int8 per row, per call.

    Written for few graph nodes: in eager each op costs microseconds and a JSON entry in the .pt2.
    """
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True)
    scale = amax.clamp(min=127.0 * EPS) / 127.0
    # |rows / scale| <= 127 by construction, so the int8 cast never wraps
    quantized = torch.ops.aten._to_copy.default(torch.round(rows / scale), dtype=torch.int8)
    acc = torch.ops.aten._to_copy.default(torch._int_mm(quantized, weight.t()), dtype=torch.float32)
    y = acc * (scale * weight_scale) if bias is None else torch.addcmul(bias, acc, scale * weight_scale)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def uint8_embedding(indices: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor) -> torch.Tensor:
    """Embedding rows stored as uint8 with a float scale and offset per row (dynamic int8's embedding
    recipe); only looked-up rows are dequantized, so a lookup reads a quarter of the bytes and never
    rebuilds the float table."""
    rows = torch.ops.aten._to_copy.default(torch.nn.functional.embedding(indices, weight), dtype=torch.float32)
    return torch.addcmul(torch.nn.functional.embedding(indices, offset), rows,
                         torch.nn.functional.embedding(indices, scale))


def _unpack(qweight: torch.Tensor, packed: bool) -> torch.Tensor:
    """int8 values, or int4 nibbles (low = even column, high = odd column) as 0..15, last dim unpacked."""
    if not packed:
        return qweight
    low = torch.bitwise_and(qweight, 15)
    high = torch.bitwise_right_shift(qweight, 4)
    return torch.stack([low, high], dim=-1).flatten(-2)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(q - zero) * scale per group of the last dim: scale/zero [..., G], q [..., G * group]."""
    groups = scale.shape[-1]
    values = q.to(dtype).unflatten(-1, (groups, -1))
    if zero is not None:
        values = values - zero.unsqueeze(-1)
    return (values * scale.unsqueeze(-1)).flatten(-2)


def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bias: torch.Tensor | None, packed: bool) -> torch.Tensor:
    """y = x @ dequant(W).T + b; W int8 [N, K] or int4 packed uint8 [N, K/2], scales per row group."""
    weight = _dequantize(_unpack(qweight, packed), scale, zero, x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def weight_only_embedding(indices: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          zero: torch.Tensor | None, packed: bool) -> torch.Tensor:
    """Weight-only int8/int4 embedding: only the looked-up rows are unpacked and dequantized."""
    rows = _unpack(torch.nn.functional.embedding(indices, qweight), packed)
    row_zero = None if zero is None else torch.nn.functional.embedding(indices, zero)
    return _dequantize(rows, torch.nn.functional.embedding(indices, scale), row_zero, scale.dtype)


def int4_tinygemm_linear(x: torch.Tensor, qweight: torch.Tensor, scale_and_zero: torch.Tensor,
                         bias: torch.Tensor | None, group_size: int, out_features: int) -> torch.Tensor:
    """y = x @ W.T + b with W int4 in CUDA's tinygemm layout (what torchao's Int4TilePackedTo4dTensor holds):
    qweight int32 [N'/8, K'/128, 32, 4], scale_and_zero bfloat16 [K'/group, N', 2], K' and N' padded up to
    128 and 8. The same kernel call torchao's linear makes: activations in bfloat16 (the kernel's only
    dtype) zero-padded from K to K', output cut back to N and returned in x's dtype. CUDA sm80+ only."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    padded = qweight.shape[1] * TINYGEMM_K_TILE
    if padded > rows.shape[-1]:
        rows = torch.nn.functional.pad(rows, (0, padded - rows.shape[-1]))
    y = torch.ops.aten._weight_int4pack_mm(rows.contiguous(), qweight, group_size, scale_and_zero)
    y = y[:, :out_features].to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)
