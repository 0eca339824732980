"""Inference engine: slots over one KV cache, driven by jitted programs (prefill, insert, decode chunk; score).

Sources: nanochat `nanochat/engine.py` (sampling, the calculator tool, the `generate` / `generate_batch` contract);
MaxText `maxengine.py` (prefill, insert into a decode slot, one generate step over all slots); vLLM (continuous
batching, per-request sampling, raw logprobs).

`max_batch` slots share one KV cache of `max_len` positions per slot. A request (a prompt, n samples) is prefilled
once and copied into n free slots; all slots advance together, up to `decode_chunk` tokens per host round-trip,
each with its own temperature, top-k, top-p, key, budget, stop tokens and forced tool tokens (one sampler).
Requests join and leave at chunk boundaries; rows never mix, so a greedy output does not depend on the others.

Programs. `engine_programs(config, mesh, max_batch, max_len, prompt_len=...)` returns {name: (jitted, abstract
args)}, lowerable on any mesh (`jitted.lower(*args)`, e.g. described GPUs); `Engine` runs the same jitted objects:

    prefill(params, idx int32 (1, Tb), valid_len int32 (1,)) -> (prefix cache of Tb positions, logits f32 (1, V))
    insert(state, prefix, logits, slot int32 (), request) -> state          the slot overwritten; state donated
    decode(decode_params, state, ctl) -> (state, out)                       up to decode_chunk steps; state donated
    score(params, idx int32 (B, T)) -> (token_logprobs, top values, top ids)  prompt scoring (`Engine.score`)

`score` is one forward without a cache over B right-padded prompts (`jaxchat.scoring`: power-of-two buckets, the rows
split over the mesh like the slots): each token's log-probability and the TOP_LOGPROBS most likely tokens at every
position, as a server's echo/logprobs requests need; `warmup` does not compile its shapes (first use does).

`state` (`init_state`): the KV cache and per-slot arrays, the slot axis sharded over the mesh
(`jaxchat.sharding.ENGINE_STATE_RULES`), params replicated. `request`: one slot's settings (`_request_fields`);
`ctl` (`_ctl_fields`): the host's edits per chunk (cancel, resume after a tool call, forced tokens). `out`, per slot
and step: the token (-1: none), the mask (1 sampled, 0 forced) and, in the `logprobs=True` variant, its
log-probability and the top TOP_LOGPROBS. Prompts are padded to power-of-two buckets and a chunk attends only to
the positions its slots reach (`attend_bucket`), so `Engine.warmup()` compiles every shape a request can meet.
Platform choices follow the mesh (`jaxchat.backend`): decode reads its own copy of the weights (`decode_weights`:
on CPU stored (in, out), on GPU in bfloat16), and on CPU argmax is two reductions.

Host side: `Engine.submit` queues a request (bounded: `QueueFull`) and returns a `Request` yielding `Output`s: the
token, its mask, the text it adds (whole characters, cut at a stop string, what may begin one held back), logprobs
and the engine's finish_reason. A server runs the scheduler thread (`start`); otherwise iterating a request runs
the scheduler in the caller's thread (`generate`, `generate_batch`). Tool use as nanochat's: after <|python_end|>
the slot pauses, the host runs `use_calculator` on the block and forces <|output_start|> result <|output_end|>
(mask 0). Without a tokenizer the engine decodes tokens only (no stop tokens, tools or text).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import threading
from collections import deque
from queue import Empty, SimpleQueue
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxchat import backend
from jaxchat import model as gpt
from jaxchat import scoring
from jaxchat import sharding as shd
from jaxchat.calculator import use_calculator
from jaxchat.common import pow2_bucket

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
MIN_CACHE_BUCKET = 64  # caches and attended prefixes hold at least 64 positions
DECODE_CHUNK = 32  # tokens emitted per host round-trip
FORCED_SLOTS = 32  # per-slot buffer of forced tool tokens (longer results are loaded in several parts)
MAX_TOP_K = 200  # top-k / top-p draw among at most this many candidates (the server's top_k limit)
SMALL_TOP_K = 64  # candidates drawn when no slot asks for more: the common top-k (nanochat's 50) costs less
TOP_LOGPROBS = 20  # the logprobs variant returns this many top alternatives per token (OpenAI's limit)
MAX_STOP_IDS = 4  # stop token ids per slot


def cache_bucket(n: int) -> int:
    """Cache length for n positions: the smallest 2^k or 1.5 * 2^k >= n (at least MIN_CACHE_BUCKET): the half steps
    waste at most a third of the memory instead of a half."""
    size = pow2_bucket(n, MIN_CACHE_BUCKET)
    return size * 3 // 4 if size * 3 // 4 >= max(n, MIN_CACHE_BUCKET) else size


def attend_bucket(n: int, max_len: int) -> int | None:
    """Cache positions a decode chunk reads when its slots will hold at most n: `cache_bucket(n)`, or None (all
    max_len) once that reaches max_len. Attention reads (and on CPU copies, layer by layer) the positions it
    attends, so its cost follows this, for at most 2 log2(max_len / 64) compiled decode shapes."""
    size = cache_bucket(n)
    return None if size >= max_len else size


def _map_matrices(fn, params):
    """fn applied to every 2-D leaf except the embedding tables (wte, value_embeds, bigram_embed): the matrices
    that `jaxchat.kernels.linear` reads."""
    def one(path, x):
        keys = {getattr(k, "key", None) for k in path}
        return fn(x) if x.ndim == 2 and not keys & {"wte", "value_embeds", "bigram_embed"} else x
    return jax.tree_util.tree_map_with_path(one, params)


def swap_matrices(params):
    """Transpose every 2-D leaf except the embedding tables (wte, value_embeds, bigram_embed); its own inverse.

    The layout the CPU decode program reads (`jaxchat.backend.decode_weights_swapped`): it swaps back inside the
    loop body, where XLA folds the transpose into the dot, and at a few rows per matmul the (in, out) layout is the
    faster one on CPU.
    """
    return _map_matrices(lambda x: x.T, params)


def decode_weights(params, platform: str):
    """The copy of the weights the decode program reads on `platform`: on CPU the (in, out) layout
    (`swap_matrices`); elsewhere the matrices in the compute dtype (bfloat16 on GPU, as nanochat serves its bf16
    checkpoints), which `linear` casts them to anyway, so a decode step reads half the bytes and gives the same
    logits. Prefill and scoring read `params` as stored."""
    if backend.decode_weights_swapped(platform):
        return swap_matrices(params)
    dtype = backend.compute_dtype(platform)
    return _map_matrices(lambda x: x.astype(dtype), params)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           kmax: int = MAX_TOP_K, two_reduction_argmax: bool = False) -> jax.Array:
    """int32 (B,): one token per row of float32 logits (B, V), each row with its own settings (nanochat
    `sample_next_token`, plus top-p). keys: uint32 (B, 2), one per row; temperature float32 (B,), 0 greedy (argmax,
    first index on ties); top_k int32 (B,), > 0 keeps the k most likely (at most kmax), 0 all; top_p float32 (B,) in
    (0, 1], < 1 keeps the smallest most likely set reaching top_p (nucleus sampling, Holtzman et al. 2019) among
    the kmax most likely. Static: kmax, two_reduction_argmax (`jaxchat.backend.two_reduction_argmax`)."""
    V = logits.shape[-1]
    if two_reduction_argmax:
        best = jnp.max(logits, axis=-1, keepdims=True)
        greedy = jnp.min(jnp.where(logits == best, jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)
    else:
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    draw = jax.vmap(lambda k, l: jax.random.categorical(k, l))
    narrowed = (top_k > 0) | (top_p < 1.0)

    def sampled(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        k = min(kmax, V)
        vals, idx = jax.lax.top_k(scaled, k)  # sorted, largest first
        keep = jnp.arange(k)[None, :] < jnp.where(top_k > 0, jnp.minimum(top_k, k), k)[:, None]
        probs = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
        keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the most likely one always stays
        from_candidates = jnp.take_along_axis(idx, draw(keys, jnp.where(keep, vals, -jnp.inf))[:, None], axis=1)[:, 0]
        # (B, V) Gumbel noise only when some sampling row keeps the whole vocabulary
        from_all = jax.lax.cond(jnp.any((temperature > 0) & ~narrowed), lambda: draw(keys, scaled),
                                lambda: from_candidates)
        return jnp.where(narrowed, from_candidates, from_all).astype(jnp.int32)

    return jnp.where(temperature > 0, jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None), greedy)


# ----------------------------------------------------------------------------------------------------------------
# The programs


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What an engine's programs are compiled for (hashable: the key of `_program`'s cache)."""
    config: gpt.GPTConfig
    mesh: Mesh
    max_batch: int
    max_len: int
    decode_chunk: int = DECODE_CHUNK
    forward_fn: Callable = gpt.forward
    python_end: int = -1  # the token after which a slot pauses for the tool (-1: never)

    @property
    def platform(self) -> str:
        return backend.platform_of(self.mesh)


def init_state(spec: _Spec) -> dict:
    """The slots' device state: 'cache' (`jaxchat.model.init_kv_cache`), 'logits' float32 (B, V) of each slot's
    next token, 'done' bool (B,) (not emitting: free, finished, cancelled, paused for the tool), 'step' int32 (B,)
    tokens emitted (folded into 'key' uint32 (B, 2)), 'budget' (B,) tokens left, 'forced' (B, FORCED_SLOTS) /
    'forced_len' / 'forced_ptr' the tool tokens to emit next, 'pending' (more wait on the host: pause when drained),
    and the settings of `_request_fields`."""
    B, i32 = spec.max_batch, np.int32
    slots = {k: (np.shape(x), x.dtype) for k, x in _request_fields().items() if k not in ("seed", "index")}
    slots.update(key=((2,), np.uint32), logits=((spec.config.vocab_size,), np.float32), step=((), i32),
                 forced=((FORCED_SLOTS,), i32), forced_len=((), i32), forced_ptr=((), i32), pending=((), bool))
    return {"cache": gpt.init_kv_cache(spec.config, B, spec.max_len, backend.compute_dtype(spec.platform)),
            "done": jnp.ones((B,), bool), **{k: jnp.zeros((B,) + shape, dtype) for k, (shape, dtype) in slots.items()}}


def _request_fields() -> dict:
    """One slot's settings, as insert takes them: 'seed' uint32 (2,) (`PRNGKey(seed)`'s data), 'index' (the sample:
    the key is the seed's folded with it), 'temperature', 'top_k', 'top_p', 'budget', 'stop_ids' (-1 pads)."""
    return {"seed": np.zeros((2,), np.uint32), "index": np.int32(0), "temperature": np.float32(0),
            "top_k": np.int32(0), "top_p": np.float32(1), "budget": np.int32(0),
            "stop_ids": np.full((MAX_STOP_IDS,), -1, np.int32)}


def _ctl_fields(spec: _Spec) -> dict:
    """The host's edits at the start of a decode chunk: 'cancel' / 'resume' bool (B,), 'forced' (B, FORCED_SLOTS)
    loaded where 'forced_len' > 0 (with its 'pending' flag), and 'num_steps' () the chunk's length."""
    B = spec.max_batch
    return {"cancel": np.zeros((B,), bool), "resume": np.zeros((B,), bool),
            "forced": np.zeros((B, FORCED_SLOTS), np.int32), "forced_len": np.zeros((B,), np.int32),
            "pending": np.zeros((B,), bool), "num_steps": np.int32(spec.decode_chunk)}


def _prefill(spec: _Spec, params, idx, valid_len):
    with backend.use(spec.mesh):  # the model's dtypes and kernels follow the mesh, also under --compile-for
        cache = gpt.init_kv_cache(spec.config, 1, idx.shape[1], backend.compute_dtype(spec.platform))
        logits, cache = spec.forward_fn(params, spec.config, idx, kv_cache=cache, valid_len=valid_len)
        return cache, jax.lax.dynamic_slice_in_dim(logits[0], valid_len[0] - 1, 1, axis=0)


def _insert(spec: _Spec, state, prefix, logits, slot, request):
    # Each entry is written at the slot's rows of its first axis (one row per slot, or k and v's n_kv_head,
    # `init_kv_cache`). Positions past the prompt keep an earlier request's values: none is read before decode
    # writes it.
    def put(big, small):
        start = (slot * small.shape[0],) + (jnp.int32(0),) * (big.ndim - 1)
        return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)

    cache = jax.tree.map(put, state["cache"], prefix)
    settings = {k: v for k, v in request.items() if k not in ("seed", "index")}
    settings["key"] = jax.random.fold_in(request["seed"], request["index"])
    new = {k: put(state[k], jnp.asarray(v)[None]) for k, v in settings.items()}
    reset = {k: put(state[k], jnp.zeros((1,), state[k].dtype)) for k in ("done", "step", "forced_len", "forced_ptr",
                                                                         "pending")}
    return {**state, **new, **reset, "cache": cache, "logits": put(state["logits"], logits)}


def _decode(spec: _Spec, attend_len: int | None, kmax: int, logprobs: bool, params, state, ctl):
    B, C, cfg = spec.max_batch, spec.decode_chunk, spec.config
    load = ctl["forced_len"] > 0  # the host's edits: new forced buffers, cancelled and resumed slots
    edits = {k: jnp.where(load.reshape((-1,) + (1,) * (ctl[k].ndim - 1)), ctl[k], state[k])
             for k in ("forced", "forced_len", "pending")}
    state = dict(state, **edits, done=(state["done"] | ctl["cancel"]) & ~ctl["resume"],
                 forced_ptr=jnp.where(load, 0, state["forced_ptr"]))
    out = {"tokens": jnp.full((B, C), -1, jnp.int32), "masks": jnp.zeros((B, C), jnp.int32)}
    if logprobs:
        out.update(logprob=jnp.zeros((B, C), jnp.float32), top_logprobs=jnp.zeros((B, C, TOP_LOGPROBS), jnp.float32),
                   top_ids=jnp.zeros((B, C, TOP_LOGPROBS), jnp.int32))
    swapped = backend.decode_weights_swapped(spec.platform)
    # The loop carries the k, v positions the chunk's slots can reach (`attend_bucket`), cut once here and written
    # back after it: attention reads all it carries, in place, and nothing copies the cache step by step.
    full = state["cache"]
    if attend_len is not None:
        state["cache"] = dict(full, **{kv: [c[:, :attend_len] for c in full[kv]] for kv in ("k", "v")})

    def body(carry):
        state, i, out = carry
        logits, live, ptr = state["logits"], ~state["done"], state["forced_ptr"]
        keys = jax.vmap(jax.random.fold_in)(state["key"], state["step"])
        drawn = sample(logits, keys, state["temperature"], state["top_k"], state["top_p"], kmax,
                       backend.two_reduction_argmax(spec.platform))
        forcing = live & (ptr < state["forced_len"])
        forced = jnp.take_along_axis(state["forced"], jnp.minimum(ptr, FORCED_SLOTS - 1)[:, None], axis=1)[:, 0]
        tok = jnp.where(forcing, forced, drawn)
        ptr = ptr + forcing
        budget = state["budget"] - live
        stop = jnp.any(tok[:, None] == state["stop_ids"], axis=-1) | (budget <= 0)
        pause = (tok == spec.python_end) | (state["pending"] & forcing & (ptr >= state["forced_len"]))
        put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, axis=1)  # noqa: E731
        out = dict(out, tokens=put(out["tokens"], jnp.where(live, tok, -1)), masks=put(out["masks"], (~forcing) * 1))
        if logprobs:  # the model's distribution, before temperature (vLLM's raw logprobs)
            lp = jax.nn.log_softmax(logits, axis=-1)
            top, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
            out.update(logprob=put(out["logprob"], jnp.take_along_axis(lp, tok[:, None], axis=1)[:, 0]),
                       top_logprobs=put(out["top_logprobs"], top), top_ids=put(out["top_ids"], top_ids))
        weights = swap_matrices(params) if swapped else params  # inside the body: XLA folds it into the dots
        new_logits, cache = spec.forward_fn(weights, cfg, tok[:, None], kv_cache=state["cache"])
        # a slot that does not emit keeps its position (k, v are written at it and rewritten when it goes on)
        cache = {k: v if k in ("k", "v") else jnp.where(live.reshape((B,) + (1,) * (v.ndim - 1)), v, state["cache"][k])
                 for k, v in cache.items()}
        state = dict(state, cache=cache, logits=jnp.where(live[:, None], new_logits[:, 0], logits), budget=budget,
                     done=state["done"] | (live & (stop | pause)), step=state["step"] + live, forced_ptr=ptr)
        return state, i + 1, out

    def cond(carry):
        state, i, _ = carry
        return (i < jnp.minimum(ctl["num_steps"], C)) & ~jnp.all(state["done"])

    with backend.use(spec.mesh):
        state, _, out = jax.lax.while_loop(cond, body, (state, jnp.int32(0), out))
    if attend_len is not None:
        put = lambda big, part: jax.lax.dynamic_update_slice(big, part, (0, 0, 0))  # noqa: E731
        state["cache"] = dict(state["cache"], **{kv: list(map(put, full[kv], state["cache"][kv])) for kv in ("k", "v")})
    return state, out


def _score(spec: _Spec, params, idx):
    # prompt scoring (`jaxchat.scoring`): one forward over padded rows, the rows split over the mesh like the slots
    with backend.use(spec.mesh):
        return scoring.token_logprobs(spec.forward_fn, params, spec.config, idx, TOP_LOGPROBS)


def _shardings(spec: _Spec):
    """(replicated, the state's, the ctl's): the slot axis split over the mesh, the rest replicated."""
    rep, slots = NamedSharding(spec.mesh, P()), NamedSharding(spec.mesh, P(shd.BATCH_AXES))
    state = shd.tree_shardings(jax.eval_shape(functools.partial(init_state, spec)), spec.mesh, shd.ENGINE_STATE_RULES)
    return rep, state, jax.tree.map(lambda x: slots if np.ndim(x) else rep, _ctl_fields(spec))


@functools.lru_cache(maxsize=None)
def _program(spec: _Spec, name: str, *variant):
    """The jitted program `name` ("init", "prefill", "insert", "decode" + (attend_len, kmax, logprobs), "score") of
    `spec`, with its shardings; one object per variant, shared by every engine of the same spec."""
    rep, state, ctl = _shardings(spec)
    if name == "score":
        rows = NamedSharding(spec.mesh, P(shd.BATCH_AXES))
        return jax.jit(functools.partial(_score, spec), in_shardings=(rep, rows), out_shardings=rows)
    if name == "init":
        return jax.jit(functools.partial(init_state, spec), out_shardings=state)
    if name == "prefill":
        return jax.jit(functools.partial(_prefill, spec), in_shardings=rep, out_shardings=rep)
    if name == "insert":
        return jax.jit(functools.partial(_insert, spec), in_shardings=(state, rep, rep, rep, rep), out_shardings=state,
                       donate_argnums=0)
    return jax.jit(functools.partial(_decode, spec, *variant), in_shardings=(rep, state, ctl),
                   out_shardings=(state, ctl["cancel"]), donate_argnums=1)


def engine_programs(config: gpt.GPTConfig, mesh: Mesh, max_batch: int, max_len: int, *, prompt_len: int,
                    decode_chunk: int = DECODE_CHUNK, attend_len: int | None = None, kmax: int = SMALL_TOP_K,
                    logprobs: bool = False) -> dict[str, tuple[Callable, tuple]]:
    """{"prefill", "insert", "decode", "score": (jitted, abstract args)}: the programs `Engine` runs, for `mesh` (a
    `jaxchat.sharding.make_mesh` mesh, e.g. of described GPUs; the slots split over it), max_batch slots (a
    multiple of its size) of max_len positions, a prompt of prompt_len tokens (its bucket) and the decode variant
    (attend_len, kmax, logprobs); "score" scores max_batch prompts of prompt_len tokens (`Engine.score`). The args
    are `ShapeDtypeStruct`s with shardings: `jitted.lower(*args)` needs no params or devices."""
    spec = _Spec(config, mesh, max_batch, max_len, decode_chunk)
    rep, _, ctl = _shardings(spec)
    abstract = lambda tree, sh=None: shd.abstract_with_shardings(tree, sh or jax.tree.map(lambda _: rep, tree))  # noqa
    with backend.use(mesh):
        params = abstract(gpt.param_shapes(config))
    prompt = abstract((np.zeros((1, min(pow2_bucket(prompt_len, MIN_PROMPT_BUCKET), max_len)), np.int32),
                       np.zeros((1,), np.int32)))
    prefix = abstract(jax.eval_shape(_program(spec, "prefill"), params, *prompt))
    state = jax.eval_shape(_program(spec, "init"))
    rows = scoring.bucket_shape(max_batch, prompt_len, config.sequence_len, mesh.size)
    return {"prefill": (_program(spec, "prefill"), (params, *prompt)),
            "insert": (_program(spec, "insert"), (state, *prefix, abstract(np.int32(0)), abstract(_request_fields()))),
            "decode": (_program(spec, "decode", attend_len, kmax, logprobs),
                       (abstract(jax.eval_shape(functools.partial(decode_weights, platform=spec.platform), params)),
                        state, abstract(_ctl_fields(spec), ctl))),
            "score": (_program(spec, "score"), (params, abstract(np.zeros(rows, np.int32),
                                                                   NamedSharding(mesh, P(shd.BATCH_AXES)))))}


# ----------------------------------------------------------------------------------------------------------------
# Requests


class QueueFull(Exception):
    """`Engine.submit` refused: every slot busy and max_queue samples waiting (a server answers 503)."""


class Output(NamedTuple):
    """One token of sample `index`: token (None only ending a sample that emitted nothing); mask (1 sampled, 0
    forced); text it adds; finish_reason "stop" (stop token or string) / "length" (max_tokens, the cache) on the
    sample's last output; logprobs (when asked): (its log-probability, ((id, log-probability), ...) of the top N),
    of the model's distribution before temperature."""
    index: int
    token: int | None
    mask: int
    text: str
    finish_reason: str | None
    logprobs: tuple | None


class _Text:
    """A sample's text, decoded incrementally: only whole characters (nanochat's rule: text ending in U+FFFD waits
    for the rest of its bytes), cut at the first stop string, holding back what may begin one."""

    def __init__(self, tokenizer, stops):
        self.decode, self.stops = tokenizer.decode if tokenizer is not None else lambda ids: "", stops
        self.ids, self.mark, self.text, self.sent = [], 0, "", 0

    def add(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the text)."""
        self.ids.append(token)
        piece = self.decode(self.ids[self.mark:])  # from the last whole character on
        if piece.endswith("\ufffd"):
            return "", False
        self.text, self.mark = self.text + piece, len(self.ids)
        hits = [j for j in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if j >= 0]
        if hits:
            out, self.sent = self.text[self.sent:min(hits)], len(self.text)
            return out, True
        hold = max([k for s in self.stops for k in range(1, min(len(s), len(self.text) + 1))
                    if self.text.endswith(s[:k])], default=0)  # what may begin a stop string waits
        upto = len(self.text) - hold
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out, False

    def flush(self) -> str:
        """The rest of the text at the end (held-back text included, an unfinished character dropped)."""
        text = self.text + self.decode(self.ids[self.mark:]).rstrip("\ufffd")
        out, self.sent = text[self.sent:], len(text)
        return out


class Request:
    """One prompt with n samples in an `Engine`; iterate it for `Output`s (samples interleaved, each in order).

    A stop string ends a sample with "stop" as its text arrives (its last output is the token that completed it,
    the text cut before it) and frees its slot. `num_tokens[i]`: sample i's tokens (its stop token excluded);
    `finish_reasons[i]`; `slots[i]` once admitted (`admitted` is set when all are). `cancel()` frees the slots at
    the next chunk boundary or drops the request from the queue, and ends the iteration. It raises engine failures.
    """

    def __init__(self, tokens, n, budget, temperature, top_k, top_p, seed, stop_ids, stop, logprobs, tokenizer):
        self.tokens, self.n, self.budget, self.logprobs = list(tokens), n, budget, logprobs
        self.stop_ids = tuple(stop_ids)
        seed &= 0xFFFFFFFFFFFFFFFF  # as jax.random.PRNGKey(seed)'s key data: what insert takes (`_request_fields`)
        self.settings = dict(_request_fields(), seed=np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32),
                             temperature=np.float32(temperature), top_k=np.int32(top_k or 0), top_p=np.float32(top_p),
                             budget=np.int32(budget))
        self.settings["stop_ids"][:len(stop_ids)] = stop_ids
        # draws among more than SMALL_TOP_K candidates (the decode chunk's wider sampler variant)
        self.wide = temperature > 0 and ((top_k or 0) > SMALL_TOP_K or (top_p < 1 and not top_k))
        self.num_tokens, self.finish_reasons, self.slots = [0] * n, [None] * n, [None] * n
        self.admitted = threading.Event()
        self.cancelled = False
        self.released: set[int] = set()  # samples ended by a stop string: the engine frees their slots
        self._text = [_Text(tokenizer, tuple(stop)) for _ in range(n)]
        self._out: SimpleQueue = SimpleQueue()
        self._pump: Callable[[], bool] | None = None  # runs a scheduler step unless the scheduler thread runs
        self._prefix = None  # the prefill's (cache, logits) while samples wait for slots
        self._next = 0  # the next sample to admit

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, index: int, tokens, masks, logprobs, reason: str | None) -> None:  # the engine's delivery
        self._out.put((index, tokens, masks, logprobs, reason))

    def _close(self, error: BaseException | None = None) -> None:
        self._out.put(error)

    def _get(self):
        while True:  # a synchronous caller runs scheduler steps itself while no scheduler thread does
            try:
                return self._out.get_nowait()
            except Empty:
                if not (self._pump and self._pump()):
                    try:
                        return self._out.get(timeout=0.1)
                    except Empty:
                        pass

    def __iter__(self) -> Iterator[Output]:
        return (out for batch in self.batches() for out in batch)

    def batches(self) -> Iterator[list[Output]]:
        """The outputs as the engine delivers them: a list per decode chunk and sample (a server writes each at
        once)."""
        while None in self.finish_reasons:
            item = self._get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            index, tokens, masks, logprobs, reason = item
            text, batch = self._text[index], []
            for j, (tok, mask) in enumerate(zip(tokens, masks)):
                if self.finish_reasons[index] is not None:
                    break
                last, stop_token = j == len(tokens) - 1, j == len(tokens) - 1 and reason == "stop"
                piece, hit = ("", False) if stop_token else text.add(tok)  # a stop token is not text
                self.num_tokens[index] += not stop_token
                if hit:  # a stop string: this sample is done, its slot freed at the next step
                    self.released.add(index)
                    self.finish_reasons[index] = "stop"
                elif last and reason:
                    piece += text.flush()
                    self.finish_reasons[index] = reason
                batch.append(Output(index, tok, mask, piece, self.finish_reasons[index],
                                    None if logprobs is None else logprobs[j]))
            if reason and not tokens:  # max_tokens 0
                self.finish_reasons[index] = reason
                batch.append(Output(index, None, 1, "", reason, None))
            if batch:
                yield batch


# ----------------------------------------------------------------------------------------------------------------
# The engine


class _Slot:
    """The host's view of a busy slot: its request sample, tokens received, and nanochat's per-row tool state."""

    def __init__(self, req: Request, index: int):
        self.req, self.index, self.emitted, self.fresh, self.finished = req, index, 0, True, False
        self.in_python, self.expr = False, []  # the python block being written
        self.pending: deque[int] = deque()  # forced tokens not yet loaded onto the device
        self.forced_left, self.drain_pause = 0, False  # loaded, not yet emitted; the device pauses when they run out
        self.resume: list[int] | None = None  # paused: the tokens to force when it goes on


class Engine:
    """KV-cached generation over `max_batch` slots (nanochat `Engine`'s contract, with continuous batching).

    Args: params (`jaxchat.model`), put replicated on `devices`; config, its `GPTConfig`; tokenizer, optional
    (`encode`, `decode`, `encode_special`, `get_bos_token_id`): with it samples stop at <|assistant_end|> or <|bos|>,
    python blocks run the calculator, outputs carry text. max_batch: slots, a multiple of len(devices) (more samples
    wait). max_len: positions per slot (default `cache_bucket(config.sequence_len)`); max_tokens is cut to the room
    a prompt leaves ("length"). max_queue: samples that may wait (then QueueFull). devices: the slots' devices
    (default: params' first). decode_chunk: tokens per host round-trip. forward_fn: `forward(params, config, idx,
    kv_cache=..., valid_len=...) -> (logits, cache)`, default `jaxchat.model.forward` (tests inject scripted ones).
    Raises ValueError: max_batch or decode_chunk below 1, max_len below 2, max_batch not a multiple of the devices.
    """

    def __init__(self, params, config: gpt.GPTConfig, tokenizer=None, *, max_batch: int = 1, max_len: int | None = None,
                 max_queue: int = 64, devices=None, decode_chunk: int = DECODE_CHUNK, forward_fn=gpt.forward):
        if devices is None:
            leaf = next((x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)), None)
            devices = [min(leaf.devices(), key=lambda d: d.id)] if leaf is not None else jax.devices()[:1]
        if max_batch < 1 or max_batch % len(devices) or decode_chunk < 1 or (max_len is not None and max_len < 2):
            raise ValueError(f"max_batch={max_batch} must be a multiple of the {len(devices)} devices, decode_chunk="
                             f"{decode_chunk} >= 1, max_len={max_len} >= 2")
        self.tokenizer, self.config, self.max_queue = tokenizer, config, max_queue
        special = tokenizer.encode_special if tokenizer is not None else lambda name: -1
        self.python_start, self.python_end, self.output_start, self.output_end, self.assistant_end = (
            special(f"<|{name}|>") for name in ("python_start", "python_end", "output_start", "output_end",
                                                "assistant_end"))
        self.stop_ids = (self.assistant_end, tokenizer.get_bos_token_id()) if tokenizer is not None else ()
        mesh = shd.make_mesh(1, devices)
        self.spec = _Spec(config, mesh, max_batch, max_len or cache_bucket(config.sequence_len), decode_chunk,
                          forward_fn, self.python_end)
        self.max_batch, self.max_len, self.num_devices = max_batch, self.spec.max_len, len(devices)
        self.cache_dtype = backend.compute_dtype(self.spec.platform)
        self.params = jax.device_put(params, NamedSharding(mesh, P()))
        self.decode_params = decode_weights(self.params, self.spec.platform)
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()  # guards the queue and the thread's start and stop
        self._drive = threading.Lock()  # one scheduler step at a time (the thread's or a synchronous caller's)
        self._slots: list[_Slot | None] = [None] * max_batch
        self._state, self._inflight, self._thread, self._closing = None, None, None, False
        self._scoring = threading.Lock()  # one scoring forward at a time (its logits are the largest buffer)

    # ------------------------------------------------------------------------------------------------ public API
    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def queued(self) -> int:
        """Samples waiting for a slot (cancelled ones excluded)."""
        return sum(r.n - r._next for r in list(self._queue) if not r.cancelled)

    def device_of(self, slot: int) -> int:
        """Index (in `devices`) of the device holding `slot`."""
        return slot * self.num_devices // self.max_batch

    def submit(self, tokens: list[int], n: int = 1, max_tokens: int | None = None, temperature: float = 1.0,
               top_k: int | None = None, top_p: float = 1.0, seed: int = 42, stop: tuple[str, ...] = (),
               logprobs: int | None = None, stop_token_ids: tuple[int, ...] | None = None) -> Request:
        """Queue n samples of the prompt `tokens`; returns their `Request` at once (served by the scheduler
        thread, or else by iterating the request). max_tokens per sample (None: to the cache's end); temperature 0
        greedy; top_k None/0 and top_p 1 keep all; sample i draws from `fold_in(PRNGKey(seed), i)` folded with its
        step; stop: strings ending a sample's text; logprobs: None or N <= TOP_LOGPROBS (each output's
        log-probability and top N); stop_token_ids default <|assistant_end|>, <|bos|> (none without a tokenizer).
        Raises TypeError / ValueError (bad arguments, a prompt leaving no room), QueueFull."""
        self._check_ids(tokens, "tokens")
        for name, value, ok in (("n", n, n >= 1), ("max_tokens", max_tokens, max_tokens is None or max_tokens >= 0),
                                ("temperature", temperature, temperature >= 0), ("top_p", top_p, 0 < top_p <= 1),
                                ("top_k", top_k, top_k is None or top_k >= 0),
                                ("logprobs", logprobs, logprobs is None or 0 <= logprobs <= TOP_LOGPROBS)):
            if not ok:
                raise ValueError(f"{name}={value} is out of range")
        if len(tokens) >= self.max_len:
            raise ValueError(f"prompt of {len(tokens)} tokens leaves no room in the {self.max_len}-position cache")
        stop_ids = self.stop_ids if stop_token_ids is None else tuple(stop_token_ids)
        if len(stop_ids) > MAX_STOP_IDS or isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, stop_token_ids at most {MAX_STOP_IDS} ids")
        room = self.max_len - len(tokens)
        req = Request(tokens, n, room if max_tokens is None else min(max_tokens, room), temperature, top_k, top_p,
                      seed, stop_ids, stop, logprobs, self.tokenizer)
        req._pump = self._pump
        with self._cv:
            if self.busy_slots + self.queued + n > self.max_batch + self.max_queue:
                raise QueueFull(f"{self.busy_slots} of {self.max_batch} slots busy and {self.queued} samples "
                                f"queued (max_queue={self.max_queue})")
            if req.budget == 0:  # max_tokens 0: ended at once
                for i in range(n):
                    req._put(i, [], [], None, "length")
            else:
                self._queue.append(req)
                self._cv.notify()
        return req

    def score(self, sequences: list[list[int]], top_n: int = 0) -> list[scoring.ScoredSequence]:
        """Per-token log-probabilities of token sequences (`jaxchat.scoring.ScoredSequence`: log p of each token
        given those before it, the top_n most likely tokens at each position and after the last), from the "score"
        program: one forward over all the sequences, padded to a `scoring.bucket_shape` (several forwards only when
        rows x length would pass the KV cache's max_batch x max_len positions). Callable from any thread, beside the
        scheduler (the model's distribution before temperature, as the logprobs variant of decode).
        Raises TypeError / ValueError: a sequence that is not a non-empty list of ids in [0, vocab_size), longer
        than sequence_len, or top_n outside [0, TOP_LOGPROBS]."""
        if not 0 <= top_n <= TOP_LOGPROBS:
            raise ValueError(f"top_n={top_n} must be in [0, {TOP_LOGPROBS}]")
        if not sequences or not all(sequences):
            raise ValueError("scoring needs at least one sequence, each of at least one token")
        for seq in sequences:
            self._check_ids(seq, "sequences")
        _, T = scoring.bucket_shape(len(sequences), max(map(len, sequences)), self.config.sequence_len)
        group = max(1, self.max_batch * self.max_len // T)
        out = []
        with self._scoring:
            for start in range(0, len(sequences), group):
                part = sequences[start:start + group]
                shape = scoring.bucket_shape(len(part), max(map(len, part)), self.config.sequence_len,
                                             self.num_devices)
                lp = jax.device_get(_program(self.spec, "score")(self.params, scoring.pack(part, shape)))
                out += scoring.unpack(part, *lp, top_n)
        return out

    def start(self) -> None:
        """Start the scheduler thread, which serves every request from then on (a server's many threads)."""
        with self._cv:
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
                self._thread.start()
                atexit.register(self.close)

    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 **kwargs) -> Iterator[tuple[list[int], list[int]]]:
        """Stream (token_column, mask_column), num_samples ints per step (nanochat `Engine.generate`; mask 0: forced
        tool tokens). An ended sample repeats its last token. Keyword arguments as `submit`; closing cancels."""
        req = self.submit(tokens, num_samples, max_tokens, temperature, top_k, seed=seed, **kwargs)
        rows: list[list[tuple[int, int]]] = [[] for _ in range(num_samples)]
        ended, t = [False] * num_samples, 0
        try:
            for out in req:
                if out.token is not None:
                    rows[out.index].append((out.token, out.mask))
                ended[out.index] = out.finish_reason is not None
                while any(len(r) > t for r in rows) and all(len(r) > t or e for r, e in zip(rows, ended)):
                    column = [r[min(t, len(r) - 1)] if r else (self.assistant_end, 1) for r in rows]
                    yield [c[0] for c in column], [c[1] for c in column]
                    t += 1
        finally:
            req.cancel()

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list, list]:
        """(sequences, masks) of num_samples samples (nanochat `Engine.generate_batch`): the prompt and the sample's
        tokens without its stop token; masks 0 over the prompt and forced tokens, 1 over sampled ones."""
        seqs, masks = [list(tokens) for _ in range(num_samples)], [[0] * len(tokens) for _ in range(num_samples)]
        for out in self.submit(tokens, num_samples, **kwargs):
            if out.token is not None and not (out.finish_reason == "stop" and out.token in self.stop_ids):
                seqs[out.index].append(out.token)
                masks[out.index].append(out.mask)
        return seqs, masks

    def warmup(self) -> None:
        """Compile every program a request can meet (prompt and attend buckets, sampler and logprobs variants)."""
        with self._drive:
            self._state = self._state or _program(self.spec, "init")()
            for size in sorted({min(pow2_bucket(n, MIN_PROMPT_BUCKET), self.max_len) for n in range(1, self.max_len)}):
                prefix = self._prefill([0] * (size - 1))
                self._state = _program(self.spec, "insert")(self._state, *prefix, np.int32(0), _request_fields())
            attends = {self._attend(h) for h in range(1, self.max_len + 1)}
            ctl = _ctl_fields(self.spec)
            ctl["cancel"][:] = True
            for variant in ((a, k, lp) for a in attends for k in (SMALL_TOP_K, MAX_TOP_K) for lp in (False, True)):
                self._state, _ = _program(self.spec, "decode", *variant)(self.decode_params, self._state, ctl)
            jax.block_until_ready(self._state)

    def close(self) -> None:
        """Stop the scheduler thread, ending the running requests (at interpreter exit too: no device call is cut)."""
        with self._cv:
            thread, self._closing = self._thread, True
            self._cv.notify()
        if thread is not None:
            thread.join(timeout=10)

    def _check_ids(self, ids, what: str) -> None:
        if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, (int, np.integer)) for t in ids):
            raise TypeError(f"{what} must be non-empty lists of ints")
        if any(t < 0 or t >= self.config.vocab_size for t in ids):
            raise ValueError(f"{what}: token ids must be in [0, vocab_size={self.config.vocab_size})")

    # ----------------------------------------------------------------------------------------------- scheduling
    def _pump(self) -> bool:
        """One scheduler step in the caller's thread, unless the scheduler thread runs (False)."""
        if self._thread is not None:
            return False
        with self._drive:
            if self._thread is None and not self._step():
                raise RuntimeError("engine: a request is unfinished but nothing runs or waits")
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closing or self._queue or self._inflight or self.busy_slots)
                if self._closing:
                    break
            try:
                with self._drive:
                    self._step()
            except Exception:  # noqa: BLE001 - _step ended its requests with the error; serve on from a fresh state
                pass
        with self._cv:
            self._thread = None
            if self._closing:  # end the running requests; the device state is stale for the next start
                for slot in filter(None, self._slots):
                    slot.req._close()
                self._slots, self._state, self._inflight = [None] * self.max_batch, None, None

    def _prefill(self, tokens: list[int]):
        idx = np.zeros((1, min(pow2_bucket(len(tokens), MIN_PROMPT_BUCKET), self.max_len)), np.int32)
        idx[0, :len(tokens)] = tokens
        return _program(self.spec, "prefill")(self.params, idx, np.array([len(tokens)], np.int32))

    def _attend(self, hold: int) -> int | None:
        return attend_bucket(min(hold, self.max_len), self.max_len)

    def _step(self) -> bool:
        """Free cancelled samples' slots, resume paused ones, admit queued requests (prefill once, insert per
        sample), dispatch a decode chunk, then hand the previous chunk's tokens to their requests (the device runs a
        chunk ahead of the host). False when there was nothing to do. A failure ends every request with it."""
        try:
            return self._schedule()
        except BaseException as e:
            with self._cv:
                for req in [s.req for s in self._slots if s is not None] + list(self._queue):
                    req._close(e)
                self._queue.clear()
                self._slots = [None] * self.max_batch
                self._state = self._inflight = None  # its buffers may have been donated to the failed call
            raise

    def _schedule(self) -> bool:
        if self._state is None:
            self._state = _program(self.spec, "init")()
        queued = bool(self._queue)
        ctl = _ctl_fields(self.spec)
        for s, slot in enumerate(self._slots):
            if slot is None:
                continue
            if slot.req.cancelled or slot.index in slot.req.released:
                ctl["cancel"][s], slot.finished, self._slots[s] = True, True, None
                if slot.req.cancelled:
                    slot.req._close()
            elif slot.resume is not None:
                load, slot.resume = slot.resume, None
                ctl["resume"][s], ctl["forced_len"][s], ctl["pending"][s] = True, len(load), slot.drain_pause
                ctl["forced"][s, :len(load)] = load
        self._admit(exclude=set(np.flatnonzero(ctl["cancel"])))
        busy = [slot for slot in self._slots if slot is not None]
        prev, self._inflight = self._inflight, None
        if busy or ctl["cancel"].any():
            steps = max(1, self.spec.decode_chunk // 4) if any(s.fresh for s in busy) else self.spec.decode_chunk
            # positions a slot may hold when this chunk starts (the chunk in flight may add its steps), and at most
            start = [len(s.req.tokens) + s.emitted + (prev[2] if prev else 0) for s in busy]
            end = [len(s.req.tokens) + s.req.budget for s in busy]
            attend = self._attend(max([min(p + steps, e) for p, e in zip(start, end)], default=1))
            edge = self._attend(max([min(p + 1, e) for p, e in zip(start, end)], default=1))
            if edge != attend:  # end the chunk where it would need the next, wider, attend bucket
                steps = min(edge - p for p, e in zip(start, end) if e > edge)
                attend = edge
            variant = (attend, MAX_TOP_K if any(s.req.wide for s in busy) else SMALL_TOP_K,
                       any(s.req.logprobs is not None for s in busy))
            ctl["num_steps"] = np.int32(steps)
            self._state, out = _program(self.spec, "decode", *variant)(self.decode_params, self._state, ctl)
            self._inflight = (out, list(self._slots), steps)
            for s in busy:
                s.fresh = False
        if prev is not None:
            self._process(*prev)
        return queued or prev is not None or self._inflight is not None

    def _admit(self, exclude: set[int]) -> None:
        free = [s for s, slot in enumerate(self._slots) if slot is None and s not in exclude]
        while free:
            with self._cv:
                if not self._queue:
                    return
                req = self._queue[0]
                if req.cancelled:
                    self._queue.popleft()
            if req.cancelled:
                req._close()
                continue
            if req._prefix is None:
                req._prefix = self._prefill(req.tokens)
            while free and req._next < req.n:
                s = free.pop(0)
                self._state = _program(self.spec, "insert")(self._state, *req._prefix, np.int32(s),
                                                            dict(req.settings, index=np.int32(req._next)))
                self._slots[s], req.slots[req._next] = _Slot(req, req._next), s
                req._next += 1
            if req._next == req.n:
                with self._cv:
                    self._queue.popleft()
                req._prefix = None
                req.admitted.set()

    def _process(self, out, slots: list[_Slot | None], steps: int) -> None:
        out = jax.device_get(out)
        for s, slot in enumerate(slots):
            n = int((out["tokens"][s] >= 0).sum())
            if slot is None or slot.finished or n == 0:
                continue
            ids, masks, req = out["tokens"][s, :n].tolist(), out["masks"][s, :n].tolist(), slot.req
            slot.emitted += n
            lps = None if req.logprobs is None else [
                (float(out["logprob"][s, j]), tuple(zip(out["top_ids"][s, j, :req.logprobs].tolist(),
                                                        out["top_logprobs"][s, j, :req.logprobs].tolist())))
                for j in range(n)]
            reason = "stop" if ids[-1] in req.stop_ids else "length" if slot.emitted >= req.budget else None
            if reason is None and self.tokenizer is not None:
                self._tool(slot, ids, masks)
            req._put(slot.index, ids, masks, lps, reason)
            if reason is not None:
                slot.finished = True
                if self._slots[s] is slot:
                    self._slots[s] = None

    def _tool(self, slot: _Slot, ids: list[int], masks: list[int]) -> None:
        """nanochat's tool state machine over a slot's new tokens; when the device paused the slot (after
        <|python_end|>, or with its forced buffer drained while more wait), the tokens to force next."""
        for t, m in zip(ids, masks):
            slot.forced_left -= m == 0
            if t == self.python_start:
                slot.in_python, slot.expr = True, []
            elif t == self.python_end and slot.in_python:
                slot.in_python = False
                result = use_calculator(self.tokenizer.decode(slot.expr)) if slot.expr else None
                if result is not None:
                    slot.pending.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
                slot.expr = []
            elif slot.in_python:
                slot.expr.append(t)
        if ids[-1] == self.python_end or (slot.drain_pause and slot.forced_left <= 0):
            slot.resume = [slot.pending.popleft() for _ in range(min(len(slot.pending), FORCED_SLOTS))]
            slot.forced_left, slot.drain_pause = len(slot.resume), bool(slot.pending)
