"""Compile jaxchat's GPU programs for GPUs that are not there: `--compile-for=h100:2x8`.

XLA compiles for a described GPU as for a real one. `jax.experimental.topologies.get_topology_desc(..., "cuda",
target_config=<GpuTargetConfig text>, topology="1x{hosts}x{gpus}")` returns H100 (H200, A100) devices spread over
`hosts` processes; a Mesh of them, ShapeDtypeStructs with NamedShardings on it, and `jax.jit(f).lower(...).compile()`
give the optimized HLO and the per-device memory analysis, on a CPU-only machine with the CUDA plugin installed
(`pip install -e .[gpu]`; run with JAX_PLATFORMS=cpu). Nothing runs, no data is read.

An entry point builds its programs once, with the same function, on the mesh `mesh_for` gives it: the real devices,
or with --compile-for the described ones; then it runs them, or compiles them here and reports:

    mesh, target = mesh_for(args.compile_for, args.fsdp)          # target None: the real devices
    step = jaxchat.trainer.build_step(config, mesh, ...)           # (jitted, abstract_args, ...)
    report = compile_report(step.fn, step.abstract_args, target, device_batch_size=16)   # prints, returns a dict

This module holds only that: the described devices (`Target`, `mesh_for`), the compile-and-report step for any
jitted program and its abstract arguments (`compile_report`; `choose_and_compile` + `print_report` for a training
step, `compile_programs` for several: the inference engine's, `jaxchat.engine.engine_programs` via
`evals.infer_bench`), the automatic device batch (`auto_device_batch_size`), and the flags of the compiled programs
(`add_flags`: --compile-for, --hlo-out, --fp8, --remat), with `config_from_checkpoint` (the model without its
weights). The programs themselves are the entry points' own; none is built here. The target configs are text
protos in configs/gpu_targets/<name>.txtpb (each says where its numbers come from). Compiling needs the platform
decisions of the described devices (bfloat16, cuDNN attention, bfloat16 embeddings): `jaxchat.trainer.build_step`
activates its mesh and `compile_report` traces under `jaxchat.backend.use(mesh)`; `jax.default_backend()` stays
"cpu" meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

import jax

from jaxchat import backend
from jaxchat import sharding as shd
from jaxchat.common import UserError

TARGETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "gpu_targets")
GIB = 1024 ** 3
# XLA's GPU compiler schedules and rematerialises against this share of the device memory
# (--xla_gpu_memory_limit_slop_factor, default 95): a program whose peak lies above it had to be squeezed.
XLA_MEMORY_LIMIT_FRACTION = 0.95
SPEEDRUN_DEVICE_BATCH = 16  # nanochat's speedrun device batch on 8xH100
REMAT_LOG = re.compile(r"Can't reduce memory use below|by rematerialization")


# ----------------------------------------------------------------------------------------------------------------
# Targets and their devices


@dataclasses.dataclass(frozen=True)
class Target:
    """A described GPU cluster: `hosts` processes of `gpus_per_host` GPUs of one kind (configs/gpu_targets)."""

    name: str
    hosts: int
    gpus_per_host: int
    config_text: str

    @property
    def num_devices(self) -> int:
        return self.hosts * self.gpus_per_host

    @property
    def device_memory_bytes(self) -> int:
        return int(re.search(r"device_memory_size:\s*(\d+)", self.config_text).group(1))

    @property
    def device_kind(self) -> str:
        m = re.search(r'device_description_str:\s*"([^"]*)"', self.config_text)
        return m.group(1) if m else self.name

    def __str__(self) -> str:
        return f"{self.name}:{self.hosts}x{self.gpus_per_host}"


def available_targets() -> list[str]:
    """Names of the shipped target configs (h100, h200, a100)."""
    if not os.path.isdir(TARGETS_DIR):
        return []
    return sorted(f[: -len(".txtpb")] for f in os.listdir(TARGETS_DIR) if f.endswith(".txtpb"))


def parse_target(spec: str) -> Target:
    """'h100:2x8' -> Target(h100, hosts=2, gpus_per_host=8). 'h100' alone means one host of 8.

    Raises:
        UserError: a malformed spec, or a name with no configs/gpu_targets/<name>.txtpb.
    """
    m = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*(?::\s*(\d+)\s*x\s*(\d+))?\s*", spec or "")
    names = available_targets()
    if not m:
        raise UserError(f"--compile-for={spec!r}: expected TARGET:HOSTSxGPUS, e.g. --compile-for=h100:1x8 "
                        f"(targets: {', '.join(names)})")
    name, hosts, gpus = m.group(1).lower(), int(m.group(2) or 1), int(m.group(3) or 8)
    if name not in names:
        raise UserError(f"--compile-for={spec!r}: no target config {TARGETS_DIR}/{name}.txtpb; "
                        f"use one of {', '.join(names)}")
    if hosts < 1 or gpus < 1:
        raise UserError(f"--compile-for={spec!r}: hosts and GPUs per host must be positive, e.g. h100:2x8")
    with open(os.path.join(TARGETS_DIR, f"{name}.txtpb"), encoding="utf-8") as f:
        text = "\n".join(line for line in f.read().splitlines() if not line.lstrip().startswith("#"))
    return Target(name, hosts, gpus, text)


def cuda_plugin_missing() -> str | None:
    """None when the CUDA plugin is importable; else the reason, with the command that installs it."""
    if importlib.util.find_spec("jax_cuda12_plugin") is None and importlib.util.find_spec("jax_plugins") is None:
        return ("the CUDA plugin (jax_cuda12_plugin) is not installed: pip install -e '.[gpu]' "
                f"(jax[cuda12]=={jax.__version__}), then run with JAX_PLATFORMS=cpu")
    try:
        from jax_plugins import xla_cuda12  # noqa: F401
    except ImportError:
        if importlib.util.find_spec("jax_cuda12_plugin") is None:
            return (f"the CUDA plugin is not installed: pip install 'jax[cuda12]=={jax.__version__}' "
                    "(or pip install -e '.[gpu]')")
    return None


@functools.lru_cache(maxsize=8)
def _topology(name: str, hosts: int, gpus: int, text: str):
    from jax.experimental.topologies import get_topology_desc
    return get_topology_desc(name, "cuda", target_config=text, topology=f"1x{hosts}x{gpus}")


def topology_devices(target: Target) -> list:
    """The described devices of `target` (hosts * gpus_per_host of them, in process order).

    Raises:
        UserError: the CUDA plugin is missing (says how to install it).
    """
    reason = cuda_plugin_missing()
    if reason:
        raise UserError(f"--compile-for={target}: {reason}")
    try:
        topo = _topology(target.name, target.hosts, target.gpus_per_host, target.config_text)
    except Exception as e:  # noqa: BLE001 - the plugin's own message, one line
        raise UserError(f"--compile-for={target}: the CUDA plugin could not describe the devices "
                        f"({str(e).splitlines()[0]}); is jax[cuda12] the same version as jax ({jax.__version__})?")
    return list(topo.devices)


def topology_mesh(target: Target, fsdp: int = 1) -> jax.sharding.Mesh:
    """jaxchat's ('data', 'fsdp') mesh (`jaxchat.sharding.make_mesh`) over the described devices of `target`.

    Raises:
        UserError: the plugin is missing, or fsdp does not divide the device count.
    """
    try:
        return shd.make_mesh(fsdp, topology_devices(target))
    except ValueError as e:
        raise UserError(f"--compile-for={target}: {e}") from None


def mesh_for(compile_for: str | None, fsdp: int = 1) -> tuple[jax.sharding.Mesh, Target | None]:
    """The mesh an entry point builds its programs on, and the Target they are compiled for.

    Args:
        compile_for: the --compile-for spec (`parse_target`), or None for every real device of every process
            (after `jaxchat.common.maybe_init_distributed`). fsdp: --fsdp, the size of the mesh's 'fsdp' axis.
    Returns:
        (mesh, Target) for described GPUs; (mesh, None) for the real devices.
    Raises:
        UserError: a bad spec, the plugin missing, or --fsdp not dividing the device count.
    """
    if compile_for:
        target = parse_target(compile_for)
        return topology_mesh(target, fsdp), target
    try:
        return shd.make_mesh(fsdp), None
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# Compiling, reading the result, the automatic device batch


@contextlib.contextmanager
def _capture_stderr(sink: list):
    """Collect what the C++ side (XLA's logs) writes to file descriptor 2, then echo it to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
            sink.append(text)
            if text.strip():
                sys.stderr.write(text)


def _mesh_of(abstract_args):
    for leaf in jax.tree.leaves(abstract_args):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            return sh.mesh
    raise ValueError("compile_report: no abstract argument carries a NamedSharding (build them on the mesh)")


_GEMM_CALL = re.compile(r"custom_call_target=\"(__cublas\$[^\"]*|__cudnn\$fusion[^\"]*)\"")
_CUDNN_FMHA = re.compile(r"custom_call_target=\"(__cudnn\$fmha[^\"]*)\"")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\(?([a-z0-9]+)\[")  # %name = TYPE[ (tuples: first element)
_CALL = re.compile(r"\b(dot|custom-call)\(([^)]*)\)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%[\w.\-]+\s.*\{\s*$")
_COLLECTIVE = re.compile(r"=\s*\S+\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                         r"collective-broadcast|ragged-all-to-all)(?:-start)?\(")
_COLLECTIVE_TUPLE = re.compile(r"\)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
                               r"collective-broadcast|ragged-all-to-all)(?:-start)?\(")
_WINDOW = re.compile(r"\"sliding_window_length\":\s*\"?(\d+)")
_OP_NAME = re.compile(r"op_name=\"([^\"]*)\"")
_BLOCK_SCOPE = re.compile(r"(^|[/(])block[/)]")


def _gemm_class(types: list[str]) -> str:
    if any(t.startswith("f8") for t in types):
        return "fp8"
    if "f32" in types or "f64" in types:
        return "f32"
    if "bf16" in types:
        return "bf16"
    if "f16" in types:
        return "f16"
    return "other"


def analyze_hlo(text: str) -> dict:
    """What an optimized GPU HLO module computes with (counts of instructions in its text).

    Returns {'attention': {'cudnn_fwd', 'cudnn_bwd': counts of cuDNN flash attention calls, 'window_lengths_fwd',
    'window_lengths_bwd': sorted distinct `sliding_window_length`s (cuDNN counts the diagonal: left window + 1;
    0 = a call without a window)}, 'gemms': {bf16, fp8, f32, f16, other}: dots and cuBLAS/cuDNN GEMM calls by
    their first two operands' dtype (fp8 when either is float8), 'block_gemms': the same for GEMMs whose op_name
    lies in the model's `block` named scope (jaxchat.model._block), 'collectives': {kind: count} (async starts
    counted once)}.
    """
    fwd, bwd, win_f, win_b = 0, 0, set(), set()
    gemms = {k: 0 for k in ("bf16", "fp8", "f32", "f16", "other")}
    block = dict(gemms)
    collectives: dict[str, int] = {}
    types: dict[str, str] = {}  # instruction name -> element type, within the current computation
    for line in text.splitlines():
        if _COMPUTATION.match(line):
            types = {}
            for name, ty in re.findall(r"([\w.\-]+):\s*\(?([a-z0-9]+)\[", line):  # the computation's parameters
                types[name] = ty
            continue
        d = _DEF.match(line)
        if d:
            types[d.group(1)] = d.group(2)
        m = _CUDNN_FMHA.search(line)
        if m:
            windows = {int(w) for w in _WINDOW.findall(line)} or {0}
            if "Backward" in m.group(1):
                bwd, win_b = bwd + 1, win_b | windows
            else:
                fwd, win_f = fwd + 1, win_f | windows
            continue
        c = _COLLECTIVE.search(line) or _COLLECTIVE_TUPLE.search(line)
        if c:
            collectives[c.group(1)] = collectives.get(c.group(1), 0) + 1
            continue
        call = _CALL.search(line)
        if not call or (call.group(1) == "custom-call" and not _GEMM_CALL.search(line)):
            continue
        operands = [o.strip().lstrip("%") for o in call.group(2).split(",")][:2]
        inline = re.findall(r"\b([a-z0-9]+)\[", call.group(2))  # older printers put the types inline
        kind = _gemm_class(inline[:2] or [types.get(o.split()[-1].lstrip("%"), "?") for o in operands])
        gemms[kind] += 1
        op = _OP_NAME.search(line)
        if op and _BLOCK_SCOPE.search(op.group(1)):
            block[kind] += 1
    return {"attention": {"cudnn_fwd": fwd, "cudnn_bwd": bwd, "window_lengths_fwd": sorted(win_f),
                          "window_lengths_bwd": sorted(win_b)},
            "gemms": gemms, "block_gemms": block, "collectives": dict(sorted(collectives.items()))}


def compile_report(jitted, abstract_args, target: Target, device_batch_size: int | None = None,
                   hlo_out: str | None = None, *, label: str = "", verbose: bool = True) -> dict:
    """Compile `jitted` for `target` and describe the result (per device).

    Args:
        jitted: a `jax.jit` function. abstract_args: its positional arguments as ShapeDtypeStructs with
            NamedShardings on a mesh of `target`'s devices (`topology_mesh`); it is traced under `backend.use` of
            that mesh, so the GPU branches of the model are taken.
        device_batch_size: recorded in the report. hlo_out: write the optimized HLO text there.
        label: a name for the human report; verbose: print it (process 0's stdout).
    Returns:
        a JSON-able dict: target, hosts, gpus_per_host, device_kind, device_memory_gib, device_batch_size,
        memory_gib {arguments, temporaries, outputs, aliased, peak}, fits (peak within XLA's memory limit),
        remat_by_xla (XLA logged "Can't reduce memory use below ... by rematerialization" while compiling: it
        had to rematerialise and still missed its target; a silent successful rematerialisation cannot be told),
        attention, gemms, block_gemms, collectives (`analyze_hlo`), compile_seconds.
    """
    mesh = _mesh_of(abstract_args)
    logs: list[str] = []
    t0 = time.perf_counter()
    with backend.use(mesh), _capture_stderr(logs):
        compiled = jitted.lower(*abstract_args).compile()
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    if hlo_out:
        os.makedirs(os.path.dirname(os.path.abspath(hlo_out)), exist_ok=True)
        with open(hlo_out, "w", encoding="utf-8") as f:
            f.write(text)
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
                             for k in ("argument", "output", "alias", "temp"))
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0) or (arg + out - alias + temp)
    limit = target.device_memory_bytes * XLA_MEMORY_LIMIT_FRACTION
    remat = bool(REMAT_LOG.search("".join(logs)))
    report = {
        "target": target.name, "hosts": target.hosts, "gpus_per_host": target.gpus_per_host,
        "device_kind": target.device_kind, "device_memory_gib": round(target.device_memory_bytes / GIB, 2),
        "device_batch_size": device_batch_size,
        "memory_gib": {"arguments": round(arg / GIB, 3), "temporaries": round(temp / GIB, 3),
                       "outputs": round(out / GIB, 3), "aliased": round(alias / GIB, 3), "peak": round(peak / GIB, 3)},
        "fits": bool(peak <= limit), "remat_by_xla": remat,
        **analyze_hlo(text),
        "compile_seconds": round(seconds, 1),
    }
    if verbose and jax.process_index() == 0:
        print(format_report(report, label), flush=True)
    return report


def format_report(r: dict, label: str = "") -> str:
    """A few readable lines of a `compile_report` dict."""
    m, a = r["memory_gib"], r["attention"]
    head = f"{label + ' ' if label else ''}on {r['target']}:{r['hosts']}x{r['gpus_per_host']} ({r['device_kind']})"
    lines = [
        f"compiled {head} in {r['compile_seconds']:.0f} s, device batch {r['device_batch_size']}",
        f"  memory per GPU: {m['peak']:.1f} GiB peak of {r['device_memory_gib']:.1f} GiB ({fit_word(r)}) = arguments "
        f"{m['arguments']:.1f} + temporaries {m['temporaries']:.1f} + outputs {m['outputs']:.1f} - aliased "
        f"{m['aliased']:.1f}",
        f"  attention: cuDNN flash fwd x{a['cudnn_fwd']} (windows {a['window_lengths_fwd']}), bwd x{a['cudnn_bwd']}"
        f" (windows {a['window_lengths_bwd']})",
        "  GEMMs by operand dtype: " + ", ".join(f"{k} {v}" for k, v in r["gemms"].items() if v)
        + " | in the blocks: " + (", ".join(f"{k} {v}" for k, v in r["block_gemms"].items() if v) or "none"),
        "  collectives: " + (", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none"),
    ]
    return "\n".join(lines)


def fits_cleanly(report: dict) -> bool:
    """The step fits device memory without XLA having to rematerialise."""
    return bool(report["fits"]) and not report["remat_by_xla"]


def fit_word(report: dict) -> str:
    """'fits', 'fits after XLA rematerialisation' or 'DOES NOT FIT' (a table's verdict on a compile report)."""
    return "fits" if fits_cleanly(report) else "fits after XLA rematerialisation" if report["fits"] else "DOES NOT FIT"


def auto_search(build: Callable[[int], tuple], target: Target | None = None, start: int = SPEEDRUN_DEVICE_BATCH,
                largest: int = 256, verbose: bool = True) -> tuple[int, dict]:
    """`auto_device_batch_size` returning (device batch size, its compile_report dict)."""
    tried: dict[int, dict] = {}

    def attempt(b: int) -> dict:
        nonlocal target
        jitted, args = build(b)[:2]
        target = target or local_target(_mesh_of(args))
        tried[b] = compile_report(jitted, args, target, b, label=f"device batch {b}", verbose=verbose)
        return tried[b]

    b = start
    while b > max(1, largest):
        b //= 2
    if fits_cleanly(attempt(b)):
        while b * 2 <= largest and fits_cleanly(attempt(b * 2)):
            b *= 2
        return b, tried[b]
    while b > 1:
        b //= 2
        if fits_cleanly(attempt(b)):
            return b, tried[b]
    need = tried[1]["memory_gib"]["peak"]
    raise UserError(f"--device-batch-size=auto: not even a device batch of 1 fits {target} ({need:.1f} GiB per GPU "
                    f"of {target.device_memory_bytes / GIB:.1f}); try --remat=block, more GPUs (ZeRO shards the "
                    f"optimizer state) or a smaller --depth")


def auto_device_batch_size(build: Callable[[int], tuple], target: Target | None = None,
                           start: int = SPEEDRUN_DEVICE_BATCH, largest: int = 256, verbose: bool = True) -> int:
    """The largest power of two device batch whose compiled step fits `target` without XLA's rematerialisation.

    Args:
        build: device_batch_size -> (jitted, abstract_args, ...) (a `jaxchat.trainer.Step` is one) on a mesh of
            `target`'s devices, or of real GPUs with target=None (then their memory_stats() give the limit:
            --device-batch-size=auto at start-up).
        start: the first size tried; sizes double while they fit and halve while they do not.
        largest: the largest size allowed (the entry point's: one micro-batch of its total batch at most).
    Returns:
        the device batch size.
    Raises:
        UserError: not even a device batch of 1 fits (names --remat and more GPUs as the ways out), or target is
            None and the mesh is not on GPUs.
    """
    return auto_search(build, target, start, largest, verbose)[0]


def local_target(mesh) -> Target:
    """A Target for the real GPUs of `mesh` (their memory from `memory_stats()`), for --device-batch-size=auto at
    start-up. Raises UserError off GPU."""
    dev = mesh.devices.flat[0]
    if backend.platform_of(mesh) != "gpu":
        raise UserError("--device-batch-size=auto picks the largest batch that fits GPU memory: it needs GPUs, or "
                        "--compile-for=TARGET:HxG to plan for them; on CPU pass a number, e.g. --device-batch-size=8")
    limit = int((dev.memory_stats() or {}).get("bytes_limit", 0))
    text = f'device_memory_size: {limit}\ndevice_description_str: "{dev.device_kind}"'
    return Target(dev.device_kind.lower().replace(" ", "-"), jax.process_count(), jax.local_device_count(), text)


def suggestion(report: dict) -> str:
    """What would probably fit, estimated from one compile: temporaries scale with the device batch, arguments do
    not. For the exact answer, --device-batch-size=auto compiles the candidates."""
    m, b = report["memory_gib"], report["device_batch_size"] or 1
    room = report["device_memory_gib"] * XLA_MEMORY_LIMIT_FRACTION - m["arguments"] - m["outputs"] + m["aliased"]
    per_row = max(m["temporaries"] / b, 1e-9)
    fit = 2 ** int(math.floor(math.log2(room / per_row))) if room > per_row else 0
    if fit >= 1:
        return (f"--device-batch-size={min(fit, b // 2 or 1)} should fit (about {per_row:.2f} GiB of temporaries per "
                f"row), or --remat=dots/block; --device-batch-size=auto finds the largest exactly")
    return "even one row does not fit: try --remat=block, more GPUs (ZeRO shards the optimizer state), a smaller --depth"


def check_fits(report: dict, flag_hint: str = "") -> None:
    """Raise UserError (exit 2 under run_cli) when the compiled step does not fit, saying what would."""
    if report["fits"]:
        return
    m = report["memory_gib"]
    raise UserError(f"{flag_hint}at --device-batch-size={report['device_batch_size']} the step needs "
                    f"{m['peak']:.1f} GiB per GPU, more than {report['device_memory_gib']:.1f} GiB on "
                    f"{report['target']}: {suggestion(report)}")


# ----------------------------------------------------------------------------------------------------------------
# The entry points' side: flags, the model without a checkpoint, the report they print


def int_or_auto(text: str):
    """argparse type of --device-batch-size: a positive int or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def add_flags(parser: argparse.ArgumentParser, *, train: bool = True, depth: bool = False) -> None:
    """The flags of the compiled programs, defined here once for every entry point: --compile-for and --hlo-out;
    for a training step (train) --fp8 and --remat (`jaxchat.trainer.step_loss_fn`); --depth (the model of
    --compile-for when there is no checkpoint) where asked."""
    parser.add_argument("--compile-for", default=None, metavar="TARGET:HOSTSxGPUS",
                        help="compile the program(s) for described GPUs (h100, h200, a100; e.g. h100:2x8) and report "
                             "memory per GPU, kernels and collectives; runs nothing (needs pip install -e '.[gpu]')")
    parser.add_argument("--hlo-out", default=None, metavar="FILE", help="with --compile-for: write the optimized HLO")
    if train:
        parser.add_argument("--fp8", action="store_true",
                            help="FP8 (tensorwise e4m3/e5m2) matmuls in the transformer blocks (H100+)")
        parser.add_argument("--remat", choices=("none", "dots", "block"), default="none",
                            help="activation checkpointing of the blocks: none, dots (keep matmul outputs), block")
    if depth:
        parser.add_argument("--depth", type=int, default=20,
                            help="[--compile-for without a checkpoint] nanochat's model of this depth")


def config_from_checkpoint(source: str, model_tag: str | None, depth: int, step: int | None = None):
    """The model of the `source` checkpoint (newest step, or `step`; meta only, no weights), else nanochat's for
    `depth` (`jaxchat.plan.depth_config`). Returns (GPTConfig, checkpoint meta ({} without one), origin text)."""
    from jaxchat import checkpoint as ckpt
    from jaxchat import model as gpt
    from jaxchat.plan import depth_config
    try:
        meta = ckpt.load_meta(ckpt.checkpoint_dir(source, model_tag), step)
        return gpt.GPTConfig.from_dict(meta["model_config"]), meta, f"{source} checkpoint"
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return depth_config(depth), {}, f"nanochat d{depth} (no {source} checkpoint)"


def choose_and_compile(build: Callable[[int], tuple], target: Target, device_batch_size, hlo_out: str | None = None,
                       label: str = "", largest: int = 256) -> tuple[int, dict]:
    """Compile `build(device_batch_size)` (build and largest as for `auto_device_batch_size`) or, for 'auto', the
    largest power of two that fits `target`; write the chosen program's HLO to hlo_out. Returns (device batch size,
    its `compile_report`)."""
    if device_batch_size == "auto":
        b, report = auto_search(build, target, largest=largest)
        if hlo_out:  # compile the winner once more for its text: auto compiled several candidates
            jitted, args = build(b)[:2]
            report = compile_report(jitted, args, target, b, hlo_out, label=label, verbose=False)
        print(f"--device-batch-size=auto: {b} (the largest power of two that fits {target} without XLA "
              f"rematerialisation)", flush=True)
        return b, report
    jitted, args = build(int(device_batch_size))[:2]
    return int(device_batch_size), compile_report(jitted, args, target, int(device_batch_size), hlo_out, label=label)


def plan_table(rows: list[tuple[str, Any]], report: dict | None = None) -> str:
    """A two-column text table of (name, value) rows, with the memory per GPU of a compile report appended."""
    rows = list(rows)
    if report:
        m = report["memory_gib"]
        rows += [("compiled for", f"{report['target']}:{report['hosts']}x{report['gpus_per_host']} "
                                  f"({report['device_kind']}, {report['device_memory_gib']:.1f} GiB)"),
                 ("device batch size", report["device_batch_size"]),
                 ("memory per GPU (GiB)", f"arguments {m['arguments']:.2f}, temporaries {m['temporaries']:.2f}, "
                                          f"outputs {m['outputs']:.2f}, aliased {m['aliased']:.2f}"),
                 ("peak per GPU (GiB)", f"{m['peak']:.2f} of {report['device_memory_gib']:.1f}: {fit_word(report)}"),
                 ("compile time (s)", report["compile_seconds"])]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else str(v))  # noqa: E731
    return "\n".join(f"{k:<{width}} | {fmt(v)}" for k, v in rows)


def print_report(report: dict, rows: list[tuple[str, Any]], **extra) -> dict:
    """An entry point's --compile-for output: the `plan_table` of rows and the report's memory per GPU, then one
    JSON line {**report, **extra} (process 0). Returns that dict.

    Raises:
        UserError (exit 2 under run_cli): the program does not fit, saying what would (`check_fits`).
    """
    print(plan_table(rows, report), flush=True)
    out = {**report, **extra}
    print_json(out)
    check_fits(report, f"--compile-for={report['target']}:{report['hosts']}x{report['gpus_per_host']}: ")
    return out


def compile_programs(programs: dict[str, tuple], target: Target, hlo_out: str | None = None,
                     rows: list[tuple[str, Any]] = (), **extra) -> dict:
    """--compile-for of several programs (an inference engine's): each compiled for `target` (`compile_report`),
    a table of rows and one row per program (its memory per GPU), then one JSON line.

    Args:
        programs: {name: (jitted, abstract_args) or (jitted, abstract_args, device_batch_size)}, built on a mesh of
            `target`'s devices. hlo_out: each program's optimized HLO goes to `<hlo_out>.<name>`. extra: more
            fields of the JSON line.
    Returns:
        {**extra, target, hosts, gpus_per_host, device_memory_gib, fits, programs: {name: report}} (the JSON line).
    Raises:
        UserError (exit 2 under run_cli): the program with the highest peak does not fit (`check_fits`).
    """
    reports = {}
    for name, (jitted, abstract_args, *batch) in programs.items():
        reports[name] = compile_report(jitted, abstract_args, target, batch[0] if batch else None,
                                       hlo_out and f"{hlo_out}.{name}", label=name)
    some = next(iter(reports.values()))
    rows = list(rows) + [("compiled for", f"{target} ({some['device_kind']}, {some['device_memory_gib']:.1f} GiB)")]
    for name, r in reports.items():
        m = r["memory_gib"]
        rows.append((f"{name} (GiB per GPU)", f"peak {m['peak']:.2f} = arguments {m['arguments']:.2f} + temporaries "
                                              f"{m['temporaries']:.2f} + outputs {m['outputs']:.2f} - aliased "
                                              f"{m['aliased']:.2f}: {fit_word(r)}"))
    print(plan_table(rows), flush=True)
    worst = max(reports.values(), key=lambda r: r["memory_gib"]["peak"])
    out = {**extra, "target": target.name, "hosts": target.hosts, "gpus_per_host": target.gpus_per_host,
           "device_memory_gib": worst["device_memory_gib"], "fits": all(r["fits"] for r in reports.values()),
           "programs": reports}
    print_json(out)
    check_fits(worst, f"--compile-for={target}: ")
    return out


def print_json(report: dict) -> None:
    """The report as the last stdout line (one JSON document), on process 0."""
    if jax.process_index() == 0:
        print(json.dumps(report), flush=True)
