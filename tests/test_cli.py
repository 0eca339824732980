"""Entry points a user runs: a mistake is one line on stderr and exit status 2 (traceback only under
JAXCHAT_DEBUG=1), library INFO logs stay off, and `serve.cli -p` prints only the answer.

Each case runs the real `python -m <module>` in a subprocess over a tiny checkpoint saved with jaxchat.checkpoint.
"""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base dir with a trained tokenizer and one tiny random checkpoint under base/ and sft/ (tag d1, step 3)."""
    import jax

    from jaxchat.checkpoint import save_model
    from jaxchat.model import GPTConfig, init_params
    from jaxchat.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("cli_base")
    tok = Tokenizer.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. " * 20], 300)
    tok.save(str(base / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=32, window_pattern="L")
    params = init_params(config, jax.random.PRNGKey(0))
    for source in ("base_checkpoints", "chatsft_checkpoints"):
        save_model(str(base / source / "d1"), 3, params, config)
    return base


def run(module, *args, base_dir, debug=False):
    env = {k: v for k, v in os.environ.items() if k != "JAXCHAT_DEBUG"}
    env.update(JAXCHAT_BASE_DIR=str(base_dir), PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]),
               JAXCHAT_NO_REEXEC="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    if debug:
        env["JAXCHAT_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(r, *needles):
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_one_shot_prints_only_the_answer_and_no_library_logs(base):
    r = run("serve.cli", "-i", "sft", "-p", "hello", "-m", "4", "-t", "0", base_dir=base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "quit" not in r.stdout and "---" not in r.stdout and "Assistant:" not in r.stdout, r.stdout
    assert len(r.stdout.splitlines()) == 1, r.stdout  # the reply (maybe empty), then a newline
    assert r.stderr == "", r.stderr[-3000:]  # no orbax/absl INFO chatter from the checkpoint load


def test_library_info_logs_are_quiet_after_run_cli(base, monkeypatch, capfd):
    """A logging set-up at INFO (as serve.app's) plus a real checkpoint load: orbax's absl INFO lines (60 of them
    here without `quiet_library_logs`) stay off; jaxchat's own INFO lines still show."""
    import logging

    from jaxchat.checkpoint import load_model
    from jaxchat.common import run_cli

    def main():
        logging.basicConfig(level=logging.INFO, force=True)
        load_model(str(base / "base_checkpoints" / "d1"))
        logging.getLogger("jaxchat.test").info("ours")

    root = logging.getLogger()
    saved = root.level, list(root.handlers), {n: logging.getLogger(n).level for n in ("absl", "orbax")}
    try:
        run_cli(main)
        err = capfd.readouterr().err
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for n, level in saved[2].items():
            logging.getLogger(n).setLevel(level)
    assert err.splitlines() == ["INFO:jaxchat.test:ours"], err[-3000:]


@pytest.mark.parametrize("module,args", [("serve.cli", ["-i", "base", "-p", "hi"]), ("evals.base_eval", []),
                                         ("evals.chat_eval", ["-i", "sft"]), ("evals.tokenizer", ["--no-shards"])])
def test_missing_tokenizer_is_one_line(base, tmp_path, module, args):
    no_tok = tmp_path / "base"  # the checkpoints without the tokenizer
    no_tok.mkdir()
    for d in ("base_checkpoints", "chatsft_checkpoints"):
        os.symlink(base / d, no_tok / d)
    r = run(module, *args, base_dir=no_tok)
    assert_one_line_error(r, f"no tokenizer at {no_tok / 'tokenizer' / 'tokenizer.pkl'}", "python -m train.tokenizer")


def test_debug_shows_the_traceback(tmp_path):
    r = run("serve.cli", "-p", "hi", base_dir=tmp_path, debug=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_corrupt_shard_is_one_line_naming_the_fix(tmp_path):
    data = tmp_path / "base_data"
    data.mkdir()
    (data / "shard_00000.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    pq.write_table(pa.table({"text": ["a val document"]}), str(data / "shard_00001.parquet"))
    r = run("train.tokenizer", "--vocab-size", "300", base_dir=tmp_path)
    assert_one_line_error(r, str(data / "shard_00000.parquet"), "corrupt", "python -m jaxchat.dataset --corpus local "
                          "--force", "delete the file")


def test_dataset_cli_mistakes_are_one_line(tmp_path):
    assert_one_line_error(run("jaxchat.dataset", "--from-text", str(tmp_path / "nope"), base_dir=tmp_path),
                          "--from-text", "nope")
    (tmp_path / "t.txt").write_text("one paragraph\n\nanother paragraph\n\nand a third one\n")
    assert run("jaxchat.dataset", "--from-text", str(tmp_path / "t.txt"), base_dir=tmp_path).returncode == 0
    assert_one_line_error(run("jaxchat.dataset", "--from-text", str(tmp_path / "t.txt"), base_dir=tmp_path),
                          "already holds", "--force")
