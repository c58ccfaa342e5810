"""Explain files: collect inputs (files, folders, globs), preprocess them in batches, run the explainer,
write overlays / maps atomically. This is what ``onnxcam explain`` does, usable from Python too.
"""
from __future__ import annotations

import glob
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import outputs, render
from .errors import OnnxcamError
from .explainer import Explainer, Explanation
from .preprocess import IMAGE_SUFFIXES, Preprocessing, read_image


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

    def summary(self) -> dict:
        return {"input": str(self.path), "method": self.method, "rank": self.rank, "class": self.target,
                "class_name": self.class_name, "score": round(float(self.score), 6), "nodes": self.nodes,
                "seconds": round(self.seconds, 6), "outputs": [str(p) for p in self.written]}


def collect_inputs(specs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images/.npy files, glob patterns expanded."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if any(ch in spec for ch in "*?[") and not path.exists():
            matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
            if not matches:
                raise OnnxcamError(f"pattern {spec!r} matches no file")
            found.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.iterdir()
                             if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".npy"))
            if not matches:
                raise OnnxcamError(f"folder {path} holds no image or .npy file")
            found.extend(matches)
        elif not path.exists():
            raise OnnxcamError(f"input {path} does not exist; check the path")
        else:
            found.append(path)
    return found


def load_input(path: Path, preprocessing: Preprocessing, model_rank: int | None) -> InputItem:
    """An image file through the preprocessing, or a .npy array already in the model's layout."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise OnnxcamError(f"input {path} is not a readable .npy array ({exc})") from exc
        if model_rank is not None and array.ndim == model_rank and array.shape[0] == 1:
            array = array[0]
        if model_rank is not None and array.ndim != model_rank - 1:
            raise OnnxcamError(f"input {path} has shape {array.shape}; the model takes rank {model_rank} "
                               "batches, so save one sample without the batch axis")
        return InputItem(path, np.asarray(array, np.float32), None)
    rgb = read_image(path)
    return InputItem(path, preprocessing.apply(rgb), rgb)


def output_stem(path: Path, method: str, rank: int | None) -> str:
    suffix = f"_top{rank}" if rank else ""
    return f"{path.stem}_{method.replace('+', 'pp')}{suffix}"


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
                 class_names: list[str] | None = None, batch_progress=None):
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
        self.class_names = class_names if class_names is not None else explainer.model.class_names

    def class_name(self, index: int) -> str | None:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return None

    def expected_outputs(self, path: Path) -> list[Path]:
        ranks = range(1, self.top_k + 1) if self.top_k else [None]
        if len(self.methods) > 1:
            return [self.out_dir / (output_stem(path, "all", r) + ".png") for r in ranks]
        return [self.out_dir / (output_stem(path, self.methods[0], r) + ".png") for r in ranks]

    def run(self, paths: list[Path]):
        """Yield FileResults batch by batch; inputs whose outputs exist are skipped unless overwrite.

        The next batch's files are decoded and preprocessed on a worker thread while the current
        batch runs (OpenCV and ONNX Runtime both release the GIL)."""
        protected = {p.resolve() for p in paths}
        todo = [p for p in paths if self.overwrite or not all(o.exists() for o in self.expected_outputs(p))]
        self.skipped = len(paths) - len(todo)
        batches = [todo[lo:lo + self.batch_size] for lo in range(0, len(todo), self.batch_size)]
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(self._load_batch, batches[0]) if batches else None
            for index in range(len(batches)):
                items, x = pending.result()
                if index + 1 < len(batches):
                    pending = reader.submit(self._load_batch, batches[index + 1])
                yield from self._explain_batch(items, x, protected)
                if self.batch_progress is not None:
                    self.batch_progress(min((index + 1) * self.batch_size, len(todo)), len(todo))

    def _load_batch(self, paths: list[Path]) -> tuple[list[InputItem], np.ndarray]:
        rank = self.explainer.model.input.rank
        items = [load_input(p, self.preprocessing, rank) for p in paths]
        shapes = {item.x.shape for item in items}
        if len(shapes) > 1:
            raise OnnxcamError(f"inputs of different shapes in one batch {sorted(shapes)}; "
                               "set --size so every image is resized alike")
        return items, np.stack([item.x for item in items])

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
            explanations: dict[str, Explanation] = {}
            for method in self.methods:
                explanations[method] = self.explainer.explain(
                    x, method=method, targets=targets, batch_size=self.batch_size,
                    max_channels=self.max_channels, progress=self.progress, target_mask=self.target_mask)
            for i, item in enumerate(items):
                yield from self._write(item, i, explanations, rank, rank_tag, protected)

    def _picture(self, item: InputItem, i: int, method: str, cam: np.ndarray) -> np.ndarray:
        """The picture written for sample ``i`` of the batch (detectors draw their box on it)."""
        return draw(item, cam, self.alpha)

    def _result(self, result: FileResult, i: int) -> FileResult:
        """The result reported for sample ``i`` of the batch (detectors add the box)."""
        return result

    def _write(self, item, i, explanations, rank, rank_tag, protected):
        results = []
        panels = [render.label_panel(item.rgb if item.rgb is not None else render.render_input(item.x),
                                      "input")] if len(explanations) > 1 else []
        for method, explanation in explanations.items():
            cam = explanation.maps[i]
            picture = self._picture(item, i, method, cam)
            stem = output_stem(item.path, method, rank_tag)
            written = []
            if len(explanations) == 1:
                written.append(outputs.write_png(self.out_dir / f"{stem}.png", picture, protected))
            else:
                panels.append(render.label_panel(picture, method))
            if self.save_npy or item.rgb is None:
                written.append(outputs.write_npy(self.out_dir / f"{stem}.npy", cam, protected))
            target = int(explanation.targets[i])
            results.append(self._result(FileResult(item.path, method, rank, target, self.class_name(target),
                                                   float(explanation.scores[i]), explanation.nodes,
                                                   explanation.seconds / len(explanation.maps), written, cam), i))
        if panels:
            grid_path = outputs.write_png(self.out_dir / (output_stem(item.path, "all", rank_tag) + ".png"),
                                          render.grid(panels, columns=min(5, len(panels))), protected)
            for result in results:
                result.written.insert(0, grid_path)
        yield from results
