"""Dataset folders: import dropped files / a folder / a zip safely, then scan images, captions and repeats.

Layout (kohya): images directly in the dataset folder get the config's ``repeats``; a sub-folder named
``N_name`` gives its images N repeats. Captions live beside the image as ``.txt`` or ``.caption``.
"""
from __future__ import annotations

import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import StudioError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")
MAX_ZIP_BYTES = 4 * 1024 ** 3        # total uncompressed size accepted from one zip (zip-bomb limit)
_REPEATS = re.compile(r"^(\d+)_(.+)$")
CONDITIONING_DIR = "conditioning"    # ControlNet pairs (diffusers' example layout): never training images


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int
    subset: str                      # the folder it came from (ss_dataset_dirs / ss_tag_frequency key)
    width: int = 0
    height: int = 0
    caption_path: Path | None = None


@dataclass
class ImportReport:
    """What an import did: files written into the dataset folder and files refused (with reasons)."""

    added: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class DatasetScan:
    items: list[ImageItem]
    skipped: list[tuple[str, str]]   # (path, reason)
    dirs: dict[str, dict]            # subset -> {"n_repeats", "img_count"}

    @property
    def num_images(self) -> int:
        return sum(i.repeats for i in self.items)


# ---- import ----------------------------------------------------------------------------------------------------
def _safe_target(dest: Path, relative: str) -> Path | None:
    """``dest / relative`` if it stays inside ``dest`` (no absolute paths, drive letters or ``..``)."""
    rel = relative.replace("\\", "/")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/") or re.match(r"^[A-Za-z]:", rel) or ".." in p.parts or not p.parts:
        return None
    target = (dest / Path(*p.parts)).resolve()
    root = dest.resolve()
    return target if target == root or root in target.parents else None


def _wanted(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS + CAPTION_EXTS)


def import_files(paths: list[str | os.PathLike], dest: str | os.PathLike, *, subfolder: str = "") -> ImportReport:
    """Copy dropped files (images + captions) into ``dest`` / ``subfolder``; others are listed as refused."""
    dest = Path(dest)
    report = ImportReport()
    target_dir = _safe_target(dest, subfolder) if subfolder else dest
    if target_dir is None:
        raise StudioError(f"Sub-folder {subfolder!r} is outside the dataset folder.", field="subfolder",
                          fix="use a plain folder name such as 10_mychar")
    target_dir.mkdir(parents=True, exist_ok=True)
    for src in map(Path, paths):
        if src.is_dir():
            sub = import_folder(src, target_dir / src.name)
            report.added += sub.added
            report.refused += sub.refused
        elif not _wanted(src.name):
            report.refused.append((str(src), "not an image or caption file"))
        else:
            shutil.copy2(src, target_dir / src.name)
            report.added.append(str(target_dir / src.name))
    return report


def import_folder(src: str | os.PathLike, dest: str | os.PathLike) -> ImportReport:
    """Copy images and captions of a folder tree (symlinks are not followed out of it)."""
    src, dest = Path(src), Path(dest)
    report = ImportReport()
    for root, _dirs, files in os.walk(src):
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(src).as_posix()
            if path.is_symlink() or not _wanted(name):
                report.refused.append((str(path), "symlink" if path.is_symlink() else "not an image or caption"))
                continue
            target = _safe_target(dest, rel)
            if target is None:
                report.refused.append((str(path), "path outside the dataset folder"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            report.added.append(str(target))
    return report


def import_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, *, max_bytes: int = MAX_ZIP_BYTES
               ) -> ImportReport:
    """Extract images and captions of a zip into ``dest``. Entries with absolute or ``..`` paths are refused;
    the declared AND the actually read sizes are capped (a lying header cannot inflate past ``max_bytes``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = ImportReport()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise StudioError(f"{Path(zip_path).name} is not a readable zip ({exc}).", path=str(zip_path),
                          fix="re-create the zip") from None
    with zf:
        infos = zf.infolist()
        if sum(i.file_size for i in infos) > max_bytes:
            raise StudioError(f"{Path(zip_path).name} unpacks to more than {max_bytes // 1024 ** 2} MiB.",
                              path=str(zip_path), fix="split it or import the folder instead")
        budget = max_bytes
        for info in infos:
            if info.is_dir():
                continue
            target = _safe_target(dest, info.filename)
            if target is None:
                report.refused.append((info.filename, "path outside the dataset folder (absolute or '..')"))
                continue
            if not _wanted(info.filename) or info.filename.startswith("__MACOSX/"):
                report.refused.append((info.filename, "not an image or caption file"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as fin, open(target, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    budget -= len(chunk)
                    if budget < 0:
                        fout.close()
                        target.unlink()
                        raise StudioError(f"{Path(zip_path).name} unpacks to more than its declared size.",
                                          path=str(zip_path), fix="the zip is damaged or a zip bomb")
                    fout.write(chunk)
            report.added.append(str(target))
    return report


def import_into(source: str | os.PathLike | list, dest: str | os.PathLike) -> ImportReport:
    """One entry for the tab: a list of dropped files, a folder, or a zip."""
    if isinstance(source, (list, tuple)):
        if len(source) == 1 and str(source[0]).lower().endswith(".zip"):
            return import_zip(source[0], dest)
        return import_files(list(source), dest)
    src = Path(source)
    if src.is_dir():
        return import_folder(src, dest)
    if src.suffix.lower() == ".zip":
        return import_zip(src, dest)
    return import_files([src], dest)


def add_image(root: str | os.PathLike, image, name: str, caption: str, extension: str = ".txt", *,
              infotext: str = "") -> Path:
    """Put one picture (a PIL image, or a PNG / JPEG file copied as it is, infotext included) with its caption
    into a dataset folder: into its only ``N_name`` sub-folder when the pictures live there (its repeats then
    apply), else the folder itself. ``name`` is the file stem wanted; ``-2``, ``-3``... keep earlier files.
    A PIL image is written as PNG with ``infotext`` as its "parameters" (how it was made stays with it)."""
    from ..infotext import png_text
    from .atomic import write_text, write_with
    root = Path(root)
    subs = [d for d in root.iterdir() if d.is_dir() and _REPEATS.match(d.name)] if root.is_dir() else []
    loose = root.is_dir() and any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir() if p.is_file())
    folder = subs[0] if len(subs) == 1 and not loose else root
    folder.mkdir(parents=True, exist_ok=True)
    suffix = Path(image).suffix.lower() if isinstance(image, (str, os.PathLike)) else ".png"
    stem = re.sub(r"[^\w.-]+", "_", name).strip("._") or "image"
    target, n = folder / f"{stem}{suffix}", 1
    while target.exists() or target.with_suffix(extension).exists():
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    if isinstance(image, (str, os.PathLike)):
        write_with(target, lambda p: shutil.copyfile(image, p))
    else:
        write_with(target, lambda p: image.save(p, format="PNG", pnginfo=png_text(infotext) if infotext else None))
    write_text(target.with_suffix(extension), caption.strip() + "\n")
    return target


# ---- scan ------------------------------------------------------------------------------------------------------
def read_caption(image: Path, extension: str = ".txt") -> tuple[str, Path | None]:
    for ext in dict.fromkeys((extension,) + CAPTION_EXTS):
        cap = image.with_suffix(ext)
        if cap.is_file():
            return cap.read_text(encoding="utf-8", errors="replace").strip().replace("\n", " "), cap
    return "", None


def _subset_repeats(folder: Path, root: Path, default: int) -> tuple[str, int]:
    if folder == root:
        return root.name, default
    m = _REPEATS.match(folder.relative_to(root).parts[0])
    return folder.relative_to(root).parts[0], (int(m.group(1)) if m else default)


def scan_dataset(root: str | os.PathLike, *, min_side: int = 64, repeats: int = 1,
                 caption_extension: str = ".txt") -> DatasetScan:
    """Every usable image under ``root`` with caption and repeats; the rest listed with a reason."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise StudioError(f"Dataset folder {root} not found.", field="dataset.dataset_dir", path=str(root),
                          fix="create it or import images first")
    items, skipped, dirs = [], [], {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        low = path.name.lower()
        if low.endswith(CAPTION_EXTS) or path.name.startswith(".") or \
                CONDITIONING_DIR in path.relative_to(root).parts[:-1]:
            continue
        if not low.endswith(IMAGE_EXTS):
            skipped.append((str(path), "not an image"))
            continue
        try:
            with Image.open(path) as im:
                im.verify()   # header + structure; a second open is needed to read pixels
            with Image.open(path) as im:
                im.load()
                w, h = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            skipped.append((str(path), f"corrupt or unreadable image ({type(exc).__name__})"))
            continue
        if min(w, h) < min_side:
            skipped.append((str(path), f"too small ({w}x{h}; the shorter side must be at least {min_side})"))
            continue
        subset, n = _subset_repeats(path.parent, root, repeats)
        caption, cap_path = read_caption(path, caption_extension)
        items.append(ImageItem(path, caption, n, subset, w, h, cap_path))
        d = dirs.setdefault(subset, {"n_repeats": n, "img_count": 0})
        d["img_count"] += 1
    return DatasetScan(items, skipped, dirs)
