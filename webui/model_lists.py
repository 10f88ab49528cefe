"""One place that knows every model list of the page, so one change on disk reaches all of them.

A tab marks a dropdown with ``model_list(dropdown, kind)`` (a "choices provider" from ``PROVIDERS``) and a
refresh button with ``refresh_button(button)``; ``layout`` finds the marks in the finished Blocks and wires
``ModelLists``: any 🔄 rescans every folder, a page load and every tab select rescan only the folders whose files
changed (a stat walk in the engine's libraries). Each page keeps what it was last sent (a ``gr.State``), so a
list is only re-sent when its choices changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr

from webui.common import checkpoint_titles, current_checkpoint_title, vae_choices

MARK = "studio_model_list"
REFRESH_MARK = "studio_refresh_button"
HIDDEN = dict(queue=False, api_visibility="private", show_progress="hidden")


def _loras(studio: Any) -> list[str]:
    return sorted(e.name for e in studio.loras.entries())


def _controlnets(studio: Any) -> list[str]:
    return ["None", *studio.controlnets.titles()]


def _bake_vaes(studio: Any) -> list[str]:
    return ["None", *[v.name for v in studio.registry.vaes()]]


def _datasets(studio: Any) -> list[str]:
    return studio.training.dataset_names()


@dataclass(frozen=True)
class Provider:
    choices: Callable[[Any], list]
    fallback: Any = None        # the value a list falls back to when its model is gone


PROVIDERS: dict[str, Provider] = {
    "checkpoint": Provider(checkpoint_titles),
    "vae": Provider(vae_choices, "Automatic"),
    "bake_vae": Provider(_bake_vaes, "None"),
    "lora": Provider(_loras),
    "controlnet": Provider(_controlnets, "None"),
    "dataset": Provider(_datasets),
}


def model_list(component: Any, kind: str, *, current: bool = False) -> Any:
    """Mark a dropdown as showing the ``kind`` models. ``current``: a page load (or a refresh while it is empty)
    also sets it to the loaded / default checkpoint (the quicksettings list)."""
    if kind not in PROVIDERS:
        raise ValueError(f"unknown model list kind {kind!r}; known: {', '.join(PROVIDERS)}")
    setattr(component, MARK, (kind, current))
    return component


def refresh_button(button: Any) -> Any:
    """Mark a refresh button: clicking it rescans every model folder and refreshes every model list."""
    setattr(button, REFRESH_MARK, True)
    return button


def rescan(studio: Any, *, force: bool) -> None:
    """Rescan the engine's model folders: all of them (``force``), else only those whose files changed."""
    for library in (studio.registry, studio.loras, getattr(studio, "embeddings", None), studio.controlnets):
        if library is None:
            continue
        if force or not hasattr(library, "refresh_if_changed"):
            library.refresh()
        else:
            library.refresh_if_changed()


class ModelLists:
    """The marked dropdowns of one Blocks and the handler that refreshes them together."""

    def __init__(self, studio: Any, components: list[Any]):
        self.studio = studio
        self.components = components
        self.kinds = [getattr(c, MARK)[0] for c in components]
        self.current = [getattr(c, MARK)[1] for c in components]

    @classmethod
    def collect(cls, studio: Any, blocks: gr.Blocks) -> "ModelLists":
        found = [b for b in blocks.blocks.values() if getattr(b, MARK, None)]
        return cls(studio, sorted(found, key=lambda b: b._id))

    @staticmethod
    def refresh_buttons(blocks: gr.Blocks) -> list[Any]:
        return [b for b in blocks.blocks.values() if getattr(b, REFRESH_MARK, False)]

    def choices(self) -> dict[str, list]:
        return {kind: PROVIDERS[kind].choices(self.studio) for kind in dict.fromkeys(self.kinds)}

    def updates(self, values: list, shown: dict | None, *, force: bool = False,
                initial: bool = False) -> tuple[list, dict]:
        """(one update per component, the choices now shown) after a rescan; a list whose choices are the ones
        this page already shows gets a no-op update."""
        rescan(self.studio, force=force)
        fresh = self.choices()
        shown = shown or {}
        out = []
        for comp, kind, current, value in zip(self.components, self.kinds, self.current, values):
            choices = fresh[kind]
            update: dict[str, Any] = {}
            if force or choices != shown.get(kind):
                update["choices"] = choices
                if value not in choices and value not in (None, "") and not getattr(comp, "allow_custom_value",
                                                                                    False):
                    update["value"] = PROVIDERS[kind].fallback
            if current and (initial or value in (None, "")):   # the first checkpoint dropped into an empty list
                update["value"] = current_checkpoint_title(self.studio)
            out.append(gr.update(**update))
        return out, fresh

    def connect(self, blocks: gr.Blocks, tabs: list[Any], extra: tuple[list, Callable[[], list]] | None = None) \
            -> Any:
        """Wire the refresh buttons, every tab's select and the page load; returns the load event (for .then).

        ``extra``: (more outputs, fn giving their updates) refreshed by the same events."""
        more, more_fn = extra or ([], lambda: [])
        shown = gr.State(self.choices())
        n = len(self.components)
        outputs = [*self.components, shown, *more]

        def handler(force: bool, initial: bool = False):
            def fn(*args):
                values, state = list(args[:n]), args[n]
                updates, fresh = self.updates(values, state, force=force, initial=initial)
                return [*updates, fresh, *more_fn()]
            return fn

        inputs = [*self.components, shown]
        for button in self.refresh_buttons(blocks):
            button.click(handler(True), inputs, outputs, **HIDDEN)
        for tab in tabs:
            tab.select(handler(False), inputs, outputs, **HIDDEN)
        return blocks.load(handler(False, initial=True), inputs, outputs, **HIDDEN)
