"""train.pretrain: nanochat's single-dial plan, exact resume, NaN stop, TensorBoard, and train.bench."""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from jaxchat import checkpoint as ckpt
from jaxchat.common import UserError
from train import bench, pretrain

# A tiny model on synthetic tokens: d2, n_embd 64, seq 32, vocab 256; 2 rows x 32 tokens x 8 devices = 512 tokens
# per micro-step, so a total batch of 1024 tokens means 2 gradient-accumulation steps.
TINY = ["--data=synthetic", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--vocab-size=256",
        "--device-batch-size=2", "--total-batch-size=1024", "--warmup-steps=2", "--eval-tokens=512",
        "--core-metric-every=-1", "--sample-every=-1"]

# nanochat's numbers (vocab 32768, seq 2048, defaults), derived by instantiating nanochat's GPT (commit 5019acc) on
# the meta device and running scripts/base_train.py's arithmetic: n_embd, n_head, total params, FLOPs per token,
# scaling params, auto total batch, iterations, scaled Muon weight decay, LR scale; grad_accum for 8 devices x 32 rows.
NANOCHAT = {
    12: (768, 6, 286261730, 759695904, 110100912, 524288, 2205, 0.28, 1.0, 1),
    20: (1280, 10, 896533746, 2886212640, 435160240, 1048576, 4357, 0.1001877764255601, 2 ** 0.5, 2),
    24: (1536, 12, 1384122122, 4775225472, 729810624, 1048576, 7308, 0.05973842446340308, 2 ** 0.5, 2),
    26: (1664, 13, 1681786938, 5991051144, 918423532, 1048576, 9196, 0.04747018702740847, 2 ** 0.5, 2),
}


def _dry_run(capsys, argv):
    pretrain.main(argv + ["--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("recipe") and not any(line.startswith("{") for line in lines[:-1]), lines
    return json.loads(lines[-1])


@pytest.mark.parametrize("depth", sorted(NANOCHAT))
def test_dry_run_plan_equals_nanochat(capsys, depth):
    n_embd, n_head, total, flops, scaling, batch, iters, wd, lr_scale, accum = NANOCHAT[depth]
    plan = _dry_run(capsys, [f"--depth={depth}", "--vocab-size=32768", "--target-param-data-ratio=10.5"])
    cfg = plan["model_config"]
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["n_layer"]) == (n_embd, n_head, n_head, depth)
    assert (cfg["sequence_len"], cfg["vocab_size"], cfg["window_pattern"]) == (2048, 32768, "SSSL")
    assert plan["param_counts"]["total"] == total
    assert plan["flops_per_token"] == flops
    assert plan["num_scaling_params"] == scaling
    assert plan["target_tokens"] == int(10.5 * scaling)
    assert plan["total_batch_size"] == batch
    assert plan["num_iterations"] == iters and plan["horizon"] == "target_param_data_ratio"
    assert plan["total_tokens"] == batch * iters
    assert plan["weight_decay"] == pytest.approx(wd, rel=1e-12)
    lrs = plan["learning_rates"]
    for name, base in (("matrix_lr", 0.02), ("embedding_lr", 0.3), ("unembedding_lr", 0.008), ("scalar_lr", 0.5)):
        assert lrs[name] == pytest.approx(base * lr_scale, rel=1e-12)
    if jax.device_count() == 8:  # 8 devices x 32 rows x 2048 tokens, as nanochat on one 8-GPU node
        assert plan["grad_accum_steps"] == accum


def test_dry_run_needs_no_tokenizer_and_honours_horizon_flags(capsys):
    plan = _dry_run(capsys, ["--depth=12"])  # no tokenizer in the fresh base dir: vocab 32768
    assert plan["model_config"]["vocab_size"] == 32768
    plan = _dry_run(capsys, ["--depth=12", "--num-iterations=7", "--total-batch-size=1048576"])
    assert (plan["num_iterations"], plan["horizon"], plan["batch_lr_scale"]) == (7, "num_iterations", 2 ** 0.5)
    plan = _dry_run(capsys, ["--depth=12", "--target-flops=1e18"])
    assert plan["num_iterations"] == round(1e18 / (759695904 * 524288))
    plan = _dry_run(capsys, ["--depth=4", "--head-dim=96", "--aspect-ratio=50"])  # 200 -> rounded up to 288
    assert (plan["model_config"]["n_embd"], plan["model_config"]["n_head"]) == (288, 3)
    assert plan["recipe"] == "head" and (plan["muon_eq"], plan["muon_plus"]) == ("row", True)
    plan = _dry_run(capsys, ["--depth=4", "--muon-eq=none", "--no-muon-plus"])
    assert (plan["recipe"], plan["muon_eq"], plan["muon_plus"]) == ("5019acc", "none", False)
    plan = _dry_run(capsys, ["--depth=12", "--total-batch-size=1000"])
    assert plan["grad_accum_steps"] is None and "--total-batch-size=1000 is not a multiple" in plan["error"]
    with pytest.raises(UserError, match="--total-batch-size=1000 is not a multiple"):
        pretrain.main(TINY + ["--total-batch-size=1000"])


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_resume_after_kill_gives_identical_losses_and_tensorboard(tmp_path, capsys):
    base = os.environ["JAXCHAT_BASE_DIR"]
    flags = TINY + ["--num-iterations=6", "--save-every=3", "--eval-every=3"]
    full = pretrain.main(flags + ["--model-tag=a", "--run=a"])
    out = capsys.readouterr().out
    assert "step 00005/00006 (83.33%) | loss:" in out and "Validation bpb" in out
    assert sorted(full["losses"]) == [0, 1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for v in full["losses"].values())
    assert full["losses"][5] < full["losses"][0]
    dir_a = full["checkpoint_dir"]
    assert ckpt.list_steps(dir_a) == [3, 6]

    # TensorBoard events are written and readable.
    runs_a = os.path.join(base, "runs", "a")
    loss_a = _scalars(runs_a, "train/raw_loss")
    assert sorted(loss_a) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose([loss_a[s] for s in range(6)], [full["losses"][s] for s in range(6)], rtol=1e-6)
    assert sorted(_scalars(runs_a, "val/bpb")) == [0, 3, 6]
    assert {"train/loss", "train/lrm", "train/dt", "train/tok_per_sec"} <= set(_tags(runs_a))
    assert "train/mfu" not in _tags(runs_a) and "| mfu: n/a |" in out  # CPU: no known peak FLOP/s, so no MFU

    # A run killed while saving step 6: step 3 is complete, step 6 only an orbax temporary directory.
    dir_b = os.path.join(base, "base_checkpoints", "b")
    shutil.copytree(os.path.join(dir_a, "3"), os.path.join(dir_b, "3"))
    shutil.copytree(os.path.join(dir_a, "6"), os.path.join(dir_b, "6.orbax-checkpoint-tmp-1234567"))
    os.remove(os.path.join(dir_b, "6.orbax-checkpoint-tmp-1234567", "commit_success.txt"))
    assert ckpt.list_steps(dir_b) == [3]
    resumed = pretrain.main(flags + ["--model-tag=b", "--run=b", "--resume-from-step=3"])
    assert sorted(resumed["losses"]) == [3, 4, 5]
    assert all(resumed["losses"][s] == full["losses"][s] for s in (3, 4, 5))  # exactly equal
    assert resumed["val_bpb"][6] == full["val_bpb"][6]
    # the smoothed loss (loop state) resumed too: the logged train/loss curves agree
    smooth_a, smooth_b = _scalars(runs_a, "train/loss"), _scalars(os.path.join(base, "runs", "b"), "train/loss")
    assert all(smooth_b[s] == smooth_a[s] for s in (3, 4, 5))
    assert ckpt.list_steps(dir_b) == [3, 6]
    _, params_a, meta_a = ckpt.load_model(dir_a, 6)
    _, params_b, meta_b = ckpt.load_model(dir_b, 6)
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert meta_b["loop_state"]["min_val_bpb"] == meta_a["loop_state"]["min_val_bpb"]
    assert meta_a["total_batch_size"] == 1024 and meta_a["user_config"]["depth"] == 2


def _tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return acc.Tags()["scalars"]


def test_divergence_keeps_the_last_truly_good_step():
    """--final-lr-frac=1e30: the update of step 7 explodes the weights. Step 8 is a save step whose own training
    loss (step 7's, measured before that update) is still fine: the probe of step 8's weights refuses it."""
    base = os.environ["JAXCHAT_BASE_DIR"]
    flags = TINY + ["--num-iterations=10", "--save-every=4", "--eval-every=-1", "--warmdown-ratio=0.4",
                    "--final-lr-frac=1e30", "--model-tag=nan"]
    with pytest.raises(FloatingPointError, match="step 8 breaks the checkpoint rule.*last good checkpoint is step 4"):
        pretrain.main(flags)
    ckpt_dir = os.path.join(base, "base_checkpoints", "nan")
    assert ckpt.list_steps(ckpt_dir) == [4]
    config, params, meta = ckpt.load_model(ckpt_dir)
    assert config.n_layer == 2 and meta["step"] == 4
    # truly good: the weights are of init scale, not merely finite
    assert max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(params)) < 10
    assert not os.path.exists(os.path.join(base, "runs"))  # --run=dummy (default): no TensorBoard


def test_existing_tag_is_refused_without_resume_or_overwrite():
    flags = TINY + ["--num-iterations=2", "--eval-every=-1", "--model-tag=same"]
    first = pretrain.main(flags)
    with pytest.raises(UserError, match=r"already holds steps \[2\].*--resume-from-step=latest.*--overwrite"):
        pretrain.main(flags)
    again = pretrain.main(flags + ["--overwrite"])
    assert again["losses"] == first["losses"] and ckpt.list_steps(first["checkpoint_dir"]) == [2]
    with pytest.raises(UserError, match=r"--resume-from-step=7: .* has steps \[2\]"):
        pretrain.main(flags + ["--resume-from-step=7"])
    with pytest.raises(UserError, match="differs from the flags.*vocab_size: 256 in the checkpoint, 512 now"):
        pretrain.main([f for f in flags if f != "--vocab-size=256"] + ["--vocab-size=512", "--resume-from-step=latest"])


# ----------------------------------------------------------------------------------------------------------------
# interrupted runs in a child process: kill -9 and SIGTERM, then resume here

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(module: str, argv: list[str], pattern: str, sig: int, prelude: str = "") -> tuple[str, int]:
    """Run `module.main(argv)` in a child process, send `sig` once a stdout line matches `pattern`, and return
    (all output, exit status). `prelude` is Python run first (e.g. a monkeypatch)."""
    import re
    import subprocess
    import sys

    code = f"import sys\n{prelude}\nfrom jaxchat.common import run_cli\nfrom {module} import main\nrun_cli(main, sys.argv[1:])"
    env = dict(os.environ, JAXCHAT_NO_REEXEC="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                proc.send_signal(sig)
                break
        rest = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(lines) + rest, proc.returncode


def assert_same_params(dir_a: str, dir_b: str, step: int) -> None:
    _, pa, _ = ckpt.load_model(dir_a, step)
    _, pb, _ = ckpt.load_model(dir_b, step)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("sig", [9, 15], ids=["kill-9", "SIGTERM"])
def test_interrupted_run_resumes_exactly(sig):
    import signal
    flags = TINY + ["--num-iterations=16", "--save-every=4", "--eval-every=8"]
    full = pretrain.main(flags + ["--model-tag=full"])
    out, rc = run_child("train.pretrain", flags + ["--model-tag=cut"], r"^Saved checkpoint step 4 ", sig)
    cut_dir = os.path.join(os.environ["JAXCHAT_BASE_DIR"], "base_checkpoints", "cut")
    steps = ckpt.list_steps(cut_dir)
    if sig == signal.SIGKILL:
        assert rc == -9 and 4 <= steps[-1] < 16, (rc, steps)
    else:  # saved at the next step boundary, exited cleanly, saying how to resume
        import re
        stopped = re.search(r"Stopped by SIGTERM at step (\d+); resume with --resume-from-step=latest", out)
        assert rc == 0 and stopped, out[-2000:]
        assert int(stopped.group(1)) == steps[-1] >= 4, (stopped.group(0), steps)
    with pytest.raises(UserError, match="already holds steps"):
        pretrain.main(flags + ["--model-tag=cut"])
    resumed = pretrain.main(flags + ["--model-tag=cut", "--resume-from-step=latest"])
    first = steps[-1]
    assert sorted(resumed["losses"]) == list(range(first, 16))
    assert all(resumed["losses"][s] == full["losses"][s] for s in range(first, 16))  # exactly equal
    assert resumed["val_bpb"][16] == full["val_bpb"][16]
    assert_same_params(full["checkpoint_dir"], cut_dir, 16)


def test_bench_prints_one_json_line(capsys):
    out = bench.main(TINY[1:8] + ["--steps=2", "--warmup-steps-bench=1"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == out
    assert line["tok_per_sec"] > 0 and line["step_ms"] > 0 and line["compile_s"] >= 0
    assert line["device_count"] == jax.device_count() and line["device_kind"]
    assert line["total_batch_size"] == 1024 and line["grad_accum_steps"] == 1024 // (2 * 32 * jax.device_count())
    assert math.isfinite(line["loss"])


WORDS = ("the cat dog sat on mat and ran to a big red house with small green tree under blue sky while bird sang "
         "song of old river near hill where people walk every morning before sun rise").split()


def test_real_data_path_tokenizer_shards_sampling_and_exact_resume(capsys):
    """--data=shards: the real tokenizer, parquet shards and BOS best-fit loader; bpb, samples, exact resume."""
    from jaxchat.dataset import write_shards
    from jaxchat.tokenizer import Tokenizer

    base = os.environ["JAXCHAT_BASE_DIR"]
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))).capitalize() + "." for _ in range(400)]
    write_shards(docs, os.path.join(base, "base_data"), shard_chars=40_000, row_group_docs=16)
    Tokenizer.train_from_iterator(docs, vocab_size=300).save(os.path.join(base, "tokenizer"))

    flags = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--device-batch-size=2",
             "--total-batch-size=512", "--warmup-steps=1", "--eval-tokens=512", "--core-metric-every=4",
             "--num-iterations=4", "--eval-every=2", "--save-every=2"]
    full = pretrain.main(flags + ["--sample-every=4", "--model-tag=real"])
    out = capsys.readouterr().out
    assert full["plan"]["model_config"]["vocab_size"] == 300
    assert all(math.isfinite(v) for v in full["val_bpb"].values()) and len(full["val_bpb"]) == 3
    assert "The capital of France is" in out  # the sampled continuation of nanochat's first prompt
    assert "CORE metric skipped: no eval bundle" in out
    meta = ckpt.load_meta(full["checkpoint_dir"], 2)
    assert meta["val_bpb"] == full["val_bpb"][2]
    resumed = pretrain.main(flags + ["--sample-every=-1", "--model-tag=real", "--resume-from-step=2"])
    assert resumed["losses"] == {s: full["losses"][s] for s in (2, 3)}


def test_hugepage_reexec_decides_when_to_restart(monkeypatch):
    import sys
    from jaxchat import common
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(common, "hugepage_malloc_applies", lambda: True)  # whatever this machine is
    monkeypatch.delenv("JAXCHAT_NO_REEXEC", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # already set: no restart
    common.reexec_with_hugepage_malloc()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")
    monkeypatch.setenv("JAXCHAT_NO_REEXEC", "1")  # opted out
    common.reexec_with_hugepage_malloc()
    assert calls == []
    monkeypatch.delenv("JAXCHAT_NO_REEXEC")
    common.reexec_with_hugepage_malloc()
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"
    monkeypatch.setattr(common, "hugepage_malloc_applies", lambda: False)  # old glibc, THP never/always, not Linux
    common.reexec_with_hugepage_malloc()
    assert len(calls) == 1


def test_hugepage_reexec_restarts_with_the_tunable_added():
    import subprocess
    import sys
    from jaxchat.common import hugepage_malloc_applies
    if not hugepage_malloc_applies():
        pytest.skip("re-exec does not apply here: needs Linux, glibc >= 2.35 and THP in madvise mode")
    code = ("import sys; from jaxchat.common import reexec_with_hugepage_malloc as r; r(); "
            "import os; print(os.environ['GLIBC_TUNABLES'], sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != "JAXCHAT_NO_REEXEC"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.check=0"  # kept, the hugetlb tunable appended
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "glibc.malloc.check=0:glibc.malloc.hugetlb=1 ['a', '--b=1']", out.stderr
