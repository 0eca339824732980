"""jaxchat's optimizer: nanochat's MuonAdamW as one optax transformation.

Parameter groups follow nanochat `GPT.setup_optimizer` (nanochat/gpt.py), chosen by the top-level key of the params
pytree (see jaxchat/model.py):

| group          | params                                      | rule  | lr                              | betas       | wd    |
|----------------|---------------------------------------------|-------|---------------------------------|-------------|-------|
| lm_head        | lm_head                                     | AdamW | unembedding_lr * s              | 0.8, 0.96   | 0.01  |
| wte            | wte                                         | AdamW | embedding_lr * s                | 0.8, 0.995  | 0.001 |
| value_embeds   | value_embeds/*                              | AdamW | embedding_lr * s * 0.5          | 0.8, 0.995  | 0.01  |
| resid_lambdas  | resid_lambdas                               | AdamW | scalar_lr * 0.01                | 0.8, 0.95   | 0.05  |
| x0_lambdas     | x0_lambdas                                  | AdamW | scalar_lr                       | 0.96, 0.95  | 0.0   |
| smear          | smear_gate, smear_lambda, backout_lambda    | AdamW | 0.2                             | 0.8, 0.95   | 0.0   |
| bigram_embed   | bigram_embed                                | AdamW | embedding_lr * s * mult (1.0)   | 0.75, 0.95  | 0.01  |
| bigram_lambdas | bigram_lambdas                              | AdamW | bigram_lambda_lr (0.004) * s    | 0.9, 0.95   | 0.0   |
| muon           | every matrix under h/ (incl. ve_gate)       | Muon  | matrix_lr (* sqrt(R/C) if tall) | mom 0.95    | weight_decay |

with s = (n_embd / 768) ** -0.5, mult = bigram_embedding_lr_mult and AdamW eps = 1e-10 everywhere. The two bigram groups exist only when the params
have those keys (`GPTConfig.bigram_embed_factor > 0`; nanochat's bigram speedrun branch, commit 412e9a1), so a model
without them has exactly the optimizer state it had before. Muon applies MuonEq (row) and Muon+ by default, as
nanochat HEAD; `muon_eq="none", muon_plus=False` is nanochat 5019acc. optax's `adamw` computes nanochat's fused AdamW:
decoupled decay p -= lr * wd * p, lerp moments, bias corrections 1 - beta**step on both moments, and
lr * m_hat / (sqrt(v_hat) + eps).

Per-step hyperparameters without recompiling: the state carries three float32 scalars (optax.inject_hyperparams):
`lrm` multiplies every group's lr, `momentum` and `weight_decay` are Muon's. The training loop does, each step:

    opt_state = set_hparams(opt_state, lrm=lr_multiplier(step, ...), momentum=muon_momentum(step, ...),
                            weight_decay=weight_decay_at(step, ...))
    updates, opt_state = tx.update(grads, opt_state, params)   # inside the jitted train step
    params = optax.apply_updates(params, updates)

(`set_hparams` can also run inside the jitted step on traced scalars.) SFT/RL's `init_lr_frac` is just a factor in
lrm: lrm = init_lr_frac * schedule.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxchat.muon import BFLOAT16, MuonState, group_by_shape, muon

PyTree = Any

ADAMW_EPS = 1e-10
# top-level params key -> optimizer group
_GROUP_OF_KEY = {
    "lm_head": "lm_head", "wte": "wte", "value_embeds": "value_embeds", "resid_lambdas": "resid_lambdas",
    "x0_lambdas": "x0_lambdas", "smear_gate": "smear", "smear_lambda": "smear", "backout_lambda": "smear", "h": "muon",
    "bigram_embed": "bigram_embed", "bigram_lambdas": "bigram_lambdas",
}
GROUPS = ("lm_head", "wte", "value_embeds", "bigram_embed", "resid_lambdas", "x0_lambdas", "bigram_lambdas", "smear",
          "muon")
HPARAMS = ("lrm", "momentum", "weight_decay")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_labels(params: PyTree) -> PyTree:
    """The optimizer group name of every leaf (same structure as params).

    Raises:
        ValueError: a top-level key nanochat's setup_optimizer does not know, or a non-2-D leaf under 'h'.
    """
    def label(path, leaf):
        top = str(getattr(path[0], "key", path[0]))
        if top not in _GROUP_OF_KEY:
            raise ValueError(f"make_optimizer: parameter '{_path_str(path)}' belongs to no optimizer group "
                             f"(known top-level keys: {sorted(_GROUP_OF_KEY)})")
        if top == "h" and len(leaf.shape) != 2:
            raise ValueError(f"make_optimizer: block parameter '{_path_str(path)}' has shape {tuple(leaf.shape)}; "
                             "Muon takes 2-D (out, in) matrices only")
        return _GROUP_OF_KEY[top]
    return jax.tree_util.tree_map_with_path(label, params)


def muon_stack_paths(params: PyTree) -> dict[str, list[str]]:
    """For each Muon shape group 'RxC', the param paths (e.g. 'h/0/attn/c_q') in the order they are stacked in
    `MuonState` (rows beyond the list are padding). Useful to map the state to nanochat's or to report it."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    labels = jax.tree.leaves(param_labels(params))
    muon_leaves = [(p, leaf) for (p, leaf), lab in zip(flat, labels) if lab == "muon"]
    groups = group_by_shape([leaf.shape for _, leaf in muon_leaves])
    return {key: [_path_str(muon_leaves[i][0]) for i in idx] for key, idx in groups.items()}


def make_optimizer(params: PyTree, config, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                   scalar_lr=0.5, *, ns_dtype=BFLOAT16, stack_multiple: int = 1,
                   muon_update_fn: Callable | None = None, muon_eq: str = "row", muon_plus: bool = True,
                   bigram_embedding_lr_mult: float = 1.0,
                   bigram_lambda_lr: float = 0.004) -> optax.GradientTransformation:
    """nanochat's `setup_optimizer`: AdamW for embeddings, head and scalars, Muon for the block matrices.

    Args:
        params: the params pytree (arrays or jax.ShapeDtypeStruct), used to check the grouping.
        config: a GPTConfig (only n_embd is read, for the AdamW lr scale (n_embd/768)**-0.5).
        unembedding_lr, embedding_lr, matrix_lr, scalar_lr: base learning rates (nanochat's defaults).
        weight_decay: Muon's cautious weight decay at lrm = 1 (the initial value of the `weight_decay` hparam).
        ns_dtype: Polar Express dtype (bfloat16 as nanochat; float32 for exactness).
        stack_multiple, muon_update_fn: passed to `jaxchat.muon.muon` (pad/shard the Muon stack axis).
        muon_eq: MuonEq before Polar Express: 'row' (nanochat HEAD, default), 'col' or 'none' (5019acc).
        muon_plus: Muon+ renormalisation after Polar Express: True (nanochat HEAD, default) or False (5019acc).
        bigram_embedding_lr_mult, bigram_lambda_lr: the bigram groups' lr factors (nanochat 412e9a1's defaults);
            used only when params hold `bigram_embed` / `bigram_lambdas`.
    Returns:
        one optax.GradientTransformation; `update(grads, state, params)` needs params. Its state holds the
        hyperparameters lrm=1, momentum=0.95, weight_decay=weight_decay, changed with `set_hparams`.
    Raises:
        ValueError: a parameter outside nanochat's groups, a non-2-D block parameter, or muon_eq not in
            'none' | 'row' | 'col'.
    Source: nanochat/gpt.py `GPT.setup_optimizer`, nanochat/optim.py `MuonAdamW` (5019acc; 4e014d3 for MuonEq
    and Muon+; 412e9a1 for the bigram groups).
    """
    labels = set(jax.tree.leaves(param_labels(params)))  # fail now, with the parameter's name, not inside jit
    if muon_eq not in ("none", "row", "col"):
        raise ValueError(f"make_optimizer: muon_eq must be 'none', 'row' or 'col', got {muon_eq!r} (flag --muon-eq)")
    s = (config.n_embd / 768) ** -0.5
    adamw_groups = {  # group: (lr, (beta1, beta2), weight decay)
        "lm_head": (unembedding_lr * s, (0.8, 0.96), 0.01),
        "wte": (embedding_lr * s, (0.8, 0.995), 0.001),
        "value_embeds": (embedding_lr * s * 0.5, (0.8, 0.995), 0.01),
        "resid_lambdas": (scalar_lr * 0.01, (0.8, 0.95), 0.05),
        "x0_lambdas": (scalar_lr, (0.96, 0.95), 0.0),  # higher beta1 for x0, as nanochat
        "smear": (0.2, (0.8, 0.95), 0.0),
        "bigram_embed": (embedding_lr * s * bigram_embedding_lr_mult, (0.75, 0.95), 0.01),
        "bigram_lambdas": (bigram_lambda_lr * s, (0.9, 0.95), 0.0),
    }
    adamw_groups = {g: hp for g, hp in adamw_groups.items() if g in labels or not g.startswith("bigram")}

    def build(lrm, momentum, weight_decay):
        transforms = {name: optax.adamw(lr * lrm, b1=b1, b2=b2, eps=ADAMW_EPS, weight_decay=wd)
                      for name, (lr, (b1, b2), wd) in adamw_groups.items()}
        transforms["muon"] = muon(matrix_lr * lrm, momentum=momentum, ns_steps=5, beta2=0.9,
                                  weight_decay=weight_decay, ns_dtype=ns_dtype, stack_multiple=stack_multiple,
                                  stacked_update_fn=muon_update_fn, muon_eq=muon_eq, muon_plus=muon_plus)
        return optax.multi_transform(transforms, param_labels)

    return optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(
        lrm=1.0, momentum=0.95, weight_decay=float(weight_decay))


def set_hparams(opt_state, *, lrm=None, momentum=None, weight_decay=None):
    """A copy of `opt_state` with new per-step hyperparameters (None keeps the current value).

    Args:
        opt_state: state of the transformation from `make_optimizer`.
        lrm: lr multiplier for all groups (nanochat `get_lr_multiplier`).
        momentum: Muon momentum (nanochat `get_muon_momentum`).
        weight_decay: Muon weight decay (nanochat `get_weight_decay`).
    Values become float32 scalars, so changing them never recompiles a jitted step. Works on host values or
    inside jit on traced scalars.
    Raises:
        TypeError: opt_state is not from `make_optimizer`.
    """
    if not hasattr(opt_state, "hyperparams"):
        raise TypeError(f"set_hparams expects the state of make_optimizer's transformation, got {type(opt_state)}")
    new = dict(opt_state.hyperparams)
    for name, value in (("lrm", lrm), ("momentum", momentum), ("weight_decay", weight_decay)):
        if value is not None:
            new[name] = jnp.asarray(value, jnp.float32)
    return opt_state._replace(hyperparams=new)


def get_hparams(opt_state) -> dict[str, jax.Array]:
    """The current {'lrm', 'momentum', 'weight_decay'} float32 scalars (no host sync)."""
    return dict(opt_state.hyperparams)


def group_state(opt_state, group: str):
    """The inner state of one group: `MuonState` for 'muon'; for an AdamW group, optax's `ScaleByAdamState`
    (count, mu, nu) whose mu/nu are params-shaped trees with `optax.MaskedNode()` outside the group.

    Raises:
        KeyError: unknown group name.
    """
    inner = opt_state.inner_state.inner_states
    if group not in inner:
        raise KeyError(f"no optimizer group '{group}'; groups are {sorted(inner)}")
    state = inner[group].inner_state
    if isinstance(state, MuonState):
        return state
    return next(s for s in state if isinstance(s, optax.ScaleByAdamState))
