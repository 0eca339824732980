"""The calculator tool: what nanochat's use_calculator accepts works, everything else is refused without running."""

import time

import pytest

from jaxchat.calculator import use_calculator


@pytest.mark.parametrize("expr, expected", [
    ("2+2", 4),
    ("6/3", 2.0),  # true division, as Python's eval
    ("7//2", 3),
    ("-(3*4)+5", -7),
    ("1,234 + 5", 1239),  # commas in numbers are dropped, as nanochat
    ("(1.5 + 2.5) * 3", 12.0),
    ("123456789 * 987654321", 121932631112635269),
    ('"strawberry".count("r")', 3),
    ("'banana'.count('an')", 2),
])
def test_accepts_arithmetic_and_count(expr, expected):
    result = use_calculator(expr)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("expr", [
    "__import__('os')",
    "__import__('os').system('echo pwned')",
    "9**9**9",  # the power operator is refused outright, as nanochat
    "2**10",
    "().__class__.__bases__",
    "'abc'.upper()",
    "'abc'.__class__",
    "open('/etc/passwd').read()",
    "x + 1",
    "[1, 2][0]",
    "lambda: 1",
    "'a' * 10**9",
    "'a' * 1000",
    "True + 1",
    "1j * 2",
    "1/0",
    "5 % 3",
    "",
    "2 +",
    "'abc'.count(x)",
    "'abc'.count('a', key=1)",
    "'abc'.count(1)",
    "(1).count('a')",
])
def test_refuses_everything_else(expr):
    t0 = time.perf_counter()
    assert use_calculator(expr) is None
    assert time.perf_counter() - t0 < 0.5


def test_huge_numbers_and_inputs_are_refused_quickly():
    t0 = time.perf_counter()
    assert use_calculator("*".join(["99999999999999999999"] * 300)) is None  # ~6000 digits: over the int cap
    assert use_calculator("1+" * 20_000 + "1") is None  # over the length cap
    assert use_calculator("(" * 500 + "1" + ")" * 500) is None  # nesting the parser refuses
    assert time.perf_counter() - t0 < 1.0


def test_time_limit_is_a_deadline_without_signals():
    import threading
    results = []
    # a zero time limit refuses even a trivial expression, also from a non-main thread (SIGALRM would fail there)
    thread = threading.Thread(target=lambda: results.append((use_calculator("1+1", time_limit=0.0),
                                                             use_calculator("1+1"))))
    thread.start()
    thread.join()
    assert results == [(None, 2)]


def test_never_raises_on_odd_input():
    assert use_calculator(None) is None
    assert use_calculator("\x00") is None
