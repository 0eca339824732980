"""evals/eval.ipynb runs top to bottom on a tiny CPU setup, and its helpers (evals/notebook_helpers.py) work.

The setup, all in the test's $JAXCHAT_BASE_DIR: a BPE tokenizer trained here, a random-init 2-layer model saved with
save_model into base_checkpoints/d2/, parquet shards from jaxchat.dataset.write_shards, tensorboardX scalars in
runs/tiny, and the fixture CORE bundle and ARC file from tests/fixtures/evals. The notebook's numbers are checked
against independent computations: bpb against the uniform-prediction value (a fresh model's logits are ~0), CORE
against evaluate_core run in this process.
"""

import math
import os
import random
import re

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from evals import notebook_helpers as nh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "evals", "eval.ipynb")
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "evals")
BUNDLE = os.path.join(FIXTURES, "eval_bundle")
ARC_FILE = os.path.join(FIXTURES, "datasets", "arc.jsonl")
MAX_PER_TASK = 3  # fewer than the fixture ARC file's 4 problems, so the cap shows

WORDS = ("the cat sat on a mat while rain fell over quiet hills and small birds sang about science water heat "
         "plants absorb carbon dioxide spiders have eight legs the sun is a star ice melts when warm").split()


def _docs(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "." for _ in range(n)]


def _outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _make_setup(monkeypatch, shards: bool = True, scalars: bool = True) -> dict:
    """Tokenizer and model checkpoint (always), shards and scalars (optional) in $JAXCHAT_BASE_DIR; notebook env."""
    import jax
    from tensorboardX import SummaryWriter

    from jaxchat.checkpoint import save_model
    from jaxchat.dataset import write_shards
    from jaxchat.model import GPTConfig, init_params
    from jaxchat.tokenizer import Tokenizer

    base = os.environ["JAXCHAT_BASE_DIR"]
    docs = _docs(160, seed=0)
    tok = Tokenizer.train_from_iterator(docs, vocab_size=300)
    tok.save(os.path.join(base, "tokenizer"))
    if shards:
        write_shards(docs, os.path.join(base, "base_data"), shard_chars=6000, row_group_docs=16, val_chars=3000)

    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    params = init_params(config, jax.random.PRNGKey(0))
    save_model(os.path.join(base, "base_checkpoints", "d2"), 7, params, config, {"val_bpb": 9.9})

    if scalars:
        writer = SummaryWriter(logdir=os.path.join(base, "runs", "tiny"))
        for s in range(20):
            writer.add_scalar("train/loss", 5.0 - 0.1 * s, s)
            writer.add_scalar("train/mfu", 1.0 + 0.01 * s, s)
            if s % 5 == 4:
                writer.add_scalar("val/bpb", 3.0 - 0.05 * s, s)
        writer.close()

    env = {"SOURCE": "base", "MODEL_TAG": "none", "STEP": "7", "RUN": "tiny", "EVAL_BUNDLE": BUNDLE,
           "MAX_PER_TASK": str(MAX_PER_TASK), "BPB_TOKENS": "4096", "DEVICE_BATCH_SIZE": "1",
           "CHAT_TASK": "ARC-Easy", "CHAT_DATA": ARC_FILE}
    for k, v in env.items():
        monkeypatch.setenv(nh.ENV_PREFIX + k, v)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return {"tok": tok, "config": config, "params": params}


def _run_notebook() -> list:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # run from evals/, where a user opening the notebook in Jupyter would be
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "evals")}})
    client.execute()  # raises CellExecutionError naming the failing cell
    return [c for c in nb.cells if c.cell_type == "code"]


def _cell_with(cells, needle: str):
    hits = [c for c in cells if needle in c.source]
    assert len(hits) == 1, f"expected one code cell containing {needle!r}, found {len(hits)}"
    return hits[0]


def test_notebook_runs_end_to_end(monkeypatch):
    tiny_setup = _make_setup(monkeypatch)
    cells = _run_notebook()
    for c in cells:
        errors = [o for o in c.outputs if o["output_type"] == "error"]
        assert not errors, f"cell raised: {errors}"

    # checkpoint: the requested step of the only tag
    load = _outputs_text(_cell_with(cells, "load_model_from("))
    assert "Loaded base/d2 step 7" in load

    # bits per byte: a fresh model predicts ~uniformly (lm_head std 0.001, logits ~0), so each counted target costs
    # log2(V) bits and bpb = log2(V) * counted targets / their bytes, over the same val batches the notebook reads
    # (8 devices x DEVICE_BATCH_SIZE 1 rows of T = 64, BPB_TOKENS 4096 -> 8 steps)
    bpb_text = _outputs_text(_cell_with(cells, "evaluate_bpb("))
    assert "Skipping" not in bpb_text
    val_bpb = float(re.search(r"val bpb: ([0-9.]+)", bpb_text).group(1))
    tok = tiny_setup["tok"]
    from jaxchat.dataloader import make_pretrain_loader
    loader = make_pretrain_loader(tok, 8, 64, "val")
    targets = np.concatenate([next(loader)[1] for _ in range(8)])
    nbytes = tok.token_bytes()[targets]
    expected = math.log2(tok.get_vocab_size()) * np.count_nonzero(nbytes) / nbytes.sum()
    assert val_bpb == pytest.approx(expected, rel=1e-3)

    # CORE: the markdown table with every fixture task, and the same CORE as evaluate_core computed here
    core_text = _outputs_text(_cell_with(cells, "evaluate_core("))
    assert "| Task | Accuracy | Centered |" in core_text
    for label in ("tiny_mc", "tiny_mc_balanced", "tiny_schema", "tiny_lm"):
        assert re.search(rf"\| {label} \| [01]\.\d{{4}} \| -?\d+\.\d{{4}} \|", core_text), label
    nb_core = float(re.search(r"\| \*\*CORE\*\* \| - \| (-?[0-9.]+) \|", core_text).group(1))
    from evals.core import CoreScorer, evaluate_core
    ref = evaluate_core(CoreScorer(params=tiny_setup["params"], config=tiny_setup["config"],
                                   pad_id=tok.get_bos_token_id()), tok, BUNDLE, max_per_task=MAX_PER_TASK)
    assert nb_core == pytest.approx(ref["core_metric"], abs=1e-4)

    # chat task: ARC-Easy over the fixture's problems
    chat_text = _outputs_text(_cell_with(cells, "run_chat_eval("))
    m = re.search(r"ARC-Easy \(categorical\): accuracy ([0-9.]+)", chat_text)
    assert m and 0.0 <= float(m.group(1)) <= 1.0
    assert f"/{MAX_PER_TASK} (" in chat_text  # "Final: k/4 (...)": MAX_PER_TASK problems

    # plots: the training curves (from the tensorboardX events) and the scores
    curves = _cell_with(cells, "read_scalars(")
    assert "train/loss" in _outputs_text(curves) and "val/bpb" in _outputs_text(curves)
    assert _images(curves) == 1
    assert _images(_cell_with(cells, "plot_scores(")) == 1

    # summary table
    summary = _outputs_text(_cell_with(cells, 'markdown_table(["metric", "value"]'))
    assert "| metric | value |" in summary
    assert f"| val bpb | {val_bpb:.4f} |" in summary
    assert "| val/bpb (training log) | 2.0500 |" in summary  # last logged: 3.0 - 0.05 * 19
    assert re.search(r"\| ARC-Easy accuracy \| [01]\.\d{4} \|", summary)


def test_notebook_skips_what_is_missing(monkeypatch):
    """No shards, no TensorBoard run, no eval bundle, no chat task: each step says why it is skipped, no error."""
    _make_setup(monkeypatch, shards=False, scalars=False)
    monkeypatch.setenv("JAXCHAT_NB_RUN", "none")
    monkeypatch.setenv("JAXCHAT_NB_EVAL_BUNDLE", os.path.join(os.environ["JAXCHAT_BASE_DIR"], "no_bundle.zip"))
    monkeypatch.setenv("JAXCHAT_NB_CHAT_TASK", "none")
    cells = _run_notebook()
    assert "Skipping bits per byte: no pretraining shards" in _outputs_text(_cell_with(cells, "evaluate_bpb("))
    assert "Skipping CORE: no eval bundle" in _outputs_text(_cell_with(cells, "evaluate_core("))
    assert "Chat task skipped" in _outputs_text(_cell_with(cells, "run_chat_eval("))
    curves = _cell_with(cells, "read_scalars(")
    assert "No TensorBoard run" in _outputs_text(curves) and _images(curves) == 0
    assert "No scores to plot" in _outputs_text(_cell_with(cells, "plot_scores("))
    summary = _outputs_text(_cell_with(cells, 'markdown_table(["metric", "value"]'))
    assert "| model | base/d2 step 7 |" in summary and "| val bpb | - |" in summary


def test_committed_notebook_is_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be the tagged parameters cell"
    assert any(c.cell_type == "markdown" for c in nb.cells[:2])
    assert nb.metadata["kernelspec"]["name"] == "python3"


# ---------------------------------------------------------------------------------------------------- helpers

def test_env_param(monkeypatch):
    monkeypatch.delenv("JAXCHAT_NB_STEP", raising=False)
    assert nh.env_param("STEP", 3, int) == 3
    monkeypatch.setenv("JAXCHAT_NB_STEP", "12")
    assert nh.env_param("step", None, int) == 12
    monkeypatch.setenv("JAXCHAT_NB_STEP", "None")
    assert nh.env_param("STEP", 3, int) is None
    monkeypatch.setenv("JAXCHAT_NB_STEP", "twelve")
    with pytest.raises(ValueError, match="JAXCHAT_NB_STEP"):
        nh.env_param("STEP", 3, int)


def test_find_run_dir_and_read_scalars(tmp_path):
    from tensorboardX import SummaryWriter

    runs = tmp_path / "runs"
    assert nh.find_run_dir(str(tmp_path)) is None
    for name in ("d4", "chatsft_d4"):
        w = SummaryWriter(logdir=str(runs / name))
        w.add_scalar("train/loss", 2.0, 0)
        w.add_scalar("train/loss", 1.5, 1)
        w.add_scalar("train/loss", 1.25, 1)  # a resumed run logging step 1 again: the later value wins
        w.close()
    assert nh.find_run_dir(str(tmp_path), "base") == str(runs / "d4")
    assert nh.find_run_dir(str(tmp_path), "sft") == str(runs / "chatsft_d4")
    assert nh.find_run_dir(str(tmp_path), "sft", "d4") == str(runs / "chatsft_d4")
    assert nh.find_run_dir(str(tmp_path), "rl") is None
    assert nh.find_run_dir(str(tmp_path), "base", "nope") is None
    steps, values = nh.read_scalars(str(runs / "d4"))["train/loss"]
    np.testing.assert_array_equal(steps, [0, 1])
    np.testing.assert_allclose(values, [2.0, 1.25])
    with pytest.raises(FileNotFoundError, match="nope"):
        nh.read_scalars(str(runs / "nope"))


def test_markdown_table_and_pick_tags():
    table = nh.markdown_table(["k", "v"], [("a", 0.5), ("b", None), ("c", 3)])
    assert table.splitlines() == ["| k | v |", "|---|---|", "| a | 0.5000 |", "| b | - |", "| c | 3 |"]
    assert nh.pick_tags(["zeta", "val/bpb", "train/loss", "alpha"], max_plots=3) == ["train/loss", "val/bpb", "alpha"]


def test_make_chat_task_from_local_file():
    task = nh.make_chat_task("ARC-Easy", ARC_FILE)
    assert task.eval_type == "categorical" and len(task) == sum(1 for line in open(ARC_FILE) if line.strip())
    with pytest.raises(ValueError, match="unknown task"):
        nh.make_chat_task("Nope", ARC_FILE)
    with pytest.raises(FileNotFoundError):
        nh.make_chat_task("ARC-Easy", os.path.join(FIXTURES, "missing.jsonl"))
