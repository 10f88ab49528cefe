"""The page answers at once: Interrupt says "Interrupting…" before the running step ends; dropped Train files are
imported without looking for the Import button."""
from __future__ import annotations

import threading

import pytest

from tests.uihelpers import by_id, handlers


@pytest.fixture()
def page(studio):
    from webui.layout import build_blocks
    return build_blocks(studio)


def test_interrupt_shows_at_once_while_the_step_still_runs(page, studio):
    from webui.generation import progress_html
    started, release = threading.Event(), threading.Event()

    def slow_step(ctx):                      # a 28 s step at 768² on a CPU, as long as the test wants
        started.set()
        release.wait(60)
        return None
    job = studio.queue.submit(slow_step, kind="txt2img")
    assert started.wait(30)
    try:
        (fn,) = handlers(page, by_id(page, "txt2img_interrupt"), "click")
        assert fn.outputs == [by_id(page, "txt2img_progress")]
        shown = fn.fn(job.id)
        assert "Interrupting…" in shown and not job.done          # the step has not ended, the page says so
        assert "Interrupting…" in progress_html(job)              # and the polling generator keeps saying it
    finally:
        release.set()
    job.wait(30)
    assert job.state == "interrupted"


def test_interrupt_without_a_job_changes_nothing(page, studio):
    (fn,) = handlers(page, by_id(page, "img2img_interrupt"), "click")
    assert fn.fn(None) == {"__type__": "update"}


def test_dropped_train_files_are_imported_at_once(page, studio, tmp_path):
    from PIL import Image
    files = []
    for i in range(2):
        path = tmp_path / f"shape{i}.png"
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(path)
        (tmp_path / f"shape{i}.txt").write_text(f"shp, shape {i}", encoding="utf-8")
        files += [str(path), str(tmp_path / f"shape{i}.txt")]
    drop = by_id(page, "train_files")
    (fn,) = handlers(page, drop, "upload")
    values = [files if c is drop else c.value for c in fn.inputs]
    out = dict(zip(fn.outputs, fn.fn(*values)))
    folder = out[by_id(page, "train_dataset_dir")]
    assert folder and sorted(p.name for p in __import__("pathlib").Path(folder).glob("*.png")) == \
        ["shape0.png", "shape1.png"]
    rows = out[by_id(page, "train_captions")]
    assert [r[1] for r in rows] == ["shp, shape 0", "shp, shape 1"]
    assert "Imported 4 file(s)" in out[by_id(page, "train_import_report")]
    assert out[drop] is None                      # the drop box is emptied: Import will not add them twice


def test_ui_text_needs_no_emoji_font():
    """Text the page shows uses symbols every font has (✓ ⚠), not emoji that are empty boxes without an emoji
    font (✅, ⚠️ with its emoji selector, 🔄 ...); docstrings and comments may name them."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    emoji = re.compile("[\u2705\ufe0f\U0001F300-\U0001FAFF]")
    found = []
    for path in [*root.glob("webui/*.py"), *root.glob("tabs/*.py"), *root.glob("extensions/*/*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and emoji.search(node.value):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value[:40]!r}")
    assert not found, found


def test_repicking_the_loaded_checkpoint_queues_no_switch():
    """A dropdown blur re-sends the loaded model's title: that must not queue a switch that could run after a
    newer one (the Merge tab's "Load it") and undo it."""
    from types import SimpleNamespace

    from webui.layout import _switch

    def no_switch(name):
        raise AssertionError(f"switch to {name!r} queued")

    studio = SimpleNamespace(manager=SimpleNamespace(current=SimpleNamespace(title="a.safetensors [0123456789]",
                                                                             name="a.safetensors")),
                             switch_checkpoint=no_switch)
    for name in ("a.safetensors [0123456789]", "a.safetensors"):
        update, status = _switch(studio, name)
        assert status == "" and "value" not in update
