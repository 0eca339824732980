"""The GPT: pure functions over a params pytree, computing what nanochat's `GPT` computes.

Source of every fact here: nanochat `nanochat/gpt.py` (commit 5019acc; the hashed bigram embeddings from its bigram
speedrun branch, commit 412e9a1). Features: rotary embeddings (no learned
positions), QK RMSNorm, grouped-query attention, a per-layer sliding-window pattern, value embeddings with an
input-dependent gate on alternating layers (ResFormer), relu² MLP, weightless RMSNorm, per-layer residual and x0
scalars, smear (previous-token mixing), backout (subtract the mid-layer residual), an untied head over a padded
vocabulary, a logit softcap, and optional hashed bigram embeddings (a per-layer residual looked up by a hash of
the (previous, current) token pair).

Parameters are a nested dict of float32 arrays (the embedding tables bfloat16 on GPU: `param_shapes`). Matrices keep
nanochat's (out_features, in_features) layout, so that checkpoints convert without transposes and Muon's row/column
conventions carry over unchanged:

    {'wte': (Vp, C), 'lm_head': (Vp, C),
     'value_embeds': {'<i>': (Vp, n_kv_head*head_dim)} for each layer i with a value embedding,
     'h': [ {'attn': {'c_q': (H*D, C), 'c_k': (K*D, C), 'c_v': (K*D, C), 'c_proj': (C, C), ['ve_gate': (K, 12)]},
             'mlp': {'c_fc': (4C, C), 'c_proj': (C, 4C)}} for each layer ],
     'resid_lambdas': (L,), 'x0_lambdas': (L,), 'smear_gate': (1, 24), 'smear_lambda': (1,), 'backout_lambda': (1,),
     ['bigram_embed': (V * bigram_embed_factor, C), 'bigram_lambdas': (L,)] when bigram_embed_factor > 0}

The bigram table has vocab_size * factor rows of the unpadded vocab (nanochat does not pad it).

Precision: master weights stay float32; matmuls and activations run in `jaxchat.common.compute_dtype()` (bfloat16 on
GPU/TPU, float32 on CPU, `$JAXCHAT_DTYPE` overrides); logits and the loss are float32.

The kernels underneath (plain and FP8 matmuls, attention with its backward, the chunked head + loss) are in
`jaxchat.kernels`; this module is the architecture: config, params, blocks, forward, loss, KV cache, counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxchat import backend
from jaxchat.common import compute_dtype
from jaxchat.kernels import (cached_attention, causal_attention, linear, loss_chunks, softcap_cross_entropy,
                             softcap_cross_entropy_sum, softcap_logits)

Params = dict[str, Any]
KVCache = dict[str, Any]  # `init_kv_cache`

VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding
SOFTCAP = 15.0  # logits are squashed to (-15, 15)
ROPE_BASE = 100_000.0
QK_SCALE = 1.2  # q and k are each scaled after QK-norm: sharper attention
PAD_VOCAB_TO = 64
# Multipliers of the bigram hash (nanochat 412e9a1 `GPT._bigram_hash`): h = (A * tok XOR B * prev) mod (rows - 1).
BIGRAM_HASH_CUR = 36313
BIGRAM_HASH_PREV = 27191
# nanochat's rotary table covers 10 x sequence_len positions, the longest input its model accepts (CORE rows may
# exceed sequence_len: nanochat never crops them).
ROTARY_LEN_FACTOR = 10


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyperparameters, with nanochat's field names and defaults (nanochat `GPTConfig`).

    Frozen and hashable, so it can be a static argument of `jax.jit`.

    Raises:
        ValueError: naming the field, when the config cannot work (n_embd not divisible by n_head, n_head not a
            multiple of n_kv_head, a window pattern with letters other than S and L, non-positive sizes).
    """

    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers; the last layer is always L
    bigram_embed_factor: int = 0  # > 0: hashed bigram embeddings with vocab_size * factor rows (0 = off)
    bigram_lambda_init: float = 0.05  # initial per-layer weight of the bigram residual

    def __post_init__(self):
        for field in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{field} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head > self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if not self.window_pattern or any(c not in "SL" for c in self.window_pattern.upper()):
            raise ValueError(f"GPTConfig.window_pattern={self.window_pattern!r} may contain only the letters S and L")
        if self.n_embd < SMEAR_CHANNELS:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be at least {SMEAR_CHANNELS} (the smear gate reads that many)")
        if not isinstance(self.bigram_embed_factor, int) or self.bigram_embed_factor < 0:
            raise ValueError(f"GPTConfig.bigram_embed_factor must be an int >= 0 (flag --bigram-embed-factor), got "
                             f"{self.bigram_embed_factor!r}")
        if self.bigram_embed_factor and self.bigram_vocab_size < 2:
            raise ValueError(f"GPTConfig.bigram_embed_factor={self.bigram_embed_factor} gives a bigram table of "
                             f"{self.bigram_vocab_size} rows; the hash needs at least 2")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 64 for the embedding and head (logits are cropped back)."""
        return -(-self.vocab_size // PAD_VOCAB_TO) * PAD_VOCAB_TO

    @property
    def bigram_vocab_size(self) -> int:
        """Rows of the bigram table: vocab_size * bigram_embed_factor (0 when off)."""
        return self.vocab_size * self.bigram_embed_factor

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Per-layer left window w: query t attends keys s with 0 <= t - s <= w.

        Long = sequence_len; short = ceil(sequence_len / 4 / 128) * 128 (FA3 tile size); the last layer is long.
        """
        long_w = self.sequence_len
        short_w = -(-long_w // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        sizes = [long_w if pattern[i % len(pattern)] == "L" else short_w for i in range(self.n_layer)]
        sizes[-1] = long_w
        return tuple(sizes)

    def has_ve(self, layer: int) -> bool:
        """Value embeddings on alternating layers, the last layer always included."""
        return layer % 2 == (self.n_layer - 1) % 2

    def to_dict(self) -> dict:
        """The fields as a dict (a checkpoint's `model_config`); the bigram fields only when bigram_embed_factor > 0,
        since nanochat versions without bigram embeddings (5019acc, HEAD) reject them in their GPTConfig."""
        d = dataclasses.asdict(self)
        if not self.bigram_embed_factor:
            del d["bigram_embed_factor"], d["bigram_lambda_init"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Build from a dict (e.g. a checkpoint's `model_config`); unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation


def param_shapes(config: GPTConfig) -> Params:
    """The params pytree with `jax.ShapeDtypeStruct` leaves, without allocating anything: float32, except the
    embedding tables (`wte`, `value_embeds`, `bigram_embed`) in `jaxchat.backend.embedding_dtype()` (bfloat16 on
    GPU, as nanochat)."""
    C, Vp, L = config.n_embd, config.padded_vocab_size, config.n_layer
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    emb = lambda *shape: jax.ShapeDtypeStruct(shape, backend.embedding_dtype())  # noqa: E731
    blocks = []
    for i in range(L):
        attn = {"c_q": f32(config.n_head * config.head_dim, C), "c_k": f32(config.kv_dim, C),
                "c_v": f32(config.kv_dim, C), "c_proj": f32(C, C)}
        if config.has_ve(i):
            attn["ve_gate"] = f32(config.n_kv_head, VE_GATE_CHANNELS)
        blocks.append({"attn": attn, "mlp": {"c_fc": f32(4 * C, C), "c_proj": f32(C, 4 * C)}})
    return {
        "wte": emb(Vp, C),
        "lm_head": f32(Vp, C),
        "value_embeds": {str(i): emb(Vp, config.kv_dim) for i in range(L) if config.has_ve(i)},
        "h": blocks,
        "resid_lambdas": f32(L),
        "x0_lambdas": f32(L),
        "smear_gate": f32(1, SMEAR_CHANNELS),
        "smear_lambda": f32(1),
        "backout_lambda": f32(1),
        **({"bigram_embed": emb(config.bigram_vocab_size, C), "bigram_lambdas": f32(L)}
           if config.bigram_embed_factor else {}),
    }


def init_params(config: GPTConfig, key: jax.Array) -> Params:
    """Fresh parameters with nanochat's `init_weights()` distributions, in `param_shapes`' dtypes.

    wte N(0, 0.8); lm_head N(0, 0.001); c_q/c_k/c_v and value embeddings U(-s, s) with s = sqrt(3/n_embd) (std
    1/sqrt(n_embd)); c_fc U(-0.4s, 0.4s); both output projections zero; resid_lambdas 1.15 -> 1.05 and x0_lambdas
    0.20 -> 0.05 linearly over layers; ve_gate U(0, 0.02); smear_gate U(0, 0.02), smear_lambda 0, backout_lambda 0.2
    (as current nanochat initialises them explicitly); bigram_embed 0 and bigram_lambdas bigram_lambda_init (so a
    fresh bigram model computes what the same model without them computes).

    Jitted (config static): one compiled program instead of hundreds of eager ops.

    Args:
        config: the model config.
        key: a `jax.random` key.
    Returns:
        the params pytree (see module docstring).
    """
    return _init_params(config, key, backend.embedding_dtype().name)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init_params(config: GPTConfig, key: jax.Array, embed_dtype: str) -> Params:
    # embed_dtype is a static argument so that a cached trace never serves another platform's storage dtype
    shapes = param_shapes(config)
    C, L = config.n_embd, config.n_layer
    s = math.sqrt(3.0) * C ** -0.5
    keys = iter(jax.random.split(key, 64 + 8 * L))

    def uniform(shape, lo, hi):
        return jax.random.uniform(next(keys), shape.shape, jnp.float32, lo, hi)

    def normal(shape, std):
        return std * jax.random.normal(next(keys), shape.shape, jnp.float32)

    blocks = []
    for sh in shapes["h"]:
        attn = {"c_q": uniform(sh["attn"]["c_q"], -s, s), "c_k": uniform(sh["attn"]["c_k"], -s, s),
                "c_v": uniform(sh["attn"]["c_v"], -s, s), "c_proj": jnp.zeros(sh["attn"]["c_proj"].shape)}
        if "ve_gate" in sh["attn"]:
            attn["ve_gate"] = uniform(sh["attn"]["ve_gate"], 0.0, 0.02)
        mlp = {"c_fc": uniform(sh["mlp"]["c_fc"], -0.4 * s, 0.4 * s), "c_proj": jnp.zeros(sh["mlp"]["c_proj"].shape)}
        blocks.append({"attn": attn, "mlp": mlp})
    frac = jnp.arange(L, dtype=jnp.float32) / max(L - 1, 1)
    return {
        "wte": normal(shapes["wte"], 0.8).astype(embed_dtype),
        "lm_head": normal(shapes["lm_head"], 0.001),
        "value_embeds": {k: uniform(v, -s, s).astype(embed_dtype) for k, v in shapes["value_embeds"].items()},
        "h": blocks,
        "resid_lambdas": 1.15 - 0.10 * frac,
        "x0_lambdas": 0.20 - 0.15 * frac,
        "smear_gate": uniform(shapes["smear_gate"], 0.0, 0.02),
        "smear_lambda": jnp.zeros((1,), jnp.float32),
        "backout_lambda": jnp.full((1,), 0.2, jnp.float32),
        **({"bigram_embed": jnp.zeros(shapes["bigram_embed"].shape, embed_dtype),
            "bigram_lambdas": jnp.full((L,), config.bigram_lambda_init, jnp.float32)}
           if config.bigram_embed_factor else {}),
    }


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: jax.Array) -> jax.Array:
    """Weightless RMSNorm over the last axis, eps = machine epsilon of x's dtype (as torch's F.rms_norm)."""
    eps = jnp.finfo(x.dtype).eps
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotary(positions: jax.Array, head_dim: int, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + (1, head_dim/2) for RoPE with base 100000, computed in float32."""
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(freqs)[..., None, :].astype(dtype), jnp.sin(freqs)[..., None, :].astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of the head dim (not interleaved), with nanochat's sign convention.

    x: (B, T, heads, D); cos, sin: broadcastable to (B, T, 1, D/2).
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def bigram_hash(idx: jax.Array, prev: jax.Array, has_prev: jax.Array, num_rows: int) -> jax.Array:
    """Row of the bigram table for each (previous, current) token pair (nanochat 412e9a1 `GPT._bigram_hash`).

    h = ((36313 * tok) XOR (27191 * prev)) mod (num_rows - 1), in int32 with wrap-around products and a non-negative
    remainder; a token with no previous one (position 0 of a sequence) gets row num_rows - 1, which no pair reaches.

    Args:
        idx: int (B, T) token ids.
        prev: int, broadcastable to idx: the token before each one.
        has_prev: bool, broadcastable to idx: False at position 0.
        num_rows: rows of the table, vocab_size * bigram_embed_factor (>= 2).
    Returns:
        int32 (B, T) row ids in [0, num_rows).
    """
    mod = num_rows - 1
    tok, prev = idx.astype(jnp.int32), prev.astype(jnp.int32)
    h = jnp.remainder(jnp.bitwise_xor(BIGRAM_HASH_CUR * tok, BIGRAM_HASH_PREV * prev), mod)
    return jnp.where(has_prev, h, mod).astype(jnp.int32)


def _smear(params: Params, x: jax.Array, x_prev: jax.Array, has_prev: jax.Array) -> jax.Array:
    """x + smear_lambda * sigmoid(smear_gate(x[..., :24])) * x_prev where a previous token exists."""
    gate = params["smear_lambda"].astype(x.dtype) * jax.nn.sigmoid(linear(x[..., :SMEAR_CHANNELS], params["smear_gate"]))
    return x + jnp.where(has_prev[..., None], gate * x_prev, jnp.zeros_like(x))


def _attention(block: Params, config: GPTConfig, x: jax.Array, ve: jax.Array | None, cos, sin, window: int,
               layer_cache: tuple[jax.Array, jax.Array] | None, pos: jax.Array | None, fp8: bool = False):
    """One attention sublayer. Returns (y, updated (k_cache, v_cache) of this layer, or None). fp8: the projections
    in FP8 (see `linear`)."""
    B, T, _ = x.shape
    H, K, D = config.n_head, config.n_kv_head, config.head_dim
    q = linear(x, block["c_q"], fp8).reshape(B, T, H, D)
    k = linear(x, block["c_k"], fp8).reshape(B, T, K, D)
    v = linear(x, block["c_v"], fp8).reshape(B, T, K, D)
    if ve is not None:  # value residual: input-dependent gate per kv head, range (0, 3)
        gate = 3.0 * jax.nn.sigmoid(linear(x[..., :VE_GATE_CHANNELS], block["ve_gate"]))
        v = v + gate[..., None] * ve.reshape(B, T, K, D)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q, k = rms_norm(q) * QK_SCALE, rms_norm(k) * QK_SCALE

    if layer_cache is None:
        # Training / full-sequence: causal, plus a sliding window when it is shorter than the sequence.
        local = (window, 0) if window < T - 1 else None
        y = causal_attention(q, k, v, local)
        return linear(y.reshape(B, T, H * D), block["c_proj"], fp8), None

    # KV-cache path: write this chunk's k, v into the layer's cache (B*K, S, D) in place, then attend over it.
    k_cache, v_cache = layer_cache
    if T == 1:  # decode: one scatter per cache instead of B tiny updates (each a separate op on CPU)
        heads, at = jnp.arange(B * K), jnp.repeat(pos, K)
        k_cache = k_cache.at[heads, at].set(k.reshape(B * K, D).astype(k_cache.dtype), mode="clip",
                                            unique_indices=True)
        v_cache = v_cache.at[heads, at].set(v.reshape(B * K, D).astype(v_cache.dtype), mode="clip",
                                            unique_indices=True)
    else:
        for b in range(B):  # B is static; each row writes at its own position
            start = (b * K, pos[b], 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k[b].swapaxes(0, 1).astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v[b].swapaxes(0, 1).astype(v_cache.dtype), start)
    y = cached_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), pos, window)
    return linear(y.reshape(B, T, H * D), block["c_proj"]), (k_cache, v_cache)


REMAT_POLICIES = {  # --remat: what the backward pass keeps of a block's forward (the rest is recomputed)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the linear layers' outputs
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input
}


def _block(block: Params, config: GPTConfig, x: jax.Array, ve, cos, sin, window: int, layer_cache, pos,
           fp8: bool = False, remat: str = "none"):
    """Attention and MLP sublayers of one block, residuals included. Returns (x, layer_cache).

    remat ("none", "dots", "block"; full-sequence path only): `jax.checkpoint` the block with REMAT_POLICIES.
    """
    def body(x, ve, block, cos, sin):
        y, cache = _attention(block["attn"], config, rms_norm(x), ve, cos, sin, window, layer_cache, pos, fp8)
        x = x + y
        h = linear(rms_norm(x), block["mlp"]["c_fc"], fp8)
        return x + linear(jnp.square(jax.nn.relu(h)), block["mlp"]["c_proj"], fp8), cache
    with jax.named_scope("block"):  # names the blocks' ops in the HLO (jaxchat.gpu_compile counts their GEMMs)
        if remat == "none" or layer_cache is not None:
            return body(x, ve, block, cos, sin)
        return jax.checkpoint(body, policy=REMAT_POLICIES[remat])(x, ve, block, cos, sin)


def _trunk(params: Params, config: GPTConfig, idx: jax.Array, kv_cache: KVCache | None = None,
           valid_len: jax.Array | None = None, max_len: int | None = None, *,
           fp8: bool = False, remat: str = "none"):
    """Embedding through final norm. Returns (hidden (B, T, C) in compute dtype, new kv_cache or None).
    fp8, remat: see `loss_fn`."""
    B, T = idx.shape
    dtype = compute_dtype()
    x = rms_norm(params["wte"].astype(dtype)[idx])

    if kv_cache is None:
        limit = config.sequence_len if max_len is None else max_len
        if T > limit:
            raise ValueError(f"sequence length T={T} exceeds GPTConfig.sequence_len={config.sequence_len}"
                             + ("" if max_len is None else f" (max_len={max_len})"))
        pos = None
        positions = jnp.arange(T)[None, :]  # (1, T)
        x_prev = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
        idx_prev = jnp.concatenate([jnp.zeros_like(idx[:, :1]), idx[:, :-1]], axis=1)
        x = _smear(params, x, x_prev, positions > 0)
        new_cache = None
    else:
        pos = kv_cache["pos"]
        positions = pos[:, None] + jnp.arange(T)  # (B, T)
        # The token before position 0 of this chunk is the last one of the previous call (kept in the cache).
        x_prev = jnp.concatenate([kv_cache["prev_embd"].astype(x.dtype), x[:, :-1]], axis=1)
        idx_prev = jnp.concatenate([kv_cache["prev_token"][:, None].astype(idx.dtype), idx[:, :-1]], axis=1)
        n_valid = jnp.full((B,), T, jnp.int32) if valid_len is None else valid_len.astype(jnp.int32)
        last_at = jnp.maximum(n_valid - 1, 0)
        last = jnp.take_along_axis(x, last_at[:, None, None], axis=1)  # (B, 1, C)
        new_cache = {"pos": pos + n_valid, "prev_embd": last.astype(kv_cache["prev_embd"].dtype),
                     "prev_token": jnp.take_along_axis(idx, last_at[:, None], axis=1)[:, 0].astype(jnp.int32),
                     "k": [], "v": []}
        x = _smear(params, x, x_prev, positions > 0)
    # Bigram rows: position 0 of a sequence has no pair. A chunk that continues a cached sequence pairs its first
    # token with the cache's prev_token, so chunked prefill and decode see the full-sequence hash (nanochat's decode
    # does the same; its multi-token cached calls only ever start at position 0).
    bigram = None
    if config.bigram_embed_factor:
        rows = bigram_hash(idx, idx_prev, positions > 0, config.bigram_vocab_size)
        bigram = params["bigram_embed"].astype(dtype)[rows]

    cos, sin = rotary(positions, config.head_dim, dtype)
    x0 = x
    backout_layer = config.n_layer // 2
    x_backout = None
    for i, block in enumerate(params["h"]):
        x = params["resid_lambdas"][i].astype(dtype) * x + params["x0_lambdas"][i].astype(dtype) * x0
        if bigram is not None:
            x = x + params["bigram_lambdas"][i].astype(dtype) * bigram
        ve = params["value_embeds"][str(i)].astype(dtype)[idx] if config.has_ve(i) else None
        layer_cache = None if kv_cache is None else (kv_cache["k"][i], kv_cache["v"][i])
        x, layer_cache = _block(block, config, x, ve, cos, sin, config.window_sizes[i], layer_cache, pos, fp8, remat)
        if layer_cache is not None:
            new_cache["k"].append(layer_cache[0])
            new_cache["v"].append(layer_cache[1])
        if i == backout_layer:
            x_backout = x
    x = x - params["backout_lambda"].astype(dtype) * x_backout
    return rms_norm(x), new_cache


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def forward(params: Params, config: GPTConfig, idx: jax.Array, kv_cache: KVCache | None = None,
            valid_len: jax.Array | None = None, *, max_len: int | None = None):
    """Logits of the next token at every position (nanochat `GPT.forward` without targets).

    Args:
        params: the params pytree.
        config: the model config (static under jit).
        idx: int32 token ids (B, T); T <= sequence_len (or max_len) without a cache.
        kv_cache: optional cache from `init_kv_cache`. Its 'pos' (B,) says how many tokens each row holds; idx is
            written at positions pos .. pos+T-1 (the caller keeps pos + T <= max_len: writes past the end are clamped).
        valid_len: optional int32 (B,): how many of the T tokens are real in a right-padded prefill. The new
            'pos' is pos + valid_len and smear's previous embedding is taken at valid_len - 1. Default T.
        max_len: optional static int: the longest T accepted without a cache, default sequence_len. nanochat's
            model accepts up to ROTARY_LEN_FACTOR * sequence_len (its rotary table); rotary angles here are computed
            for the actual positions, and the "long" layers keep their window of sequence_len, as nanochat's.
    Returns:
        logits float32 (B, T, vocab_size), softcapped; with a cache, (logits, new_cache), whose 'prev_token' is
        the last real token id of idx per row (the bigram hash of the next call needs it).
    Raises:
        ValueError: T > sequence_len (or max_len) without a cache.
    """
    x, new_cache = _trunk(params, config, idx, kv_cache, valid_len, max_len)
    logits = softcap_logits(x, params["lm_head"], config.vocab_size, SOFTCAP)
    return logits if kv_cache is None else (logits, new_cache)


def loss_fn(params: Params, config: GPTConfig, idx: jax.Array, targets: jax.Array, reduction: str = "mean",
            loss_chunk_tokens: int | None = None, *, fp8: bool = False, remat: str = "none") -> jax.Array:
    """Cross-entropy of the next-token prediction (nanochat `GPT.forward` with targets).

    The head and the softmax run over chunks of the sequence (`loss_chunk_tokens` tokens of the whole batch at a
    time), so the (tokens, vocab) float32 logits never exist all at once. 'mean' and 'sum' use the fused
    `softcap_cross_entropy_sum`, whose gradients come out of the forward pass; 'none' runs the chunks under
    `jax.checkpoint` (recomputed in a backward pass).

    Args:
        idx, targets: int32 (B, T); targets == -1 are ignored.
        reduction: 'mean' (over valid targets; a scalar), 'sum' (scalar) or 'none' ((B, T) float32, 0 where ignored).
        loss_chunk_tokens: tokens (over the whole batch) per chunk; default keeps a chunk's logits near 1 GiB per
            device (`jaxchat.kernels.LOSS_CHUNK_ELEMENTS`).
        fp8: the blocks' linear layers as `jaxchat.kernels.fp8_matmul` (nanochat `--fp8`, tensorwise scaling; e4m3 forward, e5m2
            gradients); the head, gates and embeddings stay in the compute dtype.
        remat: "none", "dots" (keep the linear layers' outputs, recompute the rest) or "block" (keep each block's
            input only): activation checkpointing of the blocks, for larger device batches.
    Raises:
        ValueError: an unknown reduction or remat, or T > config.sequence_len.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if remat != "none" and remat not in REMAT_POLICIES:
        raise ValueError(f"--remat must be one of none, {', '.join(REMAT_POLICIES)}; got {remat!r}")
    x, _ = _trunk(params, config, idx, fp8=fp8, remat=remat)
    B, T, _ = x.shape
    n_chunks = loss_chunks(B, T, config.padded_vocab_size, loss_chunk_tokens)
    if reduction == "none":
        return softcap_cross_entropy(x, params["lm_head"], targets, config.vocab_size, SOFTCAP, n_chunks)
    total = softcap_cross_entropy_sum(x, params["lm_head"], targets, config.vocab_size, SOFTCAP, n_chunks)
    if reduction == "sum":
        return total
    return total / jnp.maximum((targets >= 0).sum(), 1)


def init_kv_cache(config: GPTConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty KV cache with static shapes.

    Returns a dict: 'k', 'v' lists of n_layer arrays (batch_size * n_kv_head, max_len, head_dim) in `dtype`
    (default the compute dtype), row b's heads at b * n_kv_head ...; 'pos' (batch_size,) int32 zeros; 'prev_embd'
    (batch_size, 1, n_embd), the last token's normalised embedding that smear needs when decoding; 'prev_token'
    (batch_size,) int32, the last token id, which the bigram hash needs when decoding (present whether or not the
    model has bigram embeddings). Every array has its rows first. A cache whose k, v hold fewer positions than
    max_len (cut by the caller) serves as well while every row's pos + T fits in it.

    Layout: one array per layer, because XLA copies a slice of a stacked (n_layer, ...) array before a matmul reads
    it (on CPU, every layer of every decode step); (row, head) pairs on one axis before the positions, so that the
    attention matmuls batch over them on the cache as stored (a separate row axis of size 1 made XLA copy and
    transpose the cache at batch 1).
    """
    dtype = dtype or compute_dtype()
    shape = (batch_size * config.n_kv_head, max_len, config.head_dim)
    return {"k": [jnp.zeros(shape, dtype) for _ in range(config.n_layer)],
            "v": [jnp.zeros(shape, dtype) for _ in range(config.n_layer)], "pos": jnp.zeros((batch_size,), jnp.int32),
            "prev_embd": jnp.zeros((batch_size, 1, config.n_embd), dtype),
            "prev_token": jnp.zeros((batch_size,), jnp.int32)}


def num_scaling_params(config: GPTConfig) -> dict[str, int]:
    """Parameter counts per group, as nanochat's `num_scaling_params` (wte, bigram_embed, value_embeds, lm_head,
    transformer_matrices, scalars, total); bigram_lambdas count as scalars (nanochat 412e9a1)."""
    shapes = param_shapes(config)
    count = lambda tree: sum(math.prod(s.shape) for s in jax.tree_util.tree_leaves(tree))  # noqa: E731
    out = {
        "wte": count(shapes["wte"]),
        "bigram_embed": count(shapes.get("bigram_embed", [])),
        "value_embeds": count(shapes["value_embeds"]),
        "lm_head": count(shapes["lm_head"]),
        "transformer_matrices": count(shapes["h"]),
        "scalars": count([shapes[k] for k in ("resid_lambdas", "x0_lambdas", "bigram_lambdas", "smear_gate",
                                             "smear_lambda", "backout_lambda") if k in shapes]),
    }
    out["total"] = sum(out.values())
    return out


def estimate_flops(config: GPTConfig) -> int:
    """Training FLOPs per token (forward + backward), nanochat's `estimate_flops`.

    6 per matmul weight (embeddings, the bigram table and scalars excluded), plus
    12 * n_head * head_dim * min(window, seq_len) per layer for the attention scores and values.
    """
    counts = num_scaling_params(config)
    matmul_params = (counts["total"] - counts["wte"] - counts["bigram_embed"] - counts["value_embeds"]
                     - counts["scalars"])
    t = config.sequence_len
    attn = sum(12 * config.n_head * config.head_dim * min(w, t) for w in config.window_sizes)
    return 6 * matmul_params + attn

