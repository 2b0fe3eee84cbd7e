"""Safe image I/O: size limits against decompression bombs, truncated files detected, masks binarised."""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Biomedical 2D slices are at most a few thousand pixels a side; anything larger is refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageReadError(ValueError):
    """An image file that cannot be used, with the reason."""


def read_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a PNG/JPEG fully into a uint8 array (H, W) or (H, W, 3); refuse bombs and truncated files."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageReadError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()  # raises OSError on truncated data
            if im.mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif im.mode in ("I;16", "I", "F"):
                a = np.asarray(im).astype(np.float64)
                lo, hi = float(a.min()), float(a.max())
                arr = np.zeros(a.shape, np.uint8) if hi <= lo else ((a - lo) / (hi - lo) * 255).round().astype(np.uint8)
            else:
                arr = np.asarray(im.convert("RGB"))
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError("file does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"not a readable image ({type(e).__name__}: {e})") from None
    return arr


def read_mask(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A mask as a boolean (H, W) array: foreground is any value > 0 (8-bit 0/255 masks)."""
    arr = read_image(path, max_pixels)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 0


def write_png(path: Path, arr: np.ndarray) -> None:
    """Write uint8 or boolean arrays as PNG, deterministically (no timestamps in the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG", optimize=False, compress_level=6)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link of `src`, or a copy across file systems (or where links are not allowed); nothing to do
    when `dst` already is `src`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
