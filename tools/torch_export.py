"""Export torch modules to ONNX the way the project's models and tests need them.

Both exporters give the graph one input named ``input`` and one output named ``logits`` whose first
axis (the batch) is dynamic, so the explainer can run any batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_legacy(module: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """TorchScript-based exporter (``dynamo=False``): node names follow module paths, e.g.
    ``/layer4/layer4.1/conv2/Conv``; BatchNorm in eval mode is folded into the preceding Conv."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return path


def export_dynamo(module: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int | None = None) -> Path:
    """torch.export-based exporter (``dynamo=True``); ``opset=None`` keeps the exporter's default
    (20 with torch 2.13).

    The weights go to an external file ``<path>.data`` beside the model (keep the two together).
    Node names are like ``node_conv2d_3``; each node carries ``metadata_props`` such as
    ``pkg.torch.onnx.name_scopes`` (the module path as a Python list literal, e.g.
    ``['', 'layer4', 'layer4.1', 'conv2', 'conv2d_3']``) and ``pkg.torch.onnx.class_hierarchy``.
    The exporter's optimizer folds eval BatchNorm into the Conv before it; the fused Conv keeps the
    BatchNorm's scope, not the Conv's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        optimize=True,
        verify=False,
    )
    program.save(str(path), external_data=True)
    return path


def add_metadata(path: str | Path, props: dict[str, object]) -> None:
    """Set ``metadata_props`` of a saved model in place (values that are not strings become JSON).

    External weights, if any, are left where they are."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, text
    onnx.save(model, str(path))
