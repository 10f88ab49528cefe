"""The loaded parts of one checkpoint, as the pipeline manager holds them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any



@dataclass
class Components:
    """Modules of one checkpoint. Pipelines for every mode are built as views over these same objects."""

    family: str                        # the family's name (``studio.families``); ``spec`` is the Family
    unet: Any
    vae: Any
    text_encoder: Any | None           # the family's first text encoder (None where it has none)
    tokenizer: Any | None
    scheduler_config: dict             # diffusers scheduler config (betas, prediction_type, ...)
    text_encoder_2: Any | None = None  # the second one, where the family has two
    tokenizer_2: Any | None = None
    text_encoder_3: Any | None = None  # a third one (SD3's T5)
    tokenizer_3: Any | None = None
    prediction_type: str = "epsilon"   # "epsilon", "v_prediction" or "flow"
    in_channels: int = 4               # 9: inpainting, 8: instruct-pix2pix, 5: depth
    source: str = ""                   # file or folder it came from
    notes: list[str] = field(default_factory=list)   # what the loader decided and why (shown to users)

    @property
    def spec(self):
        """The ``Family`` these components are of."""
        from .. import families
        fam = families.get(self.family)
        if fam is None:
            from ..errors import ModelLoadError
            raise ModelLoadError(f"Unknown model family {self.family!r}.", fix="install the plug-in that provides it")
        return fam

    @property
    def is_inpaint(self) -> bool:
        """An inpainting model (SD's 9-channel UNets, FLUX Fill): it serves every mode through a mask."""
        from .. import families
        fam = families.get(self.family)
        return fam.is_inpaint_model(self.in_channels) if fam else self.in_channels == 9

    def text_modules(self) -> dict[str, Any]:
        """Text encoders and tokenizers by pipeline argument name (None where the family has none)."""
        out = {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
               "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2}
        if self.text_encoder_3 is not None:
            out.update(text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
        return out

    def modules(self) -> dict[str, Any]:
        """The torch modules, by diffusers component name."""
        out = {"unet": self.unet, "vae": self.vae}
        if self.text_encoder is not None:
            out["text_encoder"] = self.text_encoder
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        if self.text_encoder_3 is not None:
            out["text_encoder_3"] = self.text_encoder_3
        return out

    def nbytes(self) -> int:
        """Bytes held by parameters and buffers of all modules (quantised weights at their real size)."""
        from ..quantize import module_bytes
        return sum(module_bytes(module) for module in self.modules().values())
