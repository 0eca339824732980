"""The calculator tool the chat model calls between <|python_start|> and <|python_end|>.

What it accepts is nanochat's `use_calculator` (nanochat `nanochat/engine.py`): arithmetic on number literals
(+ - * / // and parentheses, commas in numbers ignored, the power operator refused) and `str.count` on string
literals, e.g. `"strawberry".count("r")`. Results are what Python's `eval` would give (so `6/3` is `2.0`).

Unlike nanochat, nothing is handed to `eval`: the expression is parsed with `ast`, every node is checked against a
whitelist, and the tree is evaluated here. Names, attribute access other than `.count`, subscripts, comprehensions,
lambdas and every other construct are refused before anything runs. The time limit is a deadline checked between
nodes (no SIGALRM, so it works in server threads); since no operation here can blow up (no power operator,
integers capped in size, bounded input length), a node never runs long by itself.
"""

from __future__ import annotations

import ast
import operator
import time

MAX_EXPR_CHARS = 10_000  # longer "expressions" are refused unparsed
MAX_INT_BITS = 4096  # intermediate integers beyond ~1233 decimal digits are refused
DEFAULT_TIME_LIMIT = 3.0  # seconds, nanochat's `eval_with_timeout` default

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    """The expression uses something outside the whitelist, overflows, or ran out of time."""


def _check_number(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Refused("integer too large")
    return value


def _eval(node: ast.AST, deadline: float):
    if time.monotonic() >= deadline:
        raise _Refused("time limit")
    if isinstance(node, ast.Expression):
        return _eval(node.body, deadline)
    if isinstance(node, ast.Constant):
        value = node.value
        # bool is an int subclass and complex is a number: neither is calculator input
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _Refused(f"constant {value!r}")
        return _check_number(value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, deadline), _eval(node.right, deadline)
        if isinstance(left, str) or isinstance(right, str):
            raise _Refused("arithmetic on strings")  # "a" * 10**9 would be a memory bomb
        return _check_number(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        operand = _eval(node.operand, deadline)
        if isinstance(operand, str):
            raise _Refused("unary operator on a string")
        return _UNARYOPS[type(node.op)](operand)
    if isinstance(node, ast.Call):
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "count") or node.keywords:
            raise _Refused("only str.count(...) may be called")
        receiver = _eval(func.value, deadline)
        args = [_eval(a, deadline) for a in node.args]
        # one argument only: commas are stripped above (as nanochat), so start/end could never be written anyway
        if not isinstance(receiver, str) or len(args) != 1 or not isinstance(args[0], str):
            raise _Refused("count needs a string receiver and one string argument")
        return receiver.count(args[0])
    raise _Refused(f"{type(node).__name__} is not allowed")


def use_calculator(expr: str, time_limit: float = DEFAULT_TIME_LIMIT):
    """Evaluate a calculator expression, or return None when it is not one we accept.

    Args:
        expr: the text the model wrote between <|python_start|> and <|python_end|>.
        time_limit: seconds before evaluation gives up (returns None).
    Returns:
        int, float or None. None for syntax errors, anything outside the whitelist (names, imports, attribute
        access other than `.count`, the power operator, ...), division by zero, integers over MAX_INT_BITS bits,
        and expressions that run out of time. Never raises.
    Source: nanochat `use_calculator` / `eval_with_timeout` (engine.py).
    """
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")  # as nanochat: "1,234 + 5" means 1234 + 5
    if len(expr) > MAX_EXPR_CHARS:
        return None
    deadline = time.monotonic() + time_limit
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return _eval(tree, deadline)
    except (_Refused, SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError,
            MemoryError):
        return None
