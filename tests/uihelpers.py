"""Calling a page's gradio handlers without a browser: find components by elem_id and the fns of an event."""
from __future__ import annotations


def by_id(blocks, elem_id):
    return next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def handlers(blocks, block, event) -> list:
    """The BlockFunctions (fn, inputs, outputs) that ``event`` on ``block`` triggers."""
    return [f for f in blocks.fns.values() if (block._id, event) in f.targets and f.fn is not None]
