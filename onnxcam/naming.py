"""Output names: one distinct name per input of a run, stable from run to run.

Rule: an input's outputs are named after its stem (``photos/cat.jpg`` -> ``cat_gradcam.png``) when
no other input of the run has that stem. Inputs sharing a stem get the suffix too
(``cat.jpg`` -> ``cat_jpg_gradcam.png``, ``cat.png`` -> ``cat_png_gradcam.png``); inputs that still
collide (the same file name in different folders) mirror their folder relative to the folder the
colliding inputs share (``x/cat.png`` -> ``x/cat_png_gradcam.png``, ``y/cat.png`` ->
``y/cat_png_gradcam.png``, under ``--out``). The same set of inputs always gives the same names, so a
resumed run finds what an interrupted one wrote.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path


def output_keys(paths: list[Path]) -> dict[Path, Path]:
    """Input path -> relative output stem path (folder parts + base name, without method/extension)."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        by_stem[p.stem].append(p)
    keys: dict[Path, Path] = {}
    for stem, group in by_stem.items():
        if len(group) == 1:
            keys[group[0]] = Path(stem)
            continue
        by_name: dict[str, list[Path]] = defaultdict(list)
        for p in group:
            by_name[_with_suffix(p)].append(p)
        for name, same in by_name.items():
            if len(same) == 1:
                keys[same[0]] = Path(name)
                continue
            parents = [os.path.abspath(p.parent) for p in same]
            common = os.path.commonpath(parents)
            for p, parent in zip(same, parents):
                keys[p] = Path(os.path.relpath(parent, common)) / name
    return _unique(keys)


def _unique(keys: dict[Path, Path]) -> dict[Path, Path]:
    """A derived name can equal another input's plain stem (``a.png`` + ``a.jpg`` + ``a_png.bmp``):
    later ones in sorted input order get ``_2``, ``_3``, ..."""
    seen: set[str] = set()
    out = {}
    for path in sorted(keys, key=str):
        key = keys[path]
        candidate, n = key, 1
        while str(candidate).lower() in seen:
            n += 1
            candidate = key.with_name(f"{key.name}_{n}")
        seen.add(str(candidate).lower())
        out[path] = candidate
    return out


def _with_suffix(path: Path) -> str:
    suffix = path.suffix.lstrip(".")
    return f"{path.stem}_{suffix}" if suffix else path.stem
