"""torch.export int4 weight-only on cuda: torchao's tinygemm int4 layout, run by torch's own CUDA kernel.

Which torchao 0.18 int4 path runs on CUDA with nothing but torch (read from its source): the default
`Int4WeightOnlyConfig()` packing (`plain`, Int4Tensor) and `preshuffled` call the `mslk` kernel library;
`plain_int32` packs for XPU and NPU only; `tile_packed_to_4d` (Int4TilePackedTo4dTensor) packs with
`aten._convert_weight_to_int4pack` and multiplies with `aten._weight_int4pack_mm`, the tinygemm kernel built
into CUDA torch (bfloat16, compute capability 8.0+). So torchao computes each Linear's int4 weights here with
`Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`, round to nearest (torchao's tinygemm qparams)
or HQQ.

Why the artifact does not hold torchao's tensor subclass: torch.export.save writes any tensor subclass with
pickle (torch/export/pt2_archive/_package.py, `_should_use_pickle`), so such a `.pt2` loads only with torchao
imported and `torch.load(weights_only=False)`, and our pickle-free loader (safety.py) refuses it. The packed
weight and its scale_and_zero are read off torchao's tensor instead, and the graph calls
ops.int4_tinygemm_linear, the same kernel call torchao's linear dispatch makes: the `.pt2` holds plain
int32/bfloat16 tensors and aten ops, and loads with torch alone on a machine with an NVIDIA GPU (sm80+).

Padding: torchao pads K to a multiple of 1024 (gpt-fast's habit); the kernel needs only a multiple of 128
(inner_k_tiles 8 x 16), and each 128-wide K tile is packed on its own (`out[nTile][kOuterTile]` in
`_convert_weight_to_int4pack_cuda`), so the tiles past the first K' = roundup(K, 128) columns, all padding,
are cut off: on a 64-wide layer the weight would otherwise be 16x larger.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from worker.engine.errors import EngineError
from worker.engine.torch_export import ops
from worker.engine.torch_export.graph import tensor_attr

if TYPE_CHECKING:
    import torch
    from torch import fx

    from worker.engine.config import WeightOnlyConfig

MIN_CAPABILITY = (8, 0)  # Int4TilePackedTo4dTensor.from_hp refuses older GPUs (tinygemm's tensor-core tiles)
PURPOSE = "torch.export int4 weight-only on cuda (the tinygemm int4 kernel)"
GROUPS = (32, 64, 128)  # the kernel takes 32, 64, 128 and 256; our config offers the first three


def group_for(cols: int, group_size: int) -> int | None:
    """The group to use on a weight with `cols` inputs: the asked size where it divides them, the whole row
    where the row is one of the kernel's group sizes (narrower than asked), else None (stays float)."""
    if cols % group_size == 0:
        return group_size
    return cols if cols in GROUPS and cols < group_size else None


def pack(weight: torch.Tensor, group: int, algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's int4 tinygemm packing of one Linear weight [N, K] on cuda: (qweight, scale_and_zero), cut
    to K' = roundup(K, 128)."""
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm, Int4PackingFormat

    rows, cols = weight.shape
    layer = torch.nn.Linear(cols, rows, bias=False, device=weight.device, dtype=torch.bfloat16)
    layer.weight = torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
    holder = torch.nn.ModuleDict({"layer": layer})
    qparams = Int4ChooseQParamsAlgorithm.HQQ if algorithm == "hqq" else Int4ChooseQParamsAlgorithm.TINYGEMM
    config = Int4WeightOnlyConfig(group_size=group, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
                                  int4_choose_qparams_algorithm=qparams, set_inductor_config=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
        quantize_(holder, config, filter_fn=lambda _, fqn: fqn == "layer")
    packed = holder["layer"].weight
    if type(packed).__name__ != "Int4TilePackedTo4dTensor":
        raise EngineError(f"torchao left a Linear weight {tuple(weight.shape)} unquantized ({type(packed).__name__})",
                          code="unsupported")
    k_tiles = -(-cols // ops.TINYGEMM_K_TILE)
    qweight = packed.qdata[:, :k_tiles].contiguous()
    scale_and_zero = packed.scale_and_zero[: k_tiles * ops.TINYGEMM_K_TILE // group].contiguous()
    return qweight, scale_and_zero


def lower(gm: fx.GraphModule, targets: list[tuple[str, str, Any]], config: WeightOnlyConfig,
          notes: list[str]) -> dict[str, str]:
    """Rewrite each target Linear to int4 tinygemm in place; returns {module path: "int4"}. Embeddings stay
    float (the kernel is a matmul)."""
    done: dict[str, str] = {}
    embeddings, undivided, whole_row = [], [], []
    for index, (path, kind, node) in enumerate(targets):
        if kind != "Linear":
            embeddings.append(path)
            continue
        weight = tensor_attr(gm, node.args[1])
        rows, cols = weight.shape
        group = group_for(cols, config.group_size)
        if group is None:
            undivided.append(f"{path} ({cols} inputs)")
            continue
        if group != config.group_size:
            whole_row.append(path)
        qweight, scale_and_zero = pack(weight, group, config.algorithm)
        gm.register_buffer(f"_int4_qweight_{index}", qweight)
        gm.register_buffer(f"_int4_scale_and_zero_{index}", scale_and_zero)
        bias = node.args[2] if len(node.args) > 2 else None
        with gm.graph.inserting_before(node):
            packed_node = gm.graph.get_attr(f"_int4_qweight_{index}")
            scales_node = gm.graph.get_attr(f"_int4_scale_and_zero_{index}")
            new = gm.graph.call_function(ops.int4_tinygemm_linear,
                                         (node.args[0], packed_node, scales_node, bias, group, rows))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done[path] = "int4"
    if embeddings:
        notes.append(f"{len(embeddings)} embedding(s) stayed float: the int4 kernel on cuda is a matmul "
                     f"({', '.join(embeddings[:10])}); use device cpu for int4/int8 embeddings")
    if whole_row:
        notes.append(f"group_size {config.group_size} is wider than {len(whole_row)} layer(s), so each row is "
                     f"one group: {', '.join(whole_row[:10])}")
    if undivided:
        notes.append(f"{len(undivided)} layer(s) stayed float because group_size {config.group_size} does not "
                     f"divide their input width (the int4 kernel is group-wise only): {', '.join(undivided[:10])}")
    if done and config.symmetric:
        notes.append("the int4 kernel's weights are asymmetric (a bfloat16 scale and zero point per group), so "
                     "symmetric=true does not apply on cuda")
    return done


def details(config: WeightOnlyConfig, output_name: str) -> dict[str, Any]:
    """What report.json says about the cuda path, with the snippet that loads the artifact."""
    qparams = "HQQ" if config.algorithm == "hqq" else "TINYGEMM (round to nearest)"
    return {
        "quantizer": f"torchao Int4WeightOnlyConfig(int4_packing_format='tile_packed_to_4d', "
                     f"int4_choose_qparams_algorithm={qparams}), computed on cuda",
        "lowering": "each int4 Linear calls aten._weight_int4pack_mm (CUDA tinygemm kernel, bfloat16 "
                    "activations) on int32-packed weights with a bfloat16 scale and zero per group",
        "loads_with": "torch alone (no torchao, no pickle), on an NVIDIA GPU of compute capability 8.0 or newer; "
                      "the program's tensors are on cuda and its inputs must be too",
        "loader": (f"import torch\nprogram = torch.export.load(\"{output_name}\")  # tensors load onto cuda\n"
                   "model = program.module()\nwith torch.no_grad():\n    y = model(x.to(\"cuda\"))"),
    }
