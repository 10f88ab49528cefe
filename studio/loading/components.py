"""The loaded parts of one checkpoint, as the pipeline manager holds them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")


@dataclass
class Components:
    """Modules of one checkpoint. Pipelines for every mode are built as views over these same objects."""

    family: str                        # one of FAMILIES
    unet: Any
    vae: Any
    text_encoder: Any | None           # CLIP-L (SD1, SDXL) or OpenCLIP-H (SD2); None for the SDXL refiner
    tokenizer: Any | None
    scheduler_config: dict             # diffusers scheduler config (betas, prediction_type, ...)
    text_encoder_2: Any | None = None  # SDXL OpenCLIP-bigG (with projection)
    tokenizer_2: Any | None = None
    prediction_type: str = "epsilon"   # "epsilon" or "v_prediction"
    in_channels: int = 4               # 9: inpainting, 8: instruct-pix2pix, 5: depth
    source: str = ""                   # file or folder it came from
    notes: list[str] = field(default_factory=list)   # what the loader decided and why (shown to users)

    @property
    def is_inpaint(self) -> bool:
        return self.in_channels == 9

    def modules(self) -> dict[str, Any]:
        """The torch modules, by diffusers component name."""
        out = {"unet": self.unet, "vae": self.vae}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out

    def nbytes(self) -> int:
        """Bytes held by parameters and buffers of all modules."""
        total = 0
        for module in self.modules().values():
            for t in list(module.parameters()) + list(module.buffers()):
                total += t.numel() * t.element_size()
        return total
