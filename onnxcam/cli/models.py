"""Commands about the model itself: `nodes` (what can be explained), `export-augmented`, `cache`."""
from __future__ import annotations

import json

import click

from ..errors import OnnxcamError
from ..gradients import BACKENDS
from .app import main
from .options import _explainer_options, _prefix, _preprocessing, _size, scored_model_options, token_options


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--size", help="Input HEIGHT,WIDTH for models with symbolic spatial axes.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@token_options
def nodes(model, size, as_json, tokens_grid, prefix_tokens):
    """List the nodes whose output can be explained, with shapes; * marks the default."""
    from .. import layouts
    from ..model import load_model
    from ..nodes import default_node, format_table, list_candidates
    from ..tokens import grids_of, is_transformer, parse_grid

    loaded = load_model(model)
    preprocessing = _preprocessing(loaded, _size(size), None, None, None, None, False)
    probe = preprocessing.probe_shape(loaded.input.shape)
    candidates = list_candidates(loaded.proto, {loaded.input.name: probe} if probe else None)
    if not candidates:
        raise OnnxcamError(f"{model} has no node with a spatial output (rank 3-5); nothing to explain")
    default = default_node(candidates, loaded.proto)
    input_spatial = layouts.spatial_shape(probe, layouts.input_layout(probe)) if probe else None
    grid = parse_grid(tokens_grid)
    reads_tokens = grid is not None or prefix_tokens is not None or is_transformer(loaded)
    grids = grids_of(candidates, input_spatial, grid, _prefix(prefix_tokens)) if reads_tokens else {}
    if as_json:
        click.echo(json.dumps([{"node": c.name, "op_type": c.op_type, "tensor": c.tensor,
                                "shape": list(c.shape) if c.shape else None, "scope": c.scope,
                                "default": c.name == default.name,
                                **({"token_grid": grids[c.tensor]} if c.tensor in grids else {})}
                               for c in candidates], indent=2))
    else:
        click.echo(format_table(candidates, default, grids))


@main.command("export-augmented")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--node", "node_specs", multiple=True, help="Node(s) to expose with their gradients "
                                                          "(same forms as for explain; default auto).")
@click.option("-o", "--out", "destination", type=click.Path(dir_okay=False),
              help="Where to write the augmented model (required).")
@click.option("--grad-backend", type=click.Choice(BACKENDS), default="portable", show_default=True,
              help="portable runs on any ONNX Runtime build; ort-training needs a training build.")
@click.option("--size", help="Input HEIGHT,WIDTH (L or D,H,W for signals and volumes) for models with "
                             "symbolic spatial axes.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
              help="Input layout (default: model metadata or detected from the input shape).")
@click.option("--probabilities", is_flag=True, help="Score the Softmax output instead of the logits.")
@scored_model_options
def export_augmented(model, node_specs, destination, grad_backend, size, layout, probabilities, input_name,
                     feed_specs, output_name, class_axis):
    """Write the augmented model: inputs = the model's inputs + onnxcam_target_weights (the scored
    output's shape, zero rows = arg-max class); outputs = the scored output, activations,
    d score / d activations. --feed values serve only the build's probe run; the written model keeps
    those inputs as inputs."""
    from pathlib import Path

    from ..explainer import Explainer
    from ..model import load_model
    from ..outputs import write_bytes_atomic

    loaded = load_model(model, input=input_name)
    outputs = [o.name for o in loaded.proto.graph.output]
    if output_name is not None and output_name not in outputs and output_name.lower().endswith(".onnx"):
        raise OnnxcamError(f"--output names the output to score (one of {', '.join(outputs)}); write the "
                           f"model with -o/--out {output_name}")
    if destination is None:
        raise OnnxcamError("give the file to write the augmented model to with -o/--out FILE.onnx")
    if loaded.path is not None and Path(destination).resolve() == loaded.path.resolve():
        raise OnnxcamError(f"refusing to overwrite the input model {model}; choose another -o path")
    preprocessing = _preprocessing(loaded, _size(size) if loaded.input.rank in (None, 4) else None,
                                   None, None, None, layout, False)
    options = _explainer_options(loaded, preprocessing, size, layout, "auto", grad_backend, probabilities,
                                 False, feed_specs, output_name, class_axis)
    explainer = Explainer(loaded, list(node_specs) or ["auto"], **options)
    augmented = explainer.augmented_gradient_model()
    data = augmented.proto.SerializeToString()
    if len(data) >= 2 ** 31:
        raise OnnxcamError("the augmented model is over 2 GB, which a single ONNX file cannot hold")
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(destination, data, {loaded.path.resolve()} if loaded.path else set())
    click.echo(f"wrote {destination} ({augmented.backend} gradients): inputs "
               f"{', '.join(i.name for i in augmented.proto.graph.input if i.name not in _initializers(augmented.proto))}; "
               f"outputs {', '.join(augmented.output_names)}")


@main.group("cache")
def cache_group():
    """Inspect or empty the augmented-model cache ($ONNXCAM_CACHE_DIR, default ~/.cache/onnxcam;
    capped at $ONNXCAM_CACHE_MAX_MB megabytes, default 2048, least recently used entries evicted)."""


@cache_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def cache_info(as_json):
    """Folder, number of entries, size and cap."""
    from ..cache import default_cache_dir
    from ..cache_limits import info
    facts = info(default_cache_dir())
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(f"{facts['folder']}: {facts['entries']} entr{'y' if facts['entries'] == 1 else 'ies'}, "
               f"{facts['bytes'] / 2**20:.1f} MB of {facts['max_bytes'] / 2**20:.0f} MB"
               + (f", {facts['temporaries']} leftover temporary file(s)" if facts["temporaries"] else ""))


@cache_group.command("clear")
def cache_clear():
    """Remove every cache entry (models, node tables, leftover temporaries); other files are left alone."""
    from ..cache import default_cache_dir
    from ..cache_limits import clear
    folder = default_cache_dir()
    count, freed = clear(folder)
    click.echo(f"removed {count} cache entr{'y' if count == 1 else 'ies'}, {freed / 2**20:.1f} MB, from {folder}")


def _initializers(proto) -> set[str]:
    return {init.name for init in proto.graph.initializer}
