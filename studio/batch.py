"""img2img batch: a folder (or a list of files) in, a folder out, one queued job per file (A1111's Batch tab).

Per-file masks are found by name in a mask folder (a file with a mask runs as inpaint); "PNG info" parameters of
each file can be merged over the base request. Files that are not images are listed as skipped, never fatal.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import StudioError
from .images import open_image
from .infotext import params_to_request_fields, parse_infotext, png_text, read_infotext
from .request import GenerationRequest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What A1111's batch takes from each file's PNG info (its "Parameters to take"): not the size, nor the model,
# since switching checkpoints per file would reload weights for every image.
PNG_INFO_FIELDS = ("seed", "cfg_scale", "sampler_name", "scheduler", "steps", "clip_skip")

Progress = Callable[[int, int, str, Any], None]


@dataclass
class BatchItem:
    source: str
    outputs: list[str]
    mask: str | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class BatchReport:
    output_dir: str
    done: list[BatchItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (file name, why)
    failed: list[tuple[str, str]] = field(default_factory=list)    # (file name, error message)
    interrupted: bool = False

    @property
    def outputs(self) -> list[str]:
        return [path for item in self.done for path in item.outputs]

    def summary(self) -> str:
        parts = [f"{len(self.done)} file(s) processed, {len(self.outputs)} image(s) written to {self.output_dir}."]
        if self.skipped:
            parts.append(f"Skipped {len(self.skipped)}: " + "; ".join(f"{n} ({why})" for n, why in self.skipped))
        if self.failed:
            parts.append(f"Failed {len(self.failed)}: " + "; ".join(f"{n}: {why}" for n, why in self.failed))
        if self.interrupted:
            parts.append("Interrupted: the remaining files were not processed.")
        return " ".join(parts)


def list_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """A folder's files (sorted, hidden ones left out) or the given files in their order."""
    if isinstance(inputs, (str, os.PathLike)):
        folder = Path(inputs).expanduser()
        if not folder.is_dir():
            raise StudioError(f"Input folder {str(folder)!r} does not exist.", field="input_dir", path=str(folder),
                              fix="enter the path of a folder on the server, or drop the files instead")
        return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                      key=lambda p: p.name.lower())
    return [Path(p) for p in inputs]


def find_mask(mask_dir: Path, source: Path) -> Path | None:
    """The mask for ``source``: same file name first, else any image with the same stem."""
    exact = mask_dir / source.name
    if exact.is_file():
        return exact
    for suffix in IMAGE_SUFFIXES:
        for candidate in (mask_dir / f"{source.stem}{suffix}", mask_dir / f"{source.stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def request_for_file(base: GenerationRequest, image: Any, path: Path, *, mask: Any = None, use_png_info: bool,
                     scale_by: float | None, max_w: int, max_h: int) -> tuple[GenerationRequest, list[str]]:
    """The base request for one file: its image (and mask), PNG-info parameters and per-file size."""
    notes: list[str] = []
    changes: dict[str, Any] = {"init_images": (image,), "save_images": False}
    if mask is not None:
        changes.update(mode="inpaint", mask=mask)
    elif base.mode == "inpaint" and base.mask is None:
        changes["mode"] = "img2img"   # an inpaint batch without a mask for this file: plain img2img
    if use_png_info:
        text = read_infotext(path) if path.suffix.lower() in IMAGE_SUFFIXES else None
        if text:
            try:
                given = params_to_request_fields(parse_infotext(text))
            except StudioError as exc:
                notes.append(f"PNG info not used: {exc}")
                given = {}
            changes.update({k: given[k] for k in PNG_INFO_FIELDS if k in given})
            # A1111 appends the file's prompt to the one typed in the UI
            for key in ("prompt", "negative_prompt"):
                if given.get(key):
                    changes[key] = " ".join(p for p in (getattr(base, key).strip(), given[key].strip()) if p)
        else:
            notes.append("no PNG info in this file; the base parameters were used")
    if scale_by:
        w = min(max_w, max(64, round(image.width * scale_by / 8) * 8))
        h = min(max_h, max(64, round(image.height * scale_by / 8) * 8))
        changes.update(width=w, height=h)
    return base.replace(**changes), notes


def confine_batch_paths(settings: Any, inputs: Any, output_dir: Any, mask_dir: Any) -> tuple[Any, Any, Any]:
    """The folders a request (the img2img tab, Gradio's API) names, each inside the studio's folders
    (``studio.paths``), resolved; dropped files (a list: Gradio's uploads) and empty fields pass unchanged."""
    from .paths import allowed_roots, confine
    roots = allowed_roots(settings)

    def check(value: Any, field: str) -> Any:
        if isinstance(value, (str, os.PathLike)) and str(value).strip():
            return str(confine(str(value).strip(), roots, field))
        return value
    return check(inputs, "input_dir"), check(output_dir, "output_dir"), check(mask_dir, "mask_dir")


def run_img2img_batch(studio: Any, base_request: GenerationRequest,
                      inputs: str | os.PathLike | Iterable[str | os.PathLike], output_dir: str | os.PathLike,
                      mask_dir: str | os.PathLike | None = None, use_png_info: bool = False,
                      progress: Progress | None = None, *, scale_by: float | None = None) -> BatchReport:
    """Run ``base_request`` once per input file through ``studio.submit`` (one queued job each).

    Outputs go to ``output_dir`` as ``<input name>.png`` (``-2``, ``-3``... for more images per file), with
    infotext, written atomically; an existing file of that name is replaced. ``progress(index, total, name, job)``
    is called before each file (job None) and once its job is queued. An interrupted job ends the batch.
    """
    files = list_inputs(inputs)
    out = Path(output_dir).expanduser() if str(output_dir or "").strip() else None
    if out is None:
        raise StudioError("The batch needs an output folder.", field="output_dir", fix="enter a folder path")
    out.mkdir(parents=True, exist_ok=True)
    masks = Path(mask_dir).expanduser() if mask_dir and str(mask_dir).strip() else None
    if masks is not None and not masks.is_dir():
        raise StudioError(f"Mask folder {str(masks)!r} does not exist.", field="mask_dir", path=str(masks),
                          fix="enter an existing folder, or leave it empty")
    s = studio.settings
    max_pixels = s.max_width * s.max_height * 4     # the engine's own cap for init images
    report = BatchReport(output_dir=str(out))
    used: set[str] = set()
    for index, path in enumerate(files):
        if progress:
            progress(index, len(files), path.name, None)
        try:
            image = open_image(path, field="init_images", max_pixels=max_pixels)
        except StudioError as exc:
            known = path.suffix.lower() in IMAGE_SUFFIXES   # a .txt needs no decoder error to explain it
            report.skipped.append((path.name, str(exc).split(" Fix:")[0] if known else "not an image file"))
            continue
        mask_path = find_mask(masks, path) if masks is not None else None
        try:
            mask = open_image(mask_path, field="mask", max_pixels=max_pixels) if mask_path else None
            request, notes = request_for_file(base_request, image, path, mask=mask, use_png_info=use_png_info,
                                              scale_by=scale_by, max_w=s.max_width, max_h=s.max_height)
            job = studio.submit(request)
        except StudioError as exc:
            report.failed.append((path.name, str(exc)))
            continue
        if progress:
            progress(index, len(files), path.name, job)
        try:
            result = job.wait()
        except Exception as exc:  # noqa: BLE001 - one bad file must not end the batch
            report.failed.append((path.name, str(exc)))
            continue
        if result is not None and result.images:
            written = [_write(out, _name(path.stem, k, used), img, result.infotexts[k])
                       for k, img in enumerate(result.images)]
            report.done.append(BatchItem(str(path), written, str(mask_path) if mask_path else None,
                                         notes + list(result.warnings)))
        if job.state == "interrupted" or (result is not None and result.interrupted):
            report.interrupted = True
            break
    return report


def _name(stem: str, k: int, used: set[str]) -> str:
    """``stem.png``, ``stem-2.png``...; also unique within the run (``a.png`` and ``a.jpg`` both give ``a``)."""
    base = stem if k == 0 else f"{stem}-{k + 1}"
    name, n = f"{base}.png", 1
    while name.lower() in used:
        n += 1
        name = f"{base}_{n}.png"
    used.add(name.lower())
    return name


def _write(folder: Path, name: str, image: Any, infotext: str) -> str:
    """Temp file + rename, so a crash never leaves a half-written PNG under the final name."""
    path = folder / name
    tmp = folder / f".{name}.tmp"
    try:
        image.save(tmp, format="PNG", pnginfo=png_text(infotext))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)
