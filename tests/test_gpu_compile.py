"""The GPU path, compiled for described H100s without a GPU (jaxchat.gpu_compile), and its CPU-checkable parts.

The compile tests need the CUDA plugin (`pip install -e '.[gpu]'` in a second virtualenv, run with
JAX_PLATFORMS=cpu; .ci/run does it) and skip, saying so, without it. Each compile of a d20/d24 step takes about
a minute on 2 cores, so every report is compiled once per module and shared by the asserts.
The FP8 / remat / embedding-dtype tests at the end run on CPU everywhere.
"""

import functools
import json
import math
import os
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import backend
from jaxchat import gpu_compile as gc
from jaxchat import model as gpt
from jaxchat import sharding as shd
from jaxchat import trainer as T
from jaxchat.plan import depth_config

PLUGIN_MISSING = gc.cuda_plugin_missing()
needs_plugin = pytest.mark.skipif(PLUGIN_MISSING is not None, reason=f"GPU compile tests: {PLUGIN_MISSING}")
SPEEDRUN_DEVICE_BATCH = 16  # nanochat's speedrun --device-batch-size on 8xH100


SMALL = gpt.GPTConfig(sequence_len=512, vocab_size=8192, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)


@pytest.fixture(scope="module")
def gpu_env():
    """The platform's own dtype choices: the suite's JAXCHAT_DTYPE=float32 would turn bf16 and cuDNN off."""
    saved = os.environ.pop("JAXCHAT_DTYPE", None)
    yield
    if saved is not None:
        os.environ["JAXCHAT_DTYPE"] = saved


@functools.lru_cache(maxsize=None)
def _train_report(config: gpt.GPTConfig, spec: str, batch: int, fp8: bool = False) -> dict:
    """The trainer's step (one micro-batch, pretraining's defaults otherwise) compiled for `spec`."""
    mesh, target = gc.mesh_for(spec)
    with backend.use(mesh):  # build_step activates the described GPUs; the CPU tests below must not inherit them
        step = T.build_step(config, mesh, device_batch_size=batch, seq_len=config.sequence_len, grad_accum=1,
                            lrs={}, loss_fn=T.step_loss_fn(fp8))
    return gc.compile_report(step.fn, step.abstract_args, target, batch,
                             label=f"test d{config.n_layer}{' fp8' if fp8 else ''}")


@pytest.fixture(scope="module")
def reports(gpu_env):
    return _train_report


def _expected_windows(config: gpt.GPTConfig) -> list[int]:
    """cuDNN's sliding_window_length counts the diagonal (left window + 1); a layer whose window covers the
    sequence is plain causal (no window: 0 in the report)."""
    T = config.sequence_len
    return sorted({w + 1 if w < T - 1 else 0 for w in config.window_sizes})


# ----------------------------------------------------------------------------------------------------------------
# Compiled for H100s


@needs_plugin
@pytest.mark.parametrize("depth,spec", [(20, "h100:1x8"), (24, "h100:1x8"), (24, "h100:2x8")])
def test_speedrun_steps_fit_at_device_batch_16(reports, depth, spec):
    r = reports(depth_config(depth), spec, SPEEDRUN_DEVICE_BATCH)
    assert r["hosts"] * r["gpus_per_host"] == (16 if spec.endswith("2x8") else 8)
    assert r["fits"] and not r["remat_by_xla"], r["memory_gib"]
    assert r["memory_gib"]["peak"] <= r["device_memory_gib"] * gc.XLA_MEMORY_LIMIT_FRACTION
    assert r["memory_gib"]["temporaries"] > r["memory_gib"]["arguments"] > 0  # a real step, activations dominate
    assert r["collectives"], "a data-parallel step must all-reduce / reduce-scatter its gradients"


@needs_plugin
def test_cudnn_flash_attention_forward_and_backward_with_the_window_pattern(reports):
    config = depth_config(20)
    a = reports(config, "h100:1x8", SPEEDRUN_DEVICE_BATCH)["attention"]
    assert a["cudnn_fwd"] >= config.n_layer and a["cudnn_bwd"] >= config.n_layer, a
    assert a["window_lengths_fwd"] == _expected_windows(config) == a["window_lengths_bwd"], a
    assert _expected_windows(config) == [0, 513]  # SSSL at 2048: short layers see 512 keys back, long ones all


@needs_plugin
def test_bf16_step_has_no_f32_gemm_in_the_blocks(reports):
    r = reports(depth_config(20), "h100:1x8", SPEEDRUN_DEVICE_BATCH)
    assert r["block_gemms"]["f32"] == 0 and r["block_gemms"]["fp8"] == 0, r["block_gemms"]
    # forward (6 linears) and backward (2 GEMMs each) per layer, some fused by XLA
    assert r["block_gemms"]["bf16"] >= 6 * 20, r["block_gemms"]


@needs_plugin
def test_fp8_blocks_gemms_take_fp8_operands(reports):
    r = reports(SMALL, "h100:1x8", 4, True)
    b = r["block_gemms"]
    # 6 linears x (forward + 2 backward GEMMs) per layer in FP8; only the value-embedding gates (12 -> n_kv_head,
    # too small for FP8 as in nanochat's filter) stay bf16: 3 GEMMs on each layer with a value embedding.
    n_ve = sum(SMALL.has_ve(i) for i in range(SMALL.n_layer))
    assert b["fp8"] >= 3 * 6 * SMALL.n_layer, b
    assert b["bf16"] <= 3 * n_ve and b["f32"] == 0, b
    assert reports(SMALL, "h100:1x8", 4)["block_gemms"]["fp8"] == 0


@needs_plugin
def test_optimizer_state_is_sharded_as_gpus_are_added(reports):
    """ZeRO-1: per-device argument bytes fall with the device count (parameters stay replicated)."""
    one, eight = (reports(SMALL, s, 4)["memory_gib"]["arguments"] for s in ("h100:1x1", "h100:1x8"))
    assert eight < one * 0.75, (one, eight)
    d24 = [reports(depth_config(24), s, SPEEDRUN_DEVICE_BATCH)["memory_gib"]["arguments"]
           for s in ("h100:1x8", "h100:2x8")]
    assert d24[1] < d24[0], d24


@needs_plugin
def test_sft_step_compiles_for_one_h100(reports):
    # train.sft's step is the pretraining step (jaxchat.trainer.build_step) with SFT's data and hparams
    sft = reports(SMALL, "h100:1x1", 4)
    assert sft["fits"] and sft["attention"]["cudnn_bwd"] >= SMALL.n_layer


# ----------------------------------------------------------------------------------------------------------------
# The inference engine's programs, compiled by evals.infer_bench --compile-for

BENCH_MODEL = ["--random-init", "--depth=4", "--aspect-ratio=64", "--head-dim=128", "--vocab-size=8192",
               "--max-seq-len=512", "--prompt-len=100", "--decode-tokens=64", "--decode-chunk=8"]  # SMALL
ENTRY_PARAM = re.compile(r"([\w.\-]+):\s*([a-z0-9]+)\[([\d,]*)\]")
MATRIX_MOVE = re.compile(r"= (?:f32|bf16)\[(\d+),(\d+)\]\{[\d,]*\} (?:transpose|copy)\(")
GREEDY_ARGMAX = re.compile(r"\(f32\[(\d+)\]\{0\}, s32\[\1\]\{0\}\) reduce\(.*op_name=\"jit\(_decode\)/while/body/reduce\"")


@pytest.fixture(scope="module")
def bench_compile(gpu_env, tmp_path_factory):
    """(spec, batch) -> evals.infer_bench --compile-for=spec of SMALL at one batch size: (its JSON line, {program:
    (jitted, abstract_args)} as compile_report received them, the --hlo-out prefix); each compiled once."""
    from evals import infer_bench

    @functools.lru_cache(maxsize=None)
    def run(spec: str, batch: int) -> tuple[dict, dict, str]:
        hlo = str(tmp_path_factory.mktemp("engine") / "engine.hlo")
        with mock.patch.object(gc, "compile_report", wraps=gc.compile_report) as spy:
            out = infer_bench.main(BENCH_MODEL + [f"--batch-sizes={batch}", f"--compile-for={spec}",
                                                  f"--hlo-out={hlo}"])
        return out, {c.kwargs["label"]: c.args[:2] for c in spy.call_args_list}, hlo
    return run


def _entry_params(hlo: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{parameter name: (dtype, shape)} of an optimized HLO module's ENTRY computation."""
    line = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    return {n: (t, tuple(int(d) for d in dims.split(",") if d)) for n, t, dims in ENTRY_PARAM.findall(line)}


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@needs_plugin
def test_infer_bench_compiles_the_engines_own_programs_for_one_h100(bench_compile):
    from jaxchat.engine import MAX_TOP_K, engine_programs

    out, compiled, hlo = bench_compile("h100:1x1", 32)
    # the bench's engine: 512 positions per slot (cache_bucket(512)); prefill at the bench prompt's bucket (100 ->
    # 128) and at the longest prompt a slot admits (511 -> 512); insert, the whole-cache decode chunk (both its
    # variants) and the scoring of 32 longest prompts at batch 32
    assert list(compiled) == list(out["programs"]) == ["prefill_t128", "prefill_t512", "insert_b32", "decode_b32",
                                                       "decode_logprobs_b32", "score_b32"]
    mesh = gc.topology_mesh(gc.parse_target("h100:1x1"))
    own = engine_programs(SMALL, mesh, 32, 512, prompt_len=511, decode_chunk=8)
    for name in ("insert", "decode", "score"):
        assert compiled[f"{name}_b32"][0] is own[name][0], name
    wide = engine_programs(SMALL, mesh, 32, 512, prompt_len=511, decode_chunk=8, kmax=MAX_TOP_K, logprobs=True)
    assert compiled["decode_logprobs_b32"][0] is wide["decode"][0] is not own["decode"][0]
    assert compiled["score_b32"][1][1].shape == (32, 512)
    assert compiled["prefill_t512"][0] is own["prefill"][0]
    assert compiled["prefill_t128"][1][1].shape == (1, 128) and compiled["prefill_t512"][1][1].shape == (1, 512)
    assert out["fits"] and out["max_len"] == 512 and out["model_config"] == SMALL.to_dict()
    for name, r in out["programs"].items():
        assert r["fits"] and r["memory_gib"]["peak"] > 0 and os.path.getsize(f"{hlo}.{name}") > 0, name
    dec = out["programs"]["decode_b32"]
    # the report's arguments are the decode's inputs: the weights as stored and the 32 slots' state, bf16 cache
    params, state, ctl = compiled["decode_b32"][1]
    assert len(state["cache"]["k"]) == SMALL.n_layer
    assert all(k.dtype == jnp.bfloat16 and k.shape == (32 * 2, 512, 128) for k in state["cache"]["k"])
    # the report rounds to 1e-3 GiB; XLA pads each of the ~100 buffers to at most 256 bytes (2.4e-5 GiB in all)
    assert dec["memory_gib"]["arguments"] == pytest.approx(_nbytes((params, state, ctl)) / gc.GIB, abs=1e-3)
    assert dec["memory_gib"]["aliased"] >= _nbytes(state["cache"]) / gc.GIB - 1e-3  # the donated state, in place
    assert dec["gemms"]["bf16"] > 0 and dec["gemms"]["f32"] == 0, dec["gemms"]
    assert dec["collectives"] == {}


@needs_plugin
def test_engine_on_described_gpus_takes_the_gpu_choices_in_its_hlo(bench_compile):
    """jaxchat.backend decides from the mesh's devices: bf16 cache and GEMMs, the weights in the layout stored (not
    the CPU decode's (in, out) copy, `swap_matrices`) but in bfloat16 (`decode_weights`: no float32 read and convert
    per step), one variadic argmax reduce (not two reductions)."""
    _, compiled, hlo = bench_compile("h100:1x1", 32)
    text = open(f"{hlo}.decode_b32").read()
    entry = _entry_params(text)
    C = SMALL.n_embd
    fc = [v for k, v in entry.items() if "mlp____c_fc" in k]
    assert fc and all(shape == (4 * C, C) and dtype == "bf16" for dtype, shape in fc), fc  # (out, in) as stored
    assert compiled["decode_b32"][1][0]["h"][0]["mlp"]["c_fc"].shape == (4 * C, C)
    decode_weights = compiled["decode_b32"][1][0]
    assert {x.dtype for x in jax.tree.leaves([decode_weights["lm_head"], decode_weights["h"]]) if x.ndim == 2} == {
        jnp.dtype(jnp.bfloat16)}
    assert not re.search(rf"= bf16\[{4 * C},{C}\]\{{[\d,]*\}} convert\(", text)  # no per-step cast of a weight
    assert {v for k, v in entry.items() if "cache____k" in k or "cache____v" in k} == {("bf16", (32 * 2, 512, 128))}
    matrices = {tuple(x.shape) for x in jax.tree.leaves(gpt.param_shapes(SMALL)) if x.ndim == 2}
    moved = [m.group(0) for m in MATRIX_MOVE.finditer(text)
             if (int(m.group(1)), int(m.group(2))) in matrices | {s[::-1] for s in matrices}]
    assert moved == [], moved  # no transposed or relaid-out copy of a weight matrix
    assert 'op_name="jit(_decode)/while/body/reduce_min"' not in text  # the CPU's two-reduction argmax
    assert GREEDY_ARGMAX.search(text), "the greedy token is one (value, index) reduce"


@needs_plugin
def test_engine_slots_split_over_eight_h100s(bench_compile):
    one, _, _ = bench_compile("h100:1x1", 32)
    eight, compiled, _ = bench_compile("h100:1x8", 32)
    state = compiled["decode_b32"][1][1]
    assert all(k.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp")) for k in state["cache"]["k"])
    assert eight["gpus_per_host"] == 8 and eight["fits"]
    # per GPU: the weights (replicated) and an eighth of the 32 slots' cache
    cache = _nbytes(state["cache"]) / gc.GIB
    args = [r["programs"]["decode_b32"]["memory_gib"]["arguments"] for r in (one, eight)]
    assert args[0] - args[1] == pytest.approx(cache * 7 / 8, rel=0.05), (args, cache)


@needs_plugin
def test_target_parsing_and_errors(tmp_path):
    t = gc.parse_target("h200:2x4")
    assert (t.name, t.hosts, t.gpus_per_host, t.num_devices) == ("h200", 2, 4, 8)
    assert t.device_memory_bytes > gc.parse_target("h100:1x1").device_memory_bytes
    for bad in ("h100:2", "b300:1x8", "h100:0x8"):
        with pytest.raises(gc.UserError, match="--compile-for"):
            gc.parse_target(bad)


def test_suggestion_names_a_batch_that_fits_by_the_linear_estimate():
    r = {"device_batch_size": 32, "device_memory_gib": 79.1,
         "memory_gib": {"arguments": 4.6, "outputs": 4.6, "aliased": 4.6, "temporaries": 97.0, "peak": 101.6},
         "fits": False, "target": "h100"}
    with pytest.raises(gc.UserError, match=r"--device-batch-size=16 should fit"):
        gc.check_fits(r)


def test_hlo_analysis_reads_operand_dtypes_and_scopes():
    text = """ENTRY %main (p0: bf16[8,16], p1: f8e4m3fn[16,16]) -> f32[8,16] {
  %a = f8e4m3fn[8,16]{1,0} convert(%p0)
  %d = f32[8,16]{1,0} dot(%a, %p1), lhs_contracting_dims={1}, metadata={op_name="jit(f)/jvp(block)/dot_general"}
  %e = (f32[8,16]{1,0}, s8[4]{0}) custom-call(%p0, %p0), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/head"}
  %s = bf16[8] custom-call(%p0), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"sliding_window_length":513}
  %r = f32[8,16]{1,0} all-reduce-start(%d), channel_id=1
  %q = f32[8,16]{1,0} all-reduce-done(%r)
}"""
    h = gc.analyze_hlo(text)
    assert h["gemms"]["fp8"] == 1 and h["gemms"]["bf16"] == 1 and h["block_gemms"]["fp8"] == 1
    assert h["block_gemms"]["bf16"] == 0
    assert h["attention"]["cudnn_fwd"] == 1 and h["attention"]["window_lengths_fwd"] == [513]
    assert h["collectives"] == {"all-reduce": 1}


@needs_plugin
def test_pretrain_compile_for_prints_the_table_and_one_json_line_and_writes_the_hlo(gpu_env, tmp_path, capsys):
    from train import pretrain

    hlo = tmp_path / "step.hlo"
    with backend.use("cpu"):  # undo the entry point's activation of the described GPUs afterwards
        out = pretrain.main(["--depth=4", "--aspect-ratio=64", "--head-dim=128", "--max-seq-len=512",
                             "--vocab-size=8192", "--device-batch-size=4", "--total-batch-size=32768",
                             "--num-iterations=10", "--compile-for=h100:1x8", f"--hlo-out={hlo}"])
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == json.loads(json.dumps(out)) and report["plan"]["grad_accum_steps"] == 2
    assert (report["target"], report["gpus_per_host"], report["device_batch_size"]) == ("h100", 8, 4)
    assert report["fits"] and report["attention"]["cudnn_bwd"] >= 4 and report["collectives"]
    assert any(line.startswith("peak per GPU (GiB)") and line.endswith(": fits") for line in lines)
    assert any(line.startswith("grad accumulation") for line in lines)  # jaxchat.plan's table comes first
    assert "__cudnn$fmha" in hlo.read_text()


# ----------------------------------------------------------------------------------------------------------------
# The entry points compile the very step they run: this machine's CPU devices stand in for the described GPUs


@pytest.fixture
def cpu_compile_for(monkeypatch):
    """`--compile-for=anything` on the CPU devices: mesh_for gives their mesh and a Target of `memory['bytes']`
    per device; every program compiled is recorded as (jitted, abstract_args)."""
    real_mesh_for, real_compile = gc.mesh_for, gc.compile_report
    memory, compiled = {"bytes": 64 * gc.GIB}, []

    def mesh_for(spec, fsdp=1):
        if not spec:
            return real_mesh_for(spec, fsdp)
        text = f'device_memory_size: {memory["bytes"]}\ndevice_description_str: "cpu"'
        return shd.make_mesh(fsdp), gc.Target("cpu", 1, jax.device_count(), text)

    def compile_report(jitted, abstract_args, *args, **kwargs):
        compiled.append((jitted, abstract_args))
        return real_compile(jitted, abstract_args, *args, **kwargs)

    monkeypatch.setattr(gc, "mesh_for", mesh_for)
    monkeypatch.setattr(gc, "compile_report", compile_report)
    with backend.use(backend.platform()):  # the entry point activates its mesh; undo it afterwards
        yield memory, compiled


def _batch_shape(abstract_args) -> tuple:
    return abstract_args[2]["inputs"].shape


def test_pretrain_compile_for_compiles_the_step_the_run_builds(cpu_compile_for, capsys):
    from train import pretrain

    _, compiled = cpu_compile_for
    argv = ["--depth=2", "--max-seq-len=64", "--vocab-size=256", "--device-batch-size=1", "--total-batch-size=1024",
            "--num-iterations=1", "--fp8", "--compile-for=cpu"]
    out = pretrain.main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["plan"] == out["plan"]
    args = pretrain.parse_args(argv)
    step = pretrain.build(args, pretrain.make_plan(args, 256, jax.device_count()), shd.make_mesh(1), 1)
    (jitted, abstract_args), = compiled
    assert jitted is step.fn  # build_step's cache: the same flags on the same mesh give the same program
    assert _batch_shape(abstract_args) == _batch_shape(step.abstract_args) == (2, jax.device_count(), 64)


def test_auto_device_batch_stays_within_one_micro_batch_of_the_total_batch(cpu_compile_for, capsys):
    """--device-batch-size=auto never picks more rows than the total batch holds (here 1024 tokens = 2 rows of 64
    per device on 8 devices, whatever the memory allows): it starts below 16 and does not double past 2."""
    from train import pretrain

    _, compiled = cpu_compile_for
    out = pretrain.main(["--depth=2", "--max-seq-len=64", "--vocab-size=256", "--device-batch-size=auto",
                         "--total-batch-size=1024", "--num-iterations=1", "--compile-for=cpu"])
    rows = 1024 // (64 * jax.device_count())
    assert out["device_batch_size"] == rows and out["plan"]["grad_accum_steps"] == 1
    assert f"--device-batch-size=auto: {rows} " in capsys.readouterr().out
    assert [_batch_shape(a) for _, a in compiled] == [(1, rows * jax.device_count(), 64)]


def test_sft_compile_for_without_a_checkpoint_compiles_the_inherited_step(cpu_compile_for, capsys):
    from train import sft

    _, compiled = cpu_compile_for
    argv = ["--depth=2", "--max-seq-len=64", "--total-batch-size=16384", "--compile-for=cpu"]
    out = sft.main(argv)
    assert out["program"] == "SFT step" and out["model_config"] == depth_config(2).to_dict()
    assert out["device_batch_size"] == gc.SPEEDRUN_DEVICE_BATCH  # nanochat's speedrun stands in for the checkpoint
    args = sft.parse_args(argv + [f"--device-batch-size={gc.SPEEDRUN_DEVICE_BATCH}"])
    sft.inherit(args, {})
    step = sft.build(args, depth_config(2), shd.make_mesh(1), gc.SPEEDRUN_DEVICE_BATCH)
    (jitted, abstract_args), = compiled
    assert jitted is step.fn
    rows = gc.SPEEDRUN_DEVICE_BATCH * jax.device_count()
    assert _batch_shape(abstract_args) == _batch_shape(step.abstract_args) == (16384 // (rows * 64), rows, 64)
    with pytest.raises(gc.UserError, match="--total-batch-size=1000 is not a multiple"):
        sft.main(argv[:-2] + ["--total-batch-size=1000", "--device-batch-size=1", "--compile-for=cpu"])
    assert len(compiled) == 1  # bad flags fail before compiling


def test_rl_compile_for_that_does_not_fit_exits_with_a_suggestion(cpu_compile_for, capsys):
    from train import rl

    memory, compiled = cpu_compile_for
    memory["bytes"] = 2 ** 20
    argv = ["--depth=2", "--device-batch-size=2", "--num-samples=4", "--examples-per-step=8", "--compile-for=cpu"]
    with pytest.raises(gc.UserError, match=r"at --device-batch-size=2 the step needs .* GiB per GPU"):
        rl.main(argv)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["program"] == "RL step" and not report["fits"]
    step = rl.build(rl.parse_args(argv), depth_config(2), shd.make_mesh(1))
    (jitted, abstract_args), = compiled
    assert jitted is step.fn and "weights" in abstract_args[2]
    # 8 questions x 4 samples over rows of 2 per device: ceil(32 / (2 x devices)) micro-batches
    assert _batch_shape(abstract_args) == (-(-32 // (2 * jax.device_count())), 2 * jax.device_count(), 2048)


def test_infer_bench_lowers_the_programs_an_engine_runs_on_the_cpu_mesh(cpu_compile_for, capsys, tmp_path):
    from evals import infer_bench
    from jaxchat.engine import MAX_TOP_K, SMALL_TOP_K, Engine, _program

    _, compiled = cpu_compile_for
    n = jax.device_count()
    argv = ["--random-init", "--depth=1", "--aspect-ratio=32", "--head-dim=32", "--vocab-size=256", "--max-seq-len=64",
            "--window-pattern=L", "--prompt-len=8", "--decode-tokens=6", "--decode-chunk=2", "--compile-for=cpu"]
    with pytest.raises(gc.UserError, match=rf"each batch size must be a multiple of {n} \(not 1\)"):
        infer_bench.main(argv + [f"--batch-sizes=1,{n}"])
    assert compiled == []  # bad flags fail before compiling
    out = infer_bench.main(argv + [f"--batch-sizes={n}", f"--hlo-out={tmp_path / 'e.hlo'}"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(out))
    names = ["prefill_t16", "prefill_t64", f"insert_b{n}", f"decode_b{n}", f"decode_logprobs_b{n}",
             f"score_b{n}"]  # cache_bucket(64) = 64 positions
    assert list(out["programs"]) == names and all((tmp_path / f"e.hlo.{k}").stat().st_size for k in names)
    config = infer_bench.random_init_config(infer_bench.parse_args(argv))
    engine = Engine(gpt.init_params(config, jax.random.key(0)), config, max_batch=n, max_len=64, decode_chunk=2,
                    devices=jax.devices())  # the bench's engine of n slots, on the same devices
    runs = [_program(engine.spec, "prefill")] * 2 + [_program(engine.spec, "insert"),
                                                      _program(engine.spec, "decode", None, SMALL_TOP_K, False),
                                                      _program(engine.spec, "decode", None, MAX_TOP_K, True),
                                                      _program(engine.spec, "score")]
    assert len(compiled) == 6 and all(fn is run for (fn, _), run in zip(compiled, runs))
    params, state, _ = compiled[3][1]
    assert all(k.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp")) for k in state["cache"]["k"])
    # the CPU choices, from the mesh's devices: the decode reads the (in, out) copy of the weights, float32 cache
    assert params["h"][0]["mlp"]["c_fc"].shape == (config.n_embd, 4 * config.n_embd)
    assert all(k.dtype == jnp.float32 for k in state["cache"]["k"])
    assert 'op_name="jit(_decode)/while/body/reduce_min"' in (tmp_path / f"e.hlo.decode_b{n}").read_text()
    engine.close()


# ----------------------------------------------------------------------------------------------------------------
# FP8, remat and the embedding dtype, on CPU

TINY = gpt.GPTConfig(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=128)


def _dense_params(config, seed=0):
    """Init params with the zero-initialised projections and the tiny head drawn like c_q, so every block matrix
    gets a gradient and the loss depends on them."""
    params = gpt.init_params(config, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 4 * config.n_layer + 1))
    s = math.sqrt(3.0 / config.n_embd)
    fill = lambda x: jax.random.uniform(next(keys), x.shape, jnp.float32, -s, s)  # noqa: E731
    for block in params["h"]:
        block["attn"]["c_proj"], block["mlp"]["c_proj"] = fill(block["attn"]["c_proj"]), fill(block["mlp"]["c_proj"])
    params["lm_head"] = fill(params["lm_head"])
    return params


def _loss_and_grads(params, config, **kw):
    idx = jax.random.randint(jax.random.key(3), (2, config.sequence_len + 1), 0, config.vocab_size)
    f = jax.jit(jax.value_and_grad(lambda p: gpt.loss_fn(p, config, idx[:, :-1], idx[:, 1:], **kw)))
    return f(params)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_fp8_step_matches_the_bf16_step_within_fp8_rounding(monkeypatch):
    """One d4 step's loss and block gradients with --fp8 against bf16 (both in bfloat16 compute).

    Tolerance: every FP8 GEMM rounds its operands once, relative error <= u = 2^-(mantissa bits + 1):
    u(e4m3) = 2^-4, u(e5m2) = 2^-3. A backward GEMM multiplies an e5m2 gradient by an e4m3 operand, whose own
    forward input was e4m3: first-order bound u(e5m2) + 2 u(e4m3) = 0.25 on the gradients; the loss goes through
    one forward GEMM per linear: 2 u(e4m3) = 0.125 relative. Random rounding errors average out far below both;
    a wrong scale or a transposed gradient is off by O(1).
    """
    monkeypatch.setenv("JAXCHAT_DTYPE", "bfloat16")
    params = _dense_params(TINY)
    loss_bf16, g_bf16 = _loss_and_grads(params, TINY)
    loss_fp8, g_fp8 = _loss_and_grads(params, TINY, fp8=True)
    assert abs(float(loss_fp8) - float(loss_bf16)) <= 0.125 * float(loss_bf16)
    for i in range(TINY.n_layer):
        for part, name in (("attn", "c_q"), ("attn", "c_v"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            got, want = g_fp8["h"][i][part][name], g_bf16["h"][i][part][name]
            assert got.dtype == jnp.float32 and _rel(got, want) <= 0.25, (i, name, _rel(got, want))
    assert _rel(g_fp8["wte"], g_bf16["wte"]) <= 0.25


@pytest.mark.parametrize("remat", ["dots", "block"])
def test_remat_policies_change_memory_not_numbers(remat):
    """float32 on CPU: recomputation repeats the same operations, so loss and gradients agree to a few ulps
    (XLA may fuse the recomputed ops differently): 64 * eps(float32) relative."""
    params = _dense_params(TINY)
    loss, grads = _loss_and_grads(params, TINY)
    loss_r, grads_r = _loss_and_grads(params, TINY, remat=remat)
    tol = 64 * float(jnp.finfo(jnp.float32).eps)
    assert abs(float(loss_r) - float(loss)) <= tol * abs(float(loss))
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
        assert _rel(a, b) <= tol * 16  # a sum over up to ~B*T products per element
    with pytest.raises(ValueError, match="--remat"):
        gpt.loss_fn(params, TINY, jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32), remat="all")


def test_embeddings_are_stored_in_bf16_on_gpu_only(monkeypatch):
    monkeypatch.delenv("JAXCHAT_DTYPE", raising=False)
    cpu = gpt.param_shapes(TINY)
    assert cpu["wte"].dtype == jnp.float32
    with backend.use("gpu"):
        shapes = gpt.param_shapes(TINY)
        params = jax.eval_shape(lambda k: gpt.init_params(TINY, k), jax.random.key(0))
    for tree in (shapes, params):
        assert tree["wte"].dtype == jnp.bfloat16
        assert all(v.dtype == jnp.bfloat16 for v in tree["value_embeds"].values())
        assert tree["lm_head"].dtype == jnp.float32 and tree["h"][0]["attn"]["c_q"].dtype == jnp.float32
    monkeypatch.setenv("JAXCHAT_DTYPE", "float32")
    with backend.use("gpu"):
        assert gpt.param_shapes(TINY)["wte"].dtype == jnp.float32  # float32 compute keeps float32 tables
