"""Device mesh, the parameter / optimizer-state sharding rule tables, and the sharded Muon step.

One `jax.sharding.Mesh` spans every device of every process, with two axes:

    'data'  data parallelism: the batch is split over it, parameters are replicated along it;
    'fsdp'  fully-sharded data parallelism: the batch is split over it too, and so are the large parameters
            (size 1 by default, which makes every 'fsdp' entry below a no-op).

Where each array lives is decided by RULE TABLES, declared once here: a list of (regex, PartitionSpec) matched in
order against the array's path in its pytree ('h/3/mlp/c_fc', '.../mu/wte', '.../momentum_buffer/768x3072'); the
first match wins. A dimension that the named mesh axes do not divide evenly is replicated instead (never an error),
so tiny test models and odd vocab sizes work on any device count.

Optimizer state is sharded over all devices (ZeRO-1, as nanochat's `DistMuonAdamW`): each device keeps 1/N of the
AdamW moments of the embedding tables and 1/N of every Muon momentum stack. The Muon step itself runs under
`shard_map`: every device orthogonalises its share of the stacked same-shape matrices, then the updates are
all-gathered (by XLA, when they are added to the replicated parameters). `jaxchat.muon.muon` pads each stack to a
multiple of the device count (`stack_multiple`) so the split is even.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxchat.multihost import global_batch  # noqa: F401  (re-exported: callers import it from here)
from jaxchat.muon import muon_update_stacked

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
ZERO_AXES = (DATA_AXIS, FSDP_AXIS)  # optimizer state too (ZeRO-1)

# Parameters: the vocab-sized tables and the block matrices are split along their first (out / vocab) dim over
# 'fsdp'; scalars and the tiny gates stay replicated. With fsdp=1 all of this means "replicated".
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"^(wte|lm_head|value_embeds/\d+)$", P(FSDP_AXIS, None)),
    (r"^bigram_embed$", P(FSDP_AXIS, None)),  # the hashed bigram table (vocab * factor rows), as wte
    (r"^h/\d+/(attn|mlp)/c_(q|k|v|proj|fc)$", P(FSDP_AXIS, None)),
    (r".*", P()),
)

# Optimizer state (paths as in `jaxchat.optim.make_optimizer`'s state): Muon stacks split along the stack axis K,
# AdamW moments of the embedding tables split along the vocab rows; counters, hyperparameters and the moments of
# the small parameters replicated.
OPT_STATE_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)(momentum_buffer|second_momentum_buffer)/\d+x\d+$", P(ZERO_AXES)),
    (r"(^|/)(mu|nu)/(wte|lm_head|value_embeds/\d+)$", P(ZERO_AXES, None)),
    (r"(^|/)(mu|nu)/bigram_embed$", P(ZERO_AXES, None)),
    (r"(^|/)(mu|nu)/h/\d+/(attn|mlp)/c_\w+$", P(ZERO_AXES, None)),  # when AdamW runs on block matrices (tests)
    (r".*", P()),
)

# The inference engine's slot state (`jaxchat.engine.init_state`, paths 'cache/k/0', 'logits', ...): every slot's
# rows on one device, the slot axis (first in every entry, `jaxchat.model.init_kv_cache`'s too) split over every
# device. Params are replicated.
ENGINE_STATE_RULES: tuple[tuple[str, P], ...] = (
    (r".*", P(BATCH_AXES)),
)


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: every device of every process).

    Args:
        fsdp: size of the 'fsdp' axis; must divide the device count. 'data' gets the rest.
        devices: the devices, e.g. `jax.devices()[:1]` for a 1-device reference.
    Raises:
        ValueError: fsdp does not divide the number of devices (names the `--fsdp` flag).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"--fsdp={fsdp} must be a positive divisor of the device count {n}")
    return Mesh(np.array(devices).reshape(n // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS))


def path_str(path) -> str:
    """'h/0/attn/c_q' from a jax key path (dict keys, sequence indices and attribute names joined by '/')."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([mesh.shape[a] for a in names]))


def spec_for(path: str, shape: tuple[int, ...], rules: Sequence[tuple[str, P]], mesh: Mesh) -> P:
    """The PartitionSpec of an array from the first matching rule, fitted to its shape.

    Entries beyond the array's rank are dropped; a dimension the named axes do not divide is replicated.
    Raises:
        ValueError: no rule matches (a rule table should end with a catch-all).
    """
    for pattern, spec in rules:
        if re.search(pattern, path):
            entries = list(spec)[: len(shape)]
            fitted = [e if dim % _axis_size(mesh, e) == 0 else None for e, dim in zip(entries, shape)]
            while fitted and fitted[-1] is None:
                fitted.pop()
            return P(*fitted)
    raise ValueError(f"no sharding rule matches '{path}' (shape {shape})")


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]]) -> Any:
    """A pytree of `NamedSharding`s for `tree` (arrays or ShapeDtypeStructs) from a rule table."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_str(path), tuple(leaf.shape), rules, mesh)), tree)


def param_shardings(params: Any, mesh: Mesh, rules=PARAM_RULES) -> Any:
    """Shardings of the params pytree (PARAM_RULES)."""
    return tree_shardings(params, mesh, rules)


def opt_state_shardings(opt_state: Any, mesh: Mesh, rules=OPT_STATE_RULES) -> Any:
    """Shardings of an optimizer state pytree (OPT_STATE_RULES, ZeRO-1)."""
    return tree_shardings(opt_state, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """Sharding of a token batch: (micro_steps, B, T) for ndim=3 or (B, T) for ndim=2, with B split over every
    device."""
    spec = P(None, BATCH_AXES, None) if ndim == 3 else P(BATCH_AXES, None)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `shardings` (what orbax restore and `jax.jit` lowering want)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def sharded_muon_update(mesh: Mesh, axes: tuple[str, ...] = ZERO_AXES):
    """A drop-in for `jaxchat.muon.muon_update_stacked` that splits the stack axis K over `axes` with `shard_map`.

    Every device runs Nesterov + Polar Express + NorMuon + cautious weight decay on its K / N matrices only (the
    update has no cross-matrix reduction, so the numbers equal the unsharded ones); the (K, R, C) outputs stay
    sharded over K, like the momentum buffers, and XLA all-gathers the updates where the replicated parameters need
    them. K must be a multiple of the number of devices on `axes`: build the optimizer with
    `stack_multiple=mesh.size` (see `jaxchat.optim.make_optimizer`).

    Source: nanochat/optim.py `DistMuonAdamW` (each rank owns a slice of every stacked group).
    """
    stack = P(axes)
    scalar = P()

    def update(grads, params, momentum_buffer, second_momentum_buffer, *, learning_rate, momentum, weight_decay,
               beta2=0.9, ns_steps: int = 5, ns_dtype=jnp.bfloat16, **options):
        n = _axis_size(mesh, axes)
        if grads.shape[0] % n:
            raise ValueError(f"sharded Muon: stack of {grads.shape[0]} matrices does not split over {n} devices; "
                             f"build the optimizer with stack_multiple={n}")

        def local(g, p, mb, smb, lr, mu, wd, b2):
            return muon_update_stacked(g, p, mb, smb, learning_rate=lr, momentum=mu, weight_decay=wd, beta2=b2,
                                       ns_steps=ns_steps, ns_dtype=ns_dtype, **options)  # muon_eq, muon_plus

        f32 = lambda v: jnp.asarray(0.0 if v is None else v, jnp.float32)  # noqa: E731
        fn = shard_map(local, mesh=mesh, in_specs=(stack, stack, stack, stack, scalar, scalar, scalar, scalar),
                       out_specs=(stack, stack, stack))
        return fn(grads, params, momentum_buffer, second_momentum_buffer, f32(learning_rate), f32(momentum),
                  f32(weight_decay), f32(beta2))

    return update
