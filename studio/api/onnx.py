"""POST /sdapi/v1/export/onnx (a studio extension; A1111 has no export API): a checkpoint to ONNX, in the job queue."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from ..errors import StudioError

if TYPE_CHECKING:  # pragma: no cover
    from ..app import Studio


class OnnxExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: Optional[str] = Field(None, description="Title, name or hash as in /sdapi/v1/sd-models; empty: the "
                                                        "current checkpoint")


class OnnxExportResponse(BaseModel):
    checkpoint: str = Field(description="The exported checkpoint's title")
    folder: str = Field(description="Where the files went (models/onnx/<name>-<short hash>)")
    files: dict[str, int] = Field(description="Each file (relative to the folder) and its bytes")
    total_bytes: int
    seconds: float = Field(description="How long the export took")
    max_error: dict[str, float] = Field(description="Per part: max |onnxruntime - torch| on the check inputs, "
                                                    "relative to the largest torch value")


def register_onnx(r: APIRouter, studio: "Studio") -> None:
    """Add the export route to ``r`` (the router carries auth and the error shape)."""
    from ..onnx.export import export_checkpoint

    async def export_onnx(body: Optional[OnnxExportRequest] = None) -> dict:
        name = (body.checkpoint if body is not None else None) or ""
        try:
            outcome = await run_in_threadpool(export_checkpoint, studio, name)
        except RuntimeError as exc:    # the queue is shut down
            raise StudioError(str(exc), status=503) from None
        return outcome.to_dict()

    r.add_api_route("/sdapi/v1/export/onnx", export_onnx, methods=["POST"], response_model=OnnxExportResponse,
                    tags=["export"], summary="Export a checkpoint to ONNX (studio extension)",
                    description="The UNet, VAE decoder / encoder and CLIP text encoder(s) of an SD 1.x / 2.x / SDXL "
                                "checkpoint through torch.onnx into models/onnx, each checked against torch. Runs "
                                "in the job queue and answers when the files are written; the onnx_runtime "
                                "option (--onnx) then runs txt2img's UNet and VAE on onnxruntime.")
