"""Parts kept in files of their own, as Forge and ComfyUI users keep them: text encoders (``clip_l``,
``t5xxl_fp16``, ``qwen_3_4b``) in models/text_encoder and a DiT family's VAE (``ae.safetensors``) in models/VAE.

A file's kind is read off its header (tensor names and shapes), never guessed from its name; the name only
breaks ties between files of the same kind (the one whose name says it, e.g. ``clip_l``, first).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .state_dict import read_header_shapes

EXTS = (".safetensors",)
WRAPPERS = ("text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer.",
            "text_encoders.qwen3_4b.transformer.", "vae.", "first_stage_model.")


@dataclass(frozen=True)
class Companion:
    kind: str            # "clip" | "t5" | "qwen3" | "vae16"
    path: Path
    prefix: str          # the wrapper its tensor names carry ("" for a bare file)
    width: int = 0       # hidden width of a text encoder (CLIP-L 768, T5-XXL 4096, Qwen3-4B 2560): what a model
    # asks for


def _strip(shapes: dict) -> tuple[dict, str]:
    for w in WRAPPERS:
        if any(k.startswith(w) for k in shapes):
            return {k[len(w):]: v for k, v in shapes.items() if k.startswith(w)}, w
    return shapes, ""


def kind_of(shapes: dict) -> tuple[str | None, str, int]:
    """(kind "clip" / "t5" / "qwen3" / "vae16" or None, wrapper prefix, text width) for a file's header shapes."""
    inner, prefix = _strip(shapes)
    # Qwen3 (HF names; ComfyUI's and causal-LM files wrap them in ``model.``): its per-head q / k norms tell it
    # from Qwen2 / Llama, which have the same names otherwise
    lm = {k.removeprefix("model."): v for k, v in inner.items()}
    if "embed_tokens.weight" in lm and "layers.0.self_attn.q_norm.weight" in lm:
        return "qwen3", prefix, int(lm["embed_tokens.weight"][1])
    if "shared.weight" in inner and any(".SelfAttention.q.weight" in k for k in inner):
        return "t5", prefix, int(inner["shared.weight"][1])
    flat = {k.removeprefix("text_model."): v for k, v in inner.items()}
    if "embeddings.token_embedding.weight" in flat and "encoder.layers.0.mlp.fc1.weight" in flat:
        return "clip", prefix, int(flat["embeddings.token_embedding.weight"][1])
    conv_out = inner.get("encoder.conv_out.weight")
    if conv_out is not None and int(conv_out[0]) == 32 and "encoder.down.0.block.0.conv1.weight" in inner:
        return "vae16", prefix, 0       # 16 latent channels (mean and logvar): FLUX's / SD3's VAE
    return None, prefix, 0


def find(folders: list[Path]) -> list[Companion]:
    """Every companion file in ``folders`` (not recursive), classified; unreadable files are left out."""
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in EXTS or not path.is_file():
                continue
            try:
                kind, prefix, width = kind_of(read_header_shapes(str(path)))
            except ModelLoadError:
                continue
            if kind is not None:
                out.append(Companion(kind, path, prefix, width))
    return out


def pick(found: list[Companion], kind: str, width: int = 0, hints: tuple[str, ...] = ()) -> Companion | None:
    """The companion of ``kind`` (and text ``width``, when given): one whose file name has a hint first, then
    by name."""
    cands = [c for c in found if c.kind == kind and (not width or c.width == width)]
    cands.sort(key=lambda c: (not any(h in c.path.name.lower() for h in hints), c.path.name.lower()))
    return cands[0] if cands else None


def fill(sd: dict, shapes, found, wants, notes: list[str]) -> dict:
    """``sd`` with the parts it lacks read from companion files: ``wants`` holds (kind, prefix in the all-in-one
    layout, text width or 0, file-name hints); ``found`` is ``find``'s list or a callable giving it (read only
    when a part is missing). Each part taken is noted."""
    missing = [w for w in wants if not any(k.startswith(w[1]) for k in shapes)]
    if not missing:
        return sd
    found = found() if callable(found) else found
    out = dict(sd)
    for kind, prefix, width, hints in missing:
        c = pick(found, kind, width, hints)
        if c is not None:
            out.update(read(c, prefix))
            notes.append(f"{kind} from {c.path.name}")
    return out


def read(companion: Companion, prefix: str) -> dict:
    """The companion's tensors under ``prefix`` (the all-in-one file's name for that part); a CLIP file's
    ``text_model.`` wrapper, present or not, is dropped."""
    from .state_dict import read_state_dict
    sd = read_state_dict(str(companion.path))
    cut = len(companion.prefix)
    out = {}
    for k, v in sd.items():
        if k.startswith(companion.prefix):
            rest = k[cut:]
            out[prefix + (rest.removeprefix("text_model.") if companion.kind == "clip" else rest)] = v
    return out
