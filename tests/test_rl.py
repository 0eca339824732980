"""RL on GSM8K (train.rl): advantages, nanochat's token-level policy-gradient loss on a hand-made batch, rollout
batches, pass@k, the GSM8K reward, and a tiny base -> SFT -> RL run on CPU whose checkpoints the engine loads."""

import json
import os

import jax
import numpy as np
import pytest

from jaxchat.policy_gradient import compute_advantages, pass_at_k, pg_loss, pg_row_weights, rollout_batch

GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?",
     "answer": "Tom has 3 + 2 = <<3+2=5>>5 apples.\n#### 5"},
    {"question": "A box holds 4 pens. How many pens are in 3 boxes?", "answer": "4 * 3 = <<4*3=12>>12 pens.\n#### 12"},
    {"question": "Sara had 1,300 dollars and spent 4. How much is left?",
     "answer": "1300 - 4 = <<1300-4=1296>>1296 dollars.\n#### 1,296"},
    {"question": "There are 2 cats with 4 legs each. How many legs?", "answer": "2 * 4 = <<2*4=8>>8 legs.\n#### 8"},
]


@pytest.fixture
def gsm_file(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM_ROWS))
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# pure functions on hand-made batches


def test_advantages_subtract_group_mean_only():
    np.testing.assert_allclose(compute_advantages([1.0, 0.0, 0.0, 1.0]), [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(compute_advantages([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
                               [[0.25, 0.25, 0.25, -0.75], [0.0, 0.0, 0.0, 0.0]])  # no division by the std


def _hand_batch():
    logp = -0.1 * np.arange(1, 13, dtype=np.float32).reshape(1, 4, 3)  # (E=1, S=4, T=3)
    valid = np.array([[[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 1]]], bool)
    targets = np.where(valid, 5, -1)
    adv = np.array([[0.5, -0.5, -0.5, 0.5]], np.float32)
    return logp, targets, adv


def test_pg_loss_matches_hand_computation():
    logp, targets, adv = _hand_batch()
    # device_batch_size 2 -> two passes: rows {0, 1} with 5 valid tokens, rows {2, 3} with 2 valid tokens
    # pass 0: 0.5 * (-0.1 - 0.2) - 0.5 * (-0.4 - 0.5 - 0.6) = 0.6 -> / 5 = 0.12
    # pass 1: -0.5 * 0 + 0.5 * (-1.0 - 1.2) = -1.1 -> / 2 = -0.55
    # loss = -(0.12 - 0.55) / (passes 2 * examples 1) = 0.215
    assert float(pg_loss(logp, targets, adv, device_batch_size=2)) == pytest.approx(0.215, abs=1e-6)
    # one pass of 4 rows: (0.6 - 1.1) / 7 valid tokens, negated
    assert float(pg_loss(logp, targets, adv, device_batch_size=4)) == pytest.approx(0.5 / 7, abs=1e-6)
    # two questions: the mean over questions (nanochat divides by examples_per_rank, DDP averages ranks)
    logp2 = np.concatenate([logp, logp])
    targets2 = np.concatenate([targets, np.full_like(targets, -1)])  # second question: nothing valid
    adv2 = np.concatenate([adv, adv])
    assert float(pg_loss(logp2, targets2, adv2, device_batch_size=2)) == pytest.approx(0.215 / 2, abs=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        pg_loss(logp, targets, adv, device_batch_size=3)


def test_row_weights_reproduce_pg_loss():
    rng = np.random.default_rng(0)
    E, S, T, dbs = 3, 4, 7, 2
    logp = -rng.random((E, S, T)).astype(np.float32)
    targets = np.where(rng.random((E, S, T)) < 0.6, 1, -1)
    adv = compute_advantages(rng.integers(0, 2, (E, S)).astype(np.float32))
    w = pg_row_weights(targets, adv, dbs)
    nll = np.where(targets >= 0, -logp, 0.0)
    assert np.sum(w * nll.sum(-1)) == pytest.approx(float(pg_loss(logp, targets, adv, dbs)), rel=1e-5, abs=1e-7)
    logp_h, targets_h, adv_h = _hand_batch()
    np.testing.assert_allclose(pg_row_weights(targets_h, adv_h, 2), [[0.5 / 10, -0.5 / 10, -0.5 / 4, 0.5 / 4]])


def test_rollout_batch_masks_prompt_and_tool_tokens():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 9]]
    masks = [[0, 0, 1, 0, 1], [0, 0, 1, 1]]  # prompt 1,2; token 4 was forced by the tool
    x, y = rollout_batch(seqs, masks, pad_id=99)
    np.testing.assert_array_equal(x, [[1, 2, 3, 4], [1, 2, 3, 9]])
    np.testing.assert_array_equal(y, [[-1, 3, -1, 5], [-1, 3, 9, -1]])
    x, y = rollout_batch(seqs, masks, pad_id=99, length=6)
    assert x.shape == y.shape == (2, 6) and (x[1, 4:] == 99).all() and (y[1, 3:] == -1).all()
    from jaxchat.common import pow2_bucket
    from jaxchat.policy_gradient import MIN_SEQ_BUCKET

    assert [pow2_bucket(n, MIN_SEQ_BUCKET, 2048) for n in (5, 33, 3000)] == [32, 64, 2048]


def test_pass_at_k():
    outcomes = [[False, True, False], [False, False, False], [True, True, True], [False, False, True]]
    np.testing.assert_allclose(pass_at_k(outcomes, 3), [1 / 4, 2 / 4, 3 / 4])


def test_gsm8k_reward_on_known_answers(gsm_file):
    from evals.tasks.gsm8k import GSM8K

    task = GSM8K("main", "train", data_files=gsm_file)
    by_q = {task[i]["messages"][0]["content"]: task[i] for i in range(len(task))}
    conv = by_q[GSM_ROWS[0]["question"]]
    assert task.reward(conv, "3 plus 2 is 5.\n#### 5") == 1.0
    assert task.reward(conv, "#### 6") == 0.0
    assert task.reward(conv, "the answer is 5") == 0.0  # no '####' marker: no reward
    big = by_q[GSM_ROWS[2]["question"]]
    assert task.reward(big, "#### 1296") == 1.0 and task.reward(big, "#### 1,296") == 1.0
    # the reference's calculator call became a python part followed by its output
    parts = conv["messages"][1]["content"]
    assert {"type": "python", "text": "3+2"} in parts and {"type": "python_output", "text": "5"} in parts


# ----------------------------------------------------------------------------------------------------------------
# end to end: base -> SFT -> RL on CPU


def test_base_sft_rl_end_to_end(tmp_path, monkeypatch, gsm_file):
    from evals.tasks.gsm8k import GSM8K
    from jaxchat.checkpoint import load_model_from
    from jaxchat.engine import Engine
    from jaxchat.tokenizer import Tokenizer
    from tests.test_sft import IDENTITY, make_base
    from train import rl, sft

    with open(IDENTITY, encoding="utf-8") as f:
        texts = [line for line in f] + [r["question"] + r["answer"] for r in GSM_ROWS] * 3
    tok = Tokenizer.train_from_iterator(texts, 300)
    make_base(tmp_path, tok, seq_len=128)
    out = sft.main(["--mixture=identity", "--num-iterations=3", "--eval-every=-1", "--eval-tokens=1024",
                    "--chatcore-every=-1", "--model-tag=d2", "--max-seq-len=128"])
    assert out["step"] == 2 and np.isfinite(out["min_val_bpb"])

    # A random policy never writes '#### N'; reward even-length completions instead so that advantages (and the
    # gradient) are not all zero and the update is exercised.
    monkeypatch.setattr(GSM8K, "reward", lambda self, conv, text: float(len(text) % 2 == 0))
    before, _, _, _ = load_model_from("sft", "d2")
    res = rl.main([f"--task-file={gsm_file}", "--model-tag=d2", "--device-batch-size=2", "--num-samples=4",
                   "--examples-per-step=2", "--max-new-tokens=12", "--eval-every=1", "--eval-examples=2",
                   "--top-k=20", "--run=test", "--init-lr-frac=1.0"])
    assert res["steps"] == 2 and len(res["losses"]) == 2
    assert all(np.isfinite(res["losses"])) and any(abs(v) > 0 for v in res["losses"])
    assert [s for s, _ in res["passk"]] == [0, 1] and all(len(p) == 2 for _, p in res["passk"])
    runs = os.path.join(os.environ["JAXCHAT_BASE_DIR"], "runs", "chatrl_test")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(runs))

    params, cfg, tokenizer, meta = load_model_from("rl", "d2")
    assert meta["step"] == 2  # checkpoint steps count updates: the params after both steps
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)))
    assert moved > 0
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": GSM_ROWS[0]["question"]},
                                                           {"role": "assistant", "content": "x"}]})
    seqs, _ = Engine(params, cfg, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=4, temperature=1.0)
    assert all(s[: len(prompt)] == prompt for s in seqs)


def test_rl_flags_are_checked():
    with pytest.raises(SystemExit):
        rl_args = ["--num-samples=6", "--device-batch-size=4"]
        from train.rl import parse_args
        parse_args(rl_args)


REWARD_PATCH = ("from evals.tasks.gsm8k import GSM8K\n"
                "GSM8K.reward = lambda self, conv, text: float(len(text) % 2 == 0)")


def test_rl_killed_mid_run_resumes_exactly(tmp_path, monkeypatch, gsm_file):
    """A random policy never answers; REWARD_PATCH rewards even-length completions so the gradient is not zero."""
    from evals.tasks.gsm8k import GSM8K
    from jaxchat import checkpoint as ckpt
    from jaxchat import model as gpt
    from jaxchat.common import get_base_dir
    from jaxchat.tokenizer import Tokenizer
    from tests.test_pretrain import assert_same_params, run_child
    from tests.test_sft import IDENTITY
    from train import rl

    with open(IDENTITY, encoding="utf-8") as f:
        texts = [line for line in f] + [r["question"] + r["answer"] for r in GSM_ROWS] * 3
    tok = Tokenizer.train_from_iterator(texts, 300)
    tok.save(os.path.join(get_base_dir(), "tokenizer"))
    config = gpt.GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    ckpt.save_checkpoint(ckpt.checkpoint_dir("sft", "d2"), 1, gpt.init_params(config, jax.random.key(0)), config,
                         {"tokenizer_fingerprint": tok.fingerprint()})
    monkeypatch.setattr(GSM8K, "reward", lambda self, conv, text: float(len(text) % 2 == 0))
    flags = [f"--task-file={gsm_file}", "--model-tag=d2", "--device-batch-size=2", "--num-samples=4",
             "--examples-per-step=2", "--max-new-tokens=8", "--eval-every=-1", "--num-epochs=3", "--save-every=2",
             "--top-k=20", "--init-lr-frac=1.0"]
    full = rl.main(flags + ["--output-tag=full"])
    assert full["steps"] == 6 and any(abs(v) > 0 for v in full["losses"])
    out, rc = run_child("train.rl", flags + ["--output-tag=cut"], r"^Saved checkpoint step 2 ", 9, REWARD_PATCH)
    cut_dir = ckpt.checkpoint_dir("rl", "cut")
    steps = ckpt.list_steps(cut_dir)
    assert rc == -9 and 2 <= steps[-1] < 6, (rc, steps, out[-2000:])
    resumed = rl.main(flags + ["--output-tag=cut", "--resume-from-step=latest"])
    assert sorted(resumed["evals"]) == [] and len(resumed["losses"]) == 6 - steps[-1]
    assert resumed["losses"] == full["losses"][steps[-1]:]  # exactly equal
    assert resumed["rewards"] == full["rewards"][steps[-1]:]
    assert_same_params(full["checkpoint_dir"], cut_dir, 6)
