"""torch.export QAT: PT2E fake-quant fine-tuning (prepare_qat_pt2e), BatchNorm folded at convert, delivered like static.

Losses: `distillation` (default) is KL divergence to the float model's softmax for classifier-like
outputs ([batch, classes]) and MSE to its outputs otherwise, so it needs no labels; `mse` is MSE to
the float model's outputs (prefer it for embedding outputs, which are not logits); `cross_entropy`
needs integer `labels` in the training set. Adam optimises every parameter at `learning_rate`.

After training, every report ranks the layers (metrics.sensitivity) and config.target keeps the most sensitive
ones float until it holds (torch_export/sensitivity.py), on candidates qat_candidates.py converts from the
trained model with those layers float, without retraining.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.engine import accelerator, evaluate
from worker.engine import metrics as m
from worker.engine.errors import EngineError
from worker.engine.torch_export import common as pt2_common
from worker.engine.torch_export import qat_candidates, qat_target, x86_recipe
from worker.engine.torch_export import sensitivity as pt2_sensitivity
from worker.engine.torch_export.deliver import deliver, layer_rows, weights_per_channel
from worker.engine.torch_export.graph import example_args, weight_layer_names
from worker.engine.types import Device, QuantizeResult, TensorSpec

if TYPE_CHECKING:
    import torch

    from worker.engine.config import QATConfig
    from worker.engine.context import JobContext

MAX_TRAINING_SAMPLES = 1_000_000
CHECK_SAMPLES = 256  # fake-quant vs converted comparison, on the samples the job measures on
PROGRESS_UPDATES = 100  # progress events over the whole training, however many steps it has
CANDIDATES = ("each candidate (probe or kept set) is the trained model converted with those layers float, not "
              "retrained: quantized layers keep their fine-tuned weights, trained activation ranges and weight "
              "grids, float layers take the uploaded weights (qat_candidates.py). A target no candidate meets gets "
              "one more fine-tune with the chosen layers float (metrics.target.retrained)")


def _training_set(ctx: JobContext, specs: list[TensorSpec], config: QATConfig) -> tuple[list, Any]:
    """Stacked input tensors (one per model input, dataset order) and labels or None."""
    import torch

    path = ctx.training_path or ctx.calibration_path
    if path is None:
        raise EngineError("QAT needs a training dataset (an .npz of typical inputs; labels only for "
                          "loss=cross_entropy)", code="invalid_input")
    data = evaluate.load_npz(Path(path), specs, MAX_TRAINING_SAMPLES, "training")
    if config.loss == "cross_entropy" and data.labels is None:
        raise EngineError("loss 'cross_entropy' needs integer class labels: add an array named 'labels' to "
                          "the training .npz, or use loss 'distillation', which learns from the float model's "
                          "outputs and needs no labels", code="dataset_mismatch")
    if len(data.batches) < 2:
        raise EngineError("QAT needs at least 2 training samples", code="dataset_mismatch")
    inputs = [torch.from_numpy(np.concatenate([b[s.name] for b in data.batches])) for s in specs]
    labels = None if data.labels is None else torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    return inputs, labels


def _module_copy(program: torch.export.ExportedProgram, device: str):  # noqa: ANN202 - GraphModule
    """program.module() shares the program's tensors (training or .to(device) would change the float
    reference the job measures against), so copy it."""
    module = qat_candidates.graph_copy(program.module())
    return module if device == "cpu" else _moved(module, device)


def _moved(gm: Any, device: str) -> Any:
    """A graph module on `device`: its tensors, and the devices a traced graph carries in its nodes (factory
    ops' `device=`, `aten.to.device`, the fake values), as torch.export.passes.move_to_device_pass does for an
    ExportedProgram. Training runs on cuda; convert and the delivered program are on the CPU."""
    import torch
    from torch.utils import _pytree as pytree

    gm = gm.to(device)
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if isinstance(node.kwargs.get("device"), (str, torch.device)):
                node.kwargs = {**node.kwargs, "device": torch.device(device)}
            if node.op == "call_function" and node.target is torch.ops.aten.to.device:
                node.args = (node.args[0], torch.device(device), *node.args[2:])
            if "val" in node.meta:
                node.meta["val"] = pytree.tree_map_only(torch.Tensor, lambda v: v.to(device), node.meta["val"])
        module.recompile()
    return gm


def _training_graph(program: torch.export.ExportedProgram, specs: list[TensorSpec], device: str):  # noqa: ANN202
    """The program re-exported with a batch dimension of at least 2 (a fixed batch fails on the last,
    smaller batch; 0/1 would specialise it), other dimensions as the upload had them, on `device`."""
    import torch
    from torch.export import Dim

    fixed = [s.name for s in specs if not (s.shape and isinstance(s.shape[0], str))]
    if fixed:
        raise EngineError(f"QAT needs a dynamic batch dimension, but input(s) {fixed} were exported with a fixed "
                          "one; export with dynamic_shapes={name: {0: Dim('batch')}}", code="unsupported")
    args, shapes = example_args(program, specs)
    uppers = [d[0].max for d in shapes if d and 0 in d and isinstance(getattr(d[0], "max", None), int)]
    batch = Dim("batch", min=2, max=min(uppers)) if uppers else Dim("batch", min=2)
    shapes = tuple({axis: batch if axis == 0 else dim for axis, dim in d.items()} if d else d for d in shapes)
    return torch.export.export(_module_copy(program, device), tuple(a.to(device) for a in args),
                               dynamic_shapes=shapes).module()


def _leaves(output: Any) -> list:
    import torch
    from torch.utils import _pytree as pytree

    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _loss(kind: str, student: Any, teacher: Any, labels: Any):  # noqa: ANN202 - a scalar tensor
    import torch.nn.functional as F

    outs, refs = _leaves(student), _leaves(teacher)
    if kind == "cross_entropy":
        return F.cross_entropy(outs[0], labels)
    total = 0.0
    for out, ref in zip(outs, refs, strict=True):
        if kind == "distillation" and out.dim() == 2 and out.shape[1] >= 2:
            total = total + F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True,
                                     reduction="batchmean")
        else:
            total = total + F.mse_loss(out, ref)
    return total


def _train(ctx: JobContext, prepared: Any, teacher: Any, inputs: list, labels: Any, config: QATConfig,
           device: str, span: tuple[float, float] = (0.05, 0.40)) -> list[float]:
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval

    optimizer = torch.optim.Adam(prepared.parameters(), lr=config.learning_rate)
    count = len(inputs[0])
    steps_per_epoch = math.ceil(count / config.batch_size)
    total, step, losses = config.epochs * steps_per_epoch, 0, []
    every = max(1, total // PROGRESS_UPDATES)
    generator = torch.Generator().manual_seed(0)
    # BatchNorm keeps the float model's running statistics while the weights train: each step then
    # trains exactly the folded, fake-quantized convolution that convert_pt2e produces. With batch
    # statistics (move_exported_model_to_train) the 32x32 digits CNN at W4 per-tensor ended at 93.6 %
    # instead of 96.7 %, and moved by 3 points from epoch to epoch. (Dropout stays off too: this is a
    # short fine-tune.) Modes switch through torchao's helpers, which rewrite the graph's batch-norm and
    # dropout ops; .train()/.eval() do not apply to an exported graph.
    move_exported_model_to_eval(prepared)
    for epoch in range(config.epochs):
        order, running, batches = torch.randperm(count, generator=generator), 0.0, 0
        for start in range(0, count, config.batch_size):
            index = order[start : start + config.batch_size]
            step += 1
            if len(index) < 2:
                continue  # the training graph's batch dimension starts at 2
            batch = [t[index].to(device) for t in inputs]
            with torch.no_grad():
                reference = teacher(*batch)
            loss = _loss(config.loss, prepared(*batch), reference,
                         None if labels is None else labels[index].to(device))
            if not torch.isfinite(loss):
                raise EngineError(f"QAT diverged (loss {loss.item()}) in epoch {epoch + 1}; lower learning_rate",
                                  code="invalid_input")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running, batches = running + loss.item(), batches + 1
            if step % every == 0:
                ctx.progress("training", span[0] + (span[1] - span[0]) * step / total)
        losses.append(running / max(batches, 1))
        ctx.log("info", f"QAT epoch {epoch + 1}/{config.epochs}: mean {config.loss} loss {losses[-1]:.5f}")
        ctx.progress("training", span[0] + (span[1] - span[0]) * step / total)
    return losses


def _outputs(module: Any, samples: evaluate.Samples, specs: list[TensorSpec]) -> list[list[np.ndarray]]:
    runner = pt2_common.runner_for_module(module, [s.name for s in specs], threads=None)
    return [runner(batch) for batch in samples.batches[:CHECK_SAMPLES]]


@dataclasses.dataclass
class _Training:
    """What every fine-tune of a job shares: the float program, its training data, the recipe, the device."""

    ctx: JobContext
    program: Any  # torch.export.ExportedProgram
    specs: list[TensorSpec]
    inputs: list
    labels: Any
    qconfig: Any
    device: str

    def fine_tune(self, excluded: set[str], span: tuple[float, float]) -> tuple[Any, Any, list[float]]:
        """Prepare a fresh training graph with `excluded` float, train it, freeze its ranges; returns the graph
        before prepare (the upload's weights, for qat_candidates), the trained one (both on the CPU), the losses."""
        from torchao.quantization.pt2e.fake_quantize import disable_observer
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
                graph = _training_graph(self.program, self.specs, self.device)
                pristine = qat_candidates.graph_copy(graph)  # prepare rewrites `graph` in place
                prepared = prepare_qat_pt2e(graph, qat_candidates.quantizer(self.qconfig, excluded))
        except EngineError:
            raise
        except Exception as exc:  # export and PT2E raise many types on graphs they cannot handle
            raise EngineError(f"PT2E QAT preparation failed on this program: {type(exc).__name__}: "
                              f"{str(exc)[:500]}", code="unsupported") from exc
        config: QATConfig = self.ctx.config
        teacher = _module_copy(self.program, self.device)  # eval-mode batch-norm: only read, never trained
        losses = _train(self.ctx, prepared, teacher, self.inputs, self.labels, config, self.device, span)
        del teacher
        prepared.apply(disable_observer)  # freeze the ranges training ended with; checks must not move them
        if self.device != "cpu":
            prepared, pristine = _moved(prepared, "cpu"), _moved(pristine, "cpu")
        return pristine, prepared, losses

    def converted(self, excluded: set[str]) -> Any:
        """Fine-tune again with `excluded` float (qat_target.py) and convert."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        return convert_pt2e(self.fine_tune(excluded, (0.44, 0.445))[1])


def _sensitivity(ctx: JobContext, program: torch.export.ExportedProgram, specs: list[TensorSpec],
                 samples: evaluate.Samples, converted: Any, candidates: qat_candidates.TrainedCandidates,
                 bits: int) -> tuple[pt2_sensitivity.Outcome, Any]:
    """metrics.sensitivity of the trained model and, with config.target, the layers to keep float; returns the
    outcome and the module to deliver: the trained model converted, or the candidate the search chose (built
    again: the builds are deterministic, as static's)."""
    artifact = ctx.work_dir / f"{ctx.model_name}.int8.pt2"  # deliver()'s name: the plain candidate's size uses it
    quantized = [row["name"] for row in layer_rows(converted, bits) if row["weight_dtype"] != "float32"]
    sensed = pt2_sensitivity.analyse(ctx, float_module=program.module(), plain=converted, build=candidates.build,
                                     candidates=quantized, specs=specs, samples=samples, span=(0.42, 0.44),
                                     plain_bytes=lambda gm: pt2_sensitivity.saved_bytes(
                                         gm, program, specs, artifact, weights_per_channel))
    sensed.report["candidates"] = CANDIDATES
    sensed.report["ranges_without_trained_state"] = candidates.observed_fresh
    if sensed.kept:
        converted = candidates.build(frozenset(sensed.kept))
    return sensed, converted


def run(ctx: JobContext) -> QuantizeResult:
    """Fine-tune a `.pt2` program with int8 (or 4-bit weight) fake quantization, then convert and deliver."""
    with qat_candidates.traced_patterns_kept():  # prepare and convert run again for every candidate
        return _run(ctx)


def _run(ctx: JobContext) -> QuantizeResult:
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    config: QATConfig = ctx.config
    device = accelerator.torch_device(ctx.device)  # cuda trains there; convert and delivery stay on the CPU
    ctx.progress("loading", 0.02)
    program = pt2_common.load_program(ctx.model_path, scratch=ctx.work_dir)
    specs = pt2_common.input_specs(program)
    samples = evaluate.load_samples(ctx, specs)  # fail on a bad dataset before any training
    inputs, labels = _training_set(ctx, specs, config)
    names = weight_layer_names(program.module())
    if not names:
        raise EngineError("QAT found no convolution or Linear layer in this program", code="nothing_to_quantize")
    excluded = {name for name in names if config.excludes(name)}
    reduce_range, range_note = x86_recipe.choose_reduce_range()
    qconfig = x86_recipe.quantization_config(config, is_qat=True, reduce_range=reduce_range)
    notes = x86_recipe.symmetric_notes(config)
    if config.calibration != type(config.calibration)():
        notes.append("calibration options do not apply to QAT: activation ranges are the moving averages "
                     "observed during training")
    training = _Training(ctx, program, specs, inputs, labels, qconfig, device)
    ctx.log("info", f"QAT on {device}: {len(inputs[0])} samples, {config.epochs} epoch(s), loss {config.loss}")
    started = time.monotonic()
    pristine, prepared, losses = training.fine_tune(excluded, (0.05, 0.40))
    training_s = time.monotonic() - started

    ctx.progress("quantizing", 0.42)
    candidates = qat_candidates.TrainedCandidates(pristine, prepared, qconfig, excluded, inputs, config.batch_size)
    fake_quant = _outputs(prepared, samples, specs)
    converted = convert_pt2e(prepared)  # folds BatchNorm into the convolutions, weights to int
    cos_mean, cos_min = m.cosine(fake_quant, _outputs(converted, samples, specs))
    check = {"samples": len(fake_quant), "cosine": round(cos_mean, 6), "cosine_min": round(cos_min, 6)}
    if cos_min < 0.99:
        notes.append(f"the converted model differs from the fake-quant model training produced (worst cosine "
                     f"{cos_min:.3f}): convert lost part of what training won")
    sensed, converted = _sensitivity(ctx, program, specs, samples, converted, candidates, config.weight_bits)
    retrained = qat_target.retrain(ctx, sensed, fine_tune=lambda kept: training.converted(excluded | kept),
                                   training_s=training_s, float_module=program.module(), specs=specs, samples=samples)
    if sensed.kept:
        excluded |= set(sensed.kept)
        notes.append(f"the accuracy target kept {', '.join(sensed.kept)} float after training" + (
            ", fine-tuned again with them float" if retrained is not None else
            ", with their uploaded weights and without retraining (resubmit with them in config.exclude to "
            "fine-tune with them float)"))
    details = {"quantizer": "X86InductorQuantizer (is_qat=True)", "weight_bits": config.weight_bits,
               "granularity": config.granularity, "device": device, "loss": config.loss,
               "training_device": accelerator.describe(device), "converted_on": "cpu",
               "epochs": config.epochs, "epoch_losses": [round(v, 6) for v in losses],
               "training_s": round(training_s, 1), "training_samples": len(inputs[0]),
               "reduce_range": reduce_range, "activation_range": range_note,
               "fake_quant_vs_converted": check, "kept_float": sorted(excluded),
               "convert_fix": "convert uses the fake-quant scales training used (TrainedGridFakeQuantize)"}
    if device == "cuda":
        torch.cuda.empty_cache()
        notes.append("trained on cuda; the delivered program is a CPU program (X86 int8 recipe), converted, "
                     "compiled and measured on this worker's CPU")
    # the artifact is measured where it runs: metrics' latency.device says cpu, training_device says cuda
    result = deliver(dataclasses.replace(ctx, device=Device.cpu), float_program=program,
                     converted=converted if retrained is None else retrained, specs=specs, samples=samples,
                     bits=config.weight_bits, method_key="torch_export_qat", notes=notes, details=details)
    return pt2_sensitivity.attach(result, sensed)
