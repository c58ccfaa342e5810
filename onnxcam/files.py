"""Explain files: collect inputs (files, folders, globs), preprocess them in batches, run the explainer,
write overlays / maps atomically. This is what ``onnxcam explain`` does, usable from Python too.
"""
from __future__ import annotations

import glob
import io
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import outputs, render
from .atomic import remove_stale_temps
from .errors import OnnxcamError
from .explainer import Explainer, Explanation
from .image_header import DEFAULT_MAX_PIXELS
from .naming import output_keys
from .preprocess import IMAGE_SUFFIXES, Preprocessing, read_image, read_regular_file
from .runtime import first_line
from .profile import phase


@dataclass
class InputItem:
    path: Path
    x: np.ndarray                  # preprocessed, no batch axis
    rgb: np.ndarray | None         # the original photo, for overlays (None for .npy inputs)


@dataclass
class FileResult:
    path: Path
    method: str
    rank: int                      # 1 for the single target, 1..k with --top-k
    target: int
    class_name: str | None
    score: float
    nodes: list[str]
    seconds: float
    written: list[Path] = field(default_factory=list)
    map: np.ndarray | None = None
    notice: str | None = None      # why a map shows nothing (see map_notice)

    def summary(self) -> dict:
        return {"input": str(self.path), "method": self.method, "rank": self.rank, "class": self.target,
                "class_name": self.class_name,
                "score": round(float(self.score), 6) if np.isfinite(self.score) else None, "nodes": self.nodes,
                "seconds": round(self.seconds, 6), "outputs": [str(p) for p in self.written],
                "notice": self.notice}


def map_notice(method: str, cam: np.ndarray, target: int, nodes: list[str]) -> str | None:
    """A word when a map shows nothing, and why, so that a blank overlay is never silent."""
    if cam.size and float(cam.max()) > float(cam.min()):
        return None
    where = ", ".join(nodes)
    if float(cam.max()) == 0.0:
        if method in ("gradcam", "xgradcam", "hirescam"):
            return (f"the map is zero everywhere: the evidence for class {target} at node {where} is negative "
                    "everywhere; LayerCAM or Grad-CAM++ show the positive part")
        return (f"the map is zero everywhere: the weighted activations for class {target} at node {where} "
                "are nowhere positive")
    return f"the map is constant at node {where}: nothing in the input stands out for class {target}"


INPUT_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")


def collect_inputs(specs: list[str]) -> list[Path]:
    """Files as given, folders and glob patterns expanded to their regular image/.npy files (the
    same filter for both), each file once."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if any(ch in spec for ch in "*?[") and not os.path.lexists(spec):
            matches = sorted(p for p in map(Path, glob.glob(spec)) if _is_input_file(p))
            if not matches:
                raise OnnxcamError(f"pattern {spec!r} matches no image or .npy file")
            found.extend(matches)
        elif os.path.isdir(spec):
            try:
                matches = sorted(p for p in path.iterdir() if _is_input_file(p))
            except OSError as exc:
                raise OnnxcamError(f"cannot list folder {path} ({exc.strerror})") from None
            if not matches:
                raise OnnxcamError(f"folder {path} holds no image or .npy file")
            found.extend(matches)
        elif not _lexists(spec):
            raise OnnxcamError(f"input {path} does not exist; check the path")
        else:
            found.append(path)
    unique, seen = [], set()
    for p in found:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _lexists(spec: str) -> bool:
    """False only when the path certainly does not exist (a permission error is for the reader to
    report, with its reason)."""
    try:
        os.lstat(spec)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _is_input_file(path: Path) -> bool:
    """A regular file (links followed) with an image or .npy suffix: FIFOs, devices and folders are
    never read from a folder or a pattern."""
    try:
        return path.suffix.lower() in INPUT_SUFFIXES and stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def load_input(path: Path, preprocessing: Preprocessing, model_rank: int | None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> InputItem:
    """An image file through the preprocessing, or a .npy array already in the model's layout."""
    if path.suffix.lower() == ".npy":
        array = load_npy(path)
        if model_rank is not None and array.ndim == model_rank and array.shape[0] == 1:
            array = array[0]
        if model_rank is not None and array.ndim != model_rank - 1:
            raise OnnxcamError(f"input {path} has shape {array.shape}; the model takes rank {model_rank} "
                               "batches, so save one sample without the batch axis")
        return InputItem(path, array, None)
    rgb = read_image(path, max_pixels)
    return InputItem(path, preprocessing.apply(rgb), rgb)


def load_npy(path: Path) -> np.ndarray:
    """A finite numeric float32 array from a .npy file (no pickles, strings or records)."""
    data = read_regular_file(path)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except MemoryError:
        raise OnnxcamError(f"not enough memory to load {path}") from None
    except Exception as exc:
        raise OnnxcamError(f"input {path} is not a readable .npy array ({first_line(exc)})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf" or array.dtype.names:
        raise OnnxcamError(f"input {path} holds {array.dtype} values; save a numeric (float or integer) "
                           "array")
    with np.errstate(over="ignore", invalid="ignore"):   # beyond float32 becomes inf, refused below
        array = np.asarray(array, np.float32)
    if array.size == 0:
        raise OnnxcamError(f"input {path} is an empty array {array.shape}")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise OnnxcamError(f"input {path} holds {bad} NaN or infinite value(s) (or values beyond float32); "
                           "replace them before explaining")
    return array


def output_stem(path: Path, method: str, rank: int | None) -> str:
    return stem_text(path.stem, method, rank)


def stem_text(name: str, method: str, rank: int | None) -> str:
    suffix = f"_top{rank}" if rank else ""
    return f"{name}_{method.replace('+', 'pp')}{suffix}"


def draw(item: InputItem, cam: np.ndarray, alpha: float) -> np.ndarray:
    """A picture for a person: overlay on the photo, or a plot of the map for .npy inputs."""
    if item.rgb is not None:
        return render.overlay(item.rgb, cam, alpha)
    return render.render_map(item.x, cam)


class FileExplainer:
    """Runs ``explainer`` over files and writes results into ``out_dir``."""

    def __init__(self, explainer: Explainer, preprocessing: Preprocessing, out_dir: str | Path,
                 methods: list[str], target=None, top_k: int | None = None, alpha: float = 0.5,
                 save_npy: bool = False, batch_size: int = 16, overwrite: bool = False,
                 max_channels: int | None = None, progress=None, target_mask=None,
                 class_names: list[str] | None = None, batch_progress=None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, fail_fast: bool = False, on_failure=None,
                 write_files: bool = True):
        if top_k is not None and target is not None:
            raise OnnxcamError("--target and --top-k exclude each other; pass one of them")
        self.explainer = explainer
        self.preprocessing = preprocessing
        self.out_dir = outputs.prepare_dir(out_dir)
        self.methods = methods
        self.target = target
        self.top_k = top_k
        self.alpha = alpha
        self.save_npy = save_npy
        self.batch_size = max(1, int(batch_size))
        self.overwrite = overwrite
        self.max_channels = max_channels
        self.progress = progress
        self.batch_progress = batch_progress      # callable(done, total) after each batch of files
        self.target_mask = target_mask
        self.max_pixels = max_pixels
        self.fail_fast = fail_fast
        self.on_failure = on_failure              # callable(path, message) for each skipped input
        self.failures: list[tuple[Path, str]] = []
        self.skipped = 0
        self._keys: dict[Path, Path] = {}
        self.class_names = class_names if class_names is not None else explainer.model.class_names
        self.write_files = write_files            # False: results carry their maps, nothing is written

    def class_name(self, index: int) -> str | None:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return None

    def output_path(self, path: Path, method: str, rank: int | None, ext: str) -> Path:
        """Where ``path``'s output goes (naming.output_keys: unique per input of the run)."""
        key = self._keys.get(path) or Path(path.stem)
        return self.out_dir / key.parent / (stem_text(key.name, method, rank) + ext)

    def expected_outputs(self, path: Path) -> list[Path]:
        """Every file a run writes for ``path``: the PNG (or grid) and, when asked or for .npy
        inputs, one .npy per method, for each rank."""
        ranks = range(1, self.top_k + 1) if self.top_k else [None]
        npy = self.save_npy or path.suffix.lower() == ".npy"
        out = []
        for r in ranks:
            out.append(self.output_path(path, "all" if len(self.methods) > 1 else self.methods[0], r, ".png"))
            if npy:
                out.extend(self.output_path(path, m, r, ".npy") for m in self.methods)
        return out

    def run(self, paths: list[Path]):
        """Yield FileResults batch by batch; inputs whose outputs all exist are skipped unless overwrite.

        Inputs that cannot be read are reported (``on_failure``, ``failures``) and skipped, or stop
        the run with ``fail_fast`` (and when there is only one input). Our temporary files left in
        the output folders by killed runs are removed first. The next batch's files are decoded and
        preprocessed on a worker thread while the current batch runs (OpenCV and ONNX Runtime both
        release the GIL)."""
        self.failures = []
        self.fail_fast = self.fail_fast or len(paths) == 1
        protected = {p.resolve() for p in paths}
        todo = self.prepare(paths)
        self.skipped = len(paths) - len(todo)
        batches = [todo[lo:lo + self.batch_size] for lo in range(0, len(todo), self.batch_size)]
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(self._load_batch, batches[0]) if batches else None
            for index in range(len(batches)):
                items, x, failed = pending.result()
                for path, message in failed:
                    self._failed(path, message)
                if index + 1 < len(batches):
                    pending = reader.submit(self._load_batch, batches[index + 1])
                if items:
                    yield from self._explain_batch(items, x, protected)
                if self.batch_progress is not None:
                    self.batch_progress(min((index + 1) * self.batch_size, len(todo)), len(todo))

    def name_outputs(self, paths: list[Path]) -> None:
        """Fix the output names of this run's inputs (naming.output_keys: unique among ``paths``)."""
        self._keys = output_keys(paths)

    def prepare(self, paths: list[Path]) -> list[Path]:
        """Name the outputs, remove the temporaries killed runs left in their folders, and return the
        inputs still to explain: all with ``overwrite``, else those missing an output (resume)."""
        started = time.time()
        self.name_outputs(paths)
        for folder in {self.out_dir / key.parent for key in self._keys.values()}:
            remove_stale_temps(folder, started)
        return [p for p in paths if self.overwrite or not all(o.exists() for o in self.expected_outputs(p))]

    def explain_items(self, items: list[InputItem], protected: set[Path] = frozenset()):
        """Explain one batch of loaded inputs (named by ``name_outputs``) and write its outputs; yields
        one FileResult per map. The single-process run and the Ray workers (onnxcam.distributed) both
        write through here."""
        shapes = {item.x.shape for item in items}
        if len(shapes) > 1:
            raise OnnxcamError(f"inputs of different shapes in one batch {sorted(shapes)}; "
                               "set --size so every image is resized alike")
        yield from self._explain_batch(items, np.stack([item.x for item in items]), protected)

    def _failed(self, path: Path, message: str) -> None:
        if self.fail_fast:
            raise OnnxcamError(message)
        self.failures.append((path, message))
        if self.on_failure is not None:
            self.on_failure(path, message)

    def _load_batch(self, paths: list[Path]):
        with phase("reading"):
            return self._read_batch(paths)

    def _read_batch(self, paths: list[Path]):
        rank = self.explainer.model.input.rank
        items, failed = [], []
        for p in paths:
            try:
                items.append(load_input(p, self.preprocessing, rank, self.max_pixels))
            except OnnxcamError as exc:
                failed.append((p, str(exc)))
                if self.fail_fast:
                    break
        shapes = {item.x.shape for item in items}
        if len(shapes) > 1:
            raise OnnxcamError(f"inputs of different shapes in one batch {sorted(shapes)}; "
                               "set --size so every image is resized alike")
        return items, (np.stack([item.x for item in items]) if items else None), failed

    def _targets_per_rank(self, x: np.ndarray) -> list[np.ndarray | int | None]:
        if self.top_k is None:
            return [self.target]
        logits = self.explainer.forward(x)[0]
        if self.top_k > logits.shape[1]:
            raise OnnxcamError(f"--top-k {self.top_k} is larger than the model's {logits.shape[1]} classes")
        order = np.argsort(-logits, axis=1, kind="stable")[:, : self.top_k]
        return [order[:, r] for r in range(self.top_k)]

    def _explain_batch(self, items: list[InputItem], x: np.ndarray, protected: set[Path]):
        for rank, targets in enumerate(self._targets_per_rank(x), start=1):
            rank_tag = rank if self.top_k else None
            # every method from one run of the model (explain_many): --method all costs one pass
            with phase("run"):
                explanations: dict[str, Explanation] = self.explainer.explain_many(
                    x, self.methods, targets=targets, batch_size=self.batch_size,
                    max_channels=self.max_channels, progress=self.progress, target_mask=self.target_mask)
            for i, item in enumerate(items):
                with phase("writing"):
                    written = list(self._write(item, i, explanations, rank, rank_tag, protected))
                yield from written

    def _picture(self, item: InputItem, i: int, method: str, cam: np.ndarray) -> np.ndarray:
        """The picture written for sample ``i`` of the batch (detectors draw their box on it)."""
        return draw(item, cam, self.alpha)

    def _write(self, item, i, explanations, rank, rank_tag, protected):
        if not self.write_files:
            yield from self._results(item, i, explanations, rank)
            return
        results = []
        multi = len(explanations) > 1
        if multi and item.rgb is not None:  # grids: panels of a downscaled photo (bounded memory)
            item = InputItem(item.path, item.x, render.fit_for_grid(item.rgb))
        folder = self.output_path(item.path, "x", None, "").parent
        if folder != self.out_dir:
            outputs.prepare_dir(folder)
        panels = [render.label_panel(item.rgb if item.rgb is not None else render.render_input(item.x),
                                      "input")] if multi else []
        for method, explanation in explanations.items():
            cam = explanation.maps[i]
            written = []
            if self.save_npy or item.rgb is None:   # the .npy first: the picture marks the input done
                written.append(outputs.write_npy(self.output_path(item.path, method, rank_tag, ".npy"),
                                                 cam, protected))
            picture = self._picture(item, i, method, cam)
            if not multi:
                written.insert(0, outputs.write_png(self.output_path(item.path, method, rank_tag, ".png"),
                                                    picture, protected, consume=True))
                del picture
            else:
                panels.append(render.label_panel(picture, method))
            results.append(self._result(item, i, method, explanation, rank, written))
        if panels:
            grid_path = outputs.write_png(self.output_path(item.path, "all", rank_tag, ".png"),
                                          render.grid(panels, columns=min(5, len(panels))), protected)
            for result in results:
                result.written.insert(0, grid_path)
        yield from results

    def _result(self, item, i, method, explanation, rank, written) -> FileResult:
        cam = explanation.maps[i]
        target = int(explanation.targets[i])
        return FileResult(item.path, method, rank, target, self.class_name(target),
                          float(explanation.scores[i]), explanation.nodes,
                          explanation.seconds / len(explanation.maps), written, cam,
                          map_notice(method, cam, target, explanation.nodes))

    def _results(self, item, i, explanations, rank):
        """Results without files (``write_files=False``: the maps go elsewhere, e.g. Parquet)."""
        for method, explanation in explanations.items():
            yield self._result(item, i, method, explanation, rank, [])
