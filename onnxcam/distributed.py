"""Dataset-scale explanations on Ray Data: the same outputs as ``onnxcam explain``, on every core of a
machine or of a cluster.

Why Ray and not a scheduler of our own: Ray Data already gives batch inference what it needs (an actor
pool, back-pressure between reading and explaining, retries when a worker dies, progress), and the same
code runs on a laptop and on a cluster. The pipeline:

    paths --from_items--> decode + preprocess (Ray tasks, files.load_input)
          --map_batches--> actor pool; each actor holds one Explainer and one ONNX Runtime session
                           and writes its outputs through files.FileExplainer (atomic writes)
          --> summaries streamed back to the driver (or, with fmt="parquet", maps and summaries
              written as a Parquet dataset)

The model bytes go to the object store once; each actor rebuilds the augmented model from the on-disk
cache that the driver filled (same machine), or builds it once itself (another node). Resume and
per-file failures behave as in the single-process run: inputs whose outputs exist are skipped, an input
that cannot be read or explained is reported with its reason and the rest of the job goes on.

Outputs must go to a folder every worker can write (one machine, or a shared filesystem on a cluster).
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .detection_files import file_runner
from .errors import OnnxcamError
from .explainer import Explainer
from .files import FileExplainer, InputItem, load_input
from .image_header import DEFAULT_MAX_PIXELS
from .model import load_model
from .preprocess import Preprocessing

RAY_MISSING = "--engine ray needs Ray Data, which is not installed; pip install 'onnxcam[ray]'"
FORMATS = ("png", "parquet")
# Each actor and its decoding task together reserve --worker-threads CPUs: decoding needs little next to
# explaining, and actors reserving every CPU would starve the readers (Ray Data then waits forever).
DECODE_CPUS = 0.25
SUMMARY_FIELDS = ("input", "method", "rank", "class", "class_name", "score", "nodes", "seconds", "outputs",
                  "notice")
DETECTION_FIELD = "detection"           # detectors' summaries add the explained prediction and its box


def summary_fields(detection: bool) -> tuple[str, ...]:
    return SUMMARY_FIELDS + (DETECTION_FIELD,) if detection else SUMMARY_FIELDS


def require_ray():
    """The ``ray`` module with Ray Data, or the one-line error naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise OnnxcamError(RAY_MISSING) from exc
    return ray


@dataclass
class DatasetRun:
    """What a distributed run did; ``results`` holds the same summaries as the single-process run."""
    results: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)       # {"input": path, "error": message}
    skipped: int = 0
    backend: str | None = None
    parquet: Path | None = None


# ---- the pipeline's stages (module level: Ray pickles them by reference) ---------------------------

def _pack(array: np.ndarray | None) -> bytes:
    """Arrays travel as .npy bytes: rows of any shape fit one binary column (photos differ in size)."""
    if array is None:
        return b""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _unpack(data) -> np.ndarray | None:
    return np.load(io.BytesIO(bytes(data)), allow_pickle=False) if data is not None and len(data) else None


def _decode(row: dict, preprocessing: Preprocessing, rank: int | None, max_pixels: int | None) -> dict:
    """One input row -> preprocessed array (and the photo for overlays), or the reason it failed.

    Rows hold a ``path`` and optionally an ``image`` (RGB uint8, H x W x 3) or an ``x`` already in the
    model's layout; a path alone is read from disk with files.load_input."""
    path = str(row["path"])
    given = {"input": str(row.get("input") or path)}
    try:
        if row.get("x") is not None:
            x, rgb = np.asarray(row["x"], np.float32), None
        elif row.get("image") is not None:
            rgb = np.ascontiguousarray(row["image"], np.uint8)
            if rgb.ndim != 3 or rgb.shape[-1] != 3:
                raise OnnxcamError(f"input {path}: image of shape {rgb.shape} is not RGB (H, W, 3)")
            x = preprocessing.apply(rgb)
        else:
            item = load_input(Path(path), preprocessing, rank, max_pixels)
            x, rgb = item.x, item.rgb
    except OnnxcamError as exc:     # worded with the path as given, as the single-process run does
        return {"path": path, **given, "x": b"", "rgb": b"", "error": str(exc).replace(path, given["input"])}
    return {"path": path, **given, "x": _pack(x), "rgb": _pack(rgb), "error": ""}


def _rows(result, with_map: bool) -> dict:
    row = result.summary()
    row["nodes"] = list(row["nodes"])
    row["error"] = None
    row["skipped"] = False
    if with_map:
        row["map"] = np.ravel(result.map).astype(np.float32).tolist()
        row["map_shape"] = list(result.map.shape)
    return row


def _failure(path: str, message: str | None, with_map: bool, skipped: bool = False,
             detection: bool = False) -> dict:
    row = {key: None for key in summary_fields(detection)}
    row.update(input=path, nodes=[], outputs=[], error=message, skipped=skipped)
    if with_map:
        row.update(map=[], map_shape=[])
    return row


class _ExplainWorker:
    """One actor of the pool: one Explainer (one ONNX Runtime session, ``threads`` threads) and the
    single-process writer, built once and reused for every batch it is given."""

    def __init__(self, model, nodes, explainer_options, preprocessing, out_dir, methods, file_options,
                 threads, write_files, protected, names=None, skip_done=False, detection=None):
        import ray
        model, protected, names = (ray.get(v) if isinstance(v, ray.ObjectRef) else v
                                   for v in (model, protected, names))
        proto = onnx.load_from_string(model) if isinstance(model, (bytes, bytearray)) else model
        explainer = Explainer(proto, nodes, threads=threads, **explainer_options)
        self.runner = file_runner(explainer, preprocessing, out_dir, methods, detection,
                                  write_files=write_files, **file_options)
        self.detection = detection is not None
        if names is not None:               # the run's inputs as given: outputs named as in one process
            self.runner.name_outputs([Path(n) for n in names])
        self.protected = protected
        self.with_map = not write_files
        self.skip_done = skip_done          # rows of a user's Dataset: resume is checked here

    def __call__(self, batch: dict) -> "pyarrow.Table":  # noqa: F821
        import pyarrow as pa
        rows, items = [], []
        for given, x, rgb, error in zip(batch["input"], batch["x"], batch["rgb"], batch["error"]):
            given = Path(str(given))        # names the outputs and the results; read as path already
            if error:
                rows.append(self._failure(str(given), str(error)))
            elif self.skip_done and not self.runner.overwrite and all(
                    o.exists() for o in self.runner.expected_outputs(given)):
                rows.append(self._failure(str(given), None, skipped=True))
            else:
                items.append(InputItem(given, _unpack(x), _unpack(rgb)))
        groups: dict[tuple, list[InputItem]] = {}
        for item in items:                      # photos resized alike share one batch
            groups.setdefault(item.x.shape, []).append(item)
        for group in groups.values():
            rows.extend(self._explain(group))
        return pa.Table.from_pylist(rows, schema=_schema(self.with_map, self.detection))

    def _failure(self, path: str, message: str | None, skipped: bool = False) -> dict:
        return _failure(path, message, self.with_map, skipped, self.detection)

    def _explain(self, items: list[InputItem]) -> list[dict]:
        try:
            return [_rows(r, self.with_map) for r in self.runner.explain_items(items, self.protected)]
        except OnnxcamError as exc:
            if len(items) == 1:
                return [self._failure(str(items[0].path), str(exc))]
        # one bad input must not fail the batch: explain each alone to find which one it was
        return [row for item in items for row in self._explain([item])]


def _schema(with_map: bool, detection: bool = False):
    import pyarrow as pa
    fields = [("input", pa.string()), ("method", pa.string()), ("rank", pa.int32()), ("class", pa.int64()),
              ("class_name", pa.string()), ("score", pa.float64()), ("nodes", pa.list_(pa.string())),
              ("seconds", pa.float64()), ("outputs", pa.list_(pa.string())), ("error", pa.string()),
              ("skipped", pa.bool_()), ("notice", pa.string())]
    if detection:       # as detection.Detection.summary writes it; null for EigenCAM (no prediction)
        fields.append((DETECTION_FIELD, pa.struct([("prediction", pa.int64()), ("class", pa.int64()),
                                                   ("confidence", pa.float64()),
                                                   ("box", pa.list_(pa.float64()))])))
    if with_map:
        fields += [("map", pa.list_(pa.float32())), ("map_shape", pa.list_(pa.int32()))]
    return pa.schema(fields)


# ---- the driver -----------------------------------------------------------------------------------

def connect(address: str | None = None, **init_options):
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` runs here; ``HOST:PORT``), or
    start a local one on this machine's cores when ``address`` is None and none runs yet."""
    ray = require_ray()
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_options)
        except ConnectionError as exc:
            raise OnnxcamError(f"cannot reach a Ray cluster at {address!r} ({exc}); start one with "
                               "`ray start --head` or drop --ray-address to use this machine") from exc
    return ray


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A HOST:PORT that does not answer is an error now: Ray itself would retry for minutes."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    import socket
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise OnnxcamError(f"no Ray cluster answers at {address} ({exc}); start one there with "
                           "`ray start --head`, or drop --ray-address to use this machine") from exc


def explain_dataset(model, inputs, out_dir="onnxcam_out", *, nodes=("auto",), methods=("gradcam",),
                    preprocessing: Preprocessing | None = None, explainer_options: dict | None = None,
                    workers: int | None = None, worker_threads: int = 1, fmt: str = "png",
                    address: str | None = None, on_result=None, detection: dict | None = None,
                    **file_options) -> DatasetRun:
    """Explain many inputs on a Ray cluster; outputs as ``files.FileExplainer`` writes them.

    ``inputs``: file paths, or a ``ray.data.Dataset`` with a ``path`` column (names the outputs) and
    optionally ``image`` (RGB uint8) or ``x`` (preprocessed, the model's layout). ``workers``: actors in
    the pool (default: the cluster's CPUs // ``worker_threads``). ``fmt="parquet"`` writes maps and
    summaries as a Parquet dataset into ``out_dir`` instead of PNG/.npy files. ``file_options`` are
    FileExplainer's (target, top_k, alpha, save_npy, batch_size, overwrite, max_channels, target_mask,
    class_names, max_pixels); ``explainer_options`` are Explainer's (provider, grad_backend, layout,
    probabilities, input_shape, cache, input, feeds, output, class_axis). ``on_result(summary)`` is
    called for each result as it arrives. ``detection``: explain a detector as ``onnxcam explain`` does,
    with ``DetectionFileExplainer``'s options (fmt, detection_index, box, confidence, iou_threshold); each
    summary then names the explained prediction and its box. A Dataset's ``path`` stems name its outputs, so they must be
    unique; file paths are named as the single-process run names them.
    """
    if fmt not in FORMATS:
        raise OnnxcamError(f"unknown format {fmt!r}; use png or parquet")
    if worker_threads < 1 or (workers is not None and workers < 1):
        raise OnnxcamError("--workers and --worker-threads must be at least 1")
    ray = connect(address)
    loaded = load_model(model, (explainer_options or {}).get("input"))
    explainer_options = dict(explainer_options or {}, input=loaded.input.name)
    preprocessing = preprocessing or Preprocessing.from_metadata(loaded.preprocess, loaded.input.shape)
    nodes, methods = list(nodes), list(methods)
    # Built here first: bad flags fail before any worker starts, and the augmented model lands in the
    # on-disk cache that actors on this machine then read instead of building it again.
    explainer = Explainer(loaded, nodes, **explainer_options)
    for method in methods:
        explainer.check_method(method)
    parquet = fmt == "parquet"
    runner = file_runner(explainer, preprocessing, out_dir, methods, detection, write_files=not parquet,
                         **file_options)
    if parquet and runner.overwrite:
        raise OnnxcamError("--overwrite cannot rewrite a Parquet dataset in place; pass a new --out folder")
    run = DatasetRun(backend=explainer.gradient_backend_used, parquet=runner.out_dir if parquet else None)

    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // worker_threads))
    user_rows = isinstance(inputs, ray.data.Dataset)
    dataset, protected = _dataset(ray, inputs, runner, parquet, run)
    proto = loaded.proto
    shipped = ray.put(proto.SerializeToString() if proto.ByteSize() < 2**31 - 1 else loaded.path)
    max_pixels = file_options.get("max_pixels", DEFAULT_MAX_PIXELS)
    decoded = dataset.map(functools.partial(_decode, preprocessing=preprocessing, rank=loaded.input.rank,
                                            max_pixels=max_pixels),
                          num_cpus=DECODE_CPUS, compute=ray.data.TaskPoolStrategy(size=workers))
    explained = decoded.map_batches(
        _ExplainWorker, batch_size=runner.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=worker_threads - DECODE_CPUS,
        fn_constructor_kwargs=dict(model=shipped, nodes=nodes, explainer_options=explainer_options,
                                   preprocessing=preprocessing, out_dir=str(runner.out_dir.resolve()),
                                   methods=methods, file_options=file_options, threads=worker_threads,
                                   write_files=not parquet, protected=ray.put(protected),
                                   names=None if user_rows else ray.put([str(p) for p in inputs]),
                                   skip_done=user_rows and not parquet, detection=detection))
    try:
        _collect(explained, runner.out_dir, parquet, run, on_result, summary_fields(detection is not None))
    except (OnnxcamError, KeyboardInterrupt):
        raise
    except Exception as exc:        # Ray wraps a worker's error in its own exceptions: one line instead
        raise OnnxcamError(f"the Ray job failed: {_reason(exc)}") from exc
    order = {str(p): i for i, p in enumerate(inputs)} if not user_rows else {}
    run.results.sort(key=lambda s: (order.get(s["input"], -1), s["input"], s["rank"], methods.index(s["method"])))
    return run


def _reason(exc: BaseException) -> str:
    """The innermost cause's message: an OnnxcamError raised in a worker keeps its own words."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OnnxcamError):
            return str(exc)
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _collect(explained, out_dir: Path, parquet: bool, run: DatasetRun, on_result,
             fields: tuple[str, ...] = SUMMARY_FIELDS) -> None:
    """Run the pipeline and gather its summaries (streamed back, or read after the Parquet write);
    output paths are reported under ``out_dir`` as given, as the single-process run does."""
    absolute = out_dir.resolve()
    parquet_dir = absolute if parquet else None
    if parquet_dir is not None:
        explained = explained.materialize()
        explained.write_parquet(str(parquet_dir))
        rows = explained.drop_columns(["map", "map_shape"]).iter_rows()
    else:
        rows = explained.iter_rows()
    seen = set()
    for row in rows:
        key = (row["input"], row["rank"], row["method"])
        if key in seen:                  # a batch retried after its worker died: reported once
            continue
        seen.add(key)
        if row["skipped"]:
            run.skipped += 1
            continue
        if row["error"]:
            run.failed.append({"input": row["input"], "error": row["error"]})
            continue
        summary = {key: row[key] for key in fields}
        summary["nodes"] = list(summary["nodes"])
        summary["outputs"] = [str(out_dir / Path(o).relative_to(absolute)) for o in summary["outputs"]]
        run.results.append(summary)
        if on_result is not None:
            on_result(summary)


def _dataset(ray, inputs, runner: FileExplainer, parquet: bool, run: DatasetRun):
    """The rows still to explain (resume) and the input files no output may overwrite."""
    if isinstance(inputs, ray.data.Dataset):
        if not parquet:
            return inputs, frozenset()        # the workers skip what is done (they know the outputs)
        return inputs.filter(functools.partial(_not_done, done=_parquet_done(runner.out_dir))), frozenset()
    paths = [Path(p) for p in inputs]
    if parquet:
        done = _parquet_done(runner.out_dir)
        todo = [p for p in paths if str(p) not in done]
    else:
        todo = runner.prepare(paths)
    run.skipped = len(paths) - len(todo)
    # one block per batch: blocks are what Ray hands out, so one block would keep one actor busy
    blocks = max(1, -(-len(todo) // runner.batch_size))
    # absolute paths: workers of a cluster do not run in the driver's folder
    return (ray.data.from_items([{"path": str(p.resolve()), "input": str(p)} for p in todo],
                                override_num_blocks=blocks),
            frozenset(p.resolve() for p in paths))


def _not_done(row: dict, done: set[str]) -> bool:
    return str(row["path"]) not in done


def _parquet_done(folder: Path) -> set[str]:
    """Inputs a previous Parquet run explained without error (a rerun skips them)."""
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return set()
    import pyarrow.parquet as pq
    done = set()
    for file in files:
        try:
            table = pq.read_table(file, columns=["input", "error"])
        except Exception:            # a file cut short by a killed job: its inputs are explained again
            continue
        done.update(i for i, e in zip(table.column("input").to_pylist(), table.column("error").to_pylist())
                    if not e)
    return done

