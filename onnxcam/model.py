"""Load an ONNX model safely (external data included) and read what onnxcam needs from it.

Every way a model file can be wrong (missing, not ONNX, external weights missing) becomes an
OnnxcamError with a one-line fix, so the CLI never shows a protobuf traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import onnx
from onnx import TensorProto

from .cache import MAX_CACHED_BYTES as MAX_DIGESTED_BYTES
from .errors import OnnxcamError, shape_text
from .graph import GraphView, default_opset

PREPROCESS_KEY = "onnxcam.preprocess"
CLASS_NAMES_KEY = "onnxcam.class_names"


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output; symbolic dims are strings or None."""
    name: str
    elem_type: int
    shape: tuple | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


@dataclass
class LoadedModel:
    """A model proto with its weights in memory, plus the facts the explainer reads from it."""
    proto: onnx.ModelProto
    path: Path | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str] = field(default_factory=dict)
    input_name: str | None = None     # the explained input (chosen by load_model)
    digest: bytes | None = None       # sha256 of the file's bytes when they are the whole model (see cache)

    @property
    def input(self) -> TensorSpec:
        """The data input onnxcam explains (the others are fed as given: see feeds.py)."""
        return next(spec for spec in self.inputs if spec.name == self.input_name)

    @cached_property
    def view(self) -> GraphView:
        """The one read-only view of this model's graph (shapes, producers, constants, opset)."""
        return GraphView(self.proto)

    @property
    def opset(self) -> int:
        return self.view.opset

    @property
    def preprocess(self) -> dict | None:
        return _json_metadata(self.metadata, PREPROCESS_KEY)

    @property
    def class_names(self) -> list[str] | None:
        names = _json_metadata(self.metadata, CLASS_NAMES_KEY)
        return [str(n) for n in names] if isinstance(names, list) else None


def _json_metadata(metadata: dict[str, str], key: str):
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise OnnxcamError(f"model metadata {key!r} is not valid JSON ({exc}); fix or remove it") from exc


def tensor_spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value_info.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in tensor_type.shape.dim)
    return TensorSpec(value_info.name, tensor_type.elem_type, shape)


def load_model(model: "str | os.PathLike | onnx.ModelProto | LoadedModel", input: str | None = None
               ) -> LoadedModel:
    """Load a path or wrap a proto, and choose the float data input to explain: ``input`` by name, or the
    model's only data input, or its only float input with spatial axes."""
    if isinstance(model, LoadedModel):
        if input is None or input == model.input_name:
            return model
        return replace(model, input_name=_explained_input(model.inputs, input, model.path).name)
    path, digest = None, None
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:
        path = Path(model)
        proto, digest = _read_proto(path)
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [tensor_spec(vi) for vi in graph.input if vi.name not in initializers]
    outputs = [tensor_spec(vi) for vi in graph.output]
    if not graph.node or not outputs:
        raise OnnxcamError(f"{_label(path)} has an empty graph; export the model again")
    explained = _explained_input(inputs, input, path)
    default_opset(proto)   # a model without the default domain is not one onnxcam can read
    metadata = {p.key: p.value for p in proto.metadata_props}
    return LoadedModel(proto, path, inputs, outputs, metadata, explained.name, digest)


_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def _explained_input(inputs: list[TensorSpec], name: str | None, path: Path | None) -> TensorSpec:
    listing = ", ".join(f"{i.name} {shape_text(i.shape)}" for i in inputs) or "none"
    if not inputs:
        raise OnnxcamError(f"{_label(path)} has no data input; export the model with its input")
    if name is not None:
        chosen = next((i for i in inputs if i.name == name), None)
        if chosen is None:
            raise OnnxcamError(f"--input {name!r} is not an input of {_label(path)}; its inputs: {listing}")
    elif len(inputs) == 1:
        chosen = inputs[0]
    else:
        spatial = [i for i in inputs if i.elem_type in _FLOATS and (i.rank or 0) >= 3]
        if len(spatial) != 1:
            raise OnnxcamError(f"{_label(path)} has {len(inputs)} data inputs ({listing}); choose the one to "
                               "explain with --input NAME and give the others with --feed NAME=FILE.npy")
        chosen = spatial[0]
    if chosen.elem_type not in _FLOATS:
        raise OnnxcamError(f"input {chosen.name!r} of {_label(path)} is not a float tensor; "
                           "onnxcam needs a float image/signal input")
    return chosen


def _label(path: Path | None) -> str:
    return str(path) if path is not None else "the model"


def _read_proto(path: Path) -> tuple[onnx.ModelProto, bytes | None]:
    """The model, and the sha256 of the file's bytes when they hold all of it (no external data): the
    cache keys start from that digest, which saves serializing the model again to hash it."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:     # a folder on the way that this user may not enter: stat itself fails
        raise OnnxcamError(f"cannot read model file {path}: {exc.strerror or exc}; check its permissions") from None
    if not exists:
        raise OnnxcamError(f"model file {path} does not exist; check the path")
    if is_dir:
        raise OnnxcamError(f"{path} is a directory, not an ONNX model file")
    try:
        data = path.read_bytes()
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-ish errors
        raise OnnxcamError(f"{path} is not a readable ONNX model ({type(exc).__name__}); "
                           "pass a .onnx file exported from your framework") from exc
    if not proto.graph.node and not proto.graph.output:
        raise OnnxcamError(f"{path} is not an ONNX model (no graph found); pass a .onnx file")
    external = _load_external_data(proto, path)
    check_structure(proto, str(path))
    return proto, None if external or len(data) > MAX_DIGESTED_BYTES else hashlib.sha256(data).digest()


def check_structure(proto: onnx.ModelProto, label: str) -> None:
    """Refuse a damaged model before any graph code reads it: protobuf hands a string field that is
    not valid UTF-8 back as bytes, which every later step (names, metadata, ONNX Runtime) trips on."""
    if _bad_text(proto):
        raise OnnxcamError(f"{label} has names or metadata that are not valid UTF-8 text; the file is "
                           "damaged, export the model again")


def _bad_text(message) -> bool:
    from google.protobuf.descriptor import FieldDescriptor
    for field, value in message.ListFields():
        repeated = (field.is_repeated if hasattr(field, "is_repeated")
                    else field.label == FieldDescriptor.LABEL_REPEATED)
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if repeated else [value]
            if any(not isinstance(v, str) for v in values):
                return True
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            values = value if repeated else [value]
            if any(_bad_text(v) for v in values):
                return True
    return False


def _load_external_data(proto: onnx.ModelProto, path: Path) -> bool:
    """Bring external weights (torch dynamo exports write a .onnx.data file) into the proto; True when
    there were any.

    onnxcam reads the files itself rather than leaving the policy to the installed ``onnx`` (older
    releases follow symlinks and ``../``): a weights file must lie inside the model's own folder
    (after resolving every link), must not be a symlink, and must have one hard link only, so a
    model file can never make onnxcam copy another file into the augmented model or the cache."""
    from onnx.external_data_helper import uses_external_data

    external = [t for t in _all_tensors(proto) if uses_external_data(t)]
    if not external:
        return False
    base = path.resolve().parent
    files: dict[str, bytes] = {}
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location")
        if not location:
            raise OnnxcamError(f"{path}: tensor {tensor.name!r} is stored externally but names no file; "
                               "export the model again")
        if location not in files:
            files[location] = _read_confined(path, base, location)
        data = files[location]
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else len(data) - offset
        except ValueError:
            raise OnnxcamError(f"{path}: tensor {tensor.name!r} has a malformed external-data offset or "
                               "length; export the model again") from None
        if offset < 0 or length < 0 or offset + length > len(data):
            raise OnnxcamError(f"{path}: tensor {tensor.name!r} wants bytes {offset}-{offset + length} of "
                               f"{location} ({len(data)} bytes); the weights file is truncated or does "
                               "not belong to this model")
        tensor.raw_data = data[offset:offset + length]
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
    return True


def _read_confined(path: Path, base: Path, location: str) -> bytes:
    """The bytes of external-data file ``location`` after the confinement checks."""
    def refuse(why: str) -> OnnxcamError:
        return OnnxcamError(f"{path}: refused to read external weights {location!r}: {why}; keep the "
                            "weights as a plain file in the model's folder (onnx.save_model with "
                            "save_as_external_data=True writes one)")
    relative = Path(location)
    if relative.is_absolute() or relative.drive:
        raise refuse("an absolute path, outside the model's folder")
    target = base / relative
    current = base
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise refuse(f"{current} is a symbolic link")
    if not target.resolve().is_relative_to(base):
        raise refuse(f"it resolves outside the model's folder {base}")
    if not target.exists():
        raise OnnxcamError(f"{path} keeps its weights in the external file {target}, which is missing; "
                           "copy it next to the model")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise OnnxcamError(f"cannot open the external weights {target} of {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise refuse("it is not a regular file")
        if st.st_nlink > 1:
            raise refuse(f"it has {st.st_nlink} hard links (it may be another file's data)")
        try:
            return f.read()
        except OSError as exc:
            raise OnnxcamError(f"cannot read the external weights {target} of {path}: {exc.strerror}") from None


def _all_tensors(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
