"""Train tab, the Dataset section: import (dropped files, a zip, or a server folder), the caption editor, bulk
edits, tag frequency, BLIP auto-captioning and the bucket options with their report.

The dataset folder (``dataset_dir``, a config field) is the single source of truth: every action rescans it,
so the table always shows what training will read. Captions are written atomically by the engine.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from studio.errors import StudioError
from studio.training.config import TrainConfig
from webui.common import error_html, note_html
from webui.generation import HIDDEN
from webui.icons import icon_button

log = logging.getLogger(__name__)

THUMB = 160                 # px, longest side of a caption-editor thumbnail
MAX_LISTED = 30             # refused / skipped files listed one by one (the rest are counted)
SCAN_FIELDS = ("dataset_dir", "min_image_side", "repeats", "caption_extension")
VIEWS = 4                   # what _view gives: thumbnails, caption rows, tag rows, version rows
VERSION_COLUMNS = ("version", "recorded", "images", "changes", "runs")
BUCKET_FIELDS = ("resolution", "enable_buckets", "min_bucket_reso", "max_bucket_reso", "bucket_step")


def build(studio: Any, f: dict) -> dict:
    """Lay out the section; its config fields go into ``f``, everything else into the returned dict."""
    d: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            d["files"] = gr.File(file_count="multiple", elem_id="train_files", height=150,
                                 label="Drop images (+ .txt / .caption files) or one .zip: imported at once")
        with gr.Column(scale=2):
            d["source_path"] = gr.Textbox("", label="…or a folder / zip on the server (keeps N_name sub-folders)",
                                          elem_id="train_source_path", placeholder="/path/to/images or .zip")
            with gr.Row(equal_height=True):
                d["name"] = gr.Textbox("my_dataset", label="Dataset name", elem_id="train_dataset_name", scale=2)
                d["import"] = gr.Button("Import", variant="primary", elem_id="train_import", scale=1)
            d["example"] = gr.Button("Example dataset (16 hearts for the demo model)", elem_id="train_example",
                                     size="sm")
        with gr.Column(scale=3):
            f["dataset_dir"] = gr.Textbox("", label="Dataset folder (what training reads; Enter rescans)",
                                          elem_id="train_dataset_dir", placeholder="import, or type a folder")
            d["rescan"] = icon_button("Rescan folder", "refresh", text=True, elem_id="train_dataset_rescan", size="sm")
            d["report"] = gr.HTML("", elem_id="train_import_report")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            d["thumbs"] = gr.Gallery(label="Images", columns=6, height=300, object_fit="contain", format="png",
                                     interactive=False, elem_id="train_thumbs", allow_preview=True)
        with gr.Column(scale=3):
            d["table"] = gr.Dataframe(headers=["file", "caption"], datatype=["str", "str"], value=[],
                                      interactive=True, static_columns=[0], wrap=True, max_height=300,
                                      label="Captions (edit the caption column, then Save captions)",
                                      elem_id="train_captions", column_widths=["30%", "70%"])
            d["save"] = gr.Button("Save captions", elem_id="train_save_captions", size="sm")
    with gr.Accordion("Versions of this dataset (what each run read)", open=False, elem_id="train_versions_box"):
        d["versions"] = gr.Dataframe(headers=list(VERSION_COLUMNS), datatype=["number", "str", "number", "str", "str"],
                                     value=[], interactive=False, max_height=220, elem_id="train_versions",
                                     label="A new version is recorded whenever the folder's pictures or captions "
                                           "changed; runs list the trainings that read it (newest last)")
    with gr.Accordion("Bulk caption tools, tag frequency, BLIP", open=True, elem_id="train_caption_tools"):
        with gr.Row():
            d["trigger"] = gr.Textbox("", label="Trigger word (added once, first)", elem_id="train_trigger")
            d["prefix"] = gr.Textbox("", label="Prefix tags", elem_id="train_prefix")
            d["suffix"] = gr.Textbox("", label="Suffix tags (style)", elem_id="train_suffix")
            d["find"] = gr.Textbox("", label="Find", elem_id="train_find")
            d["replace"] = gr.Textbox("", label="Replace with", elem_id="train_replace")
        d["bulk"] = gr.Button("Apply trigger / prefix / suffix / find & replace to all captions",
                              elem_id="train_bulk_apply", size="sm")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                d["tags"] = gr.Dataframe(headers=["tag", "count"], datatype=["str", "number"], value=[],
                                         interactive=False, max_height=220, label="Tag frequency",
                                         elem_id="train_tags")
            with gr.Column(scale=3):
                from studio.training.captions import captioner_folder
                d["blip_folder"] = gr.Textbox(str(captioner_folder(Path(studio.settings.models_dir).resolve())),
                                              label="BLIP captioner folder (a transformers BLIP model)",
                                              elem_id="train_blip_folder")
                d["blip_overwrite"] = gr.Checkbox(False, label="Replace existing captions",
                                                  elem_id="train_blip_overwrite")
                d["blip"] = gr.Button("Auto-caption with BLIP (trigger word + BLIP text + suffix tags)",
                                      elem_id="train_blip", size="sm")
    with gr.Accordion("Buckets and caption options", open=False, elem_id="train_buckets"):
        with gr.Row():
            for name, label in (("resolution", "Resolution"), ("min_bucket_reso", "Min bucket side"),
                                ("max_bucket_reso", "Max bucket side"), ("bucket_step", "Bucket step"),
                                ("min_image_side", "Skip images smaller than"), ("repeats", "Repeats")):
                f[name] = gr.Number(getattr(TrainConfig(), name), precision=0, label=label, min_width=110,
                                    elem_id=f"train_{name}")
        with gr.Row():
            f["enable_buckets"] = gr.Checkbox(True, label="Aspect-ratio buckets (off: centre crop)",
                                              elem_id="train_enable_buckets")
            f["flip"] = gr.Checkbox(False, label="Random flip", elem_id="train_flip")
            f["shuffle_caption"] = gr.Checkbox(False, label="Shuffle caption tags", elem_id="train_shuffle_caption")
            f["keep_tokens"] = gr.Number(0, precision=0, label="Keep first N tags", elem_id="train_keep_tokens",
                                         min_width=110)
            f["caption_dropout"] = gr.Number(0.0, label="Caption dropout", elem_id="train_caption_dropout",
                                             min_width=110)
            f["caption_extension"] = gr.Dropdown([".txt", ".caption"], value=".txt", label="Caption files",
                                                 elem_id="train_caption_extension", min_width=110)
        d["bucket_button"] = gr.Button("Bucket report", elem_id="train_bucket_report_button", size="sm")
        d["buckets"] = gr.HTML("", elem_id="train_bucket_report")
    _wire(studio, f, d)
    return d


def _wire(studio: Any, f: dict, d: dict) -> None:
    scan_in = [f[n] for n in SCAN_FIELDS]
    outs = [d["thumbs"], d["table"], d["tags"], d["versions"], d["report"], f["dataset_dir"]]
    svc = studio.training

    def handler(action, n_inputs: int):
        """``action(*inputs, scan=...) -> (html, new folder or None)``, then a fresh view of the folder; errors
        show in the report box, naming the field."""
        def fn(*values):
            inputs, scan = values[:n_inputs], list(values[n_inputs:])
            try:
                text, folder = action(*inputs, scan=scan)
                if folder:
                    scan[0] = folder
                view, summary = _view(svc, *scan)
            except StudioError as exc:
                return [gr.update()] * VIEWS + [error_html(str(exc)), gr.update()]
            except Exception as exc:  # noqa: BLE001 - e.g. a broken captioner model: a message, not a traceback
                log.exception("Dataset action %s failed", action.__name__)
                return [gr.update()] * VIEWS + [error_html(f"{type(exc).__name__}: {exc}"), gr.update()]
            return [*view, summary + text, folder or gr.update()]
        return fn

    def do_import(files, source, name, scan):
        return import_action(svc, files, source, name)

    def rescan(scan):
        return "", None

    def save(table, scan):
        return note_html(f"Saved {_write_table(svc, table, *scan)} changed caption(s)."), None

    def bulk(table, trigger, prefix, suffix, find, replace, scan):
        from studio.training.captions import bulk_edit
        items = _items_with_table(svc, table, *scan)
        bulk_edit(items, trigger=trigger.strip(), prefix=prefix.strip(), suffix=suffix.strip(), find=find,
                  replace=replace, extension=scan[-1])
        return note_html(f"Updated {len(items)} caption(s)."), None

    def blip(folder, overwrite, trigger, suffix, scan):
        from studio.training.captions import BlipCaptioner
        items = _scan(svc, *scan).items
        folder = str(svc.confine((folder or "").strip(), "blip_folder"))
        if not (Path(folder) / "config.json").is_file():
            BlipCaptioner(folder)      # raises at once with the message naming the folder and files expected
        todo = [i for i in items if overwrite or not i.caption]
        if not todo:
            return note_html("Every image has a caption already (tick 'Replace existing captions')."), None

        def work():  # in the studio's queue: never beside a generation on the same device
            BlipCaptioner(folder).caption_items(todo, trigger=trigger.strip(), suffix=suffix.strip(),
                                                overwrite=overwrite, extension=scan[-1])
        studio.run_exclusive(work, kind="caption")
        return note_html(f"BLIP captioned {len(todo)} image(s)."), None

    edits = [d["trigger"], d["prefix"], d["suffix"], d["find"], d["replace"]]
    blip_in = [d["blip_folder"], d["blip_overwrite"], d["trigger"], d["suffix"]]
    for event, action, inputs in ((d["import"].click, do_import, [d["files"], d["source_path"], d["name"]]),
                                  (d["rescan"].click, rescan, []), (f["dataset_dir"].submit, rescan, []),
                                  (d["save"].click, save, [d["table"]]), (d["bulk"].click, bulk, [d["table"], *edits]),
                                  (d["blip"].click, blip, blip_in)):
        event(handler(action, len(inputs)), [*inputs, *scan_in], outs, api_visibility="private")
    # a drop is meant to be used: import it at once (into "Dataset name"), then empty the drop box so a later
    # Import of a server folder does not import the same files again
    def import_dropped(files, name, scan):
        return do_import(files, "", name, scan=scan)
    dropped = handler(import_dropped, 2)

    def on_drop(*values):
        out = dropped(*values)
        return [*out, gr.update() if "studio-error" in str(out[VIEWS]) else None]
    d["files"].upload(on_drop, [d["files"], d["name"], *scan_in], [*outs, d["files"]], api_visibility="private")
    bucket_in = [f[n] for n in BUCKET_FIELDS]
    d["bucket_button"].click(lambda *a: _bucket_report(svc, *a), [*bucket_in, *scan_in], d["buckets"], **HIDDEN)


EXAMPLE_FOLDER = "example_heart"


def example_values(studio: Any) -> dict:
    """Write the demo world's example dataset (a shape the demo model has never seen, with a trigger word) into
    the training service's datasets folder; returns the form values that must match it and the message."""
    from studio import demo
    from studio.demo_world import write_example_dataset
    folder = studio.training.datasets_dir() / EXAMPLE_FOLDER
    written = write_example_dataset(folder, demo.EXAMPLE_CONCEPT, count=16, trigger=demo.EXAMPLE_TRIGGER,
                                    repeats=10)
    base = next((i.title for i in studio.registry.checkpoints() if demo.is_demo_checkpoint(i.name)), None)
    from PIL import Image
    with Image.open(written[0][0]) as im:     # the training resolution must be the pictures' own size
        side = im.width
    concept, trigger = demo.EXAMPLE_CONCEPT, demo.EXAMPLE_TRIGGER
    message = (f"Wrote {len(written)} pictures of a {concept} (a shape the demo model has never seen), {side} px, "
               f"captioned \"{trigger}, ...\" (trigger word {trigger}, 10 repeats), into {folder}. Resolution, "
               f"output name, sample prompt and a quick recipe ("
               + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in demo.EXAMPLE_RECIPE.items())
               + ": about a minute on a CPU) are set to match"
               + ("; the base checkpoint is the demo model." if base else
                  "; install the demo model (the button in the checkpoint help, or --demo) to train on it."))
    return {"dataset_dir": str(folder), "resolution": side, "output_name": f"{concept}_lora",
            "sample_prompts": f"{trigger}, a red {concept} on a blue background", "trigger": trigger,
            "base_model": base, "message": message, **demo.EXAMPLE_RECIPE}


def wire_example(studio: Any, f: dict, d: dict) -> None:
    """The Example dataset button; wired once the whole form exists (it sets training fields too)."""
    from studio.demo import EXAMPLE_RECIPE
    names = ("dataset_dir", "resolution", "output_name", "sample_prompts", "base_model", *EXAMPLE_RECIPE)
    scan_in = [f[n] for n in SCAN_FIELDS]

    def run(*scan):
        try:
            v = example_values(studio)
            view, summary = _view(studio.training, v["dataset_dir"], *scan[1:])
        except (StudioError, OSError) as exc:
            return [gr.update()] * (len(names) + 2 + VIEWS) + [error_html(str(exc))]
        fields = [v[n] if v[n] is not None else gr.update() for n in names]
        return [*fields, v["trigger"], *view, summary + note_html(v["message"])]

    d["example"].click(run, scan_in, [*[f[n] for n in names], d["trigger"], d["thumbs"], d["table"], d["tags"],
                                      d["versions"], d["report"]], api_visibility="private")


def import_action(svc: Any, files, source, name) -> tuple[str, str]:
    """Import dropped files (Gradio's uploads) and / or a typed server folder or zip, which must lie inside the
    studio's folders (``studio.paths``). Returns (report HTML, the dataset folder)."""
    source = (source or "").strip()
    if not files and not source:
        raise StudioError("Nothing to import.", field="dataset_files",
                          fix="drop images or a zip, or type a folder / zip path on the server")
    if source:
        source = str(svc.confine(source, "dataset_source"))
        if not Path(source).exists():
            raise StudioError(f"{source} does not exist on the server.", field="dataset_source",
                              fix="give a folder or .zip path inside the studio's folders")
    added, refused, dest = [], [], None
    for src in ([list(files)] if files else []) + ([source] if source else []):
        dest, report = svc.import_dataset(src, (name or "").strip())
        added += report.added
        refused += report.refused
    body = note_html(f"Imported {len(added)} file(s) into {dest}.")
    return body + _listing("Refused", refused), str(dest)


def _scan_cfg(folder, min_side, repeats, extension) -> TrainConfig:
    return TrainConfig(dataset_dir=folder or "", min_image_side=int(min_side or 0), repeats=int(repeats or 1),
                       caption_extension=extension or ".txt")


def _scan(svc: Any, folder, *rest):
    if not (folder or "").strip():
        raise StudioError("No dataset folder yet.", field="dataset.dataset_dir",
                          fix="import images or type the folder path")
    folder = str(svc.confine(folder.strip(), "dataset.dataset_dir"))   # only the studio's folders (studio.paths)
    return svc.scan(folder, _scan_cfg(folder, *rest))


def version_rows(versions: list[dict]) -> list[list]:
    from studio.training.versions import describe
    return [[v["version"], v["time"], v["images"], describe(v), ", ".join(v.get("runs") or [])]
            for v in reversed(versions)]


def _view(svc: Any, folder, *rest) -> tuple[list, str]:
    """(thumbnails, caption rows, tag rows, version rows) and the HTML list of skipped files. The folder's
    version is recorded here: every view is of what training would read now."""
    from PIL import Image
    from studio.training.captions import tag_frequency

    if not (folder or "").strip():
        return [[], [], [], []], ""
    scan = _scan(svc, folder, *rest)
    root = svc.confine(folder.strip(), "dataset.dataset_dir")
    svc.versions.record(root, scan)
    versions = svc.versions.versions(root)
    root = Path(folder).resolve()
    thumbs, rows = [], []
    for item in scan.items:
        rel = item.path.resolve().relative_to(root).as_posix()
        with Image.open(item.path) as im:
            im.thumbnail((THUMB, THUMB))
            thumbs.append((im.convert("RGB"), rel))
        rows.append([rel, item.caption])
    counts: dict[str, int] = {}
    for tags in tag_frequency(scan.items).values():
        for tag, n in tags.items():
            counts[tag] = counts.get(tag, 0) + n
    tag_rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    skipped = [(Path(p).name, why) for p, why in scan.skipped]
    summary = note_html(f"{len(scan.items)} image(s), {scan.num_images} per epoch with repeats.")
    return [thumbs, rows, [list(r) for r in tag_rows], version_rows(versions)], summary + _listing("Skipped", skipped)


def _listing(title: str, entries: list[tuple[str, str]]) -> str:
    if not entries:
        return ""
    shown = "".join(f"<li><code>{html.escape(Path(p).name)}</code>: {html.escape(why)}</li>"
                    for p, why in entries[:MAX_LISTED])
    more = f"<li>… and {len(entries) - MAX_LISTED} more</li>" if len(entries) > MAX_LISTED else ""
    return (f"<div class='studio-note train-listing'><b>{title} ({len(entries)}):</b><ul>{shown}{more}</ul>"
            "</div>")


def _rows(table) -> list[list[str]]:
    if table is None:
        return []
    if hasattr(table, "values"):       # pandas DataFrame
        table = table.values.tolist()
    return [[str(r[0]), "" if r[1] is None else str(r[1])] for r in table if r and r[0]]


def _items_with_table(svc: Any, table, *scan) -> list:
    """The scanned items with the captions as the table shows them (unsaved edits included)."""
    items = _scan(svc, *scan).items
    root = Path(scan[0]).resolve()
    edited = {rel: caption for rel, caption in _rows(table)}
    for item in items:
        rel = item.path.resolve().relative_to(root).as_posix()
        if rel in edited:
            item.caption = edited[rel].strip()
    return items


def _write_table(svc: Any, table, *scan) -> int:
    from studio.training.captions import set_caption
    before = {i.path: i.caption for i in _scan(svc, *scan).items}
    changed = [i for i in _items_with_table(svc, table, *scan) if before.get(i.path) != i.caption]
    for item in changed:
        set_caption(item, item.caption, scan[-1])
    return len(changed)


def _bucket_report(svc: Any, resolution, enable, min_reso, max_reso, step, *scan) -> str:
    from studio.training.buckets import plan_buckets   # imports torch: only when asked
    try:
        items = _scan(svc, *scan).items
        plan = plan_buckets(items, resolution=int(resolution), enable=bool(enable), min_reso=int(min_reso),
                            max_reso=int(max_reso), step=int(step))
    except StudioError as exc:
        return error_html(str(exc))
    except (TypeError, ValueError) as exc:
        return error_html(f"Bucket options: {exc}")
    rows = "".join(f"<tr><th>{html.escape(size)}</th><td>{len(files)}</td><td>{html.escape(', '.join(files))}"
                   "</td></tr>" for size, files in plan.report(items).items())
    mode = "aspect-ratio buckets" if enable else f"centre crop at {int(resolution)}×{int(resolution)}"
    return (f"<div class='studio-note'>{len(items)} image(s), {mode}:</div>"
            f"<table class='studio-params train-buckets'><tr><th>bucket (W×H)</th><th>images</th><th>files</th>"
            f"</tr>{rows}</table>")
