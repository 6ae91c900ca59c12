"""Greedy and beam-search captioning with a static KV cache: the fast path of ``generate_captions``.

The decoder step drives the HF layers' own weights on caches allocated once per batch (the greedy
step a CUDA graph on a GPU); its output equals HF ``generate``'s (greedy token-identical in fp32,
beams equal up to ties) under the generation configs ``check_supported`` accepts.
Why and how: docs/inference.md, "The static-cache decoder".
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

log = logging.getLogger(__name__)
SYNC_EVERY = 8  # tokens decoded between two "every row finished?" reads (each read waits for the GPU)
GRAPH_CACHE_SIZE = 4  # captured greedy steps kept (each holds its batch's caches on the device)
DROP_SHARE = 0.25  # CPU: drop finished rows from the batch once they are this share of the rows still in it
_capture_failed = ""  # why the CUDA graph capture failed in this process, once it has

# GenerationConfig settings that add logits processors or change the search, with their neutral
# values; the static path implements none of them, so a config that sets one is refused rather than
# decoded differently from HF.
NEUTRAL = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
           "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
           "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
           "forced_eos_token_id": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
           "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0), "renormalize_logits": (None, False),
           "early_stopping": (None, False), "no_speech_threshold": (None,), "return_timestamps": (None, False)}


@dataclass(frozen=True)
class DecodeRules:
    """What decoding needs from the generation config, resolved once."""

    prompt: tuple[int, ...]  # <|startoftranscript|><|en|><|translate|><|notimestamps|> + prefix
    eos: int
    pad: int
    suppress: tuple[int, ...]  # at every step
    begin_suppress: tuple[int, ...]  # at the first caption token
    length_penalty: float


def check_supported(gen: GenerationConfig) -> None:
    """ValueError naming the first generation setting the static path does not implement."""
    for name, neutral in NEUTRAL.items():
        value = getattr(gen, name, None)
        if value not in neutral:
            raise ValueError(f"generation_config.{name}={value!r} is not implemented by the static decoder; "
                             f"use method='hf' (infer_stream.py --decoder hf)")


def task_prompt(gen: GenerationConfig, language: str, task: str, prefix_ids: Sequence[int] = ()) -> tuple[int, ...]:
    """The decoder prompt HF Whisper ``generate`` builds for ``language``/``task`` without timestamps
    (generation_whisper.py: ``_retrieve_init_tokens``), then ``prefix_ids``."""
    return (gen.decoder_start_token_id, gen.lang_to_id[f"<|{language}|>"], gen.task_to_id[task],
            gen.no_timestamps_token_id, *[int(i) for i in prefix_ids])


def decode_rules(gen: GenerationConfig, language: str, task: str, prefix_ids: Sequence[int] = ()) -> DecodeRules:
    """The prompt and token rules HF Whisper ``generate`` derives from ``gen`` for ``language``/``task``
    without timestamps (generation_whisper.py: ``_retrieve_logit_processors``)."""
    check_supported(gen)
    prompt = task_prompt(gen, language, task, prefix_ids)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, int) else gen.eos_token_id[0]
    return DecodeRules(prompt=prompt, eos=eos, pad=eos if gen.pad_token_id is None else gen.pad_token_id,
                       suppress=tuple(gen.suppress_tokens or ()), begin_suppress=tuple(gen.begin_suppress_tokens or ()),
                       length_penalty=1.0 if gen.length_penalty is None else float(gen.length_penalty))


def prompt_room(model, prompt: Sequence[int]) -> int:
    """The decoder positions ``prompt`` leaves for a caption (< 1: none)."""
    return model.config.max_target_positions - len(prompt)


def max_new_tokens_for(model, rules: DecodeRules, max_new_tokens: int | None) -> int:
    """New tokens after the prompt, as HF Whisper counts them: ``max_new_tokens`` (default: the
    generation config's ``max_length``) capped by the decoder's positions left after the prompt."""
    room = prompt_room(model, rules.prompt)
    if room < 1:
        raise ValueError(f"the decoder prompt ({len(rules.prompt)} tokens with the prefix) leaves no room for a "
                         f"caption in {model.config.max_target_positions} positions")
    wanted = max_new_tokens or model.generation_config.max_length
    return max(1, min(int(wanted), room))


# ------------------------------------------------------------------------------------- the decoder step

@dataclass
class _Caches:
    """Per decoder layer: self-attention K/V ``[rows, H, max_len, Dh]`` written in place, and the
    clips' cross-attention K/V ``[clips, H, frames, Dh]`` (a clip's ``rows // clips`` beams share them)."""

    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    cross_k: list[torch.Tensor]
    cross_v: list[torch.Tensor]

    def keep(self, rows: torch.Tensor, clips: torch.Tensor) -> None:
        """Keep only ``rows`` (self-attention) and ``clips`` (cross-attention), in that order."""
        self.self_k = [k.index_select(0, rows) for k in self.self_k]
        self.self_v = [v.index_select(0, rows) for v in self.self_v]
        self.cross_k = [k.index_select(0, clips) for k in self.cross_k]
        self.cross_v = [v.index_select(0, clips) for v in self.cross_v]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row ``i`` continues row ``rows[i]``'s hypothesis (in place: shapes stay static)."""
        for cache in self.self_k + self.self_v:
            cache.copy_(cache.index_select(0, rows))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[N, T, D]`` -> ``[N, H, T, D/H]``."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _cross(model, encoder_out: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per decoder layer, the cross-attention K and V ``[clips, H, frames, Dh]`` of ``encoder_out``."""
    heads = model.config.decoder_attention_heads
    layers = [layer.encoder_attn for layer in model.model.decoder.layers]
    return ([_heads(attn.k_proj(encoder_out), heads).contiguous() for attn in layers],
            [_heads(attn.v_proj(encoder_out), heads).contiguous() for attn in layers])


def _self_caches(model, like: torch.Tensor, rows: int, max_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed self-attention K and V ``[rows, H, max_len, Dh]`` per decoder layer, in ``like``'s dtype
    (the projections' dtype, which autocast may make differ from the encoder output's)."""
    heads = model.config.decoder_attention_heads
    shape = (rows, heads, max_len, model.config.d_model // heads)
    layers = len(model.model.decoder.layers)
    return [like.new_zeros(shape) for _ in range(layers)], [like.new_zeros(shape) for _ in range(layers)]


def _caches(model, encoder_out: torch.Tensor, rows: int, max_len: int) -> _Caches:
    """Cross-attention K/V from ``encoder_out [clips, frames, D]`` (once per batch) and empty self K/V."""
    cross_k, cross_v = _cross(model, encoder_out)
    return _Caches(*_self_caches(model, cross_k[0], rows, max_len), cross_k, cross_v)


def decoder_logits(model, caches: _Caches, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Float32 logits ``[rows, vocab]`` of the last of ``tokens [rows, T]`` at ``positions [T]``
    (consecutive), writing their self-attention K/V into the caches: HF's WhisperDecoder forward
    (pre-norm layers, queries scaled before SDPA, no embedding scale) over static caches. No host
    synchronisation and fixed shapes for a fixed ``T``, so a CUDA graph can capture it."""
    decoder = model.model.decoder
    heads = model.config.decoder_attention_heads
    rows, steps = tokens.shape
    clips = caches.cross_k[0].shape[0]
    beams = rows // clips
    max_len = caches.self_k[0].shape[2]
    hidden = decoder.embed_tokens(tokens) + decoder.embed_positions.weight[positions]  # [rows, T, D]
    # query t sees the cache slots up to its own position: [T, max_len]
    visible = torch.arange(max_len, device=tokens.device)[None, :] <= positions[:, None]
    for index, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(hidden)
        q = _heads(attn.q_proj(x) * attn.scaling, heads)  # [rows, H, T, Dh]
        caches.self_k[index].index_copy_(2, positions, _heads(attn.k_proj(x), heads))
        caches.self_v[index].index_copy_(2, positions, _heads(attn.v_proj(x), heads))
        out = F.scaled_dot_product_attention(q, caches.self_k[index], caches.self_v[index], attn_mask=visible,
                                             scale=1.0)
        hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(rows, steps, -1))

        attn = layer.encoder_attn
        x = layer.encoder_attn_layer_norm(hidden)
        q = _heads(attn.q_proj(x) * attn.scaling, heads)  # [rows, H, T, Dh]
        # a clip's beams query its keys together: [clips, H, beams * T, Dh]
        q = q.reshape(clips, beams, heads, steps, -1).transpose(1, 2).reshape(clips, heads, beams * steps, -1)
        out = F.scaled_dot_product_attention(q, caches.cross_k[index], caches.cross_v[index], scale=1.0)
        out = out.reshape(clips, heads, beams, steps, -1).permute(0, 2, 3, 1, 4).reshape(rows, steps, -1)
        hidden = hidden + attn.out_proj(out)

        x = layer.final_layer_norm(hidden)
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(x)))
    last = decoder.layer_norm(hidden[:, -1])  # [rows, D]
    return model.proj_out(last).float()


def _token_mask(tokens: Sequence[int], vocab: int, device) -> torch.Tensor:
    """``[vocab]`` float: -inf at ``tokens``, 0 elsewhere (added to the logits)."""
    mask = torch.zeros(vocab, device=device)
    mask[list(tokens)] = float("-inf")
    return mask


def _prompt_logits(model, caches: _Caches, rules: DecodeRules) -> torch.Tensor:
    """The prompt through the decoder (its K/V written into ``caches``): raw logits ``[rows, V]`` of
    the first caption token."""
    rows, device = caches.self_k[0].shape[0], caches.self_k[0].device
    prompt = torch.tensor(rules.prompt, device=device)
    return decoder_logits(model, caches, prompt.expand(rows, -1), torch.arange(len(rules.prompt), device=device))


def _prefill(model, features: torch.Tensor, rules: DecodeRules, beams: int, max_len: int):
    """Encoder, caches, and the prompt through the decoder: ``(caches, raw logits [rows, V] of the
    first caption token, suppress mask [V], begin-suppress mask [V])``."""
    encoder_out = model.model.encoder(features).last_hidden_state  # [clips, frames, D]
    caches = _caches(model, encoder_out, features.shape[0] * beams, max_len)
    logits = _prompt_logits(model, caches, rules)
    vocab = logits.shape[-1]
    return (caches, logits, _token_mask(rules.suppress, vocab, logits.device),
            _token_mask(rules.begin_suppress, vocab, logits.device))


def _hf_layout(tokens: torch.Tensor, rules: DecodeRules) -> torch.Tensor:
    """HF Whisper's output from generated tokens ``[B, N]`` (pad after a row's end): the end token
    cut, rows right-padded with the pad token to the longest remaining row."""
    ended = tokens == rules.eos
    lengths = torch.where(ended.any(1), ended.int().argmax(1), tokens.shape[1])  # [B] tokens before the end
    width = int(lengths.max()) if len(lengths) else 0
    keep = torch.arange(width, device=tokens.device)[None, :] < lengths[:, None]
    return torch.where(keep, tokens[:, :width], torch.full_like(tokens[:, :width], rules.pad))


# ------------------------------------------------------------------------------------- greedy

GREEDY_MODES = ("graph", "mask", "drop")


def greedy(model, features: torch.Tensor, rules: DecodeRules, max_new_tokens: int,
           mode: str | None = None) -> torch.Tensor:
    """Greedy captions ``[B, T]`` (HF layout) for ``features [B, n_mels, frames]``. ``mode``: ``graph``
    (the default on CUDA): the step captured as a CUDA graph and replayed, finished rows masked;
    ``mask``: the same step run eagerly; ``drop`` (the default elsewhere): eager, finished rows dropped."""
    mode = mode or ("graph" if features.device.type == "cuda" else "drop")
    if mode not in GREEDY_MODES:
        raise ValueError(f"greedy mode {mode!r}: choose from {', '.join(GREEDY_MODES)}")
    if mode == "drop":
        caches, logits, suppress, begin = _prefill(model, features, rules, 1, len(rules.prompt) + max_new_tokens)
        first = (logits + suppress + begin).argmax(-1)
        tokens = _greedy_drop(model, caches, first, suppress, rules, max_new_tokens)
    else:
        tokens = _greedy_static(model, features, rules, max_new_tokens, mode == "graph")
    return _hf_layout(tokens, rules)


def _greedy_drop(model, caches: _Caches, first: torch.Tensor, suppress: torch.Tensor, rules: DecodeRules,
                 max_new_tokens: int) -> torch.Tensor:
    """Step by step; finished rows leave the batch (their caches with them) once they are
    ``DROP_SHARE`` of it, and are masked to the pad token until then."""
    device = first.device
    out = torch.full((first.shape[0], max_new_tokens), rules.pad, dtype=torch.long, device=device)  # [B, N]
    out[:, 0] = first
    live = torch.arange(first.shape[0], device=device)  # the batch rows still decoding, in cache order
    last, finished = first, first == rules.eos
    prompt_len = len(rules.prompt)
    for step in range(1, max_new_tokens):
        done = int(finished.sum())
        if done == len(live):
            break
        if done and done >= DROP_SHARE * len(live):
            running = (~finished).nonzero().squeeze(1)
            caches.keep(running, running)
            live, last, finished = live[running], last[running], finished[running]
        position = torch.tensor([prompt_len + step - 1], device=device)
        logits = decoder_logits(model, caches, last[:, None], position) + suppress
        last = torch.where(finished, rules.pad, logits.argmax(-1))
        finished = finished | (last == rules.eos)
        out[live, step] = last
    return out


@dataclass
class _GreedyState:
    """What the greedy step reads and writes, on fixed buffers: a captured step replays on them."""

    caches: _Caches
    suppress: torch.Tensor  # [V] -inf at the tokens suppressed at every step
    begin: torch.Tensor  # [V] -inf at the tokens suppressed at the first caption token
    out: torch.Tensor  # [rows, N] caption tokens, the pad token after a row's end
    last: torch.Tensor  # [rows] the token fed in next (the last one generated)
    finished: torch.Tensor  # [rows] bool
    position: torch.Tensor  # [1] the decoder position of ``last``
    column: torch.Tensor  # [1] the column of ``out`` the step writes

    @classmethod
    def allocate(cls, model, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor], rules: DecodeRules,
                 max_new_tokens: int):
        """Buffers for a batch like this one, whose cross-attention K/V become the state's own."""
        like = cross_k[0]  # [rows, H, frames, Dh]
        rows, device, vocab = like.shape[0], like.device, model.proj_out.weight.shape[0]
        caches = _Caches(*_self_caches(model, like, rows, len(rules.prompt) + max_new_tokens), cross_k, cross_v)
        long = dict(dtype=torch.long, device=device)
        return cls(caches, _token_mask(rules.suppress, vocab, device), _token_mask(rules.begin_suppress, vocab, device),
                   torch.zeros(rows, max_new_tokens, **long), torch.zeros(rows, **long),
                   torch.zeros(rows, dtype=torch.bool, device=device), torch.zeros(1, **long), torch.zeros(1, **long))

    def start(self, model, cross_k: list[torch.Tensor], cross_v: list[torch.Tensor], rules: DecodeRules) -> None:
        """A batch in: its cross-attention K/V, the prompt through the decoder, the first caption token.
        Rows past the batch's are padding: finished from the start (rows never mix in the step)."""
        caches = self.caches
        rows = cross_k[0].shape[0]
        for static, batch in zip(caches.cross_k + caches.cross_v, cross_k + cross_v):
            if static is not batch:
                static[:rows].copy_(batch)
        # masked-out slots still meet the attention weights (as 0 * value): a NaN left there by an
        # earlier batch would spread, so they start at zero as fresh caches do
        for cache in caches.self_k + caches.self_v:
            cache.zero_()
        first = (_prompt_logits(model, caches, rules) + self.suppress + self.begin).argmax(-1)  # [rows]
        self.out.fill_(rules.pad)
        self.out[:, 0] = first
        self.last.copy_(first)
        torch.eq(first, rules.eos, out=self.finished)
        self.finished[rows:] = True
        self.position.fill_(len(rules.prompt))
        self.column.fill_(1)

    def step(self, model, rules: DecodeRules) -> None:
        """One token for every row (the pad token for finished ones): no host synchronisation, no new
        shapes, so that a CUDA graph can capture it."""
        logits = decoder_logits(model, self.caches, self.last[:, None], self.position) + self.suppress
        token = torch.where(self.finished, rules.pad, logits.argmax(-1))
        self.finished.logical_or_(token == rules.eos)
        self.out.index_copy_(1, self.column, token[:, None])
        self.last.copy_(token)
        self.position.add_(1)
        self.column.add_(1)


@dataclass
class _Graph:
    """A captured greedy step and the buffers it replays on."""

    state: _GreedyState
    replay: Callable[[], None]


class GraphCache:
    """Captured greedy steps with their buffers, for one model's weights (a graph reads them where
    they were at capture: other weights drop every graph), keyed by all else a graph depends on
    (``_graph_key``); the ``size`` last used are kept. Their captures share one memory pool and one
    side stream, so a capture reuses the blocks an earlier one freed."""

    def __init__(self, size: int):
        self.size = size
        self.weights: tuple = ()
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = None
        self.stream = None

    def clear(self) -> None:
        """Drop every graph and its buffers (their memory returns to torch's allocator)."""
        self.graphs.clear()
        self.weights, self.pool, self.stream = (), None, None

    def find(self, model, rows: int, key: tuple) -> _Graph | None:
        """The graph for ``key`` with the fewest rows from ``rows`` to twice that (a batch of fewer
        rows than the graph's rides it with padding rows), or None."""
        weights = tuple((p.data_ptr(), p.dtype, p.shape) for p in model.parameters())
        if weights != self.weights:
            self.clear()
            self.weights = weights
        fits = [held for held in self.graphs if held[1] == key and rows <= held[0] <= 2 * rows]
        if not fits:
            return None
        best = min(fits, key=lambda held: held[0])
        self.graphs.move_to_end(best)
        return self.graphs[best]

    def capture(self, key: tuple, state: _GreedyState, step: Callable[[], None]) -> _Graph:
        """``step`` on ``state`` captured (``_capture``) and kept under ``key`` with its rows; raises
        the capture's error."""
        if self.pool is None:
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        graph = _Graph(state, _capture(step, self.pool, self.stream))
        self.graphs[state.out.shape[0], key] = graph
        while len(self.graphs) > self.size:
            self.graphs.popitem(last=False)
        return graph


GRAPHS = GraphCache(GRAPH_CACHE_SIZE)


def _graph_key(cross_k: list[torch.Tensor], rules: DecodeRules, max_new_tokens: int) -> tuple:
    """Everything a captured greedy step depends on besides the weights and its rows: the batch's
    cache shape, dtype and device, the rules (prompt length, tokens), the caption length, and the
    autocast, grad and inference modes it was recorded under."""
    like = cross_k[0]
    device = like.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (tuple(like.shape[1:]), like.dtype, like.device, rules, max_new_tokens, autocast,
            torch.is_grad_enabled(), torch.is_inference_mode_enabled())


def _greedy_static(model, features: torch.Tensor, rules: DecodeRules, max_new_tokens: int,
                   capture: bool) -> torch.Tensor:
    """Tokens ``[B, N]``, the whole greedy step (``_GreedyState.step``) run on fixed buffers: with
    ``capture``, as a CUDA graph captured once per shape (``GRAPHS``) and replayed per token; "every
    row finished?" is read every ``SYNC_EVERY`` tokens."""
    global _capture_failed
    cross_k, cross_v = _cross(model, model.model.encoder(features).last_hidden_state)
    capture = capture and max_new_tokens > 1 and not _capture_failed
    key = _graph_key(cross_k, rules, max_new_tokens) if capture else ()
    rows = features.shape[0]
    graph = GRAPHS.find(model, rows, key) if capture else None
    if graph is None:
        state = _GreedyState.allocate(model, cross_k, cross_v, rules, max_new_tokens)
        run = functools.partial(state.step, model, rules)
        if capture:
            try:
                graph = GRAPHS.capture(key, state, run)
            except RuntimeError as error:  # an op this torch cannot capture: the same step, eagerly, from now on
                _capture_failed = str(error).splitlines()[0]
                log.warning("CUDA graph capture of the decoder step failed (%s); decoding without a graph",
                            _capture_failed)
    if graph is not None:
        state, run = graph.state, graph.replay
    state.start(model, cross_k, cross_v, rules)
    del cross_k, cross_v  # copied into a cached state: the batch's own go before the decoding
    for index in range(1, max_new_tokens):
        if index % SYNC_EVERY == 1 and bool(state.finished.all()):
            break
        run()
    return state.out[:rows]


@contextlib.contextmanager
def _on_stream(stream):
    """``stream`` is the current CUDA stream inside; the caller's is again afterwards, whatever raised."""
    caller = torch.cuda.current_stream()
    torch.cuda.set_stream(stream)
    try:
        yield
    finally:
        torch.cuda.set_stream(caller)


def _capture(step: Callable[[], None], pool, stream) -> Callable[[], None]:
    """``step`` recorded as a CUDA graph on ``stream`` into the memory ``pool``; returns its replay.
    ``step`` runs once before, outside the capture (lazy initialisation, cuBLAS workspaces), so its
    buffers must be set afterwards. ``capture_begin``/``capture_end`` rather than ``torch.cuda.graph``,
    whose entry synchronises the device and empties its block caches (the training step's too) and
    whose exit leaves the capture stream current when ``capture_end`` raises. A failure raises the
    first error: a step that fails inside the capture makes ``capture_end`` fail too."""
    caller = torch.cuda.current_stream()
    stream.wait_stream(caller)
    with _on_stream(stream):
        step()
    caller.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # autocast (training's evaluation) must not reuse its cast-weight cache inside a capture; other
    # threads (the loader's pinning and hand-over threads) may go on using CUDA meanwhile
    autocast = torch.is_autocast_enabled("cuda")
    with _on_stream(stream), (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                              if autocast else contextlib.nullcontext()):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            step()
        except BaseException as error:
            try:
                graph.capture_end()  # takes the stream out of capture mode
            except RuntimeError as second:
                error.add_note(f"ending the failed capture: {str(second).splitlines()[0]}")
            raise
        graph.capture_end()
    return graph.replay


# ------------------------------------------------------------------------------------- beam search

def beam_search(model, features: torch.Tensor, rules: DecodeRules, max_new_tokens: int, num_beams: int) -> torch.Tensor:
    """Beam-search captions ``[B, T]`` (HF layout), HF's rules (transformers ``GenerationMixin._beam_search``
    with ``early_stopping=False``): per step the top ``2 * num_beams`` continuations over all beams of a
    clip; those ending in the end token (among the top ``num_beams``) become finished hypotheses scored
    ``log p / length ** length_penalty``, the best ``num_beams`` others run on; a clip stops when its best
    running beam cannot beat its worst finished one. The host reads that every ``SYNC_EVERY`` tokens: a
    clip that stopped takes no more hypotheses (``improvable``), so the steps in between change nothing."""
    clips, device = features.shape[0], features.device
    prompt_len = len(rules.prompt)
    max_len = prompt_len + max_new_tokens
    caches, logits, suppress, begin = _prefill(model, features, rules, num_beams, max_len)
    rows = clips * num_beams
    keep_k = 2 * num_beams
    running = torch.full((clips, num_beams, max_new_tokens), rules.pad, dtype=torch.long, device=device)
    running_scores = torch.zeros(clips, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # the beams start identical: only the first one's continuations count
    finished = running.clone()
    finished_scores = torch.full((clips, num_beams), -1e9, device=device)
    finished_any = torch.zeros(clips, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(clips, 1, dtype=torch.bool, device=device)
    top_mask = torch.arange(keep_k, device=device) < num_beams  # [2k]
    offsets = torch.arange(clips, device=device)[:, None] * num_beams
    positions = torch.arange(prompt_len, max_len, device=device)  # of the caption tokens
    for step in range(max_new_tokens):
        if step:
            logits = decoder_logits(model, caches, running[:, :, step - 1].reshape(rows, 1), positions[step - 1:step])
        # HF: the log-softmax of the raw logits, then the processors' -inf
        log_probs = F.log_softmax(logits, dim=-1) + (suppress + begin if step == 0 else suppress)
        vocab = log_probs.shape[-1]
        scores = (log_probs.view(clips, num_beams, vocab) + running_scores[:, :, None]).view(clips, -1)
        top_scores, top_index = torch.topk(scores, keep_k)  # [clips, 2k]
        source = top_index // vocab
        token = top_index % vocab
        top_seqs = torch.take_along_dim(running, source[:, :, None], dim=1)  # [clips, 2k, N]
        top_seqs[:, :, step] = token
        ends = (token == rules.eos) | (step + 1 >= max_new_tokens)  # HF's stopping criteria: end token, length

        # running beams for the next step: the best num_beams that did not end
        alive_scores = top_scores + ends.float() * -1e9
        pick = torch.topk(alive_scores, num_beams)[1]
        running = torch.take_along_dim(top_seqs, pick[:, :, None], dim=1)
        running_scores = torch.take_along_dim(alive_scores, pick, dim=1)
        parent = torch.take_along_dim(source, pick, dim=1)  # [clips, beams]

        # finished hypotheses: the ended ones among the top num_beams, length-normalised
        just_ended = ends & top_mask[None, :]
        normalised = top_scores / ((step + 1) ** rules.length_penalty)
        normalised = normalised + (~improvable).float() * -1e9 + (~just_ended).float() * -1e9
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = torch.topk(merged_scores, num_beams)[1]
        finished = torch.take_along_dim(torch.cat([finished, top_seqs], dim=1), best[:, :, None], dim=1)
        finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
        finished_any = torch.take_along_dim(torch.cat([finished_any, just_ended], dim=1), best, dim=1)

        # every continuation hit a stopping criterion only at the length limit: a beam ends by its
        # end token once, so at most num_beams of the 2 * num_beams candidates end that way
        if step + 1 == max_new_tokens:
            break
        # HF's early_stopping=False heuristic, with the length the running beams have now
        best_running = running_scores[:, :1] / ((step + 1) ** rules.length_penalty)
        worst_finished = torch.where(finished_any, finished_scores.min(dim=1, keepdim=True)[0], -1e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if step % SYNC_EVERY == SYNC_EVERY - 1 and not bool(improvable.any()):
            break
        caches.reorder((parent + offsets).view(-1))
    return _hf_layout(finished[:, 0], rules)


def generate(model, features: torch.Tensor, rules: DecodeRules, max_new_tokens: int,
             num_beams: int = 1) -> torch.Tensor:
    """Caption token ids ``[B, T]`` for ``features [B, n_mels, frames]``: greedy, or beam search."""
    if num_beams == 1:
        return greedy(model, features, rules, max_new_tokens)
    return beam_search(model, features, rules, max_new_tokens, num_beams)
