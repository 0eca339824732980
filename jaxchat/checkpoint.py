"""Model checkpoints: orbax-checkpoint for arrays, JSON for config and metadata; nanochat import and export.

A checkpoint directory is an orbax `CheckpointManager` root (one numbered sub-directory per step) whose steps hold
the items 'params' (the params pytree) and 'meta' (JSON: 'model_config' plus whatever the writer adds). Training
runs add 'opt_state' and 'loader' items to the same steps (see `save_checkpoint`); `load_model` reads only params
and meta, so the engine, evals and server load training checkpoints directly. orbax writes each step to a temporary
directory and renames it when complete, so a run killed while saving leaves the previous step intact.

Directory layout under `$JAXCHAT_BASE_DIR` (as nanochat's `checkpoint_manager.py`): `base_checkpoints/<tag>/`,
`chatsft_checkpoints/<tag>/`, `chatrl_checkpoints/<tag>/`, where tag is e.g. `d12`.

nanochat interop: `from_nanochat` / `to_nanochat` map its `state_dict` names and (out, in) layouts to ours (same
layout, no transposes), keeping the padded vocab rows.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxchat.common import UserError, get_base_dir
from jaxchat.model import GPTConfig, Params, param_shapes

class MissingCheckpoint(UserError, FileNotFoundError):
    """No such checkpoint directory, tag or step; the message lists what exists and the command that makes one."""


SOURCES = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "mid": "chatsft_checkpoints",
           "rl": "chatrl_checkpoints"}


# ----------------------------------------------------------------------------------------------------------------
# orbax read/write


def _manager(ckpt_dir: str, create: bool = False, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(create=create, max_to_keep=max_to_keep)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)


def save_checkpoint(ckpt_dir: str, step: int, params: Params, config: GPTConfig, meta: dict | None = None,
                    opt_state: Any = None, loader_state: dict | None = None, max_to_keep: int | None = None) -> str:
    """Write one step (params, meta, and optionally optimizer and data-loader state); blocks until complete.

    An existing step of the same number is replaced.

    Every process must call this (orbax gathers sharded arrays collectively); only process 0 writes JSON.
    Returns the step's directory.
    """
    meta = _json_safe(dict(meta or {}))
    meta["model_config"] = config.to_dict()
    meta["step"] = int(step)
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if loader_state is not None:
        items["loader"] = ocp.args.JsonSave(_json_safe(loader_state))
    with _manager(ckpt_dir, create=True, max_to_keep=max_to_keep) as mgr:
        if int(step) in mgr.all_steps():  # a re-run with the same tag replaces that step rather than failing
            mgr.delete(int(step))
        mgr.save(int(step), args=ocp.args.Composite(**items), force=True)
        mgr.wait_until_finished()
    return os.path.join(os.path.abspath(ckpt_dir), str(int(step)))


def _json_safe(x):
    """NaN and +-inf become None (JSON has no such numbers), recursively through dicts and lists."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def save_model(ckpt_dir: str, step: int, params: Params, config: GPTConfig, meta: dict | None = None) -> str:
    """Write params and meta (with 'model_config') as step `step` of `ckpt_dir`. Returns the step directory."""
    return save_checkpoint(ckpt_dir, step, params, config, meta)


def list_steps(ckpt_dir: str) -> list[int]:
    """Completed steps in a checkpoint directory, ascending ([] when none or no directory)."""
    if not os.path.isdir(ckpt_dir):
        return []
    with _manager(ckpt_dir) as mgr:
        return sorted(mgr.all_steps())


def describe_tags(root: str) -> str:
    """'tags here: d2 (steps [5, 10]), d4 (steps [])' for a checkpoints root, or 'no tags under <root>'."""
    tags = sorted(t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))) if os.path.isdir(root) else []
    if not tags:
        return f"no tags under {root}"
    return "tags here: " + ", ".join(f"{t} (steps {list_steps(os.path.join(root, t))})" for t in tags)


def _resolve_step(ckpt_dir: str, step: int | None) -> int:
    steps = list_steps(ckpt_dir)
    if not steps:
        raise MissingCheckpoint(f"no checkpoint in {ckpt_dir} (train one with `python -m train.pretrain`, or convert "
                                f"a nanochat one with `python -m jaxchat.convert`); "
                                f"{describe_tags(os.path.dirname(os.path.abspath(ckpt_dir)))}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise MissingCheckpoint(f"no step {step} in {ckpt_dir}; available steps: {steps}")
    return step


def check_same_model(meta: dict, config: GPTConfig, what: str) -> None:
    """Raise UserError naming the fields where the checkpoint's model_config differs from `config`."""
    saved, now = meta.get("model_config") or {}, config.to_dict()
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise UserError(f"{what}: the model differs from the flags' ({'; '.join(diff)}); pass the flags of the "
                        f"original run, or start a new run under another tag")


def check_tokenizer(meta: dict, fingerprint: str | None, what: str) -> None:
    """Raise UserError when the checkpoint was trained with another tokenizer than the current one (both named)."""
    saved = meta.get("tokenizer_fingerprint")
    if saved and fingerprint and saved != fingerprint:
        raise UserError(f"{what} was trained with tokenizer {saved}, but $JAXCHAT_BASE_DIR/tokenizer is {fingerprint}; "
                        f"restore that tokenizer (or retrain the model with `python -m train.pretrain`)")


def load_meta(ckpt_dir: str, step: int | None = None) -> dict:
    """The JSON metadata of a step (newest by default). Raises FileNotFoundError when absent."""
    step = _resolve_step(ckpt_dir, step)
    with _manager(ckpt_dir) as mgr:
        return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _abstract(tree, sharding=None):
    """ShapeDtypeStructs for orbax restore, optionally with one sharding (or a matching tree of them)."""
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)
    return jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, sharding)


def load_model(ckpt_dir: str, step: int | None = None, sharding=None) -> tuple[GPTConfig, Params, dict]:
    """Read (config, params, meta) of a step (newest by default).

    Args:
        ckpt_dir: a checkpoint directory written by `save_model`/`save_checkpoint`.
        step: which step; None for the newest.
        sharding: a `jax.sharding.Sharding` for every array, or a pytree of them matching params; default device 0.
    Raises:
        FileNotFoundError: no such directory or step (the message says how to make one).
    """
    step = _resolve_step(ckpt_dir, step)
    meta = load_meta(ckpt_dir, step)
    config = GPTConfig.from_dict(meta["model_config"])
    with _manager(ckpt_dir) as mgr:
        restored = mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(param_shapes(config), sharding))))
    return config, restored["params"], meta


def restore_checkpoint(ckpt_dir: str, step: int, abstract_params, abstract_opt_state=None) -> dict:
    """Restore a training step: {'params', 'meta', and 'opt_state' / 'loader' when asked for and present}.

    `abstract_params` / `abstract_opt_state` are pytrees of `jax.ShapeDtypeStruct` (with shardings) that say where
    each restored array goes.
    """
    step = _resolve_step(ckpt_dir, step)
    with _manager(ckpt_dir) as mgr:
        present = set(mgr.item_metadata(step).keys()) if hasattr(mgr, "item_metadata") else set()
        items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        if not present or "loader" in present:
            items["loader"] = ocp.args.JsonRestore()
        try:
            out = mgr.restore(step, args=ocp.args.Composite(**items))
        except (FileNotFoundError, KeyError, ValueError):
            items.pop("loader", None)
            out = mgr.restore(step, args=ocp.args.Composite(**items))
    return {k: out[k] for k in items if k in out}


def find_largest_model(checkpoints_dir: str) -> str:
    """Default model tag: the largest `d<N>` tag, else the most recently modified directory (as nanochat)."""
    if not os.path.isdir(checkpoints_dir):
        raise MissingCheckpoint(f"no checkpoints directory {checkpoints_dir}")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise MissingCheckpoint(f"no model tags in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def checkpoint_dir(source: str, model_tag: str | None = None) -> str:
    """`$JAXCHAT_BASE_DIR/<source>_checkpoints/<tag>` for source in base|sft|rl (tag guessed when None)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")
    root = os.path.join(get_base_dir(), SOURCES[source])
    if model_tag is None:
        try:
            model_tag = find_largest_model(root)
        except FileNotFoundError:
            hint = {"base": "python -m train.pretrain", "sft": "python -m train.sft", "mid": "python -m train.sft",
                    "rl": "python -m train.rl"}[source]
            raise MissingCheckpoint(f"no {source} checkpoint under {root}: run `{hint}` first") from None
    return os.path.join(root, model_tag)


def load_model_from(source: str = "base", model_tag: str | None = None, step: int | None = None, sharding=None):
    """Load (params, config, tokenizer, meta) from the standard checkpoint directories (nanochat `load_model`).

    Raises:
        MissingCheckpoint (a UserError and FileNotFoundError): no checkpoint (listing the tags and steps that
            exist, and the command that makes one); FileNotFoundError: no tokenizer.
        UserError: the tokenizer's vocab size or fingerprint disagrees with the checkpoint's.
    """
    from jaxchat.tokenizer import get_tokenizer  # lazy: keeps model-only users free of tokenizer files

    config, params, meta = load_model(checkpoint_dir(source, model_tag), step, sharding)
    tokenizer = get_tokenizer()
    where = f"{source} checkpoint {model_tag or ''} step {meta.get('step')}".replace("  ", " ")
    check_tokenizer(meta, tokenizer.fingerprint(), where)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"{where}: tokenizer vocab size {tokenizer.get_vocab_size()} != model vocab_size "
                        f"{config.vocab_size}; use the tokenizer the model was trained with")
    return params, config, tokenizer, meta


# ----------------------------------------------------------------------------------------------------------------
# nanochat interop


def _nanochat_names(config: GPTConfig) -> dict[str, tuple]:
    """nanochat state_dict key -> path into our params pytree."""
    names = {"transformer.wte.weight": ("wte",), "lm_head.weight": ("lm_head",),
             "resid_lambdas": ("resid_lambdas",), "x0_lambdas": ("x0_lambdas",),
             "smear_gate.weight": ("smear_gate",), "smear_lambda": ("smear_lambda",),
             "backout_lambda": ("backout_lambda",)}
    if config.bigram_embed_factor:  # nanochat 412e9a1; without bigrams its bigram_lambdas is a non-persistent buffer
        names.update({"bigram_embed.weight": ("bigram_embed",), "bigram_lambdas": ("bigram_lambdas",)})
    for i in range(config.n_layer):
        for sub, mats in (("attn", ("c_q", "c_k", "c_v", "c_proj")), ("mlp", ("c_fc", "c_proj"))):
            for m in mats:
                names[f"transformer.h.{i}.{sub}.{m}.weight"] = ("h", i, sub, m)
        if config.has_ve(i):
            names[f"transformer.h.{i}.attn.ve_gate.weight"] = ("h", i, "attn", "ve_gate")
            names[f"value_embeds.{i}.weight"] = ("value_embeds", str(i))
    return names


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (possibly bfloat16, which numpy lacks)
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def from_nanochat(state_dict: dict, config: GPTConfig) -> Params:
    """Params pytree (float32 jax arrays) from a nanochat `GPT.state_dict()` (torch tensors or numpy arrays).

    Strips torch.compile's `_orig_mod.` prefix. Raises ValueError listing missing keys, unexpected keys, or keys
    whose shape disagrees with the config; nothing is dropped silently.
    """
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    names = _nanochat_names(config)
    missing = sorted(set(names) - set(sd))
    extra = sorted(set(sd) - set(names))
    if missing or extra:
        raise ValueError(f"nanochat state_dict does not fit {config}: missing keys {missing}, unexpected keys {extra}")
    shapes = param_shapes(config)
    params = jax.tree_util.tree_map(lambda s: None, shapes)
    bad = []
    for key, path in names.items():
        arr = _to_numpy(sd[key])
        want = _get(shapes, path).shape
        if arr.shape != want:
            bad.append(f"{key}: {arr.shape} != {want}")
            continue
        parent = _get(params, path[:-1])
        parent[path[-1]] = jnp.asarray(arr)
    if bad:
        raise ValueError("nanochat state_dict shapes disagree with the config: " + "; ".join(bad))
    return params


def to_nanochat(params: Params, config: GPTConfig) -> dict[str, np.ndarray]:
    """nanochat `state_dict` (float32 numpy arrays, nanochat key names and (out, in) layouts) from our params."""
    return {key: np.asarray(jax.device_get(_get(params, path)), dtype=np.float32)
            for key, path in _nanochat_names(config).items()}
