"""lm-evaluation-harness 0.4.13 (a dev dependency) against the real server: `create_app` over a tiny random Engine
on `serve.wsgi.Server`, lm-eval's own `simple_evaluate` on the shipped tasks (tests/lm_eval_tasks) through
`local-completions` (its remote tokenizer: /tokenizer_info, /tokenize; loglikelihoods from /v1/completions echo +
logprobs; generate_until) and `local-chat-completions` (with the chat template).

Every loglikelihood lm-eval reports is the model's own log-probability of that continuation, computed here directly
in float32 (`jaxchat.model.forward` + log_softmax over <|bos|>, context, continuation: the server's BOS rule), within
a rounding tolerance; lm-eval's acc follows from those; its greedy generations are the engine's own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving import random_params, serve_in_thread
from tolerances import gpt_reduction_len, tol

from jaxchat.chat_template import encode_with_special_tokens
from jaxchat.model import SOFTCAP, GPTConfig, forward
from serve.app import Defaults, build_engine, create_app

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "lm_eval_tasks"
CONTEXT = 128


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The server, and lm-eval's results: {"completions": mc + gen through local-completions, "chat": gen through
    local-chat-completions}, with the seconds each took."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a dev dependency: pip install -e '.[dev]'")
    from lm_eval.tasks import TaskManager

    from jaxchat.tokenizer import Tokenizer

    lines = [json.loads(x) for f in ("tiny_mc.jsonl", "tiny_gen.jsonl") for x in (TASKS / f).read_text().splitlines()]
    text = " ".join(f"Question: {d['question']}\nAnswer: {' '.join(d.get('choices', [d['answer']]))}" for d in lines)
    tok = Tokenizer.train_from_iterator([text * 4], vocab_size=400)  # real merges: " Paris" may be one token
    config = GPTConfig(sequence_len=CONTEXT, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1,
                       n_embd=32, window_pattern="SL")
    params = random_params(config)
    engine = build_engine(params, config, tok, 1, max_batch=4, decode_chunk=8, max_queue=16)
    app = create_app(engine, tok, Defaults(model="tiny/d2", max_context=CONTEXT, eos_token="<|bos|>"))
    server, url = serve_in_thread(app)
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)  # the tasks' data_files are relative to the repository root
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    try:
        manager = TaskManager(include_path=str(TASKS), include_defaults=False)
        runs, seconds = {}, {}
        for name, model, args, tasks, extra in (
                # max_length: sequence_len - 1, one position for the <|bos|> the server puts first
                ("completions", "local-completions", {"base_url": f"{url}/v1/completions", "max_length": CONTEXT - 1},
                 ["jaxchat_tiny_mc", "jaxchat_tiny_gen"], {"batch_size": 4}),
                ("chat", "local-chat-completions", {"base_url": f"{url}/v1/chat/completions"}, ["jaxchat_tiny_gen"],
                 {"apply_chat_template": True})):
            t0 = time.perf_counter()
            runs[name] = lm_eval.simple_evaluate(model=model, model_args={"model": "tiny/d2", "max_retries": 1, **args},
                                                 tasks=tasks, task_manager=manager, log_samples=True,
                                                 bootstrap_iters=0, **extra)
            seconds[name] = time.perf_counter() - t0
        yield {"tok": tok, "config": config, "params": params, "engine": engine, "runs": runs, "seconds": seconds,
               "stats": app.extensions["jaxchat_stats"].snapshot()}
    finally:
        mp.undo()
        server.stop()
        engine.close()


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `TemplateLM._encode_pair` with its remote tokenizer (/tokenize, no special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode_with_special_tokens(tok, context + continuation)
    ctx = encode_with_special_tokens(tok, context)
    return ctx, whole[len(ctx):]


def _reference(ev, pairs):
    """Per (context, continuation): (sum of the continuation's float32 logprobs given <|bos|> + context, each
    continuation token the argmax?, the smallest margin of that verdict, its tolerance). One forward over all rows,
    padded to the context's width (causal: padding is invisible to the real positions)."""
    tok, config = ev["tok"], ev["config"]
    bos = tok.get_bos_token_id()
    rows = [(ctx, cont) for ctx, cont in (_encode_pair(tok, *p) for p in pairs)]
    idx = np.zeros((len(rows), CONTEXT), np.int32)
    for i, (ctx, cont) in enumerate(rows):
        idx[i, :1 + len(ctx) + len(cont)] = [bos] + ctx + cont
    logits = jax.jit(forward, static_argnums=1)(ev["params"], config, jnp.asarray(idx))
    logprobs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    # one logprob is logit - logsumexp: each logit off by tol(f32, reduction, SOFTCAP) between two computations, the
    # logsumexp by as much again plus its own sum of vocab_size terms (as tests/test_scoring.py); a sum of k of them
    # by at most k times that
    per_token = 2 * tol(jnp.float32, gpt_reduction_len(config, CONTEXT), SOFTCAP) + tol(
        jnp.float32, config.vocab_size, float(np.max(np.abs(logprobs))))
    out = []
    for i, (ctx, cont) in enumerate(rows):
        at = range(len(ctx), len(ctx) + len(cont))  # row t predicts token t + 1 of [bos] + ctx + cont
        picked = [logprobs[i, t, cont[t - len(ctx)]] for t in at]
        best = [np.max(np.delete(logprobs[i, t], cont[t - len(ctx)])) for t in at]
        out.append((float(np.sum(picked)), all(p > b for p, b in zip(picked, best)),
                    min(abs(p - b) for p, b in zip(picked, best)), len(cont) * per_token))
    return out


def test_loglikelihoods_are_the_models_and_acc_follows(evaluated):
    run = evaluated["runs"]["completions"]
    samples = run["samples"]["jaxchat_tiny_mc"]
    assert len(samples) == 6
    worst, correct, decided = 0.0, [], 0
    for s in samples:
        pairs = [tuple(a) for a in s["arguments"]]
        assert len(pairs) == 4 and all(ctx.startswith("Question: ") for ctx, _ in pairs)
        reported = [r[0] for r in s["resps"]]  # [[ll, is_greedy]] per choice
        ref = _reference(evaluated, pairs)
        for (ll, greedy), (ref_ll, ref_greedy, margin, atol) in zip(reported, ref):
            assert abs(ll - ref_ll) <= atol, (pairs, ll, ref_ll, atol)
            worst = max(worst, abs(ll - ref_ll) / atol)
            if margin > 2 * atol:  # lm-eval's exact float compare is meaningful away from ties
                assert greedy == ref_greedy
        # acc: the choice of the largest loglikelihood; where the model's two best choices are closer than the
        # tolerance (a near tie, either may win) it follows from lm-eval's own values, which equal the model's
        ref_lls = [r[0] for r in ref]
        top2 = sorted(ref_lls, reverse=True)[:2]
        clear = top2[0] - top2[1] > 2 * max(r[3] for r in ref)
        decided += clear
        pick = int(np.argmax(ref_lls if clear else [r[0] for r in reported]))
        correct.append(pick == s["target"])
        assert s["acc"] == float(correct[-1])
    assert decided >= 4  # most docs are not near ties: the check above means something
    assert run["results"]["jaxchat_tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    print(f"\nlm-eval loglikelihoods: max |difference| = {worst:.3f} of the tolerance; lm-eval took "
          f"{evaluated['seconds']['completions']:.1f} s (mc + gen), {evaluated['seconds']['chat']:.1f} s (chat gen)")


def _engine_text(engine, prompt: list[int], stop: list[str]) -> str:
    return "".join(o.text for o in engine.submit(prompt, max_tokens=16, temperature=0.0, stop=stop))


def test_greedy_generations_are_the_engines(evaluated):
    tok, engine = evaluated["tok"], evaluated["engine"]
    bos = tok.get_bos_token_id()
    samples = evaluated["runs"]["completions"]["samples"]["jaxchat_tiny_gen"]
    assert len(samples) == 6
    for s in samples:
        context, kwargs = s["arguments"][0]
        assert kwargs["until"] == ["\n"] and kwargs["max_gen_toks"] == 16
        # lm-eval adds the server's eos string to its stops; the server puts <|bos|> first
        want = _engine_text(engine, [bos] + encode_with_special_tokens(tok, context), ["\n", "<|bos|>"])
        assert s["resps"] == [[want]] and "\n" not in want
    chat = evaluated["runs"]["chat"]["samples"]["jaxchat_tiny_gen"]
    assert len(chat) == 6
    for s in chat:
        messages = json.loads(s["arguments"][0][0][0])  # (JSON of the messages,): lm-eval's JsonChatStr, logged
        assert messages[-1]["role"] == "user" and messages[-1]["content"].startswith("Q: ")
        ids, _ = tok.render_conversation({"messages": messages}, max_tokens=1 << 30)
        want = _engine_text(engine, ids + [tok.encode_special("<|assistant_start|>")], ["\n"])
        assert s["resps"] == [[want]]
    stats = evaluated["stats"]
    assert stats["requests_invalid"] == 0 and stats["requests_rejected"] == 0 and stats["requests_active"] == 0
