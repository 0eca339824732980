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
        leaf = jax.tree.leaves(params)[0]
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
