"""Say what a picture shows, without learned weights: the main object's colour, shape, texture, mask and box, and the
background colour, each with confidences and distances so tests can measure "how red" or "how circular".

How: the background is the dominant colour of the picture's border (named by the nearest palette colour in Lab);
the object is the largest connected region far from it, cut at half the Lab distance between background and
object colour (the 50 % coverage line of an anti-aliased edge); its colour is the majority palette name of its
interior; its shape is the world outline that, laid on its silhouette with the same area and centroid and blurred
like the picture's own edges, overlaps it best (plus a hole-share term that tells rings from circles); stripes are
a second colour that splits the interior into bands along one direction. Scale-free contour features (solidity,
circularity, ...) are reported alongside. Any picture size works: it is resampled to WORK_SIDE first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..errors import StudioError
from . import shapes as geometry
from .palette import ALL_SHAPES, COLOURS, POSITIONS, SIZES

WORK_SIDE = 128          # the picture's longer side while scoring: small pictures gain sub-pixel edges
BORDER = 0.03            # width of the border band that decides the background, as a fraction of the side
MIN_OBJECT = 0.002       # smallest object, as a fraction of the picture's area
STRIPE_MIN_SHARE = 0.12  # share of the interior a second colour needs before it can count as stripes

FEATURES = ("hole", "solidity", "extent", "circularity", "aspect", "balance", "vertices", "blur")


@dataclass(frozen=True)
class Score:
    """What the scorer found; lower distances are nearer. Colour distances are Lab ΔE76 from the object's (or the
    background's) median colour to each palette colour; shape distances are 1 - IoU with each shape's outline
    plus the hole-share mismatch (0 is a perfect match).

    ``found`` is False when no object stands out from the background; shape / colour are then None.
    ``mask`` is a bool array at the input picture's size; ``box`` is (x0, y0, x1, y1) in its pixels (exclusive).
    """

    background: str
    background_confidence: float
    background_distances: dict[str, float]
    found: bool
    shape: str | None = None
    shape_confidence: float = 0.0
    shape_distances: dict[str, float] = field(default_factory=dict)
    colour: str | None = None
    colour_confidence: float = 0.0
    colour_distances: dict[str, float] = field(default_factory=dict)
    colour_fractions: dict[str, float] = field(default_factory=dict)
    texture: str | None = None
    texture_confidence: float = 0.0
    size: str | None = None
    position: str | None = None
    box: tuple[int, int, int, int] | None = None
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    area_fraction: float = 0.0
    features: dict[str, float] = field(default_factory=dict)

    def shows(self, concept: str) -> bool:
        """Whether the picture shows ``concept``: a shape, colour, texture, size or position name, or
        "<colour> background"."""
        if concept.endswith(" background"):
            return self.background == concept[: -len(" background")]
        return self.found and concept in (self.shape, self.colour, self.texture, self.size, self.position)

    def matches(self, label) -> dict[str, bool]:
        """Which of a world Label's attributes this score agrees with."""
        return {"shape": self.shape == label.shape, "colour": self.colour == label.colour,
                "background": self.background == label.background, "texture": self.texture == label.texture,
                "size": self.size == label.size, "position": self.position == label.position}


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Intersection over union of two bool masks of one size."""
    if a is None or b is None:
        return 0.0
    if a.shape != b.shape:
        raise StudioError(f"Masks of sizes {a.shape} and {b.shape} cannot be compared.", field="mask",
                          fix="score pictures of the same size, or resize one mask first")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _rgb01(image) -> np.ndarray:
    """An (H, W, 3) float32 array in 0..1 from a PIL image or an array (uint8 0..255 or float 0..1)."""
    if hasattr(image, "convert"):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) < 8:
        raise StudioError(f"Cannot score an array of shape {arr.shape}.", field="image",
                          fix="pass a PIL image or an (H, W, 3) array of at least 8x8 pixels")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _lab(rgb01: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb01, dtype=np.float32), cv2.COLOR_RGB2Lab)


def _palette_lab() -> np.ndarray:
    return _lab(np.array([[c for _, c in COLOURS]], np.float32) / 255.0)[0]


def _nearest(lab_pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour per pixel (|p|^2 - 2 x.p ranks like the distance, and is faster)."""
    return ((palette ** 2).sum(1)[None, :] - 2.0 * lab_pixels @ palette.T).argmin(1)


def _dist(lab: np.ndarray, value: np.ndarray) -> np.ndarray:
    diff = lab - value
    return np.sqrt(np.einsum("...c,...c->...", diff, diff))


def _distances(lab_value: np.ndarray, palette: np.ndarray) -> dict[str, float]:
    d = np.linalg.norm(palette - lab_value[None], axis=1)
    return {name: round(float(v), 3) for (name, _), v in zip(COLOURS, d)}


def _largest(mask: np.ndarray, min_area: int) -> np.ndarray | None:
    """The largest 8-connected region of ``mask`` after a 3x3 opening (which drops noise specks), or None."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best if stats[best, cv2.CC_STAT_AREA] >= min_area else None


def _filled(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mask with its holes filled, and its outer contour."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, [contour], -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | mask, contour


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """The scale-free contour features of a bool object mask (FEATURES but blur, which needs the picture)."""
    filled, contour = _filled(mask)
    area = float(filled.sum())
    hull = cv2.convexHull(contour)
    hull_area = max(float(cv2.contourArea(hull)), 1.0)
    perimeter = max(float(cv2.arcLength(contour, True)), 1.0)
    ys, xs = np.nonzero(filled)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = float(x1 - x0), float(y1 - y0)
    hull_perimeter = float(cv2.arcLength(hull, True))
    vertices = len(cv2.approxPolyDP(hull, 0.04 * hull_perimeter, True))
    return {
        "hole": 1.0 - float(mask.sum()) / area,
        # Pixel areas count whole boundary pixels, the hull's polygon area does not: compare like with like.
        "solidity": min(1.0, float(cv2.contourArea(contour)) / hull_area),
        "extent": area / (w * h),
        "circularity": min(1.0, 4 * math.pi * area / perimeter ** 2),
        "aspect": w / h,
        "balance": (float(ys.mean()) + 0.5 - (y0 + y1) / 2) / h,
        "vertices": float(min(vertices, 8)),
    }


def _area_centroid(points: np.ndarray) -> tuple[float, np.ndarray]:
    """Area and centroid of a simple polygon (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return abs(float(area)), np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)


def _edge_blur(mask: np.ndarray, alpha: np.ndarray, pixel: float) -> float:
    """The Gaussian sigma (working pixels) of the object's outer edge: the 10-90 % ramp of a blurred step is 2.56
    sigma wide, so the ramp's area along the contour divided by the contour's length gives it."""
    filled, contour = _filled(mask)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * round(3 * pixel) + 1,) * 2)
    near = cv2.dilate(filled.astype(np.uint8), k).astype(bool) & ~cv2.erode(filled.astype(np.uint8), k).astype(bool)
    ramp = near & (alpha > 0.1) & (alpha < 0.9)
    perimeter = max(float(cv2.arcLength(contour, True)), 1.0)
    return float(np.clip(ramp.sum() / perimeter / 2.56, 0.0, 3.0 * pixel))


def _template_distances(mask: np.ndarray, shapes, blur: float = 0.0) -> dict[str, float]:
    """Per shape: 1 - IoU between the object's silhouette (holes filled) and the shape's outline laid on it with
    the same area and centroid, plus how far the object's hole share is from the shape's.

    Blur rounds corners and shrinks points and holes, which moves scalar contour features a lot but a whole
    outline's overlap only a little, so this is what names the shape; the features are reported alongside. The
    outlines are blurred by ``blur`` (the picture's own edge blur) and cut at 50 % like the object, so a blurred
    star is compared with a blurred star, not with a sharp one that a circle would match better.
    """
    filled, _ = _filled(mask)
    area = float(filled.sum())
    hole = 1.0 - float(mask.sum()) / area
    ys, xs = np.nonzero(filled)
    # Work on the object's neighbourhood only: a template of the object's area reaches at most 0.9 sqrt(area)
    # from its centroid (the star's tips), which this pad around the object's box covers.
    pad = int(3 * blur + 0.6 * math.sqrt(area)) + 2
    x0, y0 = max(0, xs.min() - pad), max(0, ys.min() - pad)
    filled = filled[y0:ys.max() + pad + 1, x0:xs.max() + pad + 1]
    centre = np.array([xs.mean() + 0.5 - x0, ys.mean() + 0.5 - y0])
    out = {}
    for name in shapes:
        outer = geometry.outline(name)
        unit_area, unit_centre = _area_centroid(outer)
        cut = geometry.hole(name)
        expected_hole = _area_centroid(cut)[0] / unit_area if cut is not None else 0.0
        pts = ((outer - unit_centre) * math.sqrt(area / unit_area) + centre - 0.5) * 16   # 4 fractional bits
        template = np.zeros(filled.shape, np.float32)
        cv2.fillPoly(template, [np.round(pts).astype(np.int32)], 1.0, shift=4)
        if blur > 0.3:
            template = cv2.GaussianBlur(template, (0, 0), blur)
        out[name] = round(1.0 - mask_iou(filled, template > 0.5) + abs(hole - expected_hole), 4)
    return out


def _position(box, w: int, h: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    # The world puts a large object's centre in a corner at most 0.41 from the edge, a centred one at least 0.475.
    col = -1 if cx < 0.44 else (1 if cx > 0.56 else 0)
    row = -1 if cy < 0.44 else (1 if cy > 0.56 else 0)
    return next(name for name, c, r in POSITIONS if (c, r) == (col, row))


def _size(box, w: int, h: int) -> str:
    side = max(box[2] - box[0], box[3] - box[1]) / min(w, h)
    fractions = [f for _, f in SIZES]
    cuts = [(a + b) / 2 for a, b in zip(fractions, fractions[1:])]
    return SIZES[sum(side > c for c in cuts)][0]


def score(image, *, shapes=ALL_SHAPES) -> Score:
    """Score a picture (PIL image or array) of any size; ``shapes`` limits the shape names it may answer."""
    unknown = [s for s in shapes if s not in ALL_SHAPES]
    if unknown or not shapes:
        raise StudioError(f"Unknown shape names {unknown or shapes!r} for the scorer.", field="shapes",
                          fix=f"use some of: {', '.join(ALL_SHAPES)}")
    rgb = _rgb01(image)
    in_h, in_w = rgb.shape[:2]
    f = WORK_SIDE / max(in_h, in_w)
    ww, wh = max(8, round(in_w * f)), max(8, round(in_h * f))
    work = cv2.resize(rgb, (ww, wh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
    # Half an input pixel of blur: tames noise and JPEG blocks without moving edges.
    work = cv2.GaussianBlur(np.clip(work, 0, 1), (0, 0), max(0.5 * f, 0.7))
    lab = _lab(work)
    palette = _palette_lab()

    bg_index, bg_lab, bg_confidence, noise = _background(lab, palette)
    result = {"background": COLOURS[bg_index][0], "background_confidence": bg_confidence,
              "background_distances": _distances(bg_lab, palette)}
    d_bg = _dist(lab, bg_lab)
    t0 = max(12.0, 4.0 * noise)
    min_area = max(4, int(MIN_OBJECT * ww * wh))
    rough = _largest(d_bg > t0, min_area)
    if rough is None:
        return Score(found=False, **result)

    edge = max(2.0, 1.5 * f)   # 1.5 input pixels: what anti-aliasing and blur blend at an edge
    core = _core(rough, edge)
    names, shares = _shares(lab[core], palette)
    # Cut at half the distance to the nearest of the object's own colours, so stripes stay inside the object.
    object_colours = [np.median(lab[core][names == k], axis=0) for k in range(len(COLOURS))
                      if shares[k] >= STRIPE_MIN_SHARE and k != bg_index]
    if object_colours:
        t0 = max(t0, 0.5 * min(float(np.linalg.norm(c - bg_lab)) for c in object_colours))
    mask = _largest(d_bg > t0, min_area)
    if mask is None:
        mask = rough
    core = _core(mask, edge)
    names, shares = _shares(lab[core], palette)
    main = int(shares.argmax())
    main_lab = np.median(lab[core][names == main], axis=0)

    features = shape_features(mask)
    alpha = d_bg / max(float(np.linalg.norm(main_lab - bg_lab)), 1.0)
    blur = _edge_blur(mask, alpha, max(1.0, f))
    features["blur"] = blur / f
    shape_d = _template_distances(mask, shapes, blur)
    ranked = sorted(shape_d, key=shape_d.get)
    best = ranked[0]
    second = shape_d[ranked[1]] if len(ranked) > 1 else shape_d[best] + 1.0
    texture, texture_conf = _texture(core, lab, main_lab, max(1.0, f))

    out_mask = cv2.resize(mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_LINEAR) > 0.5
    if not out_mask.any():
        out_mask = cv2.resize(mask.astype(np.uint8), (in_w, in_h), interpolation=cv2.INTER_NEAREST) > 0
    ys, xs = np.nonzero(out_mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None
    return Score(
        found=True, **result,
        shape=best, shape_confidence=round(float(second / (second + shape_d[best] + 1e-9)), 4),
        shape_distances=shape_d,
        colour=COLOURS[main][0], colour_confidence=round(float(shares[main]), 4),
        colour_distances=_distances(main_lab, palette),
        colour_fractions={name: round(float(s), 4) for (name, _), s in zip(COLOURS, shares)},
        texture=texture, texture_confidence=texture_conf,
        size=_size(box, in_w, in_h) if box else None, position=_position(box, in_w, in_h) if box else None,
        box=box, mask=out_mask, area_fraction=round(float(out_mask.mean()), 5),
        features={k: round(v, 4) for k, v in features.items()},
    )


def _background(lab: np.ndarray, palette: np.ndarray) -> tuple[int, np.ndarray, float, float]:
    """The border band's majority palette colour: (index, median Lab, share of the border, median noise ΔE)."""
    b = max(2, round(BORDER * min(lab.shape[:2])))
    border = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3),
                             lab[:, :b].reshape(-1, 3), lab[:, -b:].reshape(-1, 3)])
    names = _nearest(border, palette)
    counts = np.bincount(names, minlength=len(COLOURS))
    index = int(counts.argmax())
    mine = border[names == index]
    median = np.median(mine, axis=0)
    return index, median, round(float(counts[index] / len(names)), 4), float(np.median(_dist(mine, median)))


def _shares(lab_pixels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's nearest palette index, and the share of pixels per palette colour."""
    names = _nearest(lab_pixels, palette)
    return names, np.bincount(names, minlength=len(COLOURS)) / max(1, len(names))


def _core(mask: np.ndarray, edge: float) -> np.ndarray:
    """The object's interior, away from anti-aliased and blurred edges (the whole mask if it is thin)."""
    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    core = dist >= min(max(edge, 0.3 * float(dist.max())), 0.6 * float(dist.max()))
    return core if core.sum() >= 8 else mask


def _texture(core: np.ndarray, lab: np.ndarray, main_lab: np.ndarray, slice_width: float) -> tuple[str, float]:
    """"striped" when the interior's distance from the main colour varies along one direction (0, 45, 90 or
    135 degrees) in at least two bands, and hardly across it.

    A stripe pattern is constant along its stripes, so averaging the interior in thin slices across them keeps
    almost all its variance; JPEG blocks, noise and blotches average away. The share of the variance kept, times
    how much a second colour covers, is the confidence.
    """
    ys, xs = np.nonzero(core)
    if len(xs) < 16:
        return "plain", 1.0
    off = _dist(lab[ys, xs], main_lab)
    share = float((off > 20.0).mean())
    total = float(off.var())
    best, bands = 0.0, 0
    for cos, sin in ((1.0, 0.0), (0.7071, 0.7071), (0.0, 1.0), (0.7071, -0.7071)):
        u = np.floor((xs * cos + ys * sin) / slice_width).astype(np.int64)
        u -= u.min()
        counts = np.bincount(u)
        keep = counts >= 3
        means = np.bincount(u, weights=off)[keep] / counts[keep]
        kept = float((counts[keep] * (means - off.mean()) ** 2).sum() / max(1, counts[keep].sum()))
        ratio = kept / total if total > 1e-6 else 0.0
        if ratio > best:
            high = means > 20.0
            best, bands = ratio, int(high[0]) + int(np.count_nonzero(high[1:] & ~high[:-1]))
    striped = share >= STRIPE_MIN_SHARE and bands >= 2 and best >= 0.6
    strength = min(1.0, share / 0.3) * best
    return ("striped", round(strength, 4)) if striped else ("plain", round(1.0 - strength, 4))
