"""The "Extra networks" panel under a prompt (A1111's): cards for LoRAs and textual-inversion embeddings.

A card shows the name, a preview thumbnail (``name.preview.png`` / ``name.png`` beside the file, sent as a small
data URL because the models folder is not among gradio's allowed paths), the base family, trigger words and,
for embeddings, the vector count. Clicking a card toggles its tag in the prompt (``<lora:name:1>`` or the
embedding's name), as in A1111. Search filters in the browser (no round trip per key); Refresh rescans the
folders. Only the ``studio.loras`` / ``studio.embeddings`` objects are used here: ``studio.adapters`` imports
torch, and webui/ stays importable without it.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import gradio as gr

from studio import families
from webui.icons import icon_button
from webui.model_lists import refresh_button

log = logging.getLogger(__name__)

HIDDEN = dict(queue=False, api_visibility="private", show_progress="hidden")
THUMB_PX = 160
MAX_SHOWN_WORDS = 4

CSS = """
.en-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px;
           max-height: 520px; overflow-y: auto; padding: 4px; }
.en-card { display: flex; flex-direction: column; border: 1px solid var(--border-color-primary);
           border-radius: 8px; overflow: hidden; cursor: pointer; background: var(--block-background-fill);
           transition: border-color 0.15s, box-shadow 0.15s; }
.en-card:hover, .en-card:focus { border-color: #f97316; box-shadow: 0 0 0 2px rgba(249, 115, 22, 0.35);
                                 outline: none; }
.en-thumb { height: 140px; display: flex; align-items: center; justify-content: center;
            background: var(--background-fill-secondary); color: var(--body-text-color-subdued); }
.en-thumb img { width: 100%; height: 100%; object-fit: cover; }
.en-initial { font-size: 1.6em; font-weight: 700; opacity: 0.5; }
.en-body { padding: 6px 8px; display: flex; flex-direction: column; gap: 4px; font-size: 0.85em; }
.en-name { font-weight: 600; word-break: break-all; }
.en-sub { color: var(--body-text-color-subdued); word-break: break-word; }
.en-badges { display: flex; flex-wrap: wrap; gap: 4px; }
.en-badge { border-radius: 4px; padding: 0 6px; font-size: 0.85em; background: var(--background-fill-secondary);
            border: 1px solid var(--border-color-primary); }
.en-warn { background: #fef3c7; color: #92400e; border-color: #f59e0b; }
.en-ok { background: #dcfce7; color: #166534; border-color: #22c55e; }
.en-words { font-style: italic; color: var(--body-text-color-subdued); word-break: break-word; }
.en-empty { padding: 12px; color: var(--body-text-color-subdued); }
"""

# Show the cards whose search text holds every word of the search box. Runs in the browser, so typing costs no
# round trip; the card HTML (with its thumbnails) is sent only on open / refresh.
FILTER_JS = """(root, q) => {
  const words = (q || '').toLowerCase().split(/\\s+/).filter(Boolean);
  root.querySelectorAll('.en-card').forEach((c) => {
    const text = c.dataset.search || '';
    c.style.display = words.every((w) => text.includes(w)) ? '' : 'none';
  });
}"""


def _on_load_js(tab: str) -> str:
    """Delegated listeners on the component root, so they survive re-renders (refresh); ``trigger('select')``
    hands the card's tag to the Python handler, which edits the prompt server-side."""
    return f"""
if (!element.dataset.enBound) {{
  element.dataset.enBound = '1';
  const filter = {FILTER_JS};
  const apply = () => {{
    const box = document.querySelector('#{tab}_extra_search textarea, #{tab}_extra_search input');
    filter(element, box ? box.value : '');
  }};
  const pick = (ev) => {{
    const card = ev.target.closest('.en-card');
    if (!card || !element.contains(card)) return;
    ev.preventDefault();
    trigger('select', {{index: Number(card.dataset.index), value: card.dataset.tag}});
  }};
  element.addEventListener('click', pick);
  element.addEventListener('keydown', (ev) => {{ if (ev.key === 'Enter' || ev.key === ' ') pick(ev); }});
  watch('value', apply);
  apply();
}}"""


def extra_networks_panel(studio: Any, prompt_box: Any, tab: str) -> dict:
    """An "Extra networks" accordion (Lora / Textual Inversion sub-tabs) wired to ``prompt_box``.

    Element ids: ``<tab>_extra_networks`` (accordion), ``_extra_search``, ``_extra_refresh``,
    ``_extra_lora_cards``, ``_extra_ti_cards``. Returns the components by name."""
    cards = CardRenderer(studio)
    with gr.Accordion("Extra networks", open=False, elem_id=f"{tab}_extra_networks") as accordion:
        with gr.Row(equal_height=True):
            search = gr.Textbox("", placeholder="Search by name, alias or trigger word…", show_label=False,
                                container=False, scale=5, elem_id=f"{tab}_extra_search")
            # also a refresh of every model list of the page (webui.model_lists)
            refresh = refresh_button(icon_button("Refresh", "refresh", text=True, size="sm", scale=0, min_width=110,
                                               elem_id=f"{tab}_extra_refresh"))
        with gr.Tabs(elem_id=f"{tab}_extra_tabs"):
            with gr.Tab("Lora", id=f"{tab}_extra_lora"):
                lora = gr.HTML(cards.loras(), js_on_load=_on_load_js(tab), css_template=CSS,
                               elem_id=f"{tab}_extra_lora_cards")
            with gr.Tab("Textual Inversion", id=f"{tab}_extra_ti"):
                ti = gr.HTML(cards.embeddings(), js_on_load=_on_load_js(tab), css_template=CSS,
                             elem_id=f"{tab}_extra_ti_cards")
    # opening re-renders (a model may have loaded since: fit / warning badges), rescanning only folders whose files
    # changed (a LoRA trained or dropped in meanwhile)
    accordion.expand(lambda: cards.refresh(only_changed=True), None, [lora, ti], **HIDDEN)
    refresh.click(lambda: cards.refresh(), None, [lora, ti], **HIDDEN)
    # .change, not .input: a js-only .input listener never fired on this Textbox in Gradio 6.31 (checked in Chromium)
    search.change(None, search, None, js=f"""(q) => {{
        const filter = {FILTER_JS};
        document.querySelectorAll('#{tab}_extra_lora_cards, #{tab}_extra_ti_cards').forEach((r) => filter(r, q));
        return [];
    }}""")
    for component in (lora, ti):
        component.select(_toggle_from_event, prompt_box, prompt_box, **HIDDEN)
    return {"search": search, "refresh": refresh, "lora": lora, "ti": ti}


def _toggle_from_event(prompt: str, evt: gr.SelectData) -> str:
    return toggle_tag(prompt or "", str(evt.value or ""))


def toggle_tag(prompt: str, tag: str) -> str:
    """Add ``tag`` at the end of the prompt (A1111's " " separator), or take it out if it is already there (any
    weight of the same LoRA counts), as A1111's card click does."""
    if not tag:
        return prompt
    m = re.fullmatch(r"<lora:([^:>]+)(?::[^>]*)?>", tag)
    if m:
        pattern = re.compile(r"<lora:" + re.escape(m.group(1)) + r"(?::[^>]*)?>")
    else:
        pattern = re.compile(r"(?<![\w-])" + re.escape(tag) + r"(?![\w-])")
    if pattern.search(prompt):
        out = pattern.sub("", prompt, count=1)
        # no " ,", ", ," or double spaces left behind where the tag was
        out = re.sub(r",(\s*,)+", ",", re.sub(r"[ \t]+,", ",", out))
        return re.sub(r"[ \t]{2,}", " ", out).strip(" \t\n,")
    return f"{prompt.rstrip()} {tag}" if prompt.strip() else tag


def preferred_weight(path: Path) -> float:
    """A1111's user metadata (``name.json`` beside the file): "preferred weight", 0 or missing meaning 1."""
    try:
        data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        weight = float(data.get("preferred weight") or 0) if isinstance(data, dict) else 0.0
    except (OSError, ValueError, TypeError):
        weight = 0.0
    return weight or 1.0


def _label(family: str | None) -> str:
    return families.short_label(family)


def _weight_text(w: float) -> str:
    return f"{w:g}"


class CardRenderer:
    """Builds the card grids. Holds the thumbnail cache (data URLs keyed by file version) for one panel."""

    def __init__(self, studio: Any):
        self.studio = studio
        self._thumbs: dict[tuple[str, int, int], str] = {}

    # ---- the loaded model --------------------------------------------------------------------------------
    def _model(self) -> tuple[Any, str | None]:
        """(components in memory or None, family of the loaded / chosen checkpoint or None)."""
        manager = self.studio.manager
        components = manager.current_components()
        if components is not None:
            return components, getattr(components, "family", None)
        current = getattr(manager, "current", None)
        return None, getattr(current, "family", None)

    # ---- actions -------------------------------------------------------------------------------------------
    def refresh(self, only_changed: bool = False) -> tuple[str, str]:
        for library in (self.studio.loras, self.studio.embeddings):
            if only_changed and hasattr(library, "refresh_if_changed"):
                library.refresh_if_changed()
            elif not only_changed:
                library.refresh()
        return self.loras(), self.embeddings()

    def loras(self) -> str:
        library = self.studio.loras
        _, model_family = self._model()
        entries = sorted(library.entries(), key=lambda e: (e.folder.lower(), e.name.lower()))
        cards = []
        for i, e in enumerate(entries):
            tag = f"<lora:{e.name}:{_weight_text(preferred_weight(e.path))}>"
            badges = [self._family_badge(e.family, model_family, "LoRA")]
            sub = e.alias if e.alias != e.name else ""
            if e.folder:
                sub = f"{e.folder}/" + (f" · {sub}" if sub else "")
            cards.append(self._card(i, e.name, tag, e.preview, badges, sub, e.trigger_words,
                                    [e.name, e.alias, e.folder, *e.trigger_words]))
        roots = ", ".join(str(r) for r in library.roots())
        errors = getattr(library, "errors", {}) or {}
        note = ""
        if errors:
            detail = html.escape("\n".join(f"{p}: {m}" for p, m in errors.items()), quote=True)
            note = (f"<div class='en-empty' title='{detail}'>⚠ {len(errors)} file(s) could not be read "
                    f"(hover for details).</div>")
        if not cards:
            return note + (f"<div class='en-empty'>No LoRAs in {html.escape(roots)}. Put <code>.safetensors</code> "
                           "files there and press Refresh.</div>")
        return note + f"<div class='en-grid'>{''.join(cards)}</div>"

    def embeddings(self) -> str:
        library = self.studio.embeddings
        components, model_family = self._model()
        fits: dict[str, str] | None = None
        if components is not None:
            try:
                loaded, skipped = library.for_model(components)
                fits = {**{n: "" for n in loaded}, **skipped}
            except Exception:  # noqa: BLE001 - a bad file must not take the panel down
                log.exception("Fitting embeddings to the loaded model failed")
        from studio.adapters.library import find_preview  # lazy: studio.adapters imports torch
        cards = []
        for i, name in enumerate(sorted(library.names(), key=str.lower)):
            ef = library.file(name)
            if ef is None:
                why = html.escape(library.error(name) or "could not be read", quote=True)
                badges = [f"<span class='en-badge en-warn' title='{why}'>⚠ unreadable</span>"]
                cards.append(self._card(i, name, name, None, badges, "", [], [name]))
                continue
            made_for = families.from_embedding({k: int(v.shape[-1]) for k, v in ef.parts.items()})
            family = made_for.name if made_for else None
            if family is None and fits is not None and fits.get(name) == "":
                family = model_family  # an unusual width that fits the loaded model is made for its family
            n = ef.n_vectors
            label = html.escape(_label(family) if family else f"width {ef.shape}")
            badges = [self._family_badge(family, model_family, "embedding") if fits is None and family else
                      f"<span class='en-badge' title='base model family'>{label}</span>",
                      f"<span class='en-badge' title='vectors per use (tokens taken)'>{n} vector"
                      f"{'s' if n != 1 else ''}</span>"]
            if fits is not None and name in fits:
                reason = fits[name]
                badges.append("<span class='en-badge en-ok' title='fits the loaded checkpoint'>✓ fits</span>"
                              if not reason else
                              f"<span class='en-badge en-warn' title='{html.escape(reason, quote=True)}'>"
                              "⚠ skipped with this model</span>")
            cards.append(self._card(i, name, name, find_preview(ef.path), badges, "", [], [name]))
        if not cards:
            path = html.escape(str(self.studio.settings.embeddings_path))
            return (f"<div class='en-empty'>No embeddings in {path}. Put <code>.pt</code> / "
                    "<code>.safetensors</code> files there and press Refresh.</div>")
        return f"<div class='en-grid'>{''.join(cards)}</div>"

    # ---- pieces --------------------------------------------------------------------------------------------
    @staticmethod
    def _family_badge(family: str | None, model_family: str | None, kind: str) -> str:
        label = html.escape(_label(family))
        if family and model_family and family != model_family:
            why = html.escape(f"made for {_label(family)}; the loaded checkpoint is {_label(model_family)}: "
                              f"the {kind} will be skipped", quote=True)
            other = html.escape(_label(model_family))
            return f"<span class='en-badge en-warn' title='{why}'>⚠ {label} ≠ {other}</span>"
        return f"<span class='en-badge' title='base model family'>{label}</span>"

    def _card(self, index: int, name: str, tag: str, preview: Path | None, badges: list[str], sub: str,
              words: list[str], search: list[str]) -> str:
        thumb = self._thumbnail(preview) if preview else None
        image = (f"<img src='{thumb}' alt='{html.escape(name, quote=True)} preview' loading='lazy'>" if thumb
                 else f"<span class='en-initial' aria-hidden='true'>{html.escape(name[:1].upper())}</span>")
        shown = ", ".join(words[:MAX_SHOWN_WORDS]) + (" …" if len(words) > MAX_SHOWN_WORDS else "")
        words_html = (f"<div class='en-words' title='{html.escape(', '.join(words), quote=True)}'>"
                      f"{html.escape(shown)}</div>" if words else "")
        sub_html = f"<div class='en-sub'>{html.escape(sub)}</div>" if sub else ""
        text = html.escape(" ".join(search).lower(), quote=True)
        return (f"<div class='en-card' role='button' tabindex='0' data-index='{index}' "
                f"data-name='{html.escape(name, quote=True)}' data-tag='{html.escape(tag, quote=True)}' "
                f"data-search='{text}' title='Click to add {html.escape(tag, quote=True)} to the prompt'>"
                f"<div class='en-thumb'>{image}</div><div class='en-body'>"
                f"<div class='en-name'>{html.escape(name)}</div>{sub_html}"
                f"<div class='en-badges'>{''.join(badges)}</div>{words_html}</div></div>")

    def _thumbnail(self, path: Path) -> str | None:
        """A small JPEG data URL of a preview image, cached per file version (None if it cannot be read)."""
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._thumbs:
            from PIL import Image
            try:
                with Image.open(path) as im:
                    im = im.convert("RGBA")
                    im.thumbnail((THUMB_PX * 2, THUMB_PX * 2))  # 2x for sharp cards on high-dpi screens
                    flat = Image.new("RGB", im.size, (128, 128, 128))
                    flat.paste(im, mask=im.getchannel("A"))
                    buf = io.BytesIO()
                    flat.save(buf, format="JPEG", quality=85)
            except (OSError, ValueError) as exc:
                log.warning("Preview %s could not be read: %s", path, exc)
                return None
            self._thumbs = {k: v for k, v in self._thumbs.items() if k[0] != key[0]}  # drop older versions
            self._thumbs[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return self._thumbs[key]
