"""LoRA / LyCORIS adapters and textual-inversion embeddings: parse once, patch live weights, restore exactly.

- ``LoraLibrary`` scans the LoRA folders and caches parsed files (``LoraFile``) under a RAM budget.
- ``AdapterPatcher`` (one per loaded checkpoint) patches a set of LoRAs into the weights and restores them.
- ``EmbeddingLibrary`` finds embeddings and fits them to a model (``Embedding.vectors`` per text encoder).
"""
from .embeddings import Embedding, EmbeddingFile, EmbeddingLibrary, load_embedding_file
from .library import LoraInfo, LoraLibrary
from .lora_files import LoraFile, load_lora_file, parse_state_dict
from .patcher import AdapterPatcher, held_bytes, patch_cache_bytes, patcher_for

__all__ = ["AdapterPatcher", "Embedding", "EmbeddingFile", "EmbeddingLibrary", "LoraFile", "LoraInfo",
           "LoraLibrary", "held_bytes", "load_embedding_file", "load_lora_file", "parse_state_dict",
           "patch_cache_bytes", "patcher_for"]
