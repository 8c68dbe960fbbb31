"""Why torch.ao's JIT quantization passes refuse a scripted model, in words a user can act on.

quantize_jit / quantize_dynamic_jit insert observers and rewrite layer calls along each submodule's access
path from `self` (`self.encoder.fc`), in the forward as written. A model whose forward chooses the submodule
that runs inside if-branches (silero-vad's `_model` or `_model_8k`, by the sample rate argument) makes the
passes raise `Can't handle the access pattern of GetAttr in getModuleAccessPath`, a message that names
neither the model's construct nor a way out. This module names both; the library's words follow in
brackets for whoever reports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.engine.errors import EngineError

if TYPE_CHECKING:
    import torch

WAY_OUT = ("upload the network that does the work on its own, with any state as an explicit input and output: "
           "a torch.export (.pt2) or ONNX export of the submodule that runs")


def _walk(block: torch.Block, depth: int, found: dict[str, list[str]]) -> None:
    import torch

    for node in block.nodes():
        if node.kind() == "prim::GetAttr" and isinstance(node.output().type(), torch.ClassType) and depth > 0:
            found["branch_modules"].append(node.s("name"))
        elif node.kind() == "prim::SetAttr":
            found["state"].append(node.s("name"))
        for sub in node.blocks():
            _walk(sub, depth + 1, found)


def constructs(module: torch.jit.ScriptModule) -> dict[str, list[str]]:
    """Submodules forward() reaches only inside if/loop blocks, and attributes it assigns (state kept
    between calls), each listed once in graph order."""
    found: dict[str, list[str]] = {"branch_modules": [], "state": []}
    try:
        _walk(module.forward.graph, 0, found)
    except (AttributeError, RuntimeError):
        return {"branch_modules": [], "state": []}
    return {key: list(dict.fromkeys(names)) for key, names in found.items()}


def jit_refusal(exc: BaseException, module: torch.jit.ScriptModule, method: str) -> EngineError:
    """An `unsupported` EngineError for a JIT quantization pass that raised `exc` on `module`; chain it
    with `raise ... from exc`."""
    library = " ".join(str(exc).split())[:300]
    found = constructs(module)
    if found["branch_modules"]:
        state = (f", and it rewrites its own attributes on every call ({', '.join(found['state'][:6])}: state "
                 "kept between calls)" if found["state"] else "")
        why = (f"TorchScript {method} quantization cannot follow this model: its forward() picks the submodule "
               f"that runs inside if-branches ({', '.join(found['branch_modules'][:6])}, chosen by an argument's "
               f"value at run time){state}, while torch.ao's JIT passes only quantize submodules called through "
               "a fixed attribute path of self")
    else:
        why = (f"TorchScript {method} quantization cannot rewrite this model's scripted graph: torch.ao's JIT "
               "passes only match Linear and convolution submodules called through a fixed attribute path of "
               "self, and this forward() has a call they cannot trace back to one")
    here = f" (here {' or '.join(found['branch_modules'][:3])})" if found["branch_modules"] else ""
    return EngineError(f"{why}. What to do: {WAY_OUT}{here}, and quantize that. (torch: {library})",
                       code="unsupported")
