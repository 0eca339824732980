"""Convert checkpoints between nanochat (PyTorch) and jaxchat (orbax).

    python -m jaxchat.convert SRC DST [--step N]            # nanochat dir -> jaxchat checkpoint dir
    python -m jaxchat.convert SRC DST --to-nanochat [--step N]

A nanochat checkpoint directory holds `model_NNNNNN.pt` (a `torch.save` of the state_dict) and `meta_NNNNNN.json`
(with `model_config`), as written by nanochat's `checkpoint_manager.save_checkpoint`; the newest step is used unless
`--step`. A jaxchat source is verified against its digests like any load (`jaxchat.checkpoint`): a damaged step is
refused in one line, and without `--step` the newest intact step is used. Checkpoints of nanochat's bigram branch
(412e9a1: `bigram_embed.weight`, `bigram_lambdas`, and `bigram_embed_factor` in `model_config`) convert both ways.
Reading or writing `.pt` files needs PyTorch: `pip install -e '.[torch]'`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import re

from jaxchat.common import BadInputError
from jaxchat.checkpoint import from_nanochat, load_model, save_model, to_nanochat
from jaxchat.common import MissingInputError, run_cli
from jaxchat.model import GPTConfig


def _torch():
    try:
        import torch
    except ImportError:
        raise SystemExit("reading or writing nanochat .pt files needs PyTorch: pip install -e '.[torch]'") from None
    return torch


def nanochat_steps(src: str) -> list[int]:
    """Steps that have a model_NNNNNN.pt in a nanochat checkpoint directory, ascending."""
    steps = []
    for path in glob.glob(os.path.join(src, "model_*.pt")):
        m = re.fullmatch(r"model_(\d+)\.pt", os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_nanochat(src: str, step: int | None = None):
    """(config, params, meta, step) from a nanochat checkpoint directory.

    The .pt file is read with `torch.load(weights_only=True)`: tensors and plain containers only, so a planted
    checkpoint cannot run code.

    Raises:
        MissingInputError (a FileNotFoundError, a UserError): no model_*.pt, or the requested step / its meta JSON
            is missing.
        ValueError: the state_dict does not fit the config (keys or shapes, named).
        BadInputError (a UserError and ValueError): the .pt file holds more than tensors (weights_only refused it).
    """
    steps = nanochat_steps(src)
    if not steps:
        raise MissingInputError(f"no nanochat model_*.pt files in {src}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise MissingInputError(f"no model_{step:06d}.pt in {src}; available steps: {steps}")
    meta_path = os.path.join(src, f"meta_{step:06d}.json")
    if not os.path.exists(meta_path):
        raise MissingInputError(f"missing {meta_path} (nanochat writes it beside the model file)")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    model_config = dict(meta["model_config"])
    model_config.setdefault("window_pattern", "L")  # nanochat's rule for checkpoints older than sliding windows
    config = GPTConfig.from_dict(model_config)
    torch = _torch()
    pt_path = os.path.join(src, f"model_{step:06d}.pt")
    try:
        state_dict = torch.load(pt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL:? ([\w.]+)", str(e))  # torch's wording varies; the global it refused
        what = f"the global {named.group(1)}" if named else "more than tensors"
        raise BadInputError(f"{pt_path}: refused to load: it names {what}, which could run code; a nanochat "
                            f"checkpoint holds only tensors (do not trust this checkpoint)") from None
    return config, from_nanochat(state_dict, config), meta, step


def write_nanochat(dst: str, step: int, params, config: GPTConfig, meta: dict) -> tuple[str, str]:
    """Write model_NNNNNN.pt and meta_NNNNNN.json that nanochat's `checkpoint_manager` loads. Returns both paths."""
    torch = _torch()
    os.makedirs(dst, exist_ok=True)
    state_dict = {k: torch.from_numpy(v.copy()) for k, v in to_nanochat(params, config).items()}
    model_path = os.path.join(dst, f"model_{step:06d}.pt")
    meta_path = os.path.join(dst, f"meta_{step:06d}.json")
    torch.save(state_dict, model_path)
    meta = dict(meta)
    meta["model_config"] = config.to_dict()  # without the bigram fields when off, as nanochat before 412e9a1
    meta["step"] = step
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return model_path, meta_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination checkpoint directory")
    parser.add_argument("--step", type=int, default=None, help="step to convert (default: newest)")
    parser.add_argument("--to-nanochat", action="store_true", help="convert a jaxchat checkpoint to nanochat's format")
    args = parser.parse_args(argv)
    if args.to_nanochat:
        config, params, meta = load_model(args.src, args.step)
        step = int(meta.get("step", args.step or 0))
        meta = {k: v for k, v in meta.items() if isinstance(v, (int, float, str, list, dict, type(None)))}
        paths = write_nanochat(args.dst, step, params, config, meta)
        print(f"wrote {paths[0]} and {paths[1]}")
    else:
        config, params, meta, step = read_nanochat(args.src, args.step)
        meta = dict(meta)
        meta["converted_from"] = os.path.abspath(args.src)
        out = save_model(args.dst, step, params, config, meta)
        print(f"wrote jaxchat checkpoint {out} ({config})")


if __name__ == "__main__":
    run_cli(main)
