"""Inference engine: KV-cached prefill and an on-device decode loop, with nanochat's calculator tool use.

Same contract as nanochat's `Engine` (nanochat `nanochat/engine.py`): `generate` streams (token column, mask column)
pairs, one entry per sample row, mask 1 for sampled tokens and 0 for tokens forced in by the tool; `generate_batch`
returns whole sequences (prompt included, terminal tokens dropped).

How it differs from nanochat, which runs one Python iteration and one device round-trip per token:
- prefill is one jitted call over the prompt right-padded to a power-of-two bucket (`valid_len` marks the real
  tokens), so only a handful of prompt shapes ever compile. `num_samples` rows come from that single batch-1 prefill
  whose cache is broadcast to the rows, as nanochat does.
- decode is a jitted `lax.while_loop` that emits up to `decode_chunk` tokens per host round-trip: sampling (greedy,
  temperature, top-k, a `jax.random` key folded with the step number), per-row done flags and forced tool tokens all
  run on the device. The cache length is bucketed too and the cache is donated between chunks. Each chunk's
  attention reads only the cache positions the rows can have filled by its end (`attend_bucket`), and on CPU the
  loop reads the weight matrices stored (in, out) (`swap_matrices`), the faster layout for one token per row.
- tool use: when a row emits <|python_end|> the loop stops early and hands control to the host, which decodes the
  expression, runs `jaxchat.calculator.use_calculator` and loads <|output_start|> result <|output_end|> into that
  row's forced-token buffer; the next chunk emits them (mask 0) in lockstep with the other rows' samples, exactly as
  nanochat's per-row `forced_tokens` queue does.
Without a tokenizer the engine is a pure token decoder: no stop tokens, no tool use.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
from collections import deque
from functools import partial
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import backend
from jaxchat import model as gpt
from jaxchat.calculator import use_calculator
from jaxchat.common import compute_dtype

# The prompts nanochat samples a base model on (scripts/base_train.py and base_eval.py).
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)

MIN_PROMPT_BUCKET = 16  # prompts are right-padded to max(16, next power of two) tokens
MIN_CACHE_BUCKET = 64  # the decode cache holds at least 64 positions, see `cache_bucket`
DECODE_CHUNK = 32  # tokens emitted per host round-trip
FORCED_SLOTS = 32  # per-row device buffer for forced tool tokens (longer results are fed in several loads)


def bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= n, at least `minimum` (so few distinct shapes compile)."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def cache_bucket(n: int) -> int:
    """Decode cache length for n positions: the smallest 2^k or 1.5 * 2^k >= n (at least MIN_CACHE_BUCKET).

    The cache's size sets the memory and the last chunks' attention reads (earlier chunks read a prefix, see
    `attend_bucket`): the half steps waste at most a third of it instead of a half, for twice as many (still
    logarithmically few) compiled shapes.
    """
    size = bucket(n, MIN_CACHE_BUCKET)
    return size * 3 // 4 if size * 3 // 4 >= max(n, MIN_CACHE_BUCKET) else size


def attend_bucket(n: int, max_len: int) -> int | None:
    """Cache positions one decode chunk reads when rows will hold n: max(64, next power of two), or None (the whole
    cache) once that reaches max_len. Attention cost follows the positions read, so a chunk early in a long cache
    is cheaper, for at most log2(max_len / 64) extra compiled decode shapes."""
    size = bucket(n, MIN_CACHE_BUCKET)
    return None if size >= max_len else size


def sample_next_token(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int | None) -> jax.Array:
    """Sample one token per row (nanochat `sample_next_token`).

    Args:
        logits: float32 (B, V).
        key: a `jax.random` key; rows draw independently from it.
        temperature: scalar; 0 means greedy (argmax), else logits / temperature are sampled.
        top_k: static; when > 0 only the k largest logits of each row can be drawn.
    Returns:
        int32 (B,) token ids.
    """
    def greedy(logits, key):
        # argmax as max, then the first index holding it: two plain reductions, ~2.5x faster on CPU than XLA's
        # variadic (value, index) reduce, with the same first-index tie-break.
        best = jnp.max(logits, axis=-1, keepdims=True)
        ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        return jnp.min(jnp.where(logits == best, ids, logits.shape[-1] - 1), axis=-1)  # all-NaN row: the last id

    def sample(logits, key):  # only runs when temperature > 0: drawing (B, V) Gumbel noise is not free
        if top_k is not None and top_k > 0:
            vals, idx = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))
            choice = jax.random.categorical(key, vals / temperature, axis=-1)
            return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits, key)


@partial(jax.jit, static_argnames=("config", "forward_fn", "num_rows", "max_len", "cache_dtype"))
def _prefill(params, idx, valid_len, *, config, forward_fn, num_rows, max_len, cache_dtype):
    """Batch-1 prefill of a right-padded prompt idx (1, Tb); returns (logits (num_rows, V) at the last real token,
    the cache padded to max_len positions and broadcast to num_rows rows)."""
    Tb = idx.shape[1]
    cache = gpt.init_kv_cache(config, 1, Tb, cache_dtype)
    logits, cache = forward_fn(params, config, idx, kv_cache=cache, valid_len=valid_len)
    last = jax.lax.dynamic_index_in_dim(logits[0], valid_len[0] - 1, axis=0, keepdims=False)  # (V,)

    # Widen every leaf to the decode cache's shape without assuming its layout: axes of size 1 (the batch) are
    # broadcast to num_rows, shorter axes (the sequence) are zero-padded at the end.
    big = jax.eval_shape(lambda: gpt.init_kv_cache(config, num_rows, max_len, cache_dtype))

    def widen(small, target):
        shape = tuple(t if s == 1 else s for s, t in zip(small.shape, target.shape))
        small = jnp.broadcast_to(small, shape).astype(target.dtype)
        return jnp.pad(small, [(0, t - s) for s, t in zip(shape, target.shape)])

    cache = jax.tree_util.tree_map(widen, cache, big)
    return jnp.broadcast_to(last, (num_rows, last.shape[0])), cache


def swap_matrices(params):
    """Transpose every 2-D leaf except the embedding tables (wte, value_embeds, bigram_embed): the layout the decode
    loop reads.

    Its own inverse. At one token per row a matmul against an (out, in) weight is ~2x slower on CPU than against
    the same weight stored (in, out), so the engine keeps a swapped copy there and swaps back inside the loop body,
    where XLA folds the transpose into the dot instead of copying the weight.
    """
    def swap(path, x):
        keys = {getattr(k, "key", None) for k in path}
        return x.T if x.ndim == 2 and not keys & {"wte", "value_embeds", "bigram_embed"} else x
    return jax.tree_util.tree_map_with_path(swap, params)


@partial(jax.jit, static_argnames=("config", "forward_fn", "chunk", "top_k", "collect_logits", "swapped",
                                   "attend_len"), donate_argnames=("state",))
def _decode_chunk(decode_params, state, key, temperature, num_steps, stop_ids, python_end, *, config, forward_fn, chunk,
                  top_k, collect_logits, swapped, attend_len):
    """Emit up to min(chunk, num_steps) tokens per row on the device.

    state: {'cache', 'logits' (B, V) for the next token, 'done' (B,) bool, 'step' () tokens emitted so far,
    'forced' (B, F) int32, 'forced_len' / 'forced_ptr' (B,) int32, 'pending' (B,) bool: the host holds more forced
    tokens for the row than fit in the buffer}. The loop stops early when every row is done, when a live row emits
    `python_end`, or when a row with `pending` drains its forced buffer: in both latter cases the host must act.
    Returns (new state, tokens (B, chunk), masks (B, chunk), number emitted, logits (B, chunk, V) or None).
    """
    B = state["logits"].shape[0]
    bufs = (jnp.zeros((B, chunk), jnp.int32), jnp.zeros((B, chunk), jnp.int32))
    logit_buf = jnp.zeros((B, chunk, config.vocab_size), jnp.float32) if collect_logits else None

    def cond(carry):
        state, i, _, _, halt = carry
        return (i < num_steps) & ~halt & ~jnp.all(state["done"])

    def body(carry):
        state, i, (toks, masks), logit_buf, _ = carry
        sampled = sample_next_token(state["logits"], jax.random.fold_in(key, state["step"]), temperature, top_k)
        ptr = state["forced_ptr"]
        has_forced = ptr < state["forced_len"]
        forced_tok = jnp.take_along_axis(state["forced"], jnp.minimum(ptr, state["forced"].shape[1] - 1)[:, None],
                                         axis=1)[:, 0]
        tok = jnp.where(has_forced, forced_tok, sampled)
        ptr = ptr + has_forced
        live = ~state["done"]
        done = state["done"] | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        drained = state["pending"] & has_forced & (ptr >= state["forced_len"])  # the host holds more forced tokens
        halt = jnp.any(live & (tok == python_end)) | jnp.any(drained)
        toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
        masks = jax.lax.dynamic_update_slice(masks, (~has_forced).astype(jnp.int32)[:, None], (0, i))
        params = swap_matrices(decode_params) if swapped else decode_params  # inside the body: folded into the dots
        extra = {} if attend_len is None else {"attend_len": attend_len}
        logits, cache = forward_fn(params, config, tok[:, None], kv_cache=state["cache"], **extra)
        logits = logits[:, 0]
        if collect_logits:
            logit_buf = jax.lax.dynamic_update_slice(logit_buf, logits[:, None], (0, i, 0))
        state = dict(state, cache=cache, logits=logits, done=done, step=state["step"] + 1, forced_ptr=ptr)
        return state, i + 1, (toks, masks), logit_buf, halt

    carry = (state, jnp.int32(0), bufs, logit_buf, jnp.bool_(False))
    state, n, (toks, masks), logit_buf, _ = jax.lax.while_loop(cond, body, carry)
    return state, toks, masks, n, logit_buf


class _RowTool:
    """Host-side tool state of one row, as nanochat's `RowState`: the python block being written and the forced
    tokens not yet handed to the device."""

    def __init__(self):
        self.in_python_block = False
        self.python_expr_tokens: list[int] = []
        self.pending: deque[int] = deque()


class Engine:
    """KV-cached generation for a GPT (nanochat `Engine`).

    Args:
        params: the model params pytree (see `jaxchat.model`).
        config: its `GPTConfig`.
        tokenizer: optional `jaxchat.tokenizer.Tokenizer` (anything with `encode`, `decode`, `encode_special`,
            `get_bos_token_id`). With it, rows stop at <|assistant_end|> or <|bos|> and python blocks run the
            calculator; without it the engine decodes tokens only.
        decode_chunk: tokens emitted per host round-trip (streaming granularity vs. host overhead).
        cache_dtype: KV cache dtype; default the compute dtype (bfloat16 on GPU, float32 on CPU).
        forward_fn: the cached forward, `forward(params, config, idx, kv_cache=..., valid_len=...) -> (logits,
            cache)`; default `jaxchat.model.forward` (which the engine also passes `attend_len`). Tests inject
            scripted models here.

    On CPU the engine holds a second copy of the weight matrices, stored (in, out) for the decode loop
    (`swap_matrices`): twice the weights' memory, for ~1.3x faster decode at batch 8.
    """

    def __init__(self, params, config: gpt.GPTConfig, tokenizer=None, *, decode_chunk: int = DECODE_CHUNK,
                 cache_dtype=None, forward_fn: Callable | None = None):
        if decode_chunk < 1:
            raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
        self.params = params
        # The decode loop's copy of the weights, (in, out) on CPU (see swap_matrices); accelerators read them as is.
        leaf = next(iter(jax.tree.leaves(params)), None)  # scripted test models may have no params
        self.swapped = backend.decode_weights_swapped(
            backend.platform_of(leaf) if isinstance(leaf, jax.Array) else backend.platform())
        self.decode_params = swap_matrices(params) if self.swapped else params
        self.config = config
        self.tokenizer = tokenizer
        self.decode_chunk = decode_chunk
        self.cache_dtype = jnp.dtype(cache_dtype or compute_dtype())
        self.forward_fn = forward_fn or gpt.forward
        if tokenizer is not None:
            special = tokenizer.encode_special
            self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
            self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
            self.assistant_end, self.bos = special("<|assistant_end|>"), tokenizer.get_bos_token_id()
            self.stop_ids = (self.assistant_end, self.bos)
        else:
            self.python_start = self.python_end = self.output_start = self.output_end = -1
            self.assistant_end = self.bos = -1
            self.stop_ids = (-1, -1)  # never matches a token id

    # ------------------------------------------------------------------------------------------------------------
    def _check(self, tokens, num_samples, max_tokens, temperature):
        if not isinstance(tokens, (list, tuple)) or not tokens or \
                not all(isinstance(t, (int, np.integer)) for t in tokens):
            raise TypeError("tokens must be a non-empty list of ints")
        if any(t < 0 or t >= self.config.vocab_size for t in tokens):
            raise ValueError(f"token ids must be in [0, vocab_size={self.config.vocab_size})")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")

    def stream_chunks(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                      temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                      collect_logits: bool = False) -> Iterator[tuple]:
        """The engine's raw stream, one item per device call (what `generate` unpacks into columns).

        First yields `(prefill_logits,)`, a device array (num_samples, vocab_size) still being computed (block on it
        to time the prefill; it is donated to the decode loop, so copy it before asking for the next item); then per
        decode chunk `(tokens, masks, logits)`: numpy int32 (num_samples, n) with n <= decode_chunk, and, with
        collect_logits, a device array (num_samples, n, vocab_size) of the logits after each emitted token (else
        None). The next chunk is already running on the device while the caller consumes one. Arguments as
        `generate`.
        """
        self._check(tokens, num_samples, max_tokens, temperature)
        L = len(tokens)
        Tb = bucket(L, MIN_PROMPT_BUCKET)
        if max_tokens is not None:
            max_len = max(cache_bucket(L + max_tokens), Tb)
            limit = max_tokens
        else:  # as nanochat: room for sequence_len positions, but always at least one new token
            max_len = max(cache_bucket(max(self.config.sequence_len, L + 1)), Tb)
            limit = max_len - L
        B, F = num_samples, FORCED_SLOTS

        idx = np.zeros((1, Tb), np.int32)
        idx[0, :L] = tokens
        logits, cache = _prefill(self.params, jnp.asarray(idx), jnp.asarray([L], jnp.int32), config=self.config,
                                 forward_fn=self.forward_fn, num_rows=B, max_len=max_len, cache_dtype=self.cache_dtype)
        yield (logits,)
        if limit == 0:
            return
        forced = np.zeros((B, F), np.int32)
        forced_len = np.zeros((B,), np.int32)
        state = {"cache": cache, "logits": logits, "done": jnp.zeros((B,), bool), "step": jnp.int32(0),
                 "forced": jnp.asarray(forced), "forced_len": jnp.asarray(forced_len),
                 "forced_ptr": jnp.zeros((B,), jnp.int32), "pending": jnp.zeros((B,), bool)}
        key = jax.random.PRNGKey(seed)
        temp = jnp.float32(temperature)
        stop_ids = jnp.asarray(self.stop_ids, jnp.int32)
        rows = [_RowTool() for _ in range(B)]

        def dispatch(state, emitted):  # asynchronous: returns device futures at once
            steps = min(self.decode_chunk, limit - emitted)
            # Every row holds L + emitted positions and gains one per step: attention need not read past that.
            attend = attend_bucket(L + emitted + steps, max_len) if self.forward_fn is gpt.forward else None
            return _decode_chunk(
                self.decode_params, state, key, temp, jnp.int32(steps), stop_ids, jnp.int32(self.python_end),
                config=self.config, forward_fn=self.forward_fn, chunk=self.decode_chunk, top_k=top_k,
                collect_logits=collect_logits, swapped=self.swapped, attend_len=attend)

        emitted = 0
        in_flight = dispatch(state, emitted)
        while True:
            state, toks, masks, n, logit_buf = in_flight
            toks, masks, n, done, ptr = jax.device_get((toks, masks, n, state["done"], state["forced_ptr"]))
            n, ptr = int(n), np.array(ptr)
            toks, masks = toks[:, :n], masks[:, :n]
            emitted += n
            if self.tokenizer is not None and self._run_tools(rows, toks, forced, forced_len, ptr):
                state["forced"], state["forced_len"] = jnp.asarray(forced), jnp.asarray(forced_len)
                state["forced_ptr"] = jnp.asarray(ptr)
                state["pending"] = jnp.asarray([len(r.pending) > 0 for r in rows])
            finished = n == 0 or bool(done.all()) or emitted >= limit
            if not finished:  # launch the next chunk before the caller consumes this one
                in_flight = dispatch(state, emitted)
            yield toks, masks, (None if logit_buf is None else logit_buf[:, :n])
            if finished:
                return

    def _run_tools(self, rows, toks, forced, forced_len, ptr) -> bool:
        """nanochat's tool state machine over the emitted columns.

        Loads pending forced tokens into the host copies of the device buffers (forced, forced_len, ptr: modified in
        place) of rows that drained theirs. Returns True when the device state must be updated.
        """
        for b, row in enumerate(rows):
            for t in toks[b].tolist():
                if t == self.python_start:
                    row.in_python_block, row.python_expr_tokens = True, []
                elif t == self.python_end and row.in_python_block:
                    row.in_python_block = False
                    if row.python_expr_tokens:
                        result = use_calculator(self.tokenizer.decode(row.python_expr_tokens))
                        if result is not None:
                            row.pending.extend([self.output_start, *self.tokenizer.encode(str(result)),
                                                self.output_end])
                    row.python_expr_tokens = []
                elif row.in_python_block:
                    row.python_expr_tokens.append(t)
        changed = False
        for b, row in enumerate(rows):
            if row.pending and ptr[b] >= forced_len[b]:  # the device buffer is drained: refill it
                load = [row.pending.popleft() for _ in range(min(len(row.pending), forced.shape[1]))]
                forced[b, :len(load)] = load
                forced_len[b], ptr[b] = len(load), 0
                changed = True
            elif ptr[b] >= forced_len[b] > 0:  # drained and nothing left: empty it
                forced_len[b], ptr[b] = 0, 0
                changed = True
        return changed

    # ------------------------------------------------------------------------------------------------------------
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42) -> Iterator[tuple[list, list]]:
        """Stream tokens: yields (token_column, mask_column), lists of num_samples ints per step.

        Args:
            tokens: the prompt, a list of int token ids (e.g. from `Tokenizer.render_for_completion`).
            num_samples: rows sampled in parallel from one prefill.
            max_tokens: most tokens to emit per row; None fills the cache (sequence_len positions).
            temperature: 0 for greedy decoding.
            top_k: sample only among the k most likely tokens (None or 0: all).
            seed: the `jax.random` seed; the same seed gives the same tokens.
        Yields:
            columns as soon as each decode chunk returns from the device. Rows that finished (emitted
            <|assistant_end|> or <|bos|>) keep producing filler until every row is done, as in nanochat.
        Raises:
            TypeError / ValueError: malformed tokens or arguments.
        """
        chunks = self.stream_chunks(tokens, num_samples, max_tokens, temperature, top_k, seed)
        next(chunks)  # prefill
        for toks, masks, _ in chunks:
            for c in range(toks.shape[1]):
                yield toks[:, c].tolist(), masks[:, c].tolist()

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Generate to completion (nanochat `Engine.generate_batch`).

        Returns:
            (sequences, masks): num_samples lists; each sequence is the prompt followed by the generated tokens,
            without the terminal <|assistant_end|> / <|bos|>; masks are 0 over the prompt and forced tokens, 1 over
            sampled ones. Keyword arguments are `generate`'s.
        """
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(column, mask_column)):
                if completed[i]:
                    continue
                if tok in (self.assistant_end, self.bos):
                    completed[i] = True
                else:
                    results[i].append(tok)
                    masks[i].append(m)
            if all(completed):
                break
        return results, masks

    def generate_with_logits(self, tokens: list[int], max_tokens: int, temperature: float = 0.0,
                             top_k: int | None = None, seed: int = 42) -> tuple[list[int], np.ndarray]:
        """One row's tokens plus the logits the sampler saw at each step, for parity checks.

        Returns:
            (ids, logits): ids the emitted tokens (up to max_tokens); logits float32 (len(ids) + 1, vocab_size): at
            the prompt's last position, then after feeding each emitted token (nanochat's `engine_step_logits`).
        """
        chunks = self.stream_chunks(tokens, 1, max_tokens, temperature, top_k, seed, collect_logits=True)
        (prefill_logits,) = next(chunks)
        ids, logits = [], [np.asarray(prefill_logits[0])]
        for toks, _, logit_buf in chunks:
            ids.extend(toks[0].tolist())
            logits.extend(np.asarray(logit_buf[0]))
        return ids, np.stack(logits)


# ----------------------------------------------------------------------------------------------------------------
# Continuous batching: B slots in one KV cache, requests join and leave the running decode loop at chunk boundaries.

MAX_TOP_K = 200  # slots sample top-k / top-p among at most this many candidates (the server's top_k limit)
SMALL_TOP_K = 64  # candidates drawn when no slot asks for more: the common top-k (nanochat's 50) costs less


def _batch_axis(name: str) -> int:
    """The batch axis of a KV-cache entry (contract 4): 'k' and 'v' are (n_layer, B, T, ...), every other key has
    its batch axis first."""
    return 1 if name in ("k", "v") else 0


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array, kmax: int = MAX_TOP_K) -> jax.Array:
    """Sample one token per row with per-row settings (the batched counterpart of `sample_next_token`).

    Args:
        logits: float32 (B, V).
        keys: uint32 (B, 2), one `jax.random` key per row.
        temperature: float32 (B,); 0 means greedy (argmax, first index on ties).
        top_k: int32 (B,); > 0 keeps only the k most likely tokens (at most kmax), 0 keeps all.
        top_p: float32 (B,) in (0, 1]; < 1 keeps the smallest set of most likely tokens whose probability reaches
            top_p (nucleus sampling, Holtzman et al. 2019), taken among the kmax most likely.
        kmax: static; candidates drawn for top-k / top-p rows.
    Returns:
        int32 (B,) token ids.
    """
    V = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.arange(V, dtype=jnp.int32)
    greedy = jnp.min(jnp.where(logits == best, ids, V - 1), axis=-1)

    draw = jax.vmap(lambda k, l: jax.random.categorical(k, l))
    narrowed = (top_k > 0) | (top_p < 1.0)

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        k = min(kmax, V)
        vals, idx = jax.lax.top_k(scaled, k)  # sorted, largest first
        keep = jnp.arange(k)[None, :] < jnp.where(top_k > 0, jnp.minimum(top_k, k), k)[:, None]
        probs = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the most likely one always stays
        choice = draw(keys, jnp.where(keep, vals, -jnp.inf))
        from_candidates = jnp.take_along_axis(idx, choice[:, None], axis=1)[:, 0]
        # (B, V) Gumbel noise only when some sampling row keeps the whole vocabulary
        from_all = jax.lax.cond(jnp.any((temperature > 0) & ~narrowed), lambda: draw(keys, scaled),
                                lambda: from_candidates)
        return jnp.where(narrowed, from_candidates, from_all).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
    return jnp.where(temperature > 0, sampled, greedy)


@partial(jax.jit, static_argnames=("config", "forward_fn", "cache_dtype"), donate_argnames=("cache", "logits"))
def _prefill_slot(params, cache, logits, idx, valid_len, slot, *, config, forward_fn, cache_dtype):
    """Prefill a right-padded prompt idx (1, Tb) and write its cache and next-token logits into row `slot` of the
    B-slot cache and logits (B, V). Every cache key is written along its own batch axis (`_batch_axis`); shorter
    axes (the sequence) are zero-padded to the slot cache's length."""
    small = gpt.init_kv_cache(config, 1, idx.shape[1], cache_dtype)
    out, small = forward_fn(params, config, idx, kv_cache=small, valid_len=valid_len)
    last = jax.lax.dynamic_index_in_dim(out[0], valid_len[0] - 1, axis=0, keepdims=True)  # (1, V)

    def insert(name, big):
        axis = _batch_axis(name)
        row = small[name].astype(big.dtype)
        row = jnp.pad(row, [(0, 0 if a == axis else t - s) for a, (s, t) in enumerate(zip(row.shape, big.shape))])
        start = [jnp.int32(0)] * big.ndim
        start[axis] = slot
        return jax.lax.dynamic_update_slice(big, row, start)

    cache = {name: insert(name, big) for name, big in cache.items()}
    return cache, jax.lax.dynamic_update_slice(logits, last.astype(logits.dtype), (slot, 0))


@partial(jax.jit, static_argnames=("config", "forward_fn", "chunk", "swapped", "attend_len", "kmax"),
         donate_argnames=("state",))
def _slot_decode_chunk(decode_params, state, keys, temperature, top_k, top_p, stop_ids, python_end, num_steps, *,
                       config, forward_fn, chunk, swapped, attend_len, kmax):
    """Up to min(chunk, num_steps) decode steps for every live slot of the B-slot state.

    state: {'cache', 'logits' (B, V), 'done' (B,) bool (free slots are done), 'step' (B,) tokens each slot has
    emitted (folded into its key), 'budget' (B,) tokens it may still emit, 'forced' (B, F), 'forced_len' /
    'forced_ptr' (B,), 'pending' (B,)}. A slot stops at a stop token or when its budget runs out; a slot that is not
    live keeps every non-k/v cache entry (its 'pos' included) as it was, so it never walks past its cache row.
    The loop halts early as `_decode_chunk` does (all done, python_end from a live slot, a pending slot drained).
    Returns (state, tokens (B, chunk), masks (B, chunk) 1 = sampled, live (B, chunk) 1 = emitted by the slot).
    """
    B = state["logits"].shape[0]
    bufs = tuple(jnp.zeros((B, chunk), jnp.int32) for _ in range(3))

    def cond(carry):
        state, i, _, halt = carry
        return (i < jnp.minimum(chunk, num_steps)) & ~halt & ~jnp.all(state["done"])

    def body(carry):
        state, i, (toks, masks, lives), _ = carry
        step_keys = jax.vmap(jax.random.fold_in)(keys, state["step"])
        sampled = sample_rows(state["logits"], step_keys, temperature, top_k, top_p, kmax)
        ptr = state["forced_ptr"]
        has_forced = ptr < state["forced_len"]
        forced_tok = jnp.take_along_axis(state["forced"], jnp.minimum(ptr, state["forced"].shape[1] - 1)[:, None],
                                         axis=1)[:, 0]
        live = ~state["done"]
        tok = jnp.where(has_forced, forced_tok, sampled)
        has_forced &= live
        ptr = ptr + has_forced
        budget = state["budget"] - live
        done = state["done"] | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1) | (budget <= 0)
        drained = state["pending"] & has_forced & (ptr >= state["forced_len"])
        halt = jnp.any(live & (tok == python_end)) | jnp.any(drained)
        toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
        masks = jax.lax.dynamic_update_slice(masks, (~has_forced).astype(jnp.int32)[:, None], (0, i))
        lives = jax.lax.dynamic_update_slice(lives, live.astype(jnp.int32)[:, None], (0, i))
        params = swap_matrices(decode_params) if swapped else decode_params
        extra = {} if attend_len is None else {"attend_len": attend_len}
        logits, cache = forward_fn(params, config, tok[:, None], kv_cache=state["cache"], **extra)

        def keep_if_idle(name, new):
            if name in ("k", "v"):
                return new
            old = state["cache"][name]
            mask = live.reshape((B,) + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        cache = {name: keep_if_idle(name, x) for name, x in cache.items()}
        logits = jnp.where(live[:, None], logits[:, 0], state["logits"])
        state = dict(state, cache=cache, logits=logits, done=done, step=state["step"] + live, budget=budget,
                     forced_ptr=ptr)
        return state, i + 1, (toks, masks, lives), halt

    state, _, (toks, masks, lives), _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0), bufs, jnp.bool_(False)))
    return state, toks, masks, lives


class Request:
    """One generation in a `BatchEngine`: iterate it for the emitted token ids (forced tool tokens included, the
    stop token last when it stopped on one); `finish_reason` is then 'stop' or 'length'. `cancel()` frees its slot
    at the next chunk boundary (or drops it from the queue)."""

    def __init__(self, tokens, max_tokens, temperature, top_k, top_p, seed, sample_index):
        self.tokens, self.max_tokens = list(tokens), max_tokens
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k or 0), float(top_p)
        self.seed, self.sample_index = seed, sample_index
        self.finish_reason: str | None = None
        self.cancelled = False
        self._out: queue.Queue = queue.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yields (token, mask) pairs until the request ends; re-raises an engine failure."""
        while True:
            item = self._out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item


class BatchEngine:
    """Continuous batching over one `Engine` (the scheme of JetStream and vLLM, simply): `max_batch` slots share one
    KV cache of `max_len` positions; a scheduler thread prefills each new request into a free slot between decode
    chunks, so it joins the running loop at the next chunk boundary, and frees a slot as soon as its request
    finishes, stops or is cancelled. Temperature, top-k, top-p, max_tokens, seed and calculator tool use are per slot.

    Shapes are static: B slots, prompt buckets (`bucket`), attend buckets over the fixed cache (`attend_bucket`), so
    after `warmup()` no request compiles. A slot's greedy output does not depend on the other slots (rows never mix).

    Args:
        engine: the `Engine` whose params, tokenizer, forward and decode settings are used.
        max_batch: slots B.
        max_len: positions per slot (default `cache_bucket(config.sequence_len)`); a request's prompt plus
            max_tokens is cut to fit.
        device: the jax.Device the scheduler thread makes default (where the engine's params live).
    """

    def __init__(self, engine: Engine, max_batch: int, max_len: int | None = None, device=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine, self.B, self.device = engine, max_batch, device
        self.params, self.tokenizer = engine.params, engine.tokenizer
        self.max_len = max_len or cache_bucket(engine.config.sequence_len)
        self._incoming: queue.Queue[Request] = queue.Queue()
        self._slots: list[Request | None] = [None] * max_batch
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.tokens_emitted = 0
        self._state = None

    # ------------------------------------------------------------------------------------------------------------
    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def queued(self) -> int:
        return self._incoming.qsize()

    def submit(self, tokens: list[int], max_tokens: int | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float = 1.0, seed: int = 42, sample_index: int = 0) -> Request:
        """Queue one generation; returns its `Request` at once. Raises TypeError / ValueError for bad arguments."""
        self.engine._check(tokens, 1, max_tokens, temperature)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if len(tokens) >= self.max_len:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room in the {self.max_len}-position cache")
        room = self.max_len - len(tokens)
        req = Request(tokens, room if max_tokens is None else min(max_tokens, room), temperature, top_k, top_p, seed,
                      sample_index)
        self._incoming.put(req)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
                self._thread.start()
                atexit.register(self.close)
        return req

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 top_p: float = 1.0) -> Iterator[tuple[list, list]]:
        """`Engine.generate`'s contract over slots: yields (token_column, mask_column) of num_samples ints per step;
        each sample is its own slot (sample i's key is folded with i). Rows that ended repeat their last token
        until every row has. Closing the generator cancels the samples."""
        reqs = [self.submit(tokens, max_tokens, temperature, top_k, top_p, seed, i) for i in range(num_samples)]
        streams = [iter(r) for r in reqs]
        last = [(self.engine.assistant_end, 1)] * num_samples
        try:
            while True:
                column, alive = [], False
                for i, s in enumerate(streams):
                    if s is not None:
                        try:
                            last[i] = next(s)
                            alive = True
                        except StopIteration:
                            streams[i] = None
                    column.append(last[i])
                if not alive:
                    return
                yield [t for t, _ in column], [m for _, m in column]
        finally:
            for r in reqs:
                r.cancel()

    def close(self) -> None:
        """Stop the scheduler thread at its next chunk boundary, ending the running requests (run at interpreter
        exit too, so no device call is cut off by the runtime's teardown). A later submit starts it again."""
        thread = self._thread
        if thread is not None:
            self._incoming.put(None)
            thread.join(timeout=10)

    def warmup(self) -> None:
        """Compile every prompt bucket and attend bucket this engine can meet, so no request compiles later."""
        self._ensure_state()
        n = MIN_PROMPT_BUCKET
        while True:
            tb = min(bucket(n, MIN_PROMPT_BUCKET), self.max_len)
            self._prefill(0, [0] * min(n, self.max_len - 1), tb)
            if tb >= self.max_len or bucket(n, MIN_PROMPT_BUCKET) >= self.engine.config.sequence_len:
                break
            n = tb * 2
        self._state["done"] = jnp.ones((self.B,), bool)
        seen = set()
        for hold in range(0, self.max_len + 1, MIN_CACHE_BUCKET // 2):
            attend = self._attend(hold)
            if attend not in seen:
                seen.add(attend)
                for kmax in (SMALL_TOP_K, MAX_TOP_K):  # both sampler variants
                    self._temp[0], self._top_k[0] = 1.0, kmax
                    self._dispatch(attend)
        self._temp[0], self._top_k[0] = 0.0, 0
        jax.block_until_ready(self._state["logits"])

    # ------------------------------------------------------------------------------------------------------------
    def _ensure_state(self):
        if self._state is not None:
            return
        e, B, F = self.engine, self.B, FORCED_SLOTS
        self._state = {"cache": gpt.init_kv_cache(e.config, B, self.max_len, e.cache_dtype),
                       "logits": jnp.zeros((B, e.config.vocab_size), jnp.float32), "done": jnp.ones((B,), bool),
                       "step": jnp.zeros((B,), jnp.int32), "budget": jnp.zeros((B,), jnp.int32),
                       "forced": jnp.zeros((B, F), jnp.int32), "forced_len": jnp.zeros((B,), jnp.int32),
                       "forced_ptr": jnp.zeros((B,), jnp.int32), "pending": jnp.zeros((B,), bool)}
        self._keys = np.zeros((B, 2), np.uint32)
        self._temp = np.zeros((B,), np.float32)
        self._top_k = np.zeros((B,), np.int32)
        self._top_p = np.ones((B,), np.float32)
        self._pos = np.zeros((B,), np.int64)  # positions each slot holds (host mirror, for the attend bucket)
        self._tools = [_RowTool() for _ in range(B)]
        self._stop_ids = jnp.asarray(e.stop_ids, jnp.int32)

    def _prefill(self, slot: int, tokens: list[int], tb: int | None = None):
        e = self.engine
        L = len(tokens)
        tb = tb or min(bucket(L, MIN_PROMPT_BUCKET), self.max_len)
        idx = np.zeros((1, tb), np.int32)
        idx[0, :L] = tokens
        s = self._state
        s["cache"], s["logits"] = _prefill_slot(
            e.params, s["cache"], s["logits"], jnp.asarray(idx), jnp.asarray([max(L, 1)], jnp.int32),
            jnp.int32(slot), config=e.config, forward_fn=e.forward_fn, cache_dtype=e.cache_dtype)

    def _attend(self, hold: int) -> int | None:
        if self.engine.forward_fn is not gpt.forward:
            return None
        return attend_bucket(min(hold + self.engine.decode_chunk, self.max_len), self.max_len)

    def _dispatch(self, attend, steps: int | None = None):
        e = self.engine
        # top-k / top-p rows draw among SMALL_TOP_K candidates unless one needs more (two compiled variants)
        wide = (self._top_k > SMALL_TOP_K) | ((self._top_p < 1.0) & (self._top_k == 0))
        kmax = MAX_TOP_K if bool(np.any(wide & (self._temp > 0))) else SMALL_TOP_K
        self._state, toks, masks, lives = _slot_decode_chunk(
            e.decode_params, self._state, jnp.asarray(self._keys), jnp.asarray(self._temp), jnp.asarray(self._top_k),
            jnp.asarray(self._top_p), self._stop_ids, jnp.int32(e.python_end), jnp.int32(steps or e.decode_chunk),
            config=e.config,
            forward_fn=e.forward_fn, chunk=e.decode_chunk, swapped=e.swapped, attend_len=attend, kmax=kmax)
        return toks, masks, lives

    def _finish(self, slot: int, reason: str | None) -> None:
        req = self._slots[slot]
        self._slots[slot] = None
        self._temp[slot], self._top_k[slot], self._top_p[slot] = 0.0, 0, 1.0  # an idle slot must not widen kmax
        if req is not None:
            req.finish_reason = reason
            req._out.put(None)

    def _admit(self, req: Request, host: dict) -> None:
        """Prefill req into a free slot and reset that slot's per-request state (host copies in `host`)."""
        slot = self._slots.index(None)
        self._slots[slot] = req  # held from here on, so that a failing prefill ends this request too (see _run)
        self._prefill(slot, req.tokens)
        key = jax.random.fold_in(jax.random.PRNGKey(req.seed), req.sample_index)
        self._keys[slot] = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                      else key)
        self._temp[slot], self._top_k[slot], self._top_p[slot] = req.temperature, req.top_k, req.top_p
        self._pos[slot] = len(req.tokens)
        self._tools[slot] = _RowTool()
        host["done"][slot], host["step"][slot], host["budget"][slot] = False, 0, req.max_tokens
        host["forced_len"][slot] = host["forced_ptr"][slot] = 0
        host["pending"][slot] = False
        self._slots[slot] = req

    def _run(self) -> None:
        ctx = jax.default_device(self.device) if self.device is not None else contextlib.nullcontext()
        with ctx:
            try:
                self._loop()
                with self._lock:
                    self._thread = None
            except BaseException as e:  # a device failure ends every request with the error, not a hang
                for slot, req in enumerate(self._slots):
                    if req is not None:
                        req._out.put(e)
                        self._slots[slot] = None
                while not self._incoming.empty():
                    self._incoming.get()._out.put(e)
                with self._lock:
                    self._thread = None
                    self._state = None  # its buffers may have been donated to the failed call: start afresh
                raise

    def _loop(self) -> None:
        self._ensure_state()
        names = ("done", "step", "budget", "forced", "forced_len", "forced_ptr", "pending")
        while True:
            s = self._state
            host = {k: np.array(v) for k, v in jax.device_get({k: s[k] for k in names}).items()}
            for slot, req in enumerate(self._slots):  # cancelled requests leave at once
                if req is not None and req.cancelled:
                    self._finish(slot, None)
                    host["done"][slot] = True
            while None in self._slots:
                try:
                    req = self._incoming.get(block=all(r is None for r in self._slots), timeout=None)
                except queue.Empty:
                    break
                if req is None:  # close(): end what runs, leave the rest queued
                    for slot in range(self.B):
                        self._finish(slot, None)
                    return
                if req.cancelled:
                    req._out.put(None)
                    continue
                if req.max_tokens == 0:
                    req.finish_reason = "length"
                    req._out.put(None)
                    continue
                self._admit(req, host)
            s = self._state
            for k in names:
                s[k] = jnp.asarray(host[k])
            active = [b for b, r in enumerate(self._slots) if r is not None]
            # a chunk that a new request joins is short, so its first tokens come out soon (time to first token)
            fresh = any(self._pos[b] == len(self._slots[b].tokens) for b in active)
            steps = max(1, self.engine.decode_chunk // 4) if fresh else self.engine.decode_chunk
            toks, masks, lives = self._dispatch(self._attend(int(max(self._pos[b] for b in active))), steps)
            toks, masks, lives, done, ptr = jax.device_get((toks, masks, lives, self._state["done"],
                                                            self._state["forced_ptr"]))
            ptr = np.array(ptr)
            emitted = 0
            rows_toks = []
            for b in range(self.B):
                n = int(lives[b].sum())
                rows_toks.append(toks[b, :n])
                req = self._slots[b]
                if req is None or n == 0:
                    continue
                emitted += n
                self._pos[b] += n
                req._out.put(list(zip(toks[b, :n].tolist(), masks[b, :n].tolist())))
            self.tokens_emitted += emitted
            if self.tokenizer is not None:
                host = {k: np.array(v) for k, v in jax.device_get({k: self._state[k] for k in names}).items()}
                host["forced_ptr"] = ptr
                if self.engine._run_tools(self._tools, rows_toks, host["forced"], host["forced_len"], ptr):
                    host["pending"] = np.array([len(t.pending) > 0 for t in self._tools])
                    for k in ("forced", "forced_len", "forced_ptr", "pending"):
                        self._state[k] = jnp.asarray(host[k])
            for b, req in enumerate(self._slots):
                if req is not None and done[b]:
                    last = rows_toks[b][-1] if len(rows_toks[b]) else None
                    self._finish(b, "stop" if last is not None and int(last) in self.engine.stop_ids else "length")
