"""Checkpoints: orbax round trip, nanochat import/export, the convert CLI on nanochat's real .pt file."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import convert
from jaxchat.checkpoint import (checkpoint_dir, from_nanochat, list_steps, load_model, save_checkpoint, save_model,
                                to_nanochat)
from jaxchat.model import GPTConfig, forward, init_params

from conftest import NANOCHAT_TINY

TINY = GPTConfig(sequence_len=256, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")
ACTIVE = os.path.join(NANOCHAT_TINY, "active")


def test_to_from_nanochat_round_trip_is_exact():
    ref = dict(np.load(os.path.join(ACTIVE, "params.npz")))
    back = to_nanochat(from_nanochat(ref, TINY), TINY)
    assert set(back) == set(ref)
    for k in ref:
        assert back[k].dtype == np.float32 and np.array_equal(back[k], ref[k]), k


def test_from_nanochat_names_missing_extra_and_misshaped_keys():
    ref = dict(np.load(os.path.join(ACTIVE, "params.npz")))
    missing = {k: v for k, v in ref.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="lm_head.weight"):
        from_nanochat(missing, TINY)
    with pytest.raises(ValueError, match="bogus.weight"):
        from_nanochat({**ref, "bogus.weight": np.zeros(3)}, TINY)
    bad = {**ref, "transformer.h.0.mlp.c_fc.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(ValueError, match="transformer.h.0.mlp.c_fc.weight"):
        from_nanochat(bad, TINY)
    # torch.compile's prefix is accepted
    prefixed = {"_orig_mod." + k: v for k, v in ref.items()}
    assert np.array_equal(np.asarray(from_nanochat(prefixed, TINY)["wte"]), ref["transformer.wte.weight"])


def test_save_load_round_trip(tmp_path):
    cfg = GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, window_pattern="L")
    params = init_params(cfg, jax.random.PRNGKey(1))
    save_model(str(tmp_path / "ck"), 5, params, cfg, {"val_bpb": 1.5})
    save_model(str(tmp_path / "ck"), 9, jax.tree_util.tree_map(lambda a: a + 1, params), cfg)
    assert list_steps(str(tmp_path / "ck")) == [5, 9]
    config, loaded, meta = load_model(str(tmp_path / "ck"), step=5)
    assert config == cfg and meta["val_bpb"] == 1.5 and meta["step"] == 5
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    save_model(str(tmp_path / "ck"), 5, params, cfg, {"val_bpb": 1.25})  # a re-run replaces the step
    assert load_model(str(tmp_path / "ck"), step=5)[2]["val_bpb"] == 1.25
    _, newest, _ = load_model(str(tmp_path / "ck"))
    assert np.array_equal(np.asarray(newest["wte"]), np.asarray(params["wte"]) + 1)
    with pytest.raises(FileNotFoundError, match="available steps"):
        load_model(str(tmp_path / "ck"), step=7)


def test_missing_checkpoint_says_which_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.pretrain"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="train.sft"):
        checkpoint_dir("sft")


def test_incomplete_save_is_ignored(tmp_path):
    # orbax writes a step to a temporary directory and renames it when complete; a leftover tmp dir (a run
    # killed mid-save) is not a step, and the previous step still loads.
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    params = init_params(cfg, jax.random.PRNGKey(0))
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, 3, params, cfg)
    shutil.copytree(os.path.join(ck, "3"), os.path.join(ck, "4.orbax-checkpoint-tmp-1234"))
    assert list_steps(ck) == [3]
    assert load_model(ck)[2]["step"] == 3


def test_convert_cli_on_nanochat_checkpoint_and_back(tmp_path):
    pytest.importorskip("torch", reason="nanochat .pt files need PyTorch (pip install -e '.[torch]')")
    import torch

    src = os.path.join(ACTIVE, "base_checkpoints", "d3")
    dst = str(tmp_path / "jax")
    convert.main([src, dst])
    config, params, meta = load_model(dst)
    assert config == TINY and meta["step"] == 0
    io = np.load(os.path.join(ACTIVE, "io.npz"))
    from tolerances import assert_close, gpt_reduction_len  # 2 eps sqrt(n) max|logit|

    assert_close(forward(params, config, jnp.asarray(io["idx"])), io["logits"], jnp.float32,
                 gpt_reduction_len(config, io["idx"].shape[1]))

    back = str(tmp_path / "nano")
    convert.main([dst, back, "--to-nanochat"])
    original = torch.load(os.path.join(src, "model_000000.pt"), map_location="cpu", weights_only=True)
    written = torch.load(os.path.join(back, "model_000000.pt"), map_location="cpu", weights_only=True)
    assert set(original) == set(written)
    for k in original:
        assert torch.equal(original[k].float(), written[k]), k
    with open(os.path.join(src, "meta_000000.json")) as f:
        original_config = json.load(f)["model_config"]
    with open(os.path.join(back, "meta_000000.json")) as f:
        written_config = json.load(f)["model_config"]
    # nanochat before the bigram branch rejects unknown GPTConfig fields: the export writes exactly its keys
    assert written_config == {k: original_config[k] for k in written_config} and set(written_config) == set(original_config)


def test_convert_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_"):
        convert.read_nanochat(str(tmp_path))



class _RunsCode:
    """Pickles as os.system(cmd)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_nanochat_pt_that_would_run_code_is_refused(tmp_path):
    """model_*.pt is read with torch.load(weights_only=True): a planted checkpoint whose unpickling runs code
    (shown live under weights_only=False) is refused with a one-line UserError naming the file; no code runs."""
    pytest.importorskip("torch", reason="nanochat .pt files need PyTorch (pip install -e '.[torch]')")
    import shutil

    import torch

    from jaxchat.common import UserError

    src = tmp_path / "d3"
    shutil.copytree(os.path.join(ACTIVE, "base_checkpoints", "d3"), src)
    marker = tmp_path / "pwned"
    state = torch.load(src / "model_000000.pt", map_location="cpu", weights_only=True)
    state["extra"] = _RunsCode(f"touch {marker}")
    torch.save(state, src / "model_000000.pt")
    torch.load(src / "model_000000.pt", weights_only=False)  # proof that the payload is live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError) as e:
        convert.read_nanochat(str(src))
    message = str(e.value)
    assert "\n" not in message and str(src / "model_000000.pt") in message and "refused" in message, message
    assert "posix.system" in message and not marker.exists()

def test_missing_checkpoint_is_a_one_line_user_error_listing_what_exists(tmp_path):
    from jaxchat.common import UserError
    from jaxchat.checkpoint import load_model_from

    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    root = os.path.join(os.environ["JAXCHAT_BASE_DIR"], "base_checkpoints")
    save_checkpoint(os.path.join(root, "d1"), 4, init_params(cfg, jax.random.PRNGKey(0)), cfg)
    with pytest.raises(UserError, match=r"no checkpoint in .*d9 .*tags here: d1 \(steps \[4\]\)") as e:
        load_model_from("base", "d9")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"no step 5 in .*available steps: \[4\]"):
        load_model(os.path.join(root, "d1"), step=5)


def test_meta_never_holds_nan_or_infinity(tmp_path):
    import json

    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, 1, init_params(cfg, jax.random.PRNGKey(0)), cfg,
                    {"val_bpb": float("nan"), "loop_state": {"best": float("inf"), "hist": [1.0, float("-inf")]}})
    text = open(os.path.join(ck, "1", "meta", "metadata")).read() if os.path.exists(
        os.path.join(ck, "1", "meta", "metadata")) else "".join(
        open(os.path.join(d, f)).read() for d, _, fs in os.walk(os.path.join(ck, "1", "meta")) for f in fs)
    assert "NaN" not in text and "Infinity" not in text
    meta = load_model(ck)[2]
    assert meta["val_bpb"] is None and meta["loop_state"] == {"best": None, "hist": [1.0, None]}
    json.loads(json.dumps(meta, allow_nan=False))


def test_tokenizer_fingerprint_mismatch_is_refused(tmp_path):
    from jaxchat.checkpoint import load_model_from
    from jaxchat.common import UserError, get_base_dir
    from jaxchat.tokenizer import Tokenizer

    a = Tokenizer.train_from_iterator(["the cat sat on the mat"] * 20 + ["a dog ran"] * 5, 300)
    b = Tokenizer.train_from_iterator(["a dog ran far away"] * 20 + ["the cat"] * 5, 300)
    assert a.get_vocab_size() == b.get_vocab_size() and a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == Tokenizer.train_from_iterator(["the cat sat on the mat"] * 20 + ["a dog ran"] * 5,
                                                            300).fingerprint()
    cfg = GPTConfig(sequence_len=32, vocab_size=a.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    save_checkpoint(checkpoint_dir("base", "d1"), 1, init_params(cfg, jax.random.PRNGKey(0)), cfg,
                    {"tokenizer_fingerprint": a.fingerprint()})
    b.save(os.path.join(get_base_dir(), "tokenizer"))
    with pytest.raises(UserError, match=f"trained with tokenizer {a.fingerprint()}.* is {b.fingerprint()}"):
        load_model_from("base", "d1")
    a.save(os.path.join(get_base_dir(), "tokenizer"))
    assert load_model_from("base", "d1")[1] == cfg
