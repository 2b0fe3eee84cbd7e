"""Pixel prompts (point, box, free-form) as binary prompt masks in the image's own pixel grid (REFERENCE §2)."""
from __future__ import annotations

import numpy as np

POINT_SIDE_AT_336 = 41  # MedPLIB: a point becomes a 41x41 square on the 336 px CLIP input


class PromptError(ValueError):
    """A pixel prompt that cannot be turned into a region: out of the image, empty or of the wrong size."""


def point_prompt_mask(x: int, y: int, height: int, width: int, side_at_336: int = POINT_SIDE_AT_336) -> np.ndarray:
    """A square around pixel (x, y), 41 px at 336 px scaled to the image's longer side, clipped to the image."""
    if not (0 <= x < width and 0 <= y < height):
        raise PromptError(f"Point ({x}, {y}) is outside the {width}x{height} image "
                          f"(x must be in [0, {width - 1}], y in [0, {height - 1}])")
    half = max(1, round(side_at_336 * max(height, width) / 336) // 2)
    mask = np.zeros((height, width), bool)
    mask[max(0, y - half): y + half + 1, max(0, x - half): x + half + 1] = True
    return mask


def box_prompt_mask(x1: int, y1: int, x2: int, y2: int, height: int, width: int) -> np.ndarray:
    """A filled rectangle with corners (x1, y1) and (x2, y2), both inclusive."""
    if not (x1 <= x2 and y1 <= y2):
        raise PromptError(f"Box ({x1}, {y1}, {x2}, {y2}) is empty: need x1 <= x2 and y1 <= y2")
    if not (0 <= x1 and 0 <= y1 and x2 < width and y2 < height):
        raise PromptError(f"Box ({x1}, {y1}, {x2}, {y2}) reaches outside the {width}x{height} image")
    mask = np.zeros((height, width), bool)
    mask[y1: y2 + 1, x1: x2 + 1] = True
    return mask


def freeform_prompt_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A free-form prompt drawn as a mask: checked for size and for at least one foreground pixel."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != (height, width):
        raise PromptError(f"Region mask is {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} but the image "
                          f"is {width}x{height}")
    mask = mask > 0
    if not mask.any():
        raise PromptError(f"Region mask ({width}x{height}) is empty: it has no foreground pixel")
    return mask
