"""Merge routes (not in A1111, which has no merge API): POST /sdapi/v1/merge/checkpoints and /sdapi/v1/merge/lora.

Both run through the studio's one job queue (after any queued generation) and answer when the file is written.
Errors use the router's one error shape; ``field`` names the body field at fault (``b``, ``block_weights``...).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Union

from fastapi import APIRouter, Body
from fastapi.concurrency import run_in_threadpool
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from ..errors import StudioError
from ..merge.blocks import BLOCK_IDS, parse_block_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio

# engine field names -> body field names
_BODY_FIELD = {"model_a": "a", "model_b": "b", "model_c": "c", "vae": "bake_vae"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MergeCheckpointsRequest(_Body):
    """Mirrors the engine's MergeSpec. Model names are anything the checkpoint list knows (title, name, hash)."""

    a: str = Field(validation_alias=AliasChoices("a", "primary_model_name"), description="Primary model (A)")
    b: Optional[str] = Field(None, validation_alias=AliasChoices("b", "secondary_model_name"),
                             description="Secondary model (B); needed unless method is no_interpolation")
    c: Optional[str] = Field(None, validation_alias=AliasChoices("c", "tertiary_model_name"),
                             description="Tertiary model (C); add_difference only")
    method: Literal["weighted_sum", "add_difference", "no_interpolation"] = Field(
        "weighted_sum",
        description="weighted_sum: A·(1−M)+B·M; add_difference: A+(B−C)·M; no_interpolation: A only")
    multiplier: float = Field(0.5, ge=-10, le=10, description="M")
    block_weights: Optional[Union[list[float], str]] = Field(
        None, description=f"{len(BLOCK_IDS)} multipliers ({BLOCK_IDS[0]}–IN11, M00, OUT00–{BLOCK_IDS[-1]}) as a "
                          "list or comma-separated string, or a preset name (GRAD_V, WRAP08...); they replace M "
                          "inside the UNet blocks")
    te_multiplier: Optional[float] = Field(None, description="Text encoder multiplier (default: M)")
    output_name: str = Field("", description="File name in models/Stable-diffusion; empty: named after the inputs")
    output_format: Literal["safetensors", "diffusers"] = "safetensors"
    fp16: bool = False
    bake_vae: Optional[str] = Field(None, description="A models/VAE name to bake in (None: keep A's)")
    discard: str = Field("", description="Regex: matching keys are left out of the result")
    save_metadata: bool = Field(True, description="Write sd_merge_recipe / sd_merge_models metadata")
    overwrite: bool = False
    config_source: int = Field(0, ge=0, le=3, description="Copy the sidecar .yaml from: 0 A, B or C (the first "
                                                          "found), 1 B, 2 C, 3 none (A1111's config_source)")

    @field_validator("block_weights")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        if v in (None, "", []):
            return None
        try:
            return parse_block_weights(v)
        except StudioError as exc:  # pydantic turns ValueError into a 422 located at this field
            raise ValueError(str(exc)) from None


class MergeResponse(BaseModel):
    title: str = Field(description="As in GET /sdapi/v1/sd-models (checkpoints) or the LoRA name")
    path: str = Field(description="The new file (or folder), inside the models folder")
    notes: list[str] = Field(default_factory=list)


class LoraEntry(_Body):
    name: str
    weight: float = 1.0
    te: Optional[float] = Field(None, description="Text encoder weight (default: weight)")
    unet: Optional[float] = Field(None, description="UNet weight (default: weight)")

    def entry(self) -> tuple:
        te, unet = (self.weight if w is None else w for w in (self.te, self.unet))
        return self.name, te, unet


class _LoraOut(_Body):
    output_name: str = Field(min_length=1)
    fp16: bool = True
    overwrite: bool = False


class BakeBody(_LoraOut):
    action: Literal["bake"]
    checkpoint: str
    loras: list[LoraEntry] = Field(min_length=1)
    fp16: bool = False
    save_metadata: bool = True


class MergeLorasBody(_LoraOut):
    action: Literal["merge"]
    loras: list[LoraEntry] = Field(min_length=1)
    mode: Literal["concat", "svd"] = "concat"
    rank: Optional[int] = Field(None, ge=1, description="Target rank (svd)")
    conv_rank: Optional[int] = Field(None, ge=1)
    clamp_quantile: Optional[float] = Field(None, gt=0, le=1)


class ResizeBody(_LoraOut):
    action: Literal["resize"]
    lora: str
    method: Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"] = "fixed"
    rank: Optional[int] = Field(None, ge=1, description="New rank (fixed) or the cap (dynamic methods)")
    conv_rank: Optional[int] = Field(None, ge=1)
    param: Optional[float] = Field(None, gt=0, description="sv_ratio: ratio ≥ 1; sv_fro / sv_cumulative: share 0–1")


class ExtractBody(_LoraOut):
    action: Literal["extract"]
    tuned: str
    base: str
    rank: int = Field(32, ge=1)
    conv_rank: int = Field(0, ge=0)
    clamp_quantile: Optional[float] = Field(0.99, gt=0, le=1)
    min_diff: float = Field(0.01, ge=0)


LoraRequest = Annotated[Union[BakeBody, MergeLorasBody, ResizeBody, ExtractBody], Body(discriminator="action")]


class LayerReport(BaseModel):
    old_rank: Optional[int] = None
    new_rank: int
    energy: float = Field(description="Kept share of the layer's squared Frobenius norm")


class LoraMergeResponse(MergeResponse):
    action: str
    energy: Optional[float] = Field(None, description="Kept share over all layers (LoRA outputs)")
    layers: dict[str, LayerReport] = Field(default_factory=dict)


def _renamed(exc: StudioError) -> StudioError:
    if exc.field in _BODY_FIELD:
        exc.field = _BODY_FIELD[exc.field]
    return exc


async def _run(submit) -> Any:
    try:
        job = submit()
        return await run_in_threadpool(job.wait)
    except StudioError as exc:
        raise _renamed(exc)
    except RuntimeError as exc:  # the queue is shut down
        raise StudioError(str(exc), status=503) from None


def register_merge(r: APIRouter, studio: "Studio") -> None:
    """Add the merge routes to ``r`` (the router carries auth and the error shape)."""
    from ..merge.service import submit_checkpoint_merge, submit_lora

    def _outcome(o: Any) -> dict:
        root = studio.settings.ckpt_path if o.kind == "checkpoint" else studio.settings.lora_path
        if not o.path.resolve().is_relative_to(root.resolve()):  # the engine's name check makes this impossible
            raise StudioError("The output left the models folder.", field="output_name", status=500)
        return {"title": o.title, "path": str(o.path), "notes": o.notes}

    async def merge_checkpoints(body: MergeCheckpointsRequest) -> dict:
        from ..merge.checkpoints import MergeSpec
        spec = MergeSpec(**body.model_dump())
        outcome = await _run(lambda: submit_checkpoint_merge(studio, spec))
        if outcome is None:
            raise StudioError("The merge was interrupted; nothing was written.", status=409)
        return _outcome(outcome)

    async def merge_lora(body: LoraRequest) -> dict:
        kw = body.model_dump(exclude={"action"})
        if "loras" in kw:
            kw["loras"] = [e.entry() for e in body.loras]
        outcome = await _run(lambda: submit_lora(studio, body.action, **kw))
        if outcome is None:
            raise StudioError("The job was interrupted; nothing was written.", status=409)
        layers = {k: {"old_rank": s.old_rank, "new_rank": s.new_rank, "energy": s.energy}
                  for k, s in outcome.layers.items()}
        return {**_outcome(outcome), "action": body.action, "energy": outcome.energy, "layers": layers}

    tags = ["merge"]
    r.add_api_route("/sdapi/v1/merge/checkpoints", merge_checkpoints, methods=["POST"], response_model=MergeResponse,
                    tags=tags, summary="Merge checkpoints (studio extension; A1111 has no merge API)",
                    description="Weighted sum, add difference or no interpolation, with optional block weights, "
                                "fp16, VAE bake and key discard, written into models/Stable-diffusion. Runs in the "
                                "job queue; answers when the file is written and listed by /sdapi/v1/sd-models.")
    r.add_api_route("/sdapi/v1/merge/lora", merge_lora, methods=["POST"], response_model=LoraMergeResponse,
                    tags=tags, summary="LoRA tools: bake | merge | resize | extract (studio extension)",
                    description="`action` picks the tool: bake LoRAs into a checkpoint (models/Stable-diffusion), "
                                "merge LoRAs (concat: exact, svd: to a rank), resize a LoRA by SVD, or extract one "
                                "from tuned − base. LoRA outputs go to models/Lora and are listed by "
                                "/sdapi/v1/loras at once; `layers` / `energy` report the kept energy.")
