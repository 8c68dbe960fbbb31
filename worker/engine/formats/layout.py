"""How a tensors dataset's arrays hold samples, for one model input. Pure Python: the API checks it too.

The rule (README, "Datasets"), decided per array by its rank against the input's:
- an array with as many dimensions as the input: its first axis is the input's batch axis, and sample i
  is `a[i:i+1]`, a batch of one (`input [N, 3, 224, 224]` for an input `[batch, 3, 224, 224]`);
- an array with one dimension more than the input: N whole samples stacked on a new first axis, and sample
  i is `a[i]`, fed as is. For inputs whose batch axis is not first (an RNN state `[layers, batch, hidden]`:
  `[N, layers, 1, hidden]`) and for scalar inputs (a 0-d sample rate: `[N]`), where a[i:i+1] cannot be
  a sample.
The first rule is what every dataset used before the second existed, so those read as they always did.
An input whose rank the model does not record (a TorchScript tensor argument) takes the first rule.
"""

from __future__ import annotations

from collections.abc import Sequence

Dim = int | str | None


def stacks_samples(input_shape: Sequence[Dim] | None, array_shape: Sequence[int]) -> bool:
    """True when the array holds whole samples on a new first axis (sample i = a[i]), False when its first
    axis is the input's batch axis (sample i = a[i:i+1]). input_shape None: rank unknown."""
    return input_shape is not None and len(array_shape) == len(input_shape) + 1


def sample_shape_problem(input_shape: Sequence[Dim] | None, array_shape: Sequence[int]) -> str | None:
    """Why the array's samples cannot feed an input of that shape (None if they can). Symbolic or
    unknown dims match any size; so does the batch axis of a batch-sliced array."""
    if input_shape is None:
        return None
    array_shape = list(array_shape)
    if not array_shape:
        return "a 0-d array holds no samples: stack N samples on a first axis"
    if stacks_samples(input_shape, array_shape):
        want, got = list(input_shape), array_shape[1:]
    elif len(array_shape) == len(input_shape):
        first = input_shape[0] if input_shape else None
        # a[i:i+1] has 1 there: no sample could fit (a dim of -1 or 0 is an exporter's "dynamic")
        if isinstance(first, int) and first > 1:
            dims = ", ".join(str(d) if isinstance(d, int) else "?" for d in input_shape)
            return (f"the input's first axis is fixed at {first}, so it is not a batch axis to slice samples "
                    f"from: stack N samples on a new first axis ([N, {dims}])")
        want, got = list(input_shape[1:]), array_shape[1:]  # axis 0 is both the batch and the sample axis
    else:
        return (f"the array has {len(array_shape)} dimension(s); the input has {len(input_shape)}: give "
                f"{len(input_shape)} (the first one the batch axis) or {len(input_shape) + 1} (N samples "
                "stacked on a new first axis, each fed as is)")
    if any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, got, strict=True)):
        return "a sample's shape does not match the input's fixed dimensions"
    return None
