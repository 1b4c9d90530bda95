"""A tiny renderer of the Go `text/template` subset that Ollama's chat templates use, for tests.

What it knows: text and `{{ }}` actions with `{{-`/`-}}` trimming; `range .X` and
`range $i, $_ := .X` (dot is the element inside); `if`/`else if`/`else`/`end`; variables
(`$x := v`, `$x = v`, `$`, `$.Field`); fields (`.Role`); string literals; parentheses; and the
functions eq, ne, and, or, not, len, slice. Anything else raises, so a template that needs more
fails loudly instead of rendering wrongly.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _parse_nodes(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with the trim markers applied to the text around."""
    nodes: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position : match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        nodes.append(("text", text))
        nodes.append(("action", match.group(2)))
        trim_next = bool(match.group(3))
        position = match.end()
    tail = template[position:]
    nodes.append(("text", tail.lstrip() if trim_next else tail))
    return nodes


def _tree(nodes: list[tuple[str, str]], start: int = 0) -> tuple[list[Any], int, str]:
    """A block of nodes up to its `end`/`else`: (items, next index, the word that closed it)."""
    items: list[Any] = []
    i = start
    while i < len(nodes):
        kind, body = nodes[i]
        i += 1
        if kind == "text":
            items.append(("text", body))
            continue
        word = body.split(" ", 1)[0]
        if word in ("end", "else"):
            return items, i, body
        if word == "range":
            inner, i, closer = _tree(nodes, i)
            if closer != "end":
                raise ValueError("range ... else is not supported")
            items.append(("range", body[len("range") :].strip(), inner))
        elif word == "if":
            branches: list[tuple[str | None, list[Any]]] = []
            condition: str | None = body[len("if") :].strip()
            while True:
                inner, i, closer = _tree(nodes, i)
                branches.append((condition, inner))
                if closer == "end":
                    break
                if closer.startswith("else if "):
                    condition = closer[len("else if ") :].strip()
                elif closer == "else":
                    condition = None
                else:
                    raise ValueError(f"unexpected {closer!r}")
            items.append(("if", branches))
        else:
            items.append(("expr", body))
    return items, i, ""


class _Scope:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.variables: dict[str, Any] = {"$": root}


def _field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        if name not in value:
            raise KeyError(f"no field {name}")
        return value[name]
    raise TypeError(f"cannot take .{name} of {value!r}")


def _atom(token: str, dot: Any, scope: _Scope) -> Any:
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape")
    if token == ".":
        return dot
    if token.startswith("."):
        value = dot
        for name in token[1:].split("."):
            value = _field(value, name)
        return value
    if token.startswith("$"):
        head, *names = token.split(".")
        value = scope.variables[head]
        for name in names:
            value = _field(value, name)
        return value
    if token.isdigit():
        return int(token)
    raise ValueError(f"unknown token {token!r}")


def _truth(value: Any) -> bool:
    return bool(value)


FUNCTIONS = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda x, *i: x[i[0] :] if len(i) == 1 else x[i[0] : i[1]],
}


def _evaluate(tokens: list[str], dot: Any, scope: _Scope) -> Any:
    """A pipeline without `|`: a function call or a single value."""
    values: list[Any] = []
    i = 0
    head = tokens[0] if tokens else ""
    while i < len(tokens):
        token = tokens[i]
        if token == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            values.append(_evaluate(tokens[i + 1 : j - 1], dot, scope))
            i = j
            continue
        if i == 0 and token in FUNCTIONS:
            i += 1
            continue
        values.append(_atom(token, dot, scope))
        i += 1
    if head in FUNCTIONS:
        return FUNCTIONS[head](*values)
    if len(values) != 1:
        raise ValueError(f"cannot evaluate {tokens}")
    return values[0]


def _expression(body: str, dot: Any, scope: _Scope) -> Any:
    tokens = _TOKEN.findall(body)
    return _evaluate(tokens, dot, scope)


def _render(items: list[Any], dot: Any, scope: _Scope, out: list[str]) -> None:
    for item in items:
        if item[0] == "text":
            out.append(item[1])
        elif item[0] == "expr":
            body = item[1]
            assign = re.match(r"(\$\w+)\s*(:?=)\s*(.*)", body, re.S)
            if assign:
                scope.variables[assign.group(1)] = _expression(assign.group(3), dot, scope)
            else:
                value = _expression(body, dot, scope)
                out.append("" if value is None else str(value))
        elif item[0] == "range":
            header = item[1]
            names: list[str] = []
            bound = re.match(r"(\$\w+)\s*,\s*(\$\w+)\s*:=\s*(.*)", header)
            if bound:
                names, header = [bound.group(1), bound.group(2)], bound.group(3)
            for index, element in enumerate(_expression(header, dot, scope)):
                if names:
                    scope.variables[names[0]], scope.variables[names[1]] = index, element
                _render(item[2], element, scope, out)
        elif item[0] == "if":
            for condition, inner in item[1]:
                if condition is None or _truth(_expression(condition, dot, scope)):
                    _render(inner, dot, scope, out)
                    break


def render(template: str, data: dict[str, Any]) -> str:
    items, _, closer = _tree(_parse_nodes(template))
    if closer:
        raise ValueError(f"unmatched {closer!r}")
    out: list[str] = []
    _render(items, data, _Scope(data), out)
    return "".join(out)


def ollama_data(messages: list[dict[str, str]]) -> dict[str, Any]:
    """What Ollama hands a template for a chat: .Messages (system ones too) and .System."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    return {
        "System": system,
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }
