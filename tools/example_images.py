"""Write the example photos (chelsea, coffee, rocket, astronaut) from scikit-image as PNG files.

They ship inside scikit-image, so nothing is downloaded; the README's demo command uses them.

    python tools/example_images.py [--out examples]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

EXAMPLE_NAMES = ("chelsea", "coffee", "rocket", "astronaut")


def write_example_images(out_dir: str | Path = "examples") -> list[Path]:
    """Save each photo as ``<out_dir>/<name>.png``; return the paths written."""
    from skimage import data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in EXAMPLE_NAMES:
        path = out_dir / f"{name}.png"
        rgb = getattr(data, name)()
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}; check that the folder is writable")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples", help="folder to write into (default: examples)")
    args = parser.parse_args()
    for path in write_example_images(args.out):
        print(path)


if __name__ == "__main__":
    main()
