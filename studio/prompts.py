"""Encoding A1111 prompts into pipeline embeddings: emphasis, 75-token chunks, BREAK, embeddings, schedules.

We encode ourselves rather than letting diffusers do it: its prompt path truncates at 77 tokens, knows no
weights, and its clip-skip branch reaches for ``text_encoder.text_model`` which transformers 5 removed from
CLIPTextModel. A plain prompt of up to 75 tokens gives embeddings bit-identical to diffusers' own.
Conditioning is cached per (model, text, clip skip, text-encoder adapter state, embeddings), so a new seed
with the same prompt does not run the text encoder again.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import StudioError
from .lazy import torch
from .offload import execution_device
from .prompt_parser import parse_attention, prompt_schedule

CHUNK = 75
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack: move the last words after a close comma to the next chunk


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)   # (offset in chunk, embedding)


def _embedding_vectors(embedding: Any, encoder_index: int) -> torch.Tensor:
    """The vectors of a textual-inversion embedding for text encoder 0 (CLIP-L / SD2) or 1 (SDXL bigG)."""
    return embedding.vectors["text_encoder" if encoder_index == 0 else "text_encoder_2"]


class _TextModel:
    """One tokenizer + text encoder pair and the A1111 chunking rules for it."""

    def __init__(self, tokenizer: Any, encoder: Any, index: int, embeddings: dict):
        self.tok, self.enc, self.index = tokenizer, encoder, index
        vocab = tokenizer.get_vocab()
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id
        self.comma = vocab.get(",</w>")
        # embeddings matched by the token ids of their name, longest first
        self.by_first: dict[int, list[tuple[list[int], Any]]] = {}
        for name, emb in embeddings.items():
            ids = tokenizer(name, add_special_tokens=False).input_ids
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, emb))
        for items in self.by_first.values():
            items.sort(key=lambda x: -len(x[0]))

    def chunks(self, text: str) -> tuple[list[_Chunk], int]:
        """A1111's tokenization into 75-token chunks (with BREAK and comma backtracking); returns token count."""
        parsed = parse_attention(text)
        ids_list = self.tok([t for t, _ in parsed], add_special_tokens=False, verbose=False).input_ids
        chunks: list[_Chunk] = []
        chunk = _Chunk()
        count = 0
        last_comma = -1

        def close(last: bool = False) -> None:
            nonlocal chunk, count, last_comma
            count += len(chunk.tokens) if last else CHUNK
            pad = CHUNK - len(chunk.tokens)
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * pad + [self.id_end]
            chunk.weights = [1.0] + chunk.weights + [1.0] * pad + [1.0]
            chunks.append(chunk)
            chunk, last_comma = _Chunk(), -1

        for (piece, weight), ids in zip(parsed, ids_list):
            if piece == "BREAK" and weight == -1:
                close()
                continue
            pos = 0
            while pos < len(ids):
                token = ids[pos]
                emb, span = self._embedding_at(ids, pos)
                if emb is None:
                    if token == self.comma:
                        last_comma = len(chunk.tokens)
                    elif (len(chunk.tokens) == CHUNK and last_comma != -1
                          and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                        cut = last_comma + 1
                        moved_t, moved_w = chunk.tokens[cut:], chunk.weights[cut:]
                        chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                        close()
                        chunk.tokens, chunk.weights = moved_t, moved_w
                    if len(chunk.tokens) == CHUNK:
                        close()
                    chunk.tokens.append(token)
                    chunk.weights.append(weight)
                    pos += 1
                    continue
                n = int(emb.n_vectors)
                if len(chunk.tokens) + n > CHUNK:
                    close()
                chunk.fixes.append((len(chunk.tokens), emb))
                chunk.tokens += [0] * n
                chunk.weights += [weight] * n
                pos += span
        if chunk.tokens or not chunks:
            close(last=True)
        return chunks, count

    def _embedding_at(self, ids: list[int], pos: int) -> tuple[Any, int]:
        for name_ids, emb in self.by_first.get(ids[pos], ()):
            if ids[pos:pos + len(name_ids)] == name_ids:
                return emb, len(name_ids)
        return None, 0

    @contextlib.contextmanager
    def _fixes(self, fixes: list[tuple[int, Any]]) -> Iterator[None]:
        """Put embedding vectors into the token-embedding output at their positions (A1111's approach)."""
        if not fixes:
            yield
            return
        layer = self.enc.get_input_embeddings()

        def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            out = output.clone()
            for offset, emb in fixes:
                vec = _embedding_vectors(emb, self.index).to(out)
                out[0, 1 + offset:1 + offset + vec.shape[0]] = vec
            return out

        handle = layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, chunk: _Chunk, clip_skip: int, pooled_family: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = list(chunk.tokens)
        if self.id_pad != self.id_end:  # after the first end token, pad with the pad token (SD2, SDXL's bigG)
            first_end = tokens.index(self.id_end)
            tokens[first_end + 1:] = [self.id_pad] * (len(tokens) - first_end - 1)
        # the encoder's execution device: under --lowvram its parameters (so enc.device) are on `meta`
        ids = torch.tensor([tokens], device=execution_device(self.enc, torch.device("cpu")))
        with self._fixes(chunk.fixes):
            if pooled_family:  # families with pooled conditioning read the penultimate layer by default
                out = self.enc(ids, output_hidden_states=True)
                z, pooled = out.hidden_states[-(clip_skip + 1)], out[0]
            elif clip_skip <= 1:
                z, pooled = self.enc(ids)[0], None
            else:
                hidden = self.enc(ids, output_hidden_states=True).hidden_states
                z, pooled = getattr(self.enc, "text_model", self.enc).final_layer_norm(hidden[-clip_skip]), None
        weights = torch.tensor(chunk.weights, device=z.device, dtype=z.dtype)
        if (weights != 1).any():  # A1111 emphasis: scale token vectors, then restore the original mean
            mean = z.mean()
            z = z * weights.reshape(1, -1, 1)
            z = z * (mean / z.mean())
        return z, pooled


@dataclass
class Conditioning:
    """Encoded positive and negative prompts, each as a step schedule of embeddings."""

    positive: list[tuple[int, torch.Tensor, torch.Tensor | None]]   # (end_step, embeds [1,77n,d], pooled)
    negative: list[tuple[int, torch.Tensor, torch.Tensor | None]]
    pooled: bool                                         # the family's UNet takes pooled text embeddings too
    embeddings_used: set = field(default_factory=set)   # textual-inversion names found in the texts

    @staticmethod
    def _at(schedule: list, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        for end, z, pooled in schedule:
            if step <= end:
                return z, pooled
        return schedule[-1][1], schedule[-1][2]

    def kwargs(self) -> dict:
        """Pipeline keyword arguments for the first step."""
        z, pooled = self._at(self.positive, 0)
        nz, npooled = self._at(self.negative, 0)
        out = {"prompt_embeds": z, "negative_prompt_embeds": nz}
        if self.pooled:
            out.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)
        return out

    @property
    def scheduled(self) -> bool:
        return len(self.positive) > 1 or len(self.negative) > 1

    @staticmethod
    def stack(conds: list["Conditioning"], repeats: list[int]) -> "Conditioning | None":
        """One row per image of several unscheduled conditionings (``repeats[i]`` rows of ``conds[i]``), for a
        pipeline call that makes them all; None when they cannot share one call (a schedule, other lengths)."""
        if any(c.scheduled for c in conds) or len({c.pooled for c in conds}) != 1:
            return None

        def rows(side: str) -> tuple | None:
            firsts = [getattr(c, side)[0] for c in conds]
            if len({tuple(z.shape) for _, z, _ in firsts}) != 1:
                return None    # other chunk counts: padding one would change its picture
            z = torch.cat([z.expand(n, *z.shape[1:]) for (_, z, _), n in zip(firsts, repeats)])
            pooled = None
            if conds[0].pooled:
                pooled = torch.cat([p.expand(n, *p.shape[1:]) for (_, _, p), n in zip(firsts, repeats)])
            return firsts[0][0], z, pooled

        pos, neg = rows("positive"), rows("negative")
        if pos is None or neg is None:
            return None
        used = set().union(*(c.embeddings_used for c in conds))
        return Conditioning([pos], [neg], conds[0].pooled, used)

    def update(self, step: int, callback_kwargs: dict, batch: int) -> dict:
        """Swap the embeddings in a step callback when the schedule moves on at 0-based ``step``."""
        if not self.scheduled or "prompt_embeds" not in callback_kwargs:
            return {}
        z, pooled = self._at(self.positive, step)
        nz, npooled = self._at(self.negative, step)
        current = callback_kwargs["prompt_embeds"]
        if isinstance(current, list):   # pipelines taking one tensor per image (ragged lengths) keep them apart
            like = current[0]
            return {"prompt_embeds": [z[0].to(like.device, like.dtype)] * len(current),
                    "negative_prompt_embeds": [nz[0].to(like.device, like.dtype)] * len(current)}
        pos, neg = z.repeat(batch, 1, 1), nz.repeat(batch, 1, 1)
        out = {"prompt_embeds": torch.cat([neg, pos]) if current.shape[0] == 2 * batch else pos}
        if self.pooled and "add_text_embeds" in callback_kwargs:
            p, n = pooled.repeat(batch, 1), npooled.repeat(batch, 1)
            out["add_text_embeds"] = torch.cat([n, p]) if current.shape[0] == 2 * batch else p
        return {k: v.to(current.device, current.dtype) for k, v in out.items()}


class PromptEncoder:
    """Turns prompt text into Conditioning for a loaded checkpoint, with an LRU cache of encodings."""

    def __init__(self, cache_size: int = 128):
        self._cache: OrderedDict[tuple, tuple] = OrderedDict()
        self.cache_size = cache_size
        self.encoder_runs = 0   # text-encoder forward passes (tests and benchmarks read it)

    def _models(self, components: Any, embeddings: dict) -> list[_TextModel]:
        pairs = [(components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2)]
        return [_TextModel(tok, enc, i, embeddings) for i, (tok, enc) in enumerate(pairs) if enc is not None]

    @staticmethod
    def count_tokens(tokenizer: Any, text: str, embeddings: dict | None = None) -> tuple[int, int]:
        """(tokens used, tokens available in the chunks used), e.g. (80, 150), as A1111's counter shows.

        Needs only a tokenizer (no model), so the UI can count before any checkpoint is loaded.
        """
        chunks, count = _TextModel(tokenizer, None, 0, embeddings or {}).chunks(text)
        return count, max(1, len(chunks)) * CHUNK

    def _encode_text(self, components: Any, key: tuple, text: str, clip_skip: int, embeddings: dict,
                     check: Callable[[], None] | None = None,
                     max_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, frozenset]:
        cache_key = (key, text, clip_skip)
        hit = self._cache.get(cache_key)
        if hit is not None:
            self._cache.move_to_end(cache_key)
            return hit
        with torch.no_grad():
            return self._run_encoders(components, cache_key, text, clip_skip, embeddings, check, max_chunks)

    def _run_encoders(self, components: Any, cache_key: tuple, text: str, clip_skip: int, embeddings: dict,
                      check: Callable[[], None] | None,
                      max_chunks: int | None) -> tuple[torch.Tensor, torch.Tensor | None, frozenset]:
        style = components.spec.prompt_style
        if style in ("t5", "diffusers"):
            if style == "t5":
                out = self._run_t5(components, text)
            else:   # the family's own (diffusers') encoding, of the text without A1111's weight syntax
                z, pooled = components.spec.encode_text(components, "".join(
                    t for t, w in parse_attention(text) if not (t == "BREAK" and w == -1)))
                self.encoder_runs += 1
                out = (z, pooled, frozenset())
            self._cache[cache_key] = out
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return out
        pooled_family = components.spec.pooled
        per_model = []
        pooled = None
        used: set[str] = set()
        for model in self._models(components, embeddings):
            chunks, _ = model.chunks(text)
            if max_chunks and len(chunks) > max_chunks:
                raise StudioError(f"The prompt makes {len(chunks)} chunks of 75 tokens; the limit is {max_chunks}.",
                                  field="prompt", fix="shorten the prompt (setting max_prompt_chunks)")
            used.update(emb.name for chunk in chunks for _, emb in chunk.fixes)
            zs = []
            for i, chunk in enumerate(chunks):
                if check is not None:
                    check()   # Interrupt stops a long prompt between chunks
                z, p = model.encode(chunk, clip_skip, pooled_family)
                self.encoder_runs += 1
                zs.append(z)
                if i == 0 and p is not None:
                    pooled = p  # A1111 pools the first chunk
            per_model.append(zs)
        n = max(len(zs) for zs in per_model)
        for zs in per_model:  # SDXL encoders may chunk differently (embeddings): repeat the last chunk
            zs.extend([zs[-1]] * (n - len(zs)))
        z = torch.cat([torch.cat(zs, dim=-1) for zs in zip(*per_model)], dim=1)
        self._cache[cache_key] = (z, pooled, frozenset(used))
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return z, pooled, frozenset(used)

    def _run_t5(self, components: Any, text: str) -> tuple[torch.Tensor, torch.Tensor, frozenset]:
        """T5 sequence (A1111 emphasis on its tokens) + CLIP-L pooled vector, as FLUX is conditioned.

        The T5 sequence has the family's fixed length (no 75-token chunks: T5 reads up to 512 tokens at once);
        ``BREAK`` is plain text there. CLIP gives only its pooled vector, of the text without weights (77 tokens,
        as diffusers encodes it); emphasis on a pooled vector has no meaning."""
        length = components.spec.max_sequence_length(components)
        tok, t5 = components.tokenizer_2, components.text_encoder_2
        parsed = [(t, w) for t, w in parse_attention(text) if not (t == "BREAK" and w == -1)]
        tokens: list[int] = []
        weights: list[float] = []
        for ids, (_, weight) in zip(tok([t for t, _ in parsed], add_special_tokens=False).input_ids, parsed):
            tokens += ids
            weights += [weight] * len(ids)
        tokens, weights = tokens[:length - 1] + [tok.eos_token_id], weights[:length - 1] + [1.0]
        pad = length - len(tokens)
        tokens, weights = tokens + [tok.pad_token_id] * pad, weights + [1.0] * pad
        ids = torch.tensor([tokens], device=execution_device(t5, torch.device("cpu")))
        z = t5(ids, output_hidden_states=False)[0]
        w = torch.tensor(weights, device=z.device, dtype=z.dtype)
        if (w != 1).any():  # A1111 emphasis: scale token vectors, then restore the original mean
            mean = z.mean()
            z = z * w.reshape(1, -1, 1)
            z = z * (mean / z.mean())
        plain = "".join(t for t, _ in parsed)
        clip_ids = components.tokenizer(plain, padding="max_length", max_length=components.tokenizer.model_max_length,
                                        truncation=True, return_tensors="pt").input_ids
        clip = components.text_encoder
        pooled = clip(clip_ids.to(execution_device(clip, torch.device("cpu"))), output_hidden_states=False).pooler_output
        self.encoder_runs += 2
        return z, pooled, frozenset()

    def encode(self, components: Any, prompt: str, negative: str, *, steps: int, clip_skip: int = 1,
               state_key: tuple = (), embeddings: dict | None = None, check: Callable[[], None] | None = None,
               max_chunks: int | None = None) -> Conditioning:
        """Encode with schedules (``[a:b:0.5]``, ``[a|b]``) for ``steps`` sampling steps.

        ``state_key`` identifies the model and its text-encoder adapter state, so patched weights never hit a
        stale cache entry. ``check`` (the job's ``ctx.check``) is called between chunks and scheduled prompts
        and raises to stop; more than ``max_chunks`` 75-token chunks in one text is a StudioError.
        """
        embeddings = embeddings or {}
        key = (id(components), state_key, tuple(sorted(embeddings)))
        sides, used = [], set()
        for text in (prompt, negative):
            side = []
            for end, t in prompt_schedule(text, steps):
                if check is not None:
                    check()
                z, pooled, names = self._encode_text(components, key, t, clip_skip, embeddings, check, max_chunks)
                used |= names
                side.append((end, z, pooled))
            sides.append(side)
        # every tensor must have the same length for CFG batching: pad with the empty prompt's chunk (unless the
        # family's pipelines take each prompt at its own length)
        longest = max(z.shape[1] for side in sides for _, z, _ in side)
        if not components.spec.ragged_text and any(z.shape[1] != longest for side in sides for _, z, _ in side):
            empty = self._encode_text(components, key, "", clip_skip, embeddings)[0]
            sides = [[(end, _pad(z, longest, empty), p) for end, z, p in side] for side in sides]
        spec = components.spec   # T5-conditioned families take CLIP's pooled vector beside the sequence
        return Conditioning(sides[0], sides[1], spec.pooled or spec.prompt_style in ("t5", "diffusers"), used)

    def clear(self) -> None:
        self._cache.clear()


def _pad(z: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    if z.shape[1] == length:
        return z
    reps = (length - z.shape[1]) // empty.shape[1]
    return torch.cat([z] + [empty.to(z)] * reps, dim=1)
