"""`VLM`: load an edgevlm export and answer questions about images with ONNX Runtime, no torch.

    vlm = VLM.load("export_dir", provider="auto")
    vlm.generate("cat.png", "What is on the table?").text
    for piece in vlm.stream("cat.png", "Describe it."): print(piece, end="")

One call runs: chat template -> token ids (each image token expanded to the image's features)
-> vision encoder -> token embeddings with the image features scattered in -> the decoder over
the prompt (prefill: from a past of length 0, in chunks of `prefill_chunk` tokens) -> one
decoder pass per new token, feeding only that token and the cache the previous pass returned
(how that cache is held, and how the embeddings are made, is the decoder back-end's business:
edgevlm.runtime.decoders, one per kind of decoder graph, picked when the VLM opens). Greedy by
default, matching the torch reference (edgevlm.evaluate) token for token on an fp32 export.

Each call keeps its state (ids, cache, rng) in locals; ONNX Runtime sessions run concurrently,
so one VLM serves several threads. With `image_cache_mb` the image features are kept by the
image's hash (edgevlm.runtime.image_cache), and a second question on one image skips the image
decode, the preprocessing and the vision encoder.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgevlm.errors import UserError
from edgevlm.runtime import contract, mrope, tiling, token_select
from edgevlm.runtime.chat import (
    ChatTemplate,
    StreamDecoder,
    Tokenizer,
    alias_image_tag,
    call_messages,
    expand_image_tokens,
)
from edgevlm.runtime.decoders import Cache, open_decoder
from edgevlm.runtime.image_cache import MB, ImageCache
from edgevlm.runtime.limits import check_cache_mb
from edgevlm.runtime.manifest import ExportInfo, read_export, with_pixel_bounds
from edgevlm.runtime.preprocess import encoder_pixels, load_image
from edgevlm.runtime.results import GenerationResult, Stream, Timings
from edgevlm.runtime.sampling import GenerationConfig, StopFilter, Trim, pick_token
from edgevlm.runtime.session import (
    Provider,
    SessionConfig,
    TensorrtConfig,
    check_io,
    check_past,
    open_session,
    resolve,
)

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class _Prepared:
    ids: np.ndarray  # (S,) int64, image tokens expanded
    pixels: np.ndarray | None  # (1, 3, H, W) float32
    resized_from: tuple[int, int] | None  # (W, H) of the image when it was not the input size
    t0: float
    preprocess_s: float
    feats: np.ndarray | None = None  # (1, N_img, D) from the image cache: no vision encoder run
    grid: tuple[int, int] | None = None  # Idefics3: the image's (rows, cols) of tiles
    key: str | None = None  # the image cache key its features are kept under (None: not kept)


class VLM:
    """A loaded export: three ONNX Runtime sessions, the tokenizer, template and image settings."""

    def __init__(self, info: ExportInfo, sessions: dict[str, ort.InferenceSession],
                 provider: Provider, tokenizer: Tokenizer, template: ChatTemplate,
                 prefill_chunk: int = 512, load_s: float = 0.0, image_cache_mb: int = 0):
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise UserError(f"prefill_chunk={prefill_chunk!r} must be a positive integer")
        check_cache_mb(image_cache_mb)
        self.image_cache = ImageCache(image_cache_mb * MB)  # stats(): hits, misses, bytes
        self.info = info
        self.provider = provider.chosen  # the short name actually in use, e.g. "cpu"
        self.tokenizer = tokenizer
        self.template = template
        # Prompts pass the decoder in chunks of this many tokens: the graph returns logits for
        # every position, and a 1k-token prompt with a 152k vocabulary would otherwise allocate
        # 600 MB of logits. The cache makes chunks exact, not an approximation.
        self.prefill_chunk = prefill_chunk
        self.load_s = load_s
        self._vision = sessions["vision_encoder"]
        self._embed = sessions["embed_tokens"]
        self._decoder = sessions["decoder_model_merged"]
        vocab = self._decoder.get_outputs()[0].shape[-1]  # logits (B, S, V)
        if isinstance(vocab, int) and max(info.eos_token_ids) >= vocab:
            raise UserError(f"{info.root / contract.MANIFEST}: eos_token_id "
                            f"{max(info.eos_token_ids)} is past the model's {vocab}-token "
                            "vocabulary; re-export")
        types = {i.name: i.type for i in self._vision.get_inputs()}
        self._pixel_dtype = _NP_TYPES.get(types["pixel_values"], np.float32)
        image_id = info.image_token_id
        if image_id is None:
            image_id = tokenizer.token_to_id("<image>")
        self.image_token_id = image_id
        self.image_tag = tokenizer.id_to_token(image_id) if image_id is not None else None
        self._takes_parts = template.takes_parts(self.image_tag or "<image>")
        # Traced, builder (shared KV buffers) or mobile (static graphs), chosen once.
        self._backend = open_decoder(info, self._embed, self._decoder, provider.device_type)
        self._image_size = tuple(sessions["vision_encoder"].get_inputs()[0].shape[-2:])
        self._tiled = info.tiled
        self._patches = info.patch_family  # Qwen2-VL: patches at the image's resolution, M-RoPE

    @classmethod
    def load(cls, export_dir: str | Path, provider: str = "auto", threads: int | None = None,
             precision: str | None = None, prefill_chunk: int = 512,
             trt_cache: str | Path | None = None, trt_fp16: bool = True,
             image_cache_mb: int = 0, min_pixels: int | None = None,
             max_pixels: int | None = None) -> VLM:
        """Open an export directory made by `edgevlm export` (see `read_export` for the files).

        provider: "auto" (best available; `vlm.provider` says which) or cpu, cuda, tensorrt,
        coreml, nnapi, qnn, dml. threads: intra-op threads (None: onnxruntime's default).
        precision: which graphs of the export (None: those the manifest names).
        trt_cache, trt_fp16: with provider "tensorrt", where its engines are kept (default:
        EXPORT/trt_cache) and whether they are built in fp16. image_cache_mb: MB of image
        features kept by image hash, least recently used evicted first (0: off, the default;
        at most half the machine's memory). min_pixels, max_pixels: a Qwen2-VL export's resize
        bounds instead of those it was exported with (fewer pixels, fewer image tokens)."""
        t0 = time.perf_counter()
        check_cache_mb(image_cache_mb)  # before any session opens
        cfg = SessionConfig(provider, threads)
        chosen = resolve(cfg.provider)
        info = with_pixel_bounds(read_export(export_dir, precision), min_pixels, max_pixels)
        trt = TensorrtConfig(Path(trt_cache or Path(export_dir) / "trt_cache"), trt_fp16) \
            if chosen.chosen == "tensorrt" else None
        sessions = {}
        for component in contract.COMPONENTS:
            path = info.graphs[component]
            # Only the decoder runs back to back; the others yield the cores when done.
            # (SmolLM2 LLaVA int4 here: the vision encoder's spinning threads slowed the prefill
            # that follows it from 157 to 198 ms.)
            spin = component == "decoder_model_merged"
            session, chosen = open_session(path, chosen, cfg.threads,
                                           strict=cfg.provider != "auto", trt=trt, spin=spin)
            if component == "decoder_model_merged":  # before names for num_layers are made
                check_past(session, path, info.num_layers, info.num_kv_heads, info.head_dim)
            io = contract.graph_io(component, info.num_layers, info.profile, info.decoder,
                                   tiled=info.tiled, scores=info.token_select == "visionzip",
                                   patches=info.patches, mrope=info.patches is not None)
            check_io(session, path, io.inputs, io.outputs)
            sessions[component] = session
        template = ChatTemplate(info.chat_template, info.special_tokens)
        return cls(info, sessions, chosen, Tokenizer(info.tokenizer_file), template,
                   prefill_chunk, time.perf_counter() - t0, image_cache_mb)

    # -- public API ---------------------------------------------------------------------------

    def generate(self, image, prompt: str | Sequence[dict], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 min_new_tokens: int = 0) -> GenerationResult:
        """Answer `prompt` (a question, or chat messages) about `image` (path, encoded image
        bytes, PIL image, uint8 array, or None for text only). temperature 0 is greedy;
        end-of-sequence is not picked before `min_new_tokens` tokens (a fixed-length run, as
        for a benchmark)."""
        stream = self.stream(image, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop,
                             min_new_tokens)
        for _ in stream:
            pass
        return stream.result

    def stream(self, image, prompt: str | Sequence[dict], max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, stop: str | Sequence[str] | None = None,
               min_new_tokens: int = 0) -> Stream:
        """Like `generate`, yielding text pieces as tokens arrive; bad input fails here, before
        the first piece."""
        t0 = time.perf_counter()
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, top_k, seed,
                               (stop,) if isinstance(stop, str) else tuple(stop or ()),
                               min_new_tokens)
        prepared = self._prepare(image, prompt, t0)
        return Stream(self._steps(prepared, cfg))

    # -- internals ----------------------------------------------------------------------------

    def messages(self, image, prompt: str | Sequence[dict]) -> list[dict]:
        """Chat messages for a call (edgevlm.runtime.chat.call_messages). A family whose image
        placeholder is its own token (Qwen2-VL's <|image_pad|>) also takes LLaVA-format
        data's `<image>`, as its torch side does."""
        tag = self.image_tag or "<image>"
        if self._patches is not None and tag != "<image>":
            prompt = alias_image_tag(prompt, "<image>", tag)
        return call_messages(prompt, image is not None, tag, self._takes_parts)

    def _prompt_ids(self, image, prompt) -> list[int]:
        """The rendered prompt's token ids, its one image placeholder (or none) checked."""
        text = self.template.render(self.messages(image, prompt), add_generation_prompt=True)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"the prompt holds {text[e.start:e.end]!r} at character {e.start}, "
                            "which is not valid Unicode (a lone surrogate, often from decoding "
                            "bytes with errors='surrogateescape'); decode it as UTF-8 "
                            "first") from e
        ids = self.tokenizer.encode(text)
        n_tags = ids.count(self.image_token_id) if self.image_token_id is not None else 0
        if image is not None and n_tags != 1:
            raise UserError(
                f"the prompt has {n_tags} image placeholders for 1 image; put exactly one "
                f"{self.image_tag or '<image>'} in the text, or one {{'type': 'image'}} part in "
                "a user message's content")
        if image is None and n_tags:
            raise UserError(f"the prompt has {n_tags} image placeholder(s) but no image was "
                            "given; pass an image or remove the placeholder")
        return ids

    def _image_settings(self) -> str:
        """Everything besides the image that shapes its features (the image cache's key)."""
        info = self.info
        return (f"{info.image_processor!r}|{np.dtype(self._pixel_dtype).str}|"
                f"{info.graphs['vision_encoder']}|{info.token_select}|{info.num_image_tokens}")

    def _prepare(self, image, prompt, t0: float) -> _Prepared:
        ids = self._prompt_ids(image, prompt)
        look = self.image_cache.look_up(image, self._image_settings)
        source, name, key, hit = look.source, look.name, look.key, look.hit
        pixels = resized_from = grid = None
        if image is not None and self._patches is not None:
            # Qwen2-VL: the image's own grid decides its token count
            if hit is None:
                pixels, grid = self._patches.pixels(load_image(source, name), self._pixel_dtype)
            else:
                grid = hit.grid
            keep = self.info.num_image_tokens if self.info.token_select else None
            ids = self._patches.expand(ids, self.image_token_id, grid, keep)
        elif image is not None and self._tiled:
            # SmolVLM: the image's tiles decide what <image> becomes (markers and a run of image
            # tokens per tile), as Idefics3Processor writes it; the markers are special tokens,
            # so the expansion tokenizes on its own exactly as inside the whole prompt.
            if hit is None:
                pixels, grid, resized_from = tiling.tiled_pixels(
                    load_image(source, name), self.info.image_processor, self._pixel_dtype)
            else:
                grid = hit.grid
            tiles_ids = self.tokenizer.encode(tiling.image_prompt(
                *grid, self.info.num_image_tokens, self.image_tag or "<image>"))
            at = ids.index(self.image_token_id)
            ids = ids[:at] + tiles_ids + ids[at + 1:]
        else:
            ids = expand_image_tokens(ids, self.image_token_id, self.info.num_image_tokens)
        limit = self.info.max_tokens
        if len(ids) >= limit:
            counted = f" (with the image's {self.info.num_image_tokens})" if image is not None \
                else ""
            raise UserError(f"the prompt is {len(ids)} tokens{counted} but "
                            f"{self._backend.limit_reason(limit)}")
        if image is not None and not self._tiled and self._patches is None and hit is None:
            pixels, resized_from = encoder_pixels(load_image(source, name),
                                                  self.info.image_processor, self._pixel_dtype,
                                                  self._image_size)
        if hit is not None:
            resized_from = hit.resized_from
        return _Prepared(np.asarray(ids, dtype=np.int64), pixels, resized_from, t0,
                         time.perf_counter() - t0, hit.features if hit is not None else None,
                         grid, key)

    def _embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """(S,) ids -> (1, S, D) embeddings (the back-end's Decoder.embed)."""
        return self._backend.embed(ids)

    def _decode(self, embeds: np.ndarray, start: int, past: Cache,
                positions: np.ndarray | None = None) -> tuple[np.ndarray, Cache]:
        """One decoder pass over `embeds` at positions start.. ; returns the last logits (V,)
        and the cache to feed the next pass (the back-end's Decoder.decode). `positions`: an
        M-RoPE decoder's (3, 1, S) position ids."""
        return self._backend.decode(embeds, start, past, positions)

    def _rope(self, p: _Prepared, kept: np.ndarray | None = None):
        """An M-RoPE export's prompt positions and decode offset (`kept`: the image tokens
        --visual-tokens kept); None for 1-D positions."""
        if self._patches is None:
            return None
        return self._patches.positions(p.ids, self.image_token_id, p.grid, kept)

    def _selected(self, feats: np.ndarray | None):
        """A patch family's image features cut to --visual-tokens (DivPrune), and which were
        kept (None: all)."""
        if feats is None or self._patches is None or self.info.token_select is None:
            return feats, None
        return self._patches.select(feats, self.info.num_image_tokens)

    def _new_cache(self) -> Cache:
        """The cache a generation starts from (the back-end's Decoder.new_cache)."""
        return self._backend.new_cache()

    def _image_features(self, p: _Prepared) -> np.ndarray | None:
        """(1, N_img, D) for the decoder: the cached ones, or the vision encoder's (then kept in
        the cache when the call has a key); None without an image."""
        if p.feats is not None or p.pixels is None:
            return p.feats
        feeds = {"pixel_values": p.pixels}
        if self._patches is not None:
            feeds = self._patches.feeds(p.pixels, p.grid)
        if self._tiled:  # every tile of one image is full
            feeds["pixel_attention_mask"] = tiling.full_mask(p.pixels)
        wanted = ["image_features"] + (["visual_scores"]
                                       if self.info.token_select == "visionzip" else [])
        out = self._vision.run(wanted, feeds)
        feats = out[0].reshape(1, -1, out[0].shape[-1])  # (1, N_img, D): tiles in order
        if self.info.token_select is not None and self._patches is None:  # the decoder sees
            # num_image_tokens of them (a patch family selects after the cache: _steps)
            feats = token_select.select(self.info.token_select, feats[0],
                                        self.info.num_image_tokens,
                                        out[1][0] if len(out) > 1 else None)[None]
        if p.key is not None:
            feats = self.image_cache.keep(p.key, feats, p.grid, p.resized_from)
        return feats

    def _steps(self, p: _Prepared, cfg: GenerationConfig) -> Iterator[str]:
        """Yield text pieces; return the GenerationResult (see Stream)."""
        rng = np.random.default_rng(cfg.seed)
        t = time.perf_counter()
        feats, kept = self._selected(self._image_features(p))
        vision_s = time.perf_counter() - t
        t = time.perf_counter()
        slots = np.flatnonzero(p.ids == self.image_token_id) if feats is not None else []
        # Image slots are embedded as token 0 and then overwritten: some checkpoints put the
        # image token id past the end of the embedding table.
        embeds = self._embed_ids(np.where(p.ids == self.image_token_id, 0, p.ids))
        if feats is not None:
            if feats.shape[1] != len(slots):
                raise UserError(f"the vision encoder gives {feats.shape[1]} image features but "
                                f"the manifest says num_image_tokens={len(slots)}; re-export")
            embeds[0, slots] = feats[0].astype(embeds.dtype)  # (N_img, D) into the image slots
        past, rope = self._new_cache(), self._rope(p, kept)
        for start in range(0, embeds.shape[1], self.prefill_chunk):
            end = start + self.prefill_chunk
            logits, past = self._decode(embeds[:, start:end], start, past,
                                        mrope.pass_positions(rope, start, end))
        prefill_s = time.perf_counter() - t
        n_prompt = len(p.ids)
        budget = min(cfg.max_new_tokens, self.info.max_tokens - n_prompt)
        # the stream shows what `text` holds: stop strings cut, then the answer stripped
        detok, stops, trim = StreamDecoder(self.tokenizer), StopFilter(cfg.stop), Trim()
        ids, pieces, finish, ttft, steps = [], [], "length", 0.0, 0
        t_decode = time.perf_counter()
        while True:
            if len(ids) < cfg.min_new_tokens:
                logits[list(self.info.eos_token_ids)] = -np.inf  # (V,), this call's own copy
            token = pick_token(logits, cfg, rng)
            if not ids:
                ttft = time.perf_counter() - p.t0
                t_decode = time.perf_counter()
            if token in self.info.eos_token_ids:
                finish = "eos"
                break
            ids.append(token)
            piece = trim.feed(stops.feed(detok.push(token)))
            if piece:
                pieces.append(piece)
                yield piece
            if stops.hit:
                finish = "stop"
                break
            if len(ids) >= budget:
                break
            position = n_prompt + len(ids) - 1
            step = mrope.pass_positions(rope, position, position + 1)
            logits, past = self._decode(self._embed_ids(np.asarray([token], np.int64)),
                                        position, past, step)
            steps += 1
        if not stops.hit:
            tail = trim.feed(stops.feed(detok.flush()) + stops.flush())
            if tail:
                pieces.append(tail)
                yield tail
        end = time.perf_counter()
        decode_s = end - t_decode
        n_new = len(ids)
        rate = steps / decode_s if steps and decode_s > 0 else float("nan")
        timings = Timings(p.preprocess_s, vision_s, prefill_s, ttft, decode_s, rate,
                          end - p.t0, n_prompt, n_new, p.resized_from, p.feats is not None)
        return GenerationResult("".join(pieces), tuple(ids), finish, timings)
