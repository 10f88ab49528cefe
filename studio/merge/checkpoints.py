"""Checkpoint merger: weighted sum, add difference, no interpolation; block weights; fp16; VAE bake; discard.

Behaves like A1111's ``run_modelmerger`` (extras.py) where that is defined: only keys containing ``model``
merge, keys missing from B (or C) keep A's value, a 9-/8-channel A with a 4-channel B merges the first four
input channels of ``input_blocks.0.0`` only, fp16 halves float32 tensors, a baked VAE replaces A's
``first_stage_model.*`` tensors, the discard regex drops keys from the result, and the metadata carries
``sd_merge_recipe`` / ``sd_merge_models``. Unlike A1111 nothing is held in memory: this module plans the
output tensor by tensor and the torch-free kernel (kernel.py, run by runner.py) streams it block by block.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import families
from ..errors import StudioError
from .blocks import multiplier_for, parse_block_weights
from .sources import family_label, family_of, open_checkpoint, output_path, vae_tensors
from . import runner
from .stio import SafetensorsSource, TensorInfo, dtype_name, raw_numpy, save_small, temp_path

METHODS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "no_interpolation": "No interpolation"}
FORMATS = ("safetensors", "diffusers")
INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"
SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
MERGEABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float8 tensors are copied from A
Progress = Callable[[int, int, str], None]


@dataclass
class MergeSpec:
    """What to merge. Model names are anything the registry resolves (name, title, stem, hash)."""

    a: str
    b: str | None = None
    c: str | None = None
    method: str = "weighted_sum"            # weighted_sum | add_difference | no_interpolation
    multiplier: float = 0.5                 # M
    block_weights: list[float] | str | None = None   # 25 values (IN00–IN11, M00, OUT00–OUT11) or a preset name
    te_multiplier: float | None = None      # text encoder multiplier (default: M)
    output_name: str = ""                   # default: derived from the inputs like A1111
    output_format: str = "safetensors"      # safetensors (single file, LDM layout) | diffusers (folder)
    fp16: bool = False
    bake_vae: str | None = None             # a models/VAE name
    discard: str = ""                       # regex; matching keys are left out of the result
    save_metadata: bool = True
    overwrite: bool = False
    config_source: int = 0                  # A1111's "Copy config from": 0 A, B or C; 1 B; 2 C; 3 don't


CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")


@dataclass
class _Plan:
    action: str                  # copy | merge | inpaint | vae
    info: TensorInfo             # output dtype and shape
    m: float = 0.0


@dataclass
class MergeReport:
    """What happened besides the formula (shown to the user)."""

    copied_from_a: list[str] = field(default_factory=list)     # missing / mismatched in B or C
    discarded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)                  # the kernel's figures (time, peak RSS, …)


def _validate(spec: MergeSpec) -> tuple[re.Pattern | None, list[float] | None]:
    if spec.method not in METHODS:
        raise StudioError(f"Unknown merge method {spec.method!r}.", field="method", fix=f"use one of {', '.join(METHODS)}")
    if spec.method != "no_interpolation" and not spec.b:
        raise StudioError(f"{METHODS[spec.method]} needs model B.", field="model_b", fix="choose model B")
    if spec.method == "add_difference" and not spec.c:
        raise StudioError("Add difference needs model C (A + (B − C) × M).", field="model_c", fix="choose model C")
    if isinstance(spec.config_source, bool) or spec.config_source not in range(len(CONFIG_SOURCES)):
        raise StudioError(f"config_source is {spec.config_source!r}.", field="config_source",
                          fix="0: copy the .yaml of A, B or C (the first found); 1: B's; 2: C's; 3: none")
    if spec.output_format not in FORMATS:
        raise StudioError(f"Unknown output format {spec.output_format!r}.", field="output_format",
                          fix="use safetensors or diffusers")
    try:
        discard = re.compile(spec.discard) if spec.discard else None
    except re.error as e:
        raise StudioError(f"The discard pattern {spec.discard!r} is not a valid regex ({e}).", field="discard",
                          fix="fix the regular expression, or leave it empty") from None
    weights = parse_block_weights(spec.block_weights) if spec.block_weights not in (None, "", []) else None
    return discard, weights


def _default_name(spec: MergeSpec, infos: list) -> str:
    stem = [Path(i.model_name).name for i in infos]
    if spec.method == "no_interpolation":
        return f"{stem[0]}-converted"
    m = round(spec.multiplier, 2)
    return f"{stem[0]}_{round(1 - m, 2)}-{stem[1]}_{m}-{spec.method}-merged"


def _out_dtype(dtype: torch.dtype, fp16: bool) -> torch.dtype:
    # A1111's to_half touches float32 only; float64 joins it here (never useful in a checkpoint)
    return torch.float16 if fp16 and dtype in (torch.float32, torch.float64) else dtype


def _plan(spec, srcs, vae, weights, discard, report, family=None) -> dict[str, _Plan]:
    a, b, c = srcs
    plan: dict[str, _Plan] = {}
    interp = spec.method != "no_interpolation"
    for key, ia in a.infos.items():
        if discard is not None and discard.search(key):
            report.discarded.append(key)
            continue
        if vae is not None and key.startswith("first_stage_model.") and key[18:] in vae:
            v = vae[key[18:]]
            if v.numel() == math.prod(ia.shape):  # LDM stores the mid attention as 1x1 convs, some VAEs as linears
                plan[key] = _Plan("vae", TensorInfo(_out_dtype(v.dtype, spec.fp16), ia.shape))
                continue
            report.notes.append(f"VAE tensor {key} has another shape; kept model A's")
        out = _Plan("copy", TensorInfo(_out_dtype(ia.dtype, spec.fp16), ia.shape))
        plan[key] = out
        if not interp or not family.merges(key) or key in SKIP_ON_MERGE or ia.dtype not in MERGEABLE:
            continue
        others = [s.infos.get(key) for s in (b, c) if s is not None]
        if any(o is None or o.dtype not in MERGEABLE for o in others):
            report.copied_from_a.append(key)
            continue
        m = multiplier_for(key, spec.multiplier, weights, spec.te_multiplier)
        shapes = {o.shape for o in others}
        dtype = ia.dtype
        for o in others:
            dtype = torch.promote_types(dtype, o.dtype)
        if len(shapes) == 1 and shapes == {ia.shape}:
            plan[key] = _Plan("merge", TensorInfo(_out_dtype(dtype, spec.fp16), ia.shape), m)
        elif key == INPUT_CONV and len(shapes) == 1 and ia.shape[1] in (8, 9) and others[0].shape[1] == 4 \
                and ia.shape[:1] + ia.shape[2:] == others[0].shape[:1] + others[0].shape[2:]:
            plan[key] = _Plan("inpaint", TensorInfo(_out_dtype(dtype, spec.fp16), ia.shape), m)
            report.notes.append(f"model A has {ia.shape[1]} input channels: only the first 4 of {key} were merged")
        elif key == INPUT_CONV and ia.shape[1] == 4 and any(o.shape[1] in (8, 9) for o in others):
            raise StudioError("When merging an inpainting (or instruct-pix2pix) model with a normal one, the "
                              "inpainting model must be model A.", field="model_a", fix="swap models A and B")
        else:
            report.copied_from_a.append(key)
    return plan


def _job(spec, plan: dict[str, _Plan], srcs, vae_index: int | None) -> list:
    """The plan as kernel ops: ``[key, dtype, shape, action, m, [[input, key in that input], ...]]``."""
    def src(i, key):
        s = srcs[i]
        return [i, s.stored[key] if isinstance(s, SafetensorsSource) else key]

    ops = []
    for key, p in plan.items():
        head = [key, dtype_name(p.info.dtype), list(p.info.shape)]
        if p.action == "vae":
            ops.append(head + ["copy", 0.0, [[vae_index, key[18:]]]])
        elif p.action == "copy":
            ops.append(head + ["copy", 0.0, [src(0, key)]])
        else:
            used = [i for i in range(3) if srcs[i] is not None]
            action = spec.method + ("_in4" if p.action == "inpaint" else "")
            ops.append(head + [action, p.m, [src(i, key) for i in used]])
    return ops


def _inputs(srcs, vae: dict | None, needed_vae: set[str], tmp_dir: Path, stack: ExitStack) -> tuple[list, int | None]:
    """Kernel inputs for A, B, C (+ the VAE): file paths when every model is a .safetensors file, so the kernel
    runs in its torch-free worker; else in-memory arrays and the kernel runs here."""
    from .kernel_io import ArrayInput
    files = all(s is None or isinstance(s, SafetensorsSource) for s in srcs)
    slots = [s if s is not None else srcs[0] for s in srcs]  # no B / C: the slot is never read
    inputs: list = [s.path if isinstance(s, SafetensorsSource) else ArrayInput(s.arrays()) for s in slots]
    if vae is None or not needed_vae:
        return inputs, None
    tensors = {k: v for k, v in vae.items() if k in needed_vae}
    if not files:
        inputs.append(ArrayInput({k: (dtype_name(v.dtype), raw_numpy(v)) for k, v in tensors.items()}))
    else:  # the worker reads files only: hand it the (small) VAE as one
        path = temp_path(tmp_dir / "vae.safetensors")
        stack.callback(path.unlink, missing_ok=True)
        save_small(path, {k: v.contiguous() for k, v in tensors.items()})
        inputs.append(os.fspath(path))
    return inputs, len(inputs) - 1


def _config_yaml(spec, infos) -> Path | None:
    """The sidecar .yaml to copy next to the result (A1111 extras.create_config: A, then B, then C for 0)."""
    def near(info):
        if info is None or info.kind != "file":
            return None
        path = Path(info.path).with_suffix(".yaml")
        return path if path.is_file() else None

    picks = {0: infos, 1: infos[1:2], 2: infos[2:3]}.get(spec.config_source, [])
    return next((y for y in map(near, picks) if y is not None), None)


def _custom_name(spec, dest: Path) -> str:
    """The recipe's custom_name: the name the user gave ("" for a derived one), without the extension added."""
    if not spec.output_name:
        return ""
    return dest.stem if dest.suffix.lower() == ".safetensors" else dest.name


def _metadata(spec, infos, srcs, registry, weights, out_name, report) -> dict[str, str]:
    meta = {"format": "pt"}
    if not spec.save_metadata:
        return meta
    hashes = [registry.ensure_hash(i) if i is not None else None for i in infos]
    in_ch = srcs[0].infos.get(INPUT_CONV)
    recipe = {
        "type": "webui",  # the value A1111 writes: tools that read sd_merge_recipe look for it
        "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1], "tertiary_model_hash": hashes[2],
        "primary_model": infos[0].name, "secondary_model": infos[1].name if infos[1] else None,
        "tertiary_model": infos[2].name if infos[2] else None,
        "interp_method": METHODS[spec.method], "method": spec.method, "multiplier": spec.multiplier,
        "block_weights": weights, "te_multiplier": spec.te_multiplier, "save_as_half": spec.fp16,
        "custom_name": out_name, "config_source": spec.config_source, "bake_in_vae": spec.bake_vae or "None",
        "discard_weights": spec.discard,
        "is_inpainting": bool(in_ch and in_ch.shape[1] == 9 and spec.method != "no_interpolation"),
        "is_instruct_pix2pix": bool(in_ch and in_ch.shape[1] == 8 and spec.method != "no_interpolation"),
    }
    models: dict = {}
    for info, sha, src in zip(infos, hashes, srcs):
        if info is None:
            continue
        legacy = registry.hashes.get_or_compute(info.path, "legacy") if info.kind == "file" else None
        own = _json_or_none(src.metadata.get("sd_merge_recipe"))
        models[sha] = {"name": info.name, "legacy_hash": legacy, "sd_merge_recipe": own}
        models.update(_json_or_none(src.metadata.get("sd_merge_models")) or {})
    meta["sd_merge_recipe"] = json.dumps(recipe)
    meta["sd_merge_models"] = json.dumps(models)
    return meta


def _json_or_none(text):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def merge_checkpoints(spec: MergeSpec, registry, settings, progress: Progress | None = None,
                      report: MergeReport | None = None, *, hash_output: bool = True) -> Path:
    """Merge per ``spec`` into ``models/Stable-diffusion``; returns the new file (or folder) path.

    ``progress(done, total, text)`` is called as blocks of the output are written (text: a tensor name).
    ``report`` (optional) collects keys copied from A, discarded keys, notes and the kernel's figures. The
    registry is refreshed so the result is listed at once. With ``hash_output`` the file's sha256 (its A1111
    hash) is computed as it is written and put in the hash cache."""
    report = report if report is not None else MergeReport()
    discard, weights = _validate(spec)
    infos = [registry.find_checkpoint(spec.a, "model_a"),
             registry.find_checkpoint(spec.b, "model_b") if spec.b and spec.method != "no_interpolation" else None,
             registry.find_checkpoint(spec.c, "model_c") if spec.c and spec.method == "add_difference" else None]
    ext = ".safetensors" if spec.output_format == "safetensors" else None
    out_name = spec.output_name or _default_name(spec, [i for i in infos if i])
    dest = output_path(settings.ckpt_path, out_name, ext=ext, overwrite=spec.overwrite)
    with ExitStack() as stack:
        srcs = [stack.enter_context(open_checkpoint(i)) if i is not None else None for i in infos]
        fams = [family_of(s, i.name) if s is not None else None for s, i in zip(srcs, infos)]
        for fam, info, label in zip(fams[1:], infos[1:], ("model_b", "model_c")):
            if fam is not None and fam != fams[0]:
                raise StudioError(f"Model {label[-1].upper()} {info.name!r} is {family_label(fam)} but model A "
                                  f"{infos[0].name!r} is {family_label(fams[0])}; only models of one family merge.",
                                  field=label, fix=f"pick a {family_label(fams[0])} model")
        vae = vae_tensors(registry, spec.bake_vae) if spec.bake_vae and spec.bake_vae != "None" else None
        plan = _plan(spec, srcs, vae, weights, discard, report, families.get(fams[0]))
        meta = _metadata(spec, infos, srcs, registry, weights, _custom_name(spec, dest), report)
        config = _config_yaml(spec, infos)
        inputs, vae_index = _inputs(srcs, vae, {k[18:] for k, p in plan.items() if p.action == "vae"},
                                    dest.parent, stack)
        ops = _job(spec, plan, srcs, vae_index)
        if spec.output_format == "safetensors":
            tmp = temp_path(dest)
            report.stats = runner.run(ops, inputs, tmp, meta, progress, sha256=hash_output)
            os.replace(tmp, dest)
            if hash_output:
                registry.hashes.put(dest, "checkpoint", report.stats["sha256"])  # no second read to hash it
            if config is not None:
                shutil.copyfile(config, dest.with_suffix(".yaml"))
                report.notes.append(f"config {config.name} copied to {dest.with_suffix('.yaml').name}")
        else:
            single = dest.with_name(f".{dest.name}.{os.getpid()}.single.safetensors")  # the loader wants the suffix
            try:
                report.stats = runner.run(ops, inputs, single, meta, progress)
                if config is not None:  # read by the loader: the folder's scheduler gets its prediction type
                    shutil.copyfile(config, single.with_suffix(".yaml"))
                _to_diffusers(single, dest, spec.fp16, meta)
            finally:
                single.unlink(missing_ok=True)
                single.with_suffix(".yaml").unlink(missing_ok=True)
    if report.copied_from_a:
        report.notes.append(f"{len(report.copied_from_a)} tensors are missing or shaped differently in B/C and "
                            f"were copied from A (e.g. {report.copied_from_a[0]})")
    registry.refresh()
    return dest


def _to_diffusers(single: Path, dest: Path, fp16: bool, meta: dict) -> None:
    """Re-express a written single file as a diffusers folder (loads it whole: folders are not streamed)."""
    from ..loading.diffusers_export import write_diffusers_folder
    from ..loading.single_file import load_single_file

    comps = load_single_file(single, dtype=torch.float16 if fp16 else torch.float32)
    tmp = temp_path(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    write_diffusers_folder(comps, tmp)
    if "sd_merge_recipe" in meta:
        (tmp / "sd_merge_recipe.json").write_text(json.dumps({k: _json_or_none(v) or v for k, v in meta.items()},
                                                             indent=1))
    if dest.exists():  # overwrite was allowed: move the old one aside first so the swap is one rename
        old = temp_path(dest.with_name(dest.name + ".old"))
        os.replace(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, dest)


def spec_dict(spec: MergeSpec) -> dict:
    return asdict(spec)
