"""QAT after training: the trained model converted with any set of layers left float, without retraining.

torch_export/sensitivity.py ranks layers and searches for the fewest to keep float through `build(kept)`. For
QAT a candidate is the trained model converted with `kept` float: a copy of the training graph (as it was before
prepare, with the upload's weights) takes the fine-tuned weights of every layer not in `kept`, is prepared again
with a quantizer that skips `kept`, and each fake-quant module it gets is loaded with the state training left in
its counterpart (the same value observed, read by the same ops; prepare names nodes the same way each time): the
trained ranges and the grid training fitted (x86_recipe.TrainedGridFakeQuantize). Then it converts as the job
does. With nothing kept the candidate computes exactly what the trained model converted computes.

A layer kept float takes the upload's weights (and its BatchNorm's), not the fine-tuned ones: fine-tuning moves
a layer's weights to make up for its own rounding, which is wrong once it is not rounded. Measured on the 8x8
digits CNN (W4 per-tensor, 1 epoch): keeping conv1 and head float moved cosine 0.99884 -> 0.99841 with their
fine-tuned weights, -> 0.99937 with the uploaded ones. No candidate is retrained (each would cost a whole
fine-tune per probe); qat_target.py fine-tunes once more with the chosen set float when a target still misses.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx

from worker.engine.torch_export.graph import WEIGHT_OPS, is_call, module_path

OBSERVE_BATCHES = 4  # a fake-quant module without a trained counterpart observes this many training batches
_TRACED: dict[tuple, fx.GraphModule] = {}  # traced_patterns_kept(): torchao's rewrite patterns, traced once


def quantizer(qconfig: Any, excluded: set[str]):  # noqa: ANN201 - a torchao X86InductorQuantizer
    """x86_recipe.quantizer for QAT: the X86 recipe, minus the empty annotations it leaves on skipped convs.

    X86InductorQuantizer marks a layer whose qconfig is None with an annotation that quantizes nothing;
    prepare_qat_pt2e's conv-BN fusion then reads that annotation's input/weight specs by position and fails
    with IndexError (torchao 0.18, qat_utils._update_conv_input_qspec_map_after_replacement), so `exclude` of
    any conv followed by BatchNorm failed QAT preparation. Without the annotation the conv is fused with its
    BatchNorm and left unquantized, which is what the mark meant; annotation is over by then, so nothing else
    reads it.
    """
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    class QATX86Quantizer(X86InductorQuantizer):
        def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
            super().annotate(model)
            for node in model.graph.nodes:
                mark = node.meta.get("quantization_annotation")
                if is_call(node, *WEIGHT_OPS) and mark is not None and not mark.input_qspec_map \
                        and mark.output_qspec is None:
                    del node.meta["quantization_annotation"]
            return model

    result = QATX86Quantizer().set_global(qconfig)
    for name in sorted(excluded):
        result.set_module_name_qconfig(name, None)
    return result


def _pattern_key(pattern: Any, example_inputs: tuple, is_cuda: bool, kwargs: dict[str, Any]) -> tuple | None:
    """What a traced pattern depends on: the pattern function's code and closure (torchao builds each pattern
    from flags and an op), and the example inputs' shapes, dtypes and devices. None where it cannot be hashed."""
    fn = getattr(pattern, "fn", pattern)  # torchao wraps pattern functions in a WrapperModule

    def shape(value: Any) -> Any:
        return ("tensor", tuple(value.shape), value.dtype, value.device.type) \
            if isinstance(value, torch.Tensor) else value

    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    try:  # an empty closure cell raises ValueError, an unhashable captured value TypeError: trace those each time
        key = (code, tuple(c.cell_contents for c in fn.__closure__ or ()), tuple(shape(v) for v in example_inputs),
               is_cuda, tuple(sorted((k, shape(v)) for k, v in kwargs.items())))
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


@contextlib.contextmanager
def traced_patterns_kept() -> Iterator[None]:
    """Trace each of torchao's PT2E rewrite patterns once per job instead of once per prepare/convert.

    prepare_qat_pt2e (conv-BN fusion), convert_pt2e (BN folding: 114 patterns) and move_exported_model_to_eval
    each re-trace their patterns with torch.export on every call: convert alone took 15-65 s on the 8x8 digits
    CNN on this 2-core host, and a sensitivity ranking converts once per layer. The patterns do not depend on
    the model or the job, so a traced one is kept for the process (and copied out, since the rewriter may touch
    it); the functions are only swapped while a QAT job runs.
    """
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import utils as pt2e_utils

    original = pt2e_utils._get_aten_graph_module_for_pattern
    traced = _TRACED

    def kept(pattern: Any, example_inputs: tuple, is_cuda: bool = False, **kwargs: Any) -> fx.GraphModule:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in traced:
            traced[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return graph_copy(traced[key])

    # qat_utils imported the function by name; export_utils imports it from utils inside each call
    patched = [(module, "_get_aten_graph_module_for_pattern") for module in (qat_utils, pt2e_utils)]
    for module, name in patched:
        setattr(module, name, kept)
    try:
        yield
    finally:
        for module, name in patched:
            setattr(module, name, original)


def graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():  # torch's own pytree pickling warns about its LeafSpec on deepcopy
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        return copy.deepcopy(gm)


def _fake_quants(gm: fx.GraphModule) -> dict[tuple[str, tuple[str, ...]], torch.nn.Module]:
    """Each fake-quant module by (the node it observes, the nodes that read it)."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    found = {}
    for node in gm.graph.nodes:
        module = getattr(gm, str(node.target), None) if node.op == "call_module" else None
        if isinstance(module, FakeQuantizeBase):
            found[(node.args[0].name, tuple(sorted(user.name for user in node.users)))] = module
    return found


class TrainedCandidates:
    """build(kept): the trained model converted with `kept` (and the config's exclusions) float, on the CPU."""

    def __init__(self, pristine: fx.GraphModule, trained: fx.GraphModule, qconfig: Any, excluded: set[str],
                 inputs: list[torch.Tensor], batch_size: int) -> None:
        """`pristine`: the training graph before prepare; `trained`: it prepared and trained, observers off,
        both on the CPU; `inputs`: the training inputs (for a fake-quant module with no trained state)."""
        self._pristine, self._qconfig, self._excluded = pristine, qconfig, set(excluded)
        keys = set(pristine.state_dict())
        self._layer_keys = _layer_state_keys(pristine)
        self._weights = {k: v.detach().clone() for k, v in trained.state_dict().items() if k in keys}
        self._states = {key: {k: v.detach().clone() for k, v in fq.state_dict().items()}
                        for key, fq in _fake_quants(trained).items()}
        self._batches = [[t[i : i + batch_size] for t in inputs]  # the training graph's batch is at least 2
                         for i in range(0, min(len(inputs[0]), OBSERVE_BATCHES * batch_size), batch_size)
                         if min(batch_size, len(inputs[0]) - i) >= 2]
        self.observed_fresh = 0  # fake-quant modules that had no trained counterpart, over all builds

    def build(self, kept: frozenset[str]) -> fx.GraphModule:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.fake_quantize import disable_observer
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

        gm = graph_copy(self._pristine)  # the upload's weights, which the layers kept float keep
        uploaded = {key for name in kept for key in self._layer_keys.get(name, ())}
        # what prepare dropped (num_batches_tracked) stays as uploaded too
        gm.load_state_dict({k: v for k, v in self._weights.items() if k not in uploaded}, strict=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchao\..*")
            gm = prepare_qat_pt2e(gm, quantizer(self._qconfig, self._excluded | set(kept)))
        move_exported_model_to_eval(gm)  # the fused conv-BN of a kept layer must use the running statistics
        fresh = []
        for key, fq in _fake_quants(gm).items():
            if key in self._states:
                fq.load_state_dict(self._states[key])
            else:
                fresh.append(fq)
        gm.apply(disable_observer)
        if fresh:  # not seen so far (prepare named its nodes as in training): observe a few batches
            self.observed_fresh += len(fresh)
            for fq in fresh:
                fq.enable_observer()
            with torch.no_grad():
                for batch in self._batches:
                    gm(*batch)
            gm.apply(disable_observer)
        return convert_pt2e(gm)


def _layer_state_keys(gm: fx.GraphModule) -> dict[str, set[str]]:
    """Each conv/linear's own tensors (weight, bias), and those of a BatchNorm that alone reads its output."""
    batch_norms = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit_no_training.default)
    found: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        if not is_call(node, *WEIGHT_OPS):
            continue
        readers = list(node.users)
        args = list(node.args[1:3])
        if len(readers) == 1 and is_call(readers[0], *batch_norms):
            args += readers[0].args[1:5]
        found.setdefault(module_path(node)[0], set()).update(
            str(a.target) for a in args if isinstance(a, fx.Node) and a.op == "get_attr")
    return found
