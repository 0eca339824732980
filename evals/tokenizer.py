"""Compression ratio (UTF-8 bytes per token) of the trained tokenizer (nanochat scripts/tok_eval.py).

    python -m evals.tokenizer

Measures our tokenizer on five fixed samples (news, korean, code, math, science) and, when pretraining shards
exist, on the first batch of documents of the train and val splits. GPT-2 and GPT-4 (cl100k_base) columns are
added only when tiktoken already has their files in its cache: this script never downloads. Prints a table and
one JSON line. Raises FileNotFoundError when no tokenizer was trained (`python -m train.tokenizer`).
"""

from __future__ import annotations

import argparse
import contextlib
import json

NEWS_TEXT = """\
(Lisbon, March 4, 2026) - The harbour authority said on Tuesday that container traffic through the port rose 7.4% \
in the last quarter, the third rise in a row, as shipping lines moved routes away from congested terminals further \
north. Officials expect 1.9 million containers this year, up from 1.62 million in 2024.

"We planned for growth, but not this fast," said the authority's director, Ana Ribeiro, at a press conference. \
She added that a new rail link, due to open in September, should take about 300 trucks a day off the coastal road.

Dock workers' unions welcomed the figures but warned that overtime had doubled since January. Talks on a new \
contract resume next week; a strike notice filed in February remains in force until April 15.
"""

KOREAN_TEXT = """\
오늘 아침 서울에는 올해 들어 가장 많은 눈이 내렸습니다. 기상청은 오후까지 5에서 10센티미터의 눈이 더 올 것으로 예상하며, \
출근길 교통 혼잡에 대비해 대중교통을 이용해 달라고 당부했습니다.

시민들은 두꺼운 외투를 입고 조심스럽게 길을 건넜고, 일부 학교는 등교 시간을 한 시간 늦췄습니다. \
한 시민은 "이렇게 많은 눈은 몇 년 만에 처음 본다"며 웃었습니다.

도로공사는 제설 차량 120대를 투입했으며, 주요 고속도로는 현재 정상적으로 운행되고 있다고 밝혔습니다.
"""

CODE_TEXT = '''\
import heapq
from collections import defaultdict


def dijkstra(graph: dict[str, list[tuple[str, float]]], source: str) -> dict[str, float]:
    """Shortest distances from source in a graph with non-negative edge weights."""
    dist = defaultdict(lambda: float("inf"))
    dist[source] = 0.0
    heap = [(0.0, source)]
    while heap:
        d, node = heapq.heappop(heap)
        if d > dist[node]:
            continue  # stale entry: a shorter path was already found
        for neighbour, weight in graph.get(node, []):
            nd = d + weight
            if nd < dist[neighbour]:
                dist[neighbour] = nd
                heapq.heappush(heap, (nd, neighbour))
    return dict(dist)


if __name__ == "__main__":
    g = {"a": [("b", 1.0), ("c", 4.0)], "b": [("c", 2.0), ("d", 5.0)], "c": [("d", 1.0)]}
    print(dijkstra(g, "a"))  # {'a': 0.0, 'b': 1.0, 'c': 3.0, 'd': 4.0}
'''

MATH_TEXT = r"""\begin{theorem}
For every integer $n \ge 1$, $\sum_{k=1}^{n} (2k-1) = n^2$.
\end{theorem}

\begin{proof}
For $n = 1$ both sides equal $1$. Suppose the claim holds for some $n \ge 1$. Then
\[
\sum_{k=1}^{n+1} (2k-1) = \sum_{k=1}^{n} (2k-1) + (2n+1) = n^2 + 2n + 1 = (n+1)^2,
\]
so it holds for $n+1$, and by induction for all $n \ge 1$.
\end{proof}

\begin{remark}
Geometrically, adding the odd number $2n+1$ to an $n \times n$ square of dots gives an $(n+1) \times (n+1)$ square:
an L-shaped border of $n + n + 1$ dots. Likewise $\int_0^1 x^2\,dx = \tfrac{1}{3}$ and $e^{i\pi} + 1 = 0$.
\end{remark}
"""

SCIENCE_TEXT = """\
Mitochondria generate most of the cell's ATP through oxidative phosphorylation. Electrons donated by NADH and \
FADH₂ pass along complexes I–IV of the inner-membrane electron transport chain, and the free energy released \
pumps protons (H⁺) from the matrix into the intermembrane space. The resulting electrochemical gradient, about \
150–200 mV, drives protons back through ATP synthase, whose rotary F₀ motor couples proton flow to the synthesis \
of ATP from ADP and inorganic phosphate (Pᵢ) in the F₁ head. Molecular oxygen is the terminal electron acceptor \
and is reduced to water; uncoupling proteins such as UCP1 in brown adipose tissue dissipate the gradient as heat.
"""

FIXED_TEXTS = [("news", NEWS_TEXT), ("korean", KOREAN_TEXT), ("code", CODE_TEXT), ("math", MATH_TEXT),
               ("science", SCIENCE_TEXT)]


@contextlib.contextmanager
def _tiktoken_offline():
    """Make tiktoken's file reader refuse URLs, so only encodings already in its cache load."""
    import tiktoken.load

    real = tiktoken.load.read_file

    def read_local_only(path: str) -> bytes:
        if "://" in path:
            raise ConnectionError(f"offline: {path} is not in tiktoken's cache")
        return real(path)

    tiktoken.load.read_file = read_local_only
    try:
        yield
    finally:
        tiktoken.load.read_file = real


def load_baseline(tiktoken_name: str):
    """OpenAI's tokenizer if tiktoken can load it without a download, else None."""
    from jaxchat.tokenizer import Tokenizer

    try:
        with _tiktoken_offline():
            return Tokenizer.from_pretrained(tiktoken_name)
    except Exception as e:  # not cached, no network, unknown name: the column is simply skipped
        print(f"({tiktoken_name} not available offline, skipped: {type(e).__name__})")
        return None


def shard_texts() -> list[tuple[str, str]]:
    """First batch of documents of the train and val shards, joined by newlines; a split without shards is left out."""
    try:
        from jaxchat.dataset import parquets_iter_batched
    except ImportError as e:
        print(f"(no shard text: {e})")
        return []
    out = []
    for split in ("train", "val"):
        try:
            docs = next(iter(parquets_iter_batched(split=split)), [])
        except FileNotFoundError as e:
            print(f"(no {split} shard text: {e})")
            continue
        if docs:
            out.append((f"shard-{split}", "\n".join(docs)))
    return out


def measure(tokenizer, texts: list[tuple[str, str]]) -> dict[str, dict]:
    """{name: {bytes, tokens, ratio}}; ratio = UTF-8 bytes per token (higher = better compression).

    Raises:
        AssertionError: decode(encode(text)) != text.
    """
    out = {}
    for name, text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, f"round trip failed on {name}"
        n_bytes = len(text.encode("utf-8"))
        out[name] = {"bytes": n_bytes, "tokens": len(ids), "ratio": n_bytes / max(len(ids), 1)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Tokenizer compression ratio (bytes per token)")
    parser.add_argument("--no-shards", action="store_true", help="only the fixed texts")
    args = parser.parse_args(argv)

    from jaxchat.tokenizer import get_tokenizer

    texts = FIXED_TEXTS + ([] if args.no_shards else shard_texts())
    tokenizers = {"ours": get_tokenizer()}
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        tok = load_baseline(name)
        if tok is not None:
            tokenizers[label] = tok
    results = {label: measure(tok, texts) for label, tok in tokenizers.items()}
    vocab = {label: tok.get_vocab_size() for label, tok in tokenizers.items()}

    print("\nVocab sizes: " + ", ".join(f"{k}={v:,}" for k, v in vocab.items()))
    cols = list(tokenizers)
    header = f"{'text':<12} {'bytes':>8} " + " ".join(f"{c + ' tok':>10} {c + ' b/t':>9}" for c in cols)
    if "ours" in cols and len(cols) > 1:
        header += " " + " ".join(f"{'vs ' + c:>9}" for c in cols if c != "ours")
    print(header)
    print("-" * len(header))
    for name, _ in texts:
        row = f"{name:<12} {results['ours'][name]['bytes']:>8} "
        row += " ".join(f"{results[c][name]['tokens']:>10} {results[c][name]['ratio']:>9.2f}" for c in cols)
        for c in cols:
            if c != "ours":  # positive: we need fewer tokens than the baseline
                base = results[c][name]["tokens"]
                row += f" {100 * (base - results['ours'][name]['tokens']) / base:>+8.1f}%"
        print(row)

    summary = {"event": "tokenizer_eval", "vocab_size": vocab,
               "ratio": {c: {n: round(r["ratio"], 4) for n, r in results[c].items()} for c in cols},
               "tokens": {c: {n: r["tokens"] for n, r in results[c].items()} for c in cols}}
    print(json.dumps(summary), flush=True)
    from jaxchat.report import get_report

    get_report().log(section="Tokenizer evaluation", data=[
        {"vocab_size": vocab["ours"]},
        {f"{name} bytes/token": results["ours"][name]["ratio"] for name, _ in texts},
    ])
    return summary


if __name__ == "__main__":
    from jaxchat.common import run_cli

    run_cli(main)
