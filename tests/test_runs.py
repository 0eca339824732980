"""The run scripts: they parse, and their dry-run modes print the commands with the numbers the depth dial derives."""

import glob
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "runs", "*.sh"))) + [os.path.join(ROOT, ".ci", "run")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True)


def _dry_run(script, tmp_path, **env):
    env = {**os.environ, "DRY_RUN": "1", "JAXCHAT_BASE_DIR": str(tmp_path), "XLA_FLAGS": "", **env}
    out = subprocess.run(["bash", os.path.join(ROOT, "runs", script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_speedrun_dry_run_prints_commands_and_plan(tmp_path):
    out = _dry_run("speedrun.sh", tmp_path)
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert commands[0] == "pip install -e .[gpu]"
    assert "python -m train.tokenizer" in commands
    assert any(c.startswith("python -m train.pretrain --depth=24 --target-param-data-ratio=8") for c in commands)
    assert commands[-1] == "python -m jaxchat.report generate"
    plan = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    # nanochat's d24: n_embd 1536, 12 heads of 128, and a power-of-two total batch
    assert plan["model_config"]["n_embd"] == 1536 and plan["model_config"]["n_head"] == 12
    assert plan["total_batch_size"] & (plan["total_batch_size"] - 1) == 0
    assert plan["num_iterations"] > 0
    assert not os.path.exists(tmp_path / "base_data"), "a dry run must not download anything"


def test_speedrun_other_hosts_skip_host0_steps(tmp_path):
    out = _dry_run("speedrun.sh", tmp_path, JAX_PROCESS_ID="1")
    assert "(host 1 skips: python -m train.tokenizer)" in out
    assert "+ python -m train.pretrain --depth=24" in out


def test_miniseries_dry_run(tmp_path):
    out = _dry_run("miniseries.sh", tmp_path, DEPTHS="10 12")
    assert "+ python -m train.pretrain --depth=10 --model-tag=d10" in out
    plans = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [p["model_config"]["n_layer"] for p in plans] == [10, 12]
