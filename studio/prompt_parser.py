"""The A1111 prompt language, parsed without torch: emphasis, BREAK, scheduling, alternation, extra networks.

Behaviour follows A1111's prompt_parser.py and extra_networks.py (checked against its docstring examples in
tests/test_prompts.py); the code is our own small recursive-descent parser, run on an explicit stack (no
recursion limit) instead of its lark grammar.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Generator

ROUND, SQUARE = 1.1, 1 / 1.1
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_BREAK_WORD = re.compile(r"\bBREAK\b")
# A1111 takes [.\d]+ and float() crashes on "1.2.3"; a weight that is no number stays plain text here
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")
_EXTRA = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b(?!_PERP|_SALT|_TOPK)")
_AND_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def count_breaks(text: str) -> int:
    """How many BREAK keywords a prompt has (each closes a 75-token chunk)."""
    return len(_BREAK_WORD.findall(text))


# ---- emphasis -------------------------------------------------------------------------------------------------
def parse_attention(text: str) -> list[tuple[str, float]]:
    """``(x)`` ×1.1, ``(x:w)`` ×w, ``[x]`` ÷1.1, ``\\(`` escapes, ``BREAK`` -> ("BREAK", -1); merged runs.

    >>> parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[1]
    ('house', 1.5730000000000004)
    """
    pieces: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "()[]\\":
            pieces.append([text[i + 1], 1.0])
            i += 2
            continue
        if ch == "(":
            rounds.append(len(pieces))
        elif ch == "[":
            squares.append(len(pieces))
        elif ch == ":" and rounds and (m := _WEIGHT_CLOSE.match(text, i)):
            scale(rounds.pop(), float(m.group(1)))
            i = m.end()
            continue
        elif ch == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif ch == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            j = i + 1
            if ch not in "()[]:\\":
                while j < len(text) and text[j] not in "()[]:\\":
                    j += 1
            for n, part in enumerate(_BREAK.split(text[i:j])):
                if n:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
            i = j
            continue
        i += 1
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


# ---- scheduling and alternation ----------------------------------------------------------------------------
@dataclass
class _Sched:
    before: list
    after: list
    when: str


@dataclass
class _Alt:
    options: list


def _parse(text: str, i: int, stop: str) -> Generator:
    """Parse until one of ``stop`` (not consumed). Nodes: str, _Sched, _Alt, or ("(", seq, ")")-style lists.

    A generator run by :func:`_run`: it yields sub-parses instead of recursing (no recursion limit), and a
    bracket that turns out literal hands the rest of the text to a memoised sub-parse, so unclosed runs like
    ``((((...`` cost linear time, not exponential.
    """
    seq: list = []
    buf = ""
    while i < len(text) and text[i] not in stop:
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf += text[i:i + 2]
            i += 2
            continue
        if ch in "[(":
            node, end = yield ("[", i, "") if ch == "[" else ("(", i + 1, ")")
            if ch == "(" and end < len(text):
                node, end = ["(", *node, ")"], end + 1
            elif ch == "(":
                node = None
            if node is None and ch == "[" and end >= len(text) and stop == ":|]":
                # an unclosed "[" inside a square part: the enclosing "[" cannot close either (its parts
                # from here on are the same ones), so stop now rather than rescan the rest for each level
                return [], len(text)
            if node is None:  # a literal bracket: the rest parses exactly as from the next character
                rest, end = yield ("(", i + 1, stop)
                if rest and isinstance(rest[0], str):
                    rest = [buf + ch + rest[0], *rest[1:]]
                else:
                    rest = [buf + ch, *rest]
                return [s for s in seq + rest if s != ""], end
            seq.append(buf)
            buf = ""
            seq.append(node)
            i = end
            continue
        buf += ch
        i += 1
    seq.append(buf)
    return [s for s in seq if s != ""], i


def _parse_square(text: str, start: int) -> Generator:
    """At ``[``: a schedule ``[a:b:n]`` / ``[b:n]``, an alternation ``[a|b]``, or plain emphasis ``[x]``."""
    parts, seps, i = [], [], start + 1
    while True:
        part, i = yield ("(", i, ":|]")
        parts.append(part)
        if i >= len(text):
            return None, len(text)   # unclosed (literal "["): callers tell this from a non-schedule by end
        if text[i] == "]":
            break
        seps.append(text[i])
        i += 1
    end = i + 1
    if seps and all(s == "|" for s in seps):
        return _Alt(parts), end
    colons = [n for n, sep in enumerate(seps) if sep == ":"]
    if seps and seps[-1] == ":" and len(colons) in (1, 2):
        when = "".join(p for p in parts[-1] if isinstance(p, str)).strip()
        if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", when) and all(isinstance(p, str) for p in parts[-1]):
            # a stray "|" inside a schedule stays literal text, as A1111's grammar leaves it
            def join(lo: int, hi: int) -> list:
                out: list = []
                for n in range(lo, hi):
                    out += parts[n] + (["|"] if n + 1 < hi else [])
                return out
            if len(colons) == 2:
                return _Sched(join(0, colons[0] + 1), join(colons[0] + 1, len(parts) - 1), when), end
            return _Sched([], join(0, len(parts) - 1), when), end
    if not seps:
        return ["[", *parts[0], "]"], end
    return None, start


def _run(text: str) -> list:
    """Drive the parse generators with an explicit stack; each (kind, position, stop) is parsed once."""
    memo: dict[tuple, tuple] = {}

    def start(call: tuple) -> Generator:
        return _parse_square(text, call[1]) if call[0] == "[" else _parse(text, call[1], call[2])

    root = ("(", 0, "")
    stack = [(root, start(root))]
    value: Any = None
    while stack:
        key, gen = stack[-1]
        try:
            call = gen.send(value)
        except StopIteration as done:
            stack.pop()
            memo[key] = value = done.value
            continue
        if call in memo:
            value = memo[call]
        else:
            stack.append((call, start(call)))
            value = None
    return memo[root][0]


def _children(node: Any, step: int | None, steps: int) -> list:
    """The sub-sequences of a node (those shown at ``step``, or all of them when ``step`` is None)."""
    if isinstance(node, _Sched):
        if step is None:
            return [node.before, node.after]
        return [node.before if step <= _step_of(node.when, steps) else node.after]
    if isinstance(node, _Alt):
        return node.options if step is None else [node.options[(step - 1) % len(node.options)]]
    return [node]


def _step_of(when: str, steps: int) -> int:
    value = float(when)
    value = value * steps if "." in when else value  # A1111 >= 1.6: "0.5" is a fraction, "10" a step
    return int(min(steps, value))   # min first: "[a:999...9]" is inf as a float


def _collect(seq: list, steps: int, out: set[int]) -> None:
    stack = [seq]
    while stack:
        for node in stack.pop():
            if isinstance(node, str):
                continue
            if isinstance(node, _Sched):
                at = _step_of(node.when, steps)
                if at >= 1:
                    out.add(at)
            elif isinstance(node, _Alt):
                out.update(range(1, steps + 1))
            stack.extend(_children(node, None, steps))


def _render(seq: list, step: int, steps: int) -> str:
    out: list[str] = []
    stack = [iter(seq)]   # depth-first, in order, without recursion
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
        elif isinstance(node, str):
            out.append(node)
        else:
            stack.extend(iter(child) for child in reversed(_children(node, step, steps)))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end_step, text), ...]: the text to use up to and including each (1-based) end step.

    >>> prompt_schedule("a [b:c:0.5] d", 10)
    [(5, 'a b d'), (10, 'a c d')]
    """
    tree = _run(prompt)
    ends: set[int] = {steps}
    _collect(tree, steps, ends)
    schedule: list[tuple[int, str]] = []
    for end in sorted(ends):
        text = _render(tree, end, steps)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule


# ---- extra networks and AND ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:name:args...>`` tag, e.g. ``<lora:castle:0.8>`` or ``<lora:castle:0.5:1>``."""

    kind: str
    name: str
    args: tuple[str, ...]

    @property
    def te_weight(self) -> float:
        return float(self.args[0]) if self.args else 1.0

    @property
    def unet_weight(self) -> float:
        return float(self.args[1]) if len(self.args) > 1 else self.te_weight


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove ``<lora:...>`` style tags from the text (as A1111 does before encoding) and return them."""
    found: list[ExtraNetwork] = []

    def take(m: re.Match) -> str:
        kind = {"lyco": "lora"}.get(m.group(1), m.group(1))
        name, *args = m.group(2).split(":")
        found.append(ExtraNetwork(kind, name.strip(), tuple(a.strip() for a in args)))
        return ""

    return _EXTRA.sub(take, prompt), found


def split_and(prompt: str) -> list[tuple[str, float]]:
    """``a AND b:0.5`` -> [("a", 1.0), ("b", 0.5)] (A1111's composable-diffusion syntax)."""
    out = []
    for sub in _AND.split(prompt):
        m = _AND_WEIGHT.match(sub)
        text, weight = (m.group(1), float(m.group(2))) if m and m.group(2) else (sub, 1.0)
        out.append((text.strip(), weight))
    return out
