"""Greedy and beam-search captioning with a static KV cache: the fast path of ``generate_captions``.

HF ``generate`` spends most of a caption's time on the host (a dynamic cache grown by ``torch.cat``,
logits processors, stopping criteria, Python bookkeeping per token): at batch 64 on an H100 about
50 ms per token for whisper-small (issue 12). Here the decoder step drives the HF layers' own
weights (projections, layer norms, fc1/fc2, positional embedding, ``proj_out``) on caches allocated
once per batch:
- self-attention keys/values preallocated for the whole caption (``[rows, heads, max_len, head_dim]``
  per layer) and written in place at the step's position; the step attends to all ``max_len`` slots
  with a mask, so every step has the same shapes;
- cross-attention keys/values computed once per batch from the encoder output, shared by a clip's
  beams (its beams' queries attend together to the clip's keys, so beams cost no extra copies);
- on CUDA the greedy step (decoder, suppression, argmax, finished-row masking, next-token write) is
  captured as a CUDA graph once per batch and replayed per token, so a token costs one graph launch
  instead of hundreds of kernel launches from Python; finished rows stay in the batch, masked to the
  pad token, and "all finished?" is read every ``SYNC_EVERY`` tokens. On the CPU the step runs eagerly
  and finished rows are dropped from the batch (no graph to keep static).

The output equals HF's (``tests/test_decode.py``: greedy token-identical in fp32, beams equal up to
ties): the same prompt (``<|startoftranscript|><|en|><|translate|><|notimestamps|>`` + prefix), the
same logits processors (``suppress_tokens`` at every step, ``begin_suppress_tokens`` at the first
caption token; a generation config asking for anything else is refused, see ``check_supported``), HF's
beam-search rules (top ``2 * beams`` candidates, finished hypotheses scored ``sum / length **
length_penalty``, the ``early_stopping=False`` heuristic) and HF's output: the caption tokens without
the prompt, the end token cut, rows right-padded with the pad token to the longest. Timestamp
tokens are among ``suppress_tokens`` (``pipeline.model.caption_generation_config``): HF ``generate``
would read one as a segment end and decode another 30-s window after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

log = logging.getLogger(__name__)
SYNC_EVERY = 8  # CUDA: tokens decoded between two "every row finished?" reads (each read waits for the GPU)
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


def _caches(model, encoder_out: torch.Tensor, rows: int, max_len: int) -> _Caches:
    """Cross-attention K/V from ``encoder_out [clips, frames, D]`` (once per batch) and empty self K/V."""
    decoder = model.model.decoder
    heads = model.config.decoder_attention_heads
    d_model = model.config.d_model
    shape = (rows, heads, max_len, d_model // heads)
    caches = _Caches([], [], [], [])
    for layer in decoder.layers:
        attn = layer.encoder_attn
        caches.cross_k.append(_heads(attn.k_proj(encoder_out), heads).contiguous())
        caches.cross_v.append(_heads(attn.v_proj(encoder_out), heads).contiguous())
        # the projections' dtype, which autocast may make differ from the encoder output's
        caches.self_k.append(caches.cross_k[-1].new_zeros(shape))
        caches.self_v.append(caches.cross_k[-1].new_zeros(shape))
    return caches


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


def _prefill(model, features: torch.Tensor, rules: DecodeRules, beams: int, max_len: int):
    """Encoder, caches, and the prompt through the decoder: ``(caches, raw logits [rows, V] of the
    first caption token, suppress mask [V], begin-suppress mask [V])``."""
    encoder_out = model.model.encoder(features).last_hidden_state  # [clips, frames, D]
    rows = features.shape[0] * beams
    caches = _caches(model, encoder_out, rows, max_len)
    prompt = torch.tensor(rules.prompt, device=features.device)
    logits = decoder_logits(model, caches, prompt.expand(rows, -1), torch.arange(len(rules.prompt),
                                                                                    device=features.device))
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
    max_len = len(rules.prompt) + max_new_tokens
    caches, logits, suppress, begin = _prefill(model, features, rules, 1, max_len)
    first = (logits + suppress + begin).argmax(-1)  # [B]
    if mode == "drop":
        tokens = _greedy_drop(model, caches, first, suppress, rules, max_new_tokens)
    else:
        tokens = _greedy_static(model, caches, first, suppress, rules, max_new_tokens, mode == "graph")
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


def _greedy_static(model, caches: _Caches, first: torch.Tensor, suppress: torch.Tensor, rules: DecodeRules,
                   max_new_tokens: int, capture: bool) -> torch.Tensor:
    """The whole greedy step (decoder, suppression, argmax, pad for finished rows, token write,
    position + 1) on fixed buffers, so that ``capture`` can record it once per batch as a CUDA graph
    replayed per token; "every row finished?" is read every ``SYNC_EVERY`` tokens."""
    device = first.device
    out = torch.full((first.shape[0], max_new_tokens), rules.pad, dtype=torch.long, device=device)  # [B, N]
    out[:, 0] = first
    last = first.clone()
    finished = first == rules.eos
    position = torch.tensor([len(rules.prompt)], device=device)  # of the token fed in (the last one generated)
    column = torch.tensor([1], device=device)  # of ``out`` the step writes

    def step() -> None:
        logits = decoder_logits(model, caches, last[:, None], position) + suppress
        token = torch.where(finished, rules.pad, logits.argmax(-1))
        finished.logical_or_(token == rules.eos)
        out.index_copy_(1, column, token[:, None])
        last.copy_(token)
        position.add_(1)
        column.add_(1)

    global _capture_failed
    run = step
    if capture and max_new_tokens > 1 and not _capture_failed:
        state = [last, finished, position, column, out] + caches.self_k + caches.self_v
        saved = [t.clone() for t in state]
        try:
            run = _capture(step)
        except RuntimeError as error:  # an op this torch cannot capture: the same step, eagerly, from now on
            _capture_failed = str(error).splitlines()[0]
            log.warning("CUDA graph capture of the decoder step failed (%s); decoding without a graph",
                        _capture_failed)
        for target, value in zip(state, saved):  # the warm-up ran a step: back to the state after the prompt
            target.copy_(value)
    for index in range(1, max_new_tokens):
        if index % SYNC_EVERY == 1 and bool(finished.all()):
            break
        run()
    return out


def _capture(step):
    """``step`` recorded as a CUDA graph; returns its replay. ``step`` runs once before, outside the
    capture (lazy initialisation, cuBLAS workspaces): its state must be put back afterwards."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # autocast (training's evaluation) must not reuse its cast-weight cache inside a capture; other
    # threads (the loader's pinning and hand-over threads) may go on using CUDA meanwhile
    autocast = torch.is_autocast_enabled("cuda")
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False), \
            torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph.replay


# ------------------------------------------------------------------------------------- beam search

def beam_search(model, features: torch.Tensor, rules: DecodeRules, max_new_tokens: int, num_beams: int) -> torch.Tensor:
    """Beam-search captions ``[B, T]`` (HF layout), HF's rules (transformers ``GenerationMixin._beam_search``
    with ``early_stopping=False``): per step the top ``2 * num_beams`` continuations over all beams of a
    clip; those ending in the end token (among the top ``num_beams``) become finished hypotheses scored
    ``log p / length ** length_penalty``, the best ``num_beams`` others run on; a clip stops when its best
    running beam cannot beat its worst finished one."""
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
    for step in range(max_new_tokens):
        if step:
            position = torch.tensor([prompt_len + step - 1], device=device)
            logits = decoder_logits(model, caches, running[:, :, step - 1].reshape(rows, 1), position)
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

        if bool(ends.all()):  # every continuation hit a stopping criterion (the length limit)
            break
        # HF's early_stopping=False heuristic, with the length the running beams have now
        best_running = running_scores[:, :1] / ((step + 1) ** rules.length_penalty)
        worst_finished = torch.where(finished_any, finished_scores.min(dim=1, keepdim=True)[0], -1e9)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if not bool(improvable.any()):
            break
        caches.reorder((parent + offsets).view(-1))
    return _hf_layout(finished[:, 0], rules)


def generate(model, features: torch.Tensor, rules: DecodeRules, max_new_tokens: int,
             num_beams: int = 1) -> torch.Tensor:
    """Caption token ids ``[B, T]`` for ``features [B, n_mels, frames]``: greedy, or beam search."""
    if num_beams == 1:
        return greedy(model, features, rules, max_new_tokens)
    return beam_search(model, features, rules, max_new_tokens, num_beams)
