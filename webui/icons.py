"""Icon buttons drawn from SVG files shipped in ``webui/icons`` (a CSS mask in the text colour), not emoji: a
machine without an emoji font showed empty boxes for 🔄 🎲 ♻️ 📂.

The button's text stays its accessible name (and hover title, set by the page's load script); an icon-only
button hides it visually.
"""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import gradio as gr

ICONS_DIR = Path(__file__).parent / "icons"

# the page's load script gives every icon-only button its text as a tooltip, also in tabs rendered later
TITLES_JS = """
const titled = () => document.querySelectorAll('.studio-icon.icon-only:not([title])').forEach((b) => {
  const label = (b.textContent || '').trim();
  if (label) { b.title = label; b.setAttribute('aria-label', label); }
});
titled();
new MutationObserver(titled).observe(document.body, {childList: true, subtree: true});
"""


def icon_button(label: str, icon: str, *, text: bool = False, **kw: Any) -> gr.Button:
    """A button showing ``icons/<icon>.svg``; ``text``: also show ``label`` beside it (else icon only)."""
    if not (ICONS_DIR / f"{icon}.svg").is_file():
        raise ValueError(f"no icon {icon!r} in {ICONS_DIR}")
    extra = kw.pop("elem_classes", None) or []
    classes = ["studio-icon", f"icon-{icon}", *([] if text else ["icon-only"]), *extra]
    return gr.Button(label, elem_classes=classes, **kw)


def icons_css() -> str:
    """One ``--studio-icon`` data URL per shipped SVG, and the rules that draw it."""
    rules = ["""
.studio-icon::before { content: ""; display: inline-block; flex: none; width: 1.2em; height: 1.2em;
    margin-right: 0.4em; background-color: currentColor; -webkit-mask: var(--studio-icon) center / contain no-repeat;
    mask: var(--studio-icon) center / contain no-repeat; }
.studio-icon.icon-only { font-size: 0 !important; gap: 0 !important; }
.studio-icon.icon-only::before { width: 20px; height: 20px; margin: 0; }"""]
    for svg in sorted(ICONS_DIR.glob("*.svg")):
        data = base64.b64encode(svg.read_bytes()).decode("ascii")
        rules.append(f'.icon-{svg.stem} {{ --studio-icon: url("data:image/svg+xml;base64,{data}"); }}')
    return "\n".join(rules) + "\n"
