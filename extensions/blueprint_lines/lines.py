"""Clean line art from a scanned plan or CAD render: grey -> adaptive threshold -> speck removal -> thinning.

White 1-px lines on black, like the other line preprocessors. Dark-on-light (paper) and light-on-dark
(blueprint, CAD on black) drawings both work: the ink is whichever side the background is not.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

THRESHOLD_C = 8        # how much darker than its neighbourhood a pixel must be to count as ink


def blueprint_lines(image: Image.Image, resolution: int = 512, block_size: float = 31,
                    min_area: float = 24) -> Image.Image:
    image = _resize_short_side(image.convert("L"), int(resolution))
    grey = np.asarray(image, dtype=np.uint8)
    if np.median(grey) < 128:       # light lines on a dark background: make the ink dark
        grey = 255 - grey
    block = max(3, int(block_size) | 1)        # odd, >= 3
    ink = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, block, THRESHOLD_C)
    # the inside of a stroke wider than the block looks like "background" to the adaptive threshold:
    # the global (Otsu) threshold fills it, so thick walls thin to one centre line, not two outlines
    otsu, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    if otsu > 0:
        ink |= np.where(grey < otsu * 0.8, 255, 0).astype(np.uint8)
    ink = remove_small_blobs(ink, int(min_area))
    from skimage.morphology import skeletonize  # 0.7 s of scipy imports: not at server start
    lines = skeletonize(ink > 0)
    return Image.fromarray((lines * 255).astype(np.uint8)).convert("RGB")


def remove_small_blobs(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected blobs with fewer than ``min_area`` pixels (dust, scanner specks, stray text dots)."""
    if min_area <= 1:
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return np.where(keep[labels], 255, 0).astype(np.uint8)


def _resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    w, h = image.size
    if resolution <= 0 or min(w, h) == resolution:
        return image
    scale = resolution / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
