"""Ground-truth boxes from Pascal VOC XML, COCO JSON or CSV, matched to inputs by file name.

Every format is read into continuous pixel coordinates of the original image, (x1, y1, x2, y2) with
pixel column c covering [c, c + 1): VOC's 1-based inclusive corners become (xmin - 1, ymin - 1, xmax,
ymax); COCO's [x, y, width, height] becomes (x, y, x + width, y + height); CSV rows
``file,x1,y1,x2,y2,class`` are taken as they are (x2, y2 exclusive). The boxes are then scaled to the
map's grid (the model's input size) by the same factors the preprocessing's resize uses.
"""
from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import OnnxcamError
from .evaluator import GroundTruth

# file name -> list of (class label as written, (x1, y1, x2, y2))
BoxTable = dict[str, list[tuple[str, tuple[float, float, float, float]]]]


def load_boxes(path: str | Path) -> BoxTable:
    """Read a .xml (VOC, one image), a folder of VOC .xml files, a .json (COCO) or a .csv file."""
    path = Path(path)
    if not path.exists():
        raise OnnxcamError(f"--boxes {path} does not exist; give a VOC .xml (or folder of them), "
                           "a COCO .json or a .csv file")
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
        if not files:
            raise OnnxcamError(f"--boxes folder {path} holds no VOC .xml file")
        table: BoxTable = {}
        for file in files:
            for name, rows in _voc(file).items():
                table.setdefault(name, []).extend(rows)
        return table
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return _voc(path)
    if suffix == ".json":
        return _coco(path)
    if suffix == ".csv":
        return _csv(path)
    raise OnnxcamError(f"--boxes {path}: unknown format {suffix or '(no suffix)'}; use .xml (Pascal VOC), "
                       ".json (COCO) or .csv (file,x1,y1,x2,y2,class)")


def _number(text, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError) as exc:
        raise OnnxcamError(f"{where}: {text!r} is not a number") from exc
    if not np.isfinite(value):
        raise OnnxcamError(f"{where}: {text!r} is not a finite number")
    return value


def _checked(box: tuple[float, float, float, float], where: str):
    if box[2] <= box[0] or box[3] <= box[1]:
        raise OnnxcamError(f"{where}: box {box} is empty; x2 must exceed x1 and y2 exceed y1")
    return box


def _voc(path: Path) -> BoxTable:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise OnnxcamError(f"--boxes {path} is not readable Pascal VOC XML ({exc})") from exc
    filename = (root.findtext("filename") or "").strip() or path.stem
    rows = []
    for i, obj in enumerate(root.iter("object")):
        where = f"--boxes {path}, object {i + 1}"
        label, box = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        if not label or box is None:
            raise OnnxcamError(f"{where}: needs <name> and <bndbox>")
        x1, y1, x2, y2 = (_number(box.findtext(tag), f"{where} <{tag}>") for tag in ("xmin", "ymin", "xmax", "ymax"))
        rows.append((label, _checked((x1 - 1, y1 - 1, x2, y2), where)))
    return {filename: rows}


def _coco(path: Path) -> BoxTable:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {img["id"]: Path(img["file_name"]).name for img in data["images"]}
        categories = {cat["id"]: str(cat.get("name", cat["id"])) for cat in data.get("categories", [])}
        annotations = data["annotations"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise OnnxcamError(f"--boxes {path} is not COCO JSON with images, annotations and categories "
                           f"({type(exc).__name__}: {exc})") from exc
    table: BoxTable = {name: [] for name in images.values()}
    for i, ann in enumerate(annotations):
        where = f"--boxes {path}, annotation {i + 1}"
        try:
            name = images[ann["image_id"]]
            label = categories.get(ann["category_id"], str(ann["category_id"]))
            x, y, w, h = (_number(v, where) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OnnxcamError(f"{where}: needs image_id of a listed image, category_id and bbox "
                               f"[x, y, width, height]") from exc
        table[name].append((label, _checked((x, y, x + w, y + h), where)))
    return table


def _csv(path: Path) -> BoxTable:
    try:
        lines = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OnnxcamError(f"--boxes {path} is not a readable CSV file ({exc})") from exc
    table: BoxTable = {}
    for number, row in enumerate(lines, start=1):
        if not row or not "".join(row).strip():
            continue
        where = f"--boxes {path}, line {number}"
        if len(row) != 6:
            raise OnnxcamError(f"{where}: expected 6 columns file,x1,y1,x2,y2,class, got {len(row)}")
        if number == 1 and row[1].strip().lower() in ("x1", "xmin", "x0"):
            continue                                             # header
        coords = tuple(_number(v.strip(), where) for v in row[1:5])
        table.setdefault(Path(row[0].strip()).name, []).append((row[5].strip(), _checked(coords, where)))
    return table


def class_index(label: str, class_names: list[str] | None, num_classes: int, where: str = "--boxes") -> int:
    """A box's class: an index, or a class name of the model (case-insensitive)."""
    names = [n.lower() for n in class_names or []]
    if label.lower() in names:
        index = names.index(label.lower())
    elif label.lstrip("-").isdigit():
        index = int(label)
    else:
        raise OnnxcamError(f"{where}: class {label!r} is neither a class index nor a class name of this "
                           "model; use indices or pass --labels FILE with the names")
    if not 0 <= index < num_classes:
        raise OnnxcamError(f"{where}: class {index} is out of range: the model has {num_classes} classes")
    return index


def ground_truth(rows, class_names, num_classes: int, original_size: tuple[int, int],
                 map_size: tuple[int, int]) -> GroundTruth | None:
    """Boxes of one input, scaled from the original image (h, w) to the map grid (H, W)."""
    if not rows:
        return None
    sy, sx = map_size[0] / original_size[0], map_size[1] / original_size[1]
    per_class: dict[int, list] = {}
    for label, (x1, y1, x2, y2) in rows:
        per_class.setdefault(class_index(label, class_names, num_classes), []).append(
            (x1 * sx, y1 * sy, x2 * sx, y2 * sy))
    return GroundTruth({c: np.asarray(b, np.float64) for c, b in per_class.items()})
