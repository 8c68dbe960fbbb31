"""torch.export weight-only int8/int4 (RTN): torchao computes the weights, plain ATen runs them; on CPU or CUDA.

torchao's `quantize_` needs real nn.Linear/nn.Embedding modules, which an unlifted `.pt2` graph does
not have (it calls aten.linear on bare parameters), so each weight op is copied into a module,
quantized there, and its integer weights and qparams read back. A program exported with torchao's
tensor subclasses calls `torchao::dequantize_affine` (a file plain torch cannot load) and stores int4
as one int8 per value, so the graph is rewritten instead to dequantize with core ATen ops from int8
weights, or int4 weights packed two to a byte. The artifact needs torch only. ENGINE.md: weight-only
is slower than float on this CPU (int8 ~0.93x, int4 ~0.5x); measure() says so in the warnings.

On cuda the job is int4 through torchao's tinygemm layout and torch's own CUDA kernel (int4_cuda.py): the
program is moved to the GPU, lowered there, saved with its tensors on cuda, and measured on cuda against the
float program on cuda. The CPU path is unchanged.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.engine import accelerator, evaluate, report
from worker.engine.errors import EngineError
from worker.engine.registry import resolve
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export import int4_cuda, weight_only_auto
from worker.engine.torch_export import sensitivity as pt2_sensitivity
from worker.engine.torch_export.deliver import measure_saved
from worker.engine.torch_export.graph import module_path, reexport, tensor_attr, weight_layers
from worker.engine.torch_export.ops import weight_only_embedding, weight_only_linear
from worker.engine.types import ArtifactFile, Device, QuantizeResult

if TYPE_CHECKING:
    import torch
    from torch import fx

    from worker.engine.config import WeightOnlyConfig
    from worker.engine.context import JobContext


def _configs(config: WeightOnlyConfig, kind: str, group: int):  # noqa: ANN202 - torchao AOBaseConfig
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerAxis, PerGroup, PerRow
    from torchao.quantization.quant_primitives import MappingType

    if config.dtype == "int8" and config.symmetric and kind == "Linear":
        return Int8WeightOnlyConfig(granularity=PerRow() if group == -1 else PerGroup(group))
    mapping = MappingType.SYMMETRIC if config.symmetric else MappingType.ASYMMETRIC
    return IntxWeightOnlyConfig(weight_dtype=torch.int8 if config.dtype == "int8" else torch.int4,
                                granularity=PerAxis(0) if group == -1 else PerGroup(group), mapping_type=mapping)


def _quantize_weight(weight: torch.Tensor, kind: str, config: WeightOnlyConfig,
                     group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """torchao RTN on one weight: (stored qweight, scale [rows, G], zero [rows, G] or None, packed)."""
    import torch
    from torchao.quantization import quantize_

    rows, cols = weight.shape
    module = torch.nn.Linear(cols, rows, bias=False) if kind == "Linear" else torch.nn.Embedding(rows, cols)
    module.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    holder = torch.nn.ModuleDict({"layer": module})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
        quantize_(holder, _configs(config, kind, group), filter_fn=lambda _, fqn: fqn == "layer")
    quantized = holder["layer"].weight
    qdata = getattr(quantized, "qdata", None)
    if qdata is None:
        raise EngineError(f"torchao left a {kind} weight unquantized ({type(quantized).__name__})", code="unsupported")
    scale = quantized.scale.detach().to(weight.dtype).reshape(rows, -1).clone()
    zero_point = getattr(quantized, "zero_point", None)
    zero = None if zero_point is None else zero_point.detach().reshape(rows, -1).to(weight.dtype)
    q = qdata.detach().to(torch.int8)
    if config.dtype == "int4" and cols % 2 == 0:
        nibbles = (q.to(torch.int16) + 8).to(torch.uint8)  # torchao's int4 range is -8..7
        packed = torch.bitwise_or(nibbles[:, 0::2], torch.bitwise_left_shift(nibbles[:, 1::2], 4)).contiguous()
        offset = torch.full_like(scale, 8.0)
        return packed, scale, offset if zero is None else offset + zero, True
    if zero is not None and not bool(zero.ne(0).any()):
        zero = None
    return q.contiguous(), scale, zero, False


def _weight_nodes(gm: fx.GraphModule) -> list[tuple[str, str, Any]]:
    """(module path, Linear/Embedding, node) whose weight is a 2-D float parameter/buffer of the graph."""
    import torch

    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.linear.default:
            kind, weight = "Linear", node.args[1]
        elif node.target is torch.ops.aten.embedding.default:
            kind, weight = "Embedding", node.args[0]
        else:
            continue
        tensor = tensor_attr(gm, weight)
        if tensor is not None and tensor.dim() == 2 and tensor.is_floating_point():
            found.append((module_path(node)[0], kind, node))
    return found


def _group_for(config: WeightOnlyConfig, cols: int) -> int | None:
    """Group size to use on a weight with `cols` inputs: -1 per channel, None when it does not divide."""
    group = -1 if config.granularity == "per_channel" else config.group_size
    if group == -1 or group >= cols:
        return -1
    return group if cols % group == 0 else None


def _lower(gm: fx.GraphModule, targets: list[tuple[str, str, Any]], config: WeightOnlyConfig,
           notes: list[str], prefix: str = "_weight_only") -> dict[str, str]:
    """Rewrite each target op to its weight-only form in place; returns {module path: weight dtype}. `prefix`
    names the new buffers: a second call on the same graph (mixed int4/int8) needs another."""
    done: dict[str, str] = {}
    per_channel, undivided = [], []
    for index, (path, kind, node) in enumerate(targets):
        weight_node = node.args[1] if kind == "Linear" else node.args[0]
        weight = tensor_attr(gm, weight_node)
        group = _group_for(config, weight.shape[1])
        if group is None:
            undivided.append(f"{path} ({weight.shape[1]} inputs)")
            continue
        if group == -1 and config.granularity != "per_channel" and config.group_size != -1:
            per_channel.append(path)
        qweight, scale, zero, packed = _quantize_weight(weight, kind, config, group)
        names = {}
        for label, tensor in (("qweight", qweight), ("scale", scale), ("zero", zero)):
            if tensor is not None:
                names[label] = f"{prefix}_{label}_{index}"
                gm.register_buffer(names[label], tensor)
        with gm.graph.inserting_before(node):
            attrs = {label: gm.graph.get_attr(name) for label, name in names.items()}
            if kind == "Linear":
                bias = node.args[2] if len(node.args) > 2 else None
                args = (node.args[0], attrs["qweight"], attrs["scale"], attrs.get("zero"), bias, packed)
                new = gm.graph.call_function(weight_only_linear, args)
            else:
                args = (node.args[1], attrs["qweight"], attrs["scale"], attrs.get("zero"), packed)
                new = gm.graph.call_function(weight_only_embedding, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done[path] = config.dtype
    if per_channel:
        notes.append(f"group_size {config.group_size} is not smaller than the input width of "
                     f"{len(per_channel)} layer(s), so they use one scale per output channel: "
                     f"{', '.join(per_channel[:10])}")
    if undivided:
        notes.append(f"{len(undivided)} layer(s) stayed float because group_size {config.group_size} does not "
                     f"divide their input width: {', '.join(undivided[:10])}")
    return done


def lower_mixed(gm: fx.GraphModule, targets: list[tuple[str, str, Any]], config: WeightOnlyConfig,
                notes: list[str], at_int8: set[str]) -> dict[str, str]:
    """int4 (config) on every target but those in `at_int8`, which get int8 with the same group size and
    symmetry: the higher precision a target or bits 'auto' keeps a sensitive layer at, cheaper than float."""
    eight: list[str] = []
    done = _lower(gm, [t for t in targets if t[0] in at_int8], config.model_copy(update={"dtype": "int8"}), eight,
                  prefix="_weight_only8")
    done |= _lower(gm, [t for t in targets if t[0] not in at_int8], config, notes)
    notes += [note for note in eight if note not in notes]
    return done


def run(ctx: JobContext) -> QuantizeResult:
    """Store a `.pt2` program's Linear and Embedding weights as int8 or int4 (RTN, torchao); on cuda, Linear
    weights as int4 for torch's tinygemm kernel (RTN or HQQ)."""
    import torch
    from torch.export.passes import move_to_device_pass

    config: WeightOnlyConfig = ctx.config
    on_cuda = ctx.device == Device.cuda
    device = accelerator.torch_device(ctx.device, min_capability=int4_cuda.MIN_CAPABILITY if on_cuda else None,
                                      purpose=int4_cuda.PURPOSE)
    problems = resolve(ctx.format, ctx.method).config_problems(config, ctx.device)  # per device (registry.py)
    if problems:
        raise EngineError("; ".join(f"config.{field}: {why}" for field, why in problems), code="unsupported")
    ctx.progress("loading", 0.02)
    program = pt2_common.load_program(ctx.model_path, scratch=ctx.work_dir)
    specs = pt2_common.input_specs(program)
    samples = evaluate.load_samples(ctx, specs)  # fail on a bad dataset before any work
    if on_cuda:  # the float reference and the lowered program both live on the GPU from here on
        program = move_to_device_pass(program, device)

    float_module = program.module()
    found = weight_layers(float_module)
    candidates = sorted({path for path, _, _ in _weight_nodes(float_module)})
    excluded = {p for p in candidates if config.excludes(p)}

    notes: list[str] = []
    # a layer the target keeps: int8 where the rest is int4 on cpu; float where it is int8, or int4 on cuda
    keep_as = "int8" if config.dtype == "int4" and not on_cuda else "float"

    def build(kept: frozenset[str] = frozenset(), sink: list[str] | None = None) -> fx.GraphModule:
        """A fresh copy of the program with its weights lowered; gm.meta["done"] = {module path: dtype}."""
        gm = program.module()
        targets = [t for t in _weight_nodes(gm) if t[0] not in excluded and (keep_as == "int8" or t[0] not in kept)]
        said = [] if sink is None else sink
        try:
            if keep_as == "int8" and kept:
                gm.meta["done"] = lower_mixed(gm, targets, config, said, set(kept))
            else:
                gm.meta["done"] = (int4_cuda.lower if on_cuda else _lower)(gm, targets, config, said)
            gm.recompile()  # the graph edits reach forward() only now; the probes run it
        except EngineError:
            raise
        except Exception as exc:  # torchao raises many types on graphs it cannot handle
            raise EngineError(f"weight-only quantization failed on this program: {type(exc).__name__}: "
                              f"{str(exc)[:500]}", code="unsupported") from exc
        return gm

    ctx.progress("quantizing", 0.10)
    lowered_module = build(sink=notes)
    if not lowered_module.meta["done"]:
        raise EngineError("weight-only quantization found no Linear or Embedding layer to quantize in this "
                          "program", code="nothing_to_quantize")
    output = ctx.work_dir / f"{ctx.model_name}.{config.dtype}.pt2"
    sensed = pt2_sensitivity.analyse(
        ctx, float_module=float_module, plain=lowered_module, build=build, specs=specs, samples=samples,
        candidates=sorted(lowered_module.meta["done"]), keep_as=keep_as, device=device, span=(0.15, 0.50),
        plain_bytes=lambda gm: pt2_sensitivity.saved_bytes(gm, program, specs, output))
    if sensed.kept:  # the target keeps these at higher precision: the same build the search measured, delivered
        notes = []
        lowered_module = build(frozenset(sensed.kept), sink=notes)
    bits_auto = None
    if config.bits == "auto":  # registry: cpu, max_size_ratio, no target
        ctx.progress("quantizing", 0.50)
        rows = weight_only_auto.plan(ctx, float_module, [t for t in _weight_nodes(float_module)
                                                         if t[0] in lowered_module.meta["done"]],
                                     config, specs, samples, _quantize_weight, _group_for)

        def size_of(at_int8: frozenset[str]) -> int:
            return pt2_sensitivity.saved_bytes(build(at_int8), program, specs, output)

        at_int8, bits_auto = weight_only_auto.allocate(ctx, rows, original_bytes=Path(ctx.model_path).stat().st_size,
                                                       bytes4=size_of(frozenset()), size_of=size_of)
        if at_int8:
            notes = []
            lowered_module = build(frozenset(at_int8), sink=notes)
    done = lowered_module.meta["done"]
    try:
        quantized, _ = reexport(lowered_module, program, specs)
    except Exception as exc:  # re-export raises many types on graphs it cannot handle
        raise EngineError(f"weight-only quantization failed on this program: {type(exc).__name__}: "
                          f"{str(exc)[:500]}", code="unsupported") from exc
    other = sorted({f"{p} ({kind})" for p, kind, _ in found if kind not in ("Linear", "Embedding")})
    if other:
        notes.append(f"{len(other)} weight layer(s) stayed float: weight-only here covers Linear and "
                     f"Embedding: {', '.join(other[:10])}")
    if excluded:
        notes.append(f"kept float as asked (exclude): {', '.join(sorted(excluded)[:10])}")
    activation = "bfloat16" if on_cuda else "float32"  # the int4 CUDA kernel takes bfloat16 activations
    runtime = (f"torch {torch.__version__} on cuda (eager, int4 aten._weight_int4pack_mm) vs float eager on cuda"
               if on_cuda else f"torch {torch.__version__} (eager, torchao)")
    metrics = measure_saved(ctx, quantized, output, float_module, lowered_module, found,
                            lambda path, _kind: (done.get(path, "float32"), activation if path in done else "float32"),
                            specs, samples, runtime, notes, device=device)
    group = "per_channel" if config.granularity == "per_channel" or config.group_size == -1 else config.group_size
    method = int4_cuda.details(config, output.name) if on_cuda else {
        "quantizer": "torchao quantize_ (Int8WeightOnlyConfig for symmetric int8 Linear, IntxWeightOnlyConfig "
                     "otherwise), round to nearest",
        "lowering": "weights stored int8 (int4: two per byte) with float scales; dequantized with core ATen ops "
                    "at each call, so the .pt2 needs torch only"}
    return pt2_sensitivity.attach(QuantizeResult(
        artifacts=[ArtifactFile(kind="model", path=output, filename=output.name, format="torch_export")],
        metrics=metrics,
        report={"versions": report.runtime_versions(), "host": report.host_info(),
                "torch_export_weight_only": {
                    **method, "dtype": config.dtype, "group_size": group,
                    "symmetric": config.symmetric and not on_cuda,  # tinygemm's int4 is asymmetric
                    "algorithm": config.algorithm, "device": accelerator.describe(device),
                    "kept_float": sorted(excluded), f"kept_{keep_as}_for_target": sensed.kept,
                    **({"bits_auto": bits_auto} if bits_auto is not None else {})}},
    ), sensed)
