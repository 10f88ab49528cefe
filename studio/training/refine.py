"""Refine: start a run from weights trained before (kohya's ``--network_weights``; a TI embedding for TI).

The file is read back into the freshly injected peft layers, so the run's first step computes what the file
computes: the inverse of ``export.network_state_dict`` (same key names, and the file's alpha / rank turned into
the run's peft scaling). A file that does not fit the run (another family, method, rank or layer set) is refused
before the first step with the layer and the setting to change; layers the file lacks start at zero, as new.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import StudioError
from .export import file_rank, layer_key, tensors_of
from .networks import ADAPTER, Network

FIELD = "network.network_weights"
# the tensor of each layer kind that carries the file's scale (peft multiplies the product by its own scaling)
_SCALED = ("lora_B", "hada_w1_a", "lokr_w2", "lokr_w2_a")
_FILE_NAMES = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
_SHOWN = 3
_KINDS = {".lora_down.": "LoRA", ".hada_": "LoHa", ".lokr_": "LoKr"}
_RUN_KIND = {"loha": "LoHa", "lokr": "LoKr"}


def apply_network_weights(net: Network, path: str | Path, family: str) -> dict[str, int]:
    """Load ``path`` into ``net``; returns {"loaded": layers, "new": layers the file did not have}."""
    path = Path(path)
    if net.method == "textual_inversion":
        return _embedding(net, path)
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for a damaged header
        raise StudioError(f"{path.name} is not a readable .safetensors LoRA ({exc}).", field=FIELD, path=str(path),
                          fix="pick a LoRA / LyCORIS .safetensors file, e.g. the output of an earlier run") from None
    kinds = {kind for k in tensors for mark, kind in _KINDS.items() if mark in k}
    want = _RUN_KIND.get(net.method, "LoRA")
    if kinds and want not in kinds:
        raise StudioError(f"{path.name} is a {'/'.join(sorted(kinds))} file; this run trains a {want}.", field=FIELD,
                          path=str(path), fix=f"set the method to the file's ({'/'.join(sorted(kinds))})")
    used: set[str] = set()
    loaded = new = 0
    with torch.no_grad():
        for part, model in net.modules.items():
            for name, module in model.named_modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                params = tensors_of(module, ADAPTER, detach=False)
                if not params:
                    continue
                key = layer_key(name, part, family, model)
                found = {attr: tensors.get(f"{key}.{_FILE_NAMES.get(attr, attr)}") for attr in params}
                if all(t is None for t in found.values()):
                    new += 1
                    continue
                missing = [a for a, t in found.items() if t is None]
                if missing:
                    raise _mismatch(path, key, f"has no {', '.join(missing)} (it is another kind of network)",
                                    "pick the method the file was trained with (LoRA, LoHa or LoKr)")
                for attr, t in found.items():
                    if tuple(t.shape) != tuple(params[attr].shape):
                        raise _mismatch(path, key, f"{attr} is {tuple(t.shape)} in the file, "
                                        f"{tuple(params[attr].shape)} in this run",
                                        "set rank / alpha (and conv rank) to the file's: its run.toml has them")
                alpha = tensors.get(f"{key}.alpha")
                rank = file_rank({a: t for a, t in found.items()})
                file_scale = 1.0 if rank is None else (float(alpha) / rank if alpha is not None else 1.0)
                ratio = file_scale / float(module.scaling[ADAPTER])
                for attr, t in found.items():
                    value = t.to(torch.float32) * (ratio if attr == _first_scaled(found) else 1.0)
                    params[attr].copy_(value.to(device=params[attr].device, dtype=params[attr].dtype))
                    used.add(f"{key}.{_FILE_NAMES.get(attr, attr)}")
                used.add(f"{key}.alpha")
                loaded += 1
    left = sorted({k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in tensors if k not in used
                   and not k.endswith(".alpha")})
    if left:
        where = "text encoder" if any("_te" in k[:9] for k in left) else "UNet"
        raise StudioError(f"{path.name} has {len(left)} layer(s) this run does not train ({', '.join(left[:_SHOWN])}"
                          f"{', …' if len(left) > _SHOWN else ''}); refining would drop them.", field=FIELD,
                          path=str(path), fix=f"train the {where} with the same layers (method, UNet layers, conv "
                                              "rank) as the file's run")
    if not loaded:
        raise StudioError(f"No layer of this run is in {path.name}.", field=FIELD, path=str(path),
                          fix="pick a LoRA trained on a model of this family")
    return {"loaded": loaded, "new": new}


def _first_scaled(found: dict) -> str | None:
    return next((a for a in _SCALED if a in found), None)


def _mismatch(path: Path, key: str, what: str, fix: str) -> StudioError:
    return StudioError(f"{path.name} does not fit this run: layer {key} {what}.", field=FIELD, path=str(path),
                       fix=fix)


def _embedding(net: Network, path: Path) -> dict[str, int]:
    from ..adapters.embeddings import load_embedding_file
    ef = load_embedding_file(path)
    vectors = ef.parts.get("single")
    emb = net.modules["text_encoder"].get_input_embeddings().weight
    if vectors is None or vectors.shape[1] != emb.shape[1]:
        raise StudioError(f"Embedding {path.name} does not fit this text encoder (width {ef.shape}, the model's "
                          f"{emb.shape[1]}).", field=FIELD, path=str(path),
                          fix="pick an embedding trained on a model of this family")
    if vectors.shape[0] != len(net.ti_ids):
        raise StudioError(f"Embedding {path.name} has {vectors.shape[0]} vector(s); this run trains "
                          f"{len(net.ti_ids)}.", field="textual_inversion.num_vectors", path=str(path),
                          fix=f"set vectors per token to {vectors.shape[0]}")
    with torch.no_grad():
        emb[net.ti_ids] = vectors.to(device=emb.device, dtype=emb.dtype)
    return {"loaded": vectors.shape[0], "new": 0}
