"""SFT: conversation rendering and best-fit packing with loss masks (jaxchat.sft_data), the identity conversations,
and a tiny base -> SFT run on CPU (train.sft) whose checkpoint the engine loads."""

import json
import os

import jax
import numpy as np
import pytest

from jaxchat.sft_data import SFTLoader, SFTPacker, best_fit_index, rows_to_batch
from jaxchat.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDENTITY = os.path.join(REPO, "configs", "identity_conversations.jsonl")
WORDS = ["apple", "banana", "strawberry", "cherry", "grape", "orange", "lemon", "melon", "peach", "plum", "kiwi",
         "mango", "papaya", "lime", "fig"]


@pytest.fixture(scope="module")
def tok():
    with open(IDENTITY, encoding="utf-8") as f:
        texts = [line for line in f] * 2
    texts += ["Spell the word: " + w + " " + w + ":" + ",".join(w) for w in WORDS * 5]
    texts += ["What is 3 + 4? Let me compute 3+4 with python. #### 7"] * 5
    return Tokenizer.train_from_iterator(texts, 300)


def tool_conversation():
    return {"messages": [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute "},
            {"type": "python", "text": "3+4"},
            {"type": "python_output", "text": "7"},
            {"type": "text", "text": " so #### 7"},
        ]},
    ]}


def simple_conversation(word: str, repeat: int = 1):
    return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                         {"role": "assistant", "content": (word + ":" + ",".join(word)) * repeat}]}


# ----------------------------------------------------------------------------------------------------------------
# rendering and masks


def test_mask_covers_exactly_assistant_tokens_including_python_calls(tok):
    conv = tool_conversation()
    ids, mask = tok.render_conversation(conv)
    sp = tok.encode_special
    expected_ids, expected_mask = [tok.get_bos_token_id()], [0]

    def add(t, m):
        t = [t] if isinstance(t, int) else t
        expected_ids.extend(t)
        expected_mask.extend([m] * len(t))

    add(sp("<|user_start|>"), 0); add(tok.encode("What is 3 + 4?"), 0); add(sp("<|user_end|>"), 0)
    add(sp("<|assistant_start|>"), 0); add(tok.encode("Let me compute "), 1)
    add(sp("<|python_start|>"), 1); add(tok.encode("3+4"), 1); add(sp("<|python_end|>"), 1)
    add(sp("<|output_start|>"), 0); add(tok.encode("7"), 0); add(sp("<|output_end|>"), 0)
    add(tok.encode(" so #### 7"), 1); add(sp("<|assistant_end|>"), 1)
    assert ids == expected_ids and mask == expected_mask

    # packed into a row, the trained targets are exactly the masked tokens, shifted by one
    packer = SFTPacker([conv], tok, batch_size=1, max_seq_len=len(ids) + 5)
    x, y = next(packer)
    assert x.shape == y.shape == (1, len(ids) + 5) and x.dtype == y.dtype == np.int32
    n = len(ids)
    np.testing.assert_array_equal(x[0, :n], ids)
    trained = y[0] >= 0
    np.testing.assert_array_equal(trained[: n - 1], np.array(mask[1:], bool))
    assert not trained[n - 1:].any()  # the padding after the conversation is never trained
    np.testing.assert_array_equal(y[0, : n - 1][trained[: n - 1]], np.array(ids[1:])[np.array(mask[1:], bool)])
    # the tool output tokens are inputs but never targets
    out_start = ids.index(tok.encode_special("<|output_start|>"))
    assert (y[0, out_start - 1: out_start + 2] == -1).all()


def test_rows_to_batch():
    rows = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    masks = np.array([[0, 1, 0, 1], [0, 0, 0, 0]])
    x, y = rows_to_batch(rows, masks)
    np.testing.assert_array_equal(x, [[1, 2, 3], [5, 6, 7]])
    np.testing.assert_array_equal(y, [[2, -1, 4], [-1, -1, -1]])


def test_best_fit_index():
    assert best_fit_index([5, 9, 3, 9, 12], 10) == 1  # longest that fits, first of equals
    assert best_fit_index([5, 9, 3], 4) == 2
    assert best_fit_index([5, 9], 4) == -1
    assert best_fit_index([], 4) == -1


# ----------------------------------------------------------------------------------------------------------------
# packing


def _segments(row: np.ndarray, bos: int) -> list[list[int]]:
    """Split a packed row at BOS tokens."""
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[a:b].tolist() for a, b in zip(starts, starts[1:] + [len(row)])]


def test_packing_is_best_fit_whole_conversations(tok):
    convs = [simple_conversation(w, r) for w in WORDS for r in (1, 2, 3)]
    rendered = [tok.render_conversation(c)[0] for c in convs]
    lengths = sorted(len(r) for r in rendered)
    T = lengths[-1] + lengths[0] + 3  # room for the longest plus a short one
    packer = SFTPacker(convs, tok, batch_size=4, max_seq_len=T, buffer_size=8)
    bos = tok.get_bos_token_id()
    whole = {tuple(r) for r in rendered}
    for _ in range(6):
        rows, masks = packer.next_rows()
        assert rows.shape == masks.shape == (4, T + 1)
        for row, mask in zip(rows, masks):
            assert row[0] == bos  # every row starts at a conversation boundary
            segs = _segments(row, bos)
            content = [s for s in segs if len(s) > 1 or tuple(s) in whole]
            pad = sum(len(s) for s in segs) - sum(len(s) for s in content)
            for s in content:  # each conversation appears whole, never split across rows
                assert tuple(s) in whole
            if pad:  # padding is trailing BOS tokens with mask 0
                assert (row[-pad:] == bos).all() and (mask[-pad:] == 0).all()
    assert packer.cropped == 0
    assert 0 < packer.padded_tokens < packer.tokens


def test_best_fit_takes_longest_that_fits(tok):
    convs = [simple_conversation("fig"), simple_conversation("strawberry", 3), simple_conversation("kiwi", 2)]
    lens = [len(tok.render_conversation(c)[0]) for c in convs]
    cap = lens[1] + lens[0]  # the long one first, then only the shortest still fits
    packer = SFTPacker(convs, tok, batch_size=1, max_seq_len=cap - 1, buffer_size=3)
    rows, _ = packer.next_rows()
    segs = _segments(rows[0], tok.get_bos_token_id())
    assert [len(s) for s in segs] == [lens[1], lens[0]]


def test_too_long_conversations_are_cropped_and_counted(tok):
    long_conv = simple_conversation("strawberry", 20)
    ids, mask = tok.render_conversation(long_conv)
    T = 40
    assert len(ids) > T + 1
    packer = SFTPacker([long_conv, simple_conversation("fig")], tok, batch_size=2, max_seq_len=T)
    rows, masks = packer.next_rows()
    assert packer.cropped == 1
    assert rows[0].tolist() == ids[: T + 1] and masks[0].tolist() == mask[: T + 1]


def test_epoch_end_and_num_iterations(tok):
    convs = [simple_conversation(w) for w in WORDS[:6]]
    packer = SFTPacker(convs, tok, batch_size=1, max_seq_len=64, buffer_size=2)
    steps = 0
    while not packer.last_step:
        next(packer)
        steps += 1
        assert steps < 50
    assert packer.consumed >= len(convs) and packer.approx_progress >= 1.0
    limited = SFTPacker(convs, tok, batch_size=1, max_seq_len=64, num_iterations=2)
    next(limited)
    assert not limited.last_step and limited.approx_progress == 0.5
    next(limited)
    assert limited.last_step


def test_ranks_read_disjoint_conversations(tok):
    convs = [simple_conversation(w) for w in WORDS[:8]]
    loader = SFTLoader(convs, tok, device_batch_size=1, max_seq_len=200, ranks=[0, 1], world_size=2, buffer_size=2)
    x, y = next(loader)
    assert x.shape == y.shape == (2, 200)
    bos = tok.get_bos_token_id()
    firsts = [tuple(_segments(np.concatenate([row, [bos]]), bos)[0]) for row in x]
    rendered = [tuple(tok.render_conversation(c)[0]) for c in convs]
    # rank r reads r, r + 2, ...: with a buffer of 2, rank 0 holds {0, 2}, rank 1 holds {1, 3}
    assert firsts[0] in {rendered[0], rendered[2]} and firsts[1] in {rendered[1], rendered[3]}


def test_packer_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="empty"):
        SFTPacker([], tok, 1, 16)
    with pytest.raises(ValueError, match="rank"):
        SFTPacker([simple_conversation("fig")], tok, 1, 16, rank=2, world_size=2)


def test_identity_conversations_file():
    from evals.tasks.customjson import CustomJSON

    task = CustomJSON(IDENTITY)
    assert 50 <= len(task) <= 100
    text = json.dumps([task[i] for i in range(len(task))]).lower()
    for fact in ("jaxchat", "nanochat", "jax", "internet", "mistake", "calculator"):
        assert fact in text


# ----------------------------------------------------------------------------------------------------------------
# end to end: base checkpoint -> SFT -> engine


def make_base(tmp_path, tok, seq_len=256):
    """A random-init tiny base model + tokenizer in $JAXCHAT_BASE_DIR (as pretraining would leave them)."""
    from jaxchat import model as gpt
    from jaxchat.checkpoint import save_checkpoint
    from jaxchat.common import get_base_dir

    base = get_base_dir()
    tok.save(os.path.join(base, "tokenizer"))
    config = gpt.GPTConfig(sequence_len=seq_len, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                           n_embd=64)
    params = gpt.init_params(config, jax.random.PRNGKey(0))
    save_checkpoint(os.path.join(base, "base_checkpoints", "d2"), 7, params, config,
                    {"max_seq_len": seq_len, "device_batch_size": 1, "total_batch_size": 8 * seq_len,
                     "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.004, "matrix_lr": 0.02}})
    words = tmp_path / "words.txt"
    words.write_text("\n".join(WORDS) + "\n")
    return config, str(words)


def test_sft_end_to_end(tmp_path, monkeypatch, tok):
    from jaxchat.checkpoint import load_model_from
    from jaxchat.engine import Engine
    from train import sft

    config, words = make_base(tmp_path, tok)
    monkeypatch.setenv("JAXCHAT_WORD_LIST", words)
    out = sft.main(["--mixture=identity,simplespelling", "--num-iterations=30", "--eval-every=14",
                    "--eval-tokens=4096", "--chatcore-every=-1", "--simple-spelling-size=600",
                    "--run=test", "--model-tag=d2"])
    hist = out["val_bpb_history"]
    steps = [s for s, _ in hist]
    # val at step 0, every 14 steps, and at the last step (the epoch of this small mixture ends before 30 steps)
    assert steps[:2] == [0, 14] and steps[-1] == out["step"] and 14 < out["step"] <= 29
    bpbs = [b for _, b in hist]
    assert all(np.isfinite(bpbs))
    assert bpbs[-1] < 0.7 * bpbs[0], bpbs  # it learns the spelling format and the identity answers
    # TensorBoard events were written
    runs = os.path.join(os.environ["JAXCHAT_BASE_DIR"], "runs", "chatsft_test")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(runs))

    params, cfg, tokenizer, meta = load_model_from("sft", "d2")
    assert cfg == config and meta["step"] == out["step"] and meta["base_model"]["step"] == 7
    assert meta["user_config"]["mixture"] == "identity,simplespelling"
    prompt = tokenizer.render_for_completion(simple_conversation("kiwi"))
    seqs, masks = Engine(params, cfg, tokenizer).generate_batch(prompt, num_samples=1, max_tokens=8, temperature=0.0)
    assert seqs[0][: len(prompt)] == prompt and len(seqs[0]) > len(prompt)


def test_missing_dataset_is_named(tmp_path, monkeypatch, tok):
    from train import sft

    make_base(tmp_path, tok)
    monkeypatch.setenv("JAXCHAT_WORD_LIST", str(tmp_path / "nope.txt"))
    from jaxchat.common import UserError
    with pytest.raises(UserError, match="simplespelling.*wamerican"):
        sft.main(["--mixture=identity,simplespelling", "--num-iterations=1", "--chatcore-every=-1"])
    with pytest.raises(SystemExit):
        sft.parse_args(["--mixture=identity,bogus"])


def test_sft_killed_mid_run_resumes_exactly(tmp_path, monkeypatch, tok):
    from jaxchat import checkpoint as ckpt
    from tests.test_pretrain import assert_same_params, run_child
    from train import sft

    monkeypatch.setenv("JAXCHAT_WORD_LIST", make_base(tmp_path, tok)[1])
    flags = ["--mixture=identity,simplespelling", "--num-iterations=12", "--eval-every=6", "--eval-tokens=2048",
             "--chatcore-every=-1", "--simple-spelling-size=300", "--model-tag=d2", "--save-every=3"]
    full = sft.main(flags + ["--output-tag=full"])
    out, rc = run_child("train.sft", flags + ["--output-tag=cut"], r"^Saved checkpoint step 3 ", 9)
    cut_dir = ckpt.checkpoint_dir("sft", "cut")
    steps = ckpt.list_steps(cut_dir)
    assert rc == -9 and 3 <= steps[-1] < full["step"], (rc, steps, out[-2000:])
    resumed = sft.main(flags + ["--output-tag=cut", "--resume-from-step=latest"])
    assert resumed["step"] == full["step"] and sorted(resumed["losses"]) == list(range(steps[-1], full["step"]))
    assert all(resumed["losses"][s] == full["losses"][s] for s in resumed["losses"])  # exactly equal
    assert resumed["val_bpb"][full["step"]] == full["val_bpb"][full["step"]]
    assert_same_params(full["checkpoint_dir"], cut_dir, full["step"])
