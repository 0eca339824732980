"""A 2-process pretraining run (jax.distributed on localhost, 4 CPU devices each) equals the 1-process 8-device run."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxchat import checkpoint as ckpt
from train import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# depth 3, not 2: at depth 2 the backout layer is the last one, so backout_lambda's gradient is pure rounding noise
# (the final RMSNorm cancels it) that AdamW (eps 1e-10) turns into +-lr steps, which no two reduction orders share.
TINY = ["--data=synthetic", "--depth=3", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--vocab-size=256",
        "--device-batch-size=2", "--total-batch-size=1024", "--warmup-steps=2", "--eval-tokens=512",
        "--core-metric-every=-1", "--sample-every=-1", "--num-iterations=3", "--eval-every=3", "--save-every=2",
        "--muon-dtype=float32"]  # bf16 Polar Express would turn 1e-7 reduction-order differences into bf16 ulps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(run_dir)
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.slow
def test_two_processes_equal_one_process():
    if jax.device_count() != 8:
        pytest.skip("needs the suite's 8 simulated CPU devices for the 1-process reference")
    base = os.environ["JAXCHAT_BASE_DIR"]
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   JAXCHAT_DTYPE="float32", JAXCHAT_BASE_DIR=base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-m", "train.pretrain", *TINY, "--model-tag=mp", "--run=mp"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # the 1-process reference runs meanwhile, in this process
    ref = pretrain.main(TINY + ["--model-tag=ref", "--run=ref"])
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "Devices: 8 x cpu (2 process(es))" in outs[0]
    assert "step 00002/00003" in outs[0] and "step 00002" not in outs[1]  # only process 0 prints

    losses = _scalars(os.path.join(base, "runs", "mp"), "train/raw_loss")
    np.testing.assert_allclose([losses[s] for s in range(3)], [ref["losses"][s] for s in range(3)], rtol=1e-5)
    bpb = _scalars(os.path.join(base, "runs", "mp"), "val/bpb")
    np.testing.assert_allclose([bpb[0], bpb[3]], [ref["val_bpb"][0], ref["val_bpb"][3]], rtol=1e-5)

    mp_dir = os.path.join(base, "base_checkpoints", "mp")
    assert ckpt.list_steps(mp_dir) == [2, 3]
    _, params_mp, meta_mp = ckpt.load_model(mp_dir, 3)
    _, params_ref, _ = ckpt.load_model(ref["checkpoint_dir"], 3)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params_mp)[0], jax.tree.leaves(params_ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=str(path))
    # each process's data-loader state is in the checkpoint (for exact resume)
    loader = ckpt.restore_checkpoint(mp_dir, 2, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params_ref)))["loader"]
    assert loader["process_states"] == [{"batches": 4}, {"batches": 4}]
