#!/usr/bin/env python3
"""Architecture check: the modules of a crate have no import cycle.

Every file of the crate is a module (`lib.rs` the crate, `a/mod.rs` or `a.rs` the module `a`). A module
depends on another when it names it: `use crate::a::b`, `crate::a::b::f()` in code, `super::x`,
`self::x`, or a child module's name (`use child::X`, `child::f()`). A path is taken to the deepest
module it reaches, so `crate::a::b::Item` is a dependency on `a::b`, not on `a`. A parent declaring
its children (`mod child;`) is not a dependency; a parent using them is.

Prints every cycle (a strongly connected group of modules) with the lines that close it, and exits 1
if there is one. Usage: check-module-cycles.py <crate src dir>...
"""

import os
import re
import sys
from collections import defaultdict

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?use\s+([^;]+);", re.M | re.S)
MOD = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", re.M)


def module_of(src, path):
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel in (["lib"], ["main"]):
        return ()
    if rel[-1] == "mod":
        rel = rel[:-1]
    return tuple(rel)


def strip_comments_and_strings(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def expand(tree):
    """`a::{b, c::{d, self}}` -> ["a::b", "a::c::d", "a::c"]."""
    tree = tree.strip()
    depth = 0
    for i, ch in enumerate(tree):
        if ch == "{":
            if depth == 0:
                prefix = tree[:i].rstrip(":").strip()
                inner = tree[i + 1 : tree.rindex("}")]
                parts, depth2, start = [], 0, 0
                for j, c in enumerate(inner):
                    if c == "{":
                        depth2 += 1
                    elif c == "}":
                        depth2 -= 1
                    elif c == "," and depth2 == 0:
                        parts.append(inner[start:j])
                        start = j + 1
                parts.append(inner[start:])
                out = []
                for p in parts:
                    if not p.strip():
                        continue
                    for e in expand(p):
                        out.append(prefix if e == "self" else f"{prefix}::{e}" if prefix else e)
                return out
            depth += 1
    return [re.sub(r"\s+as\s+\w+$", "", tree)]


def check(src):
    files = {}
    for root, _, names in os.walk(src):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(root, n)
                files[module_of(src, p)] = p
    modules = set(files)
    edges = defaultdict(dict)  # from -> {to: example line}

    def deepest(parts):
        for k in range(len(parts), 0, -1):
            if tuple(parts[:k]) in modules:
                return tuple(parts[:k])
        return None

    for mod, path in files.items():
        raw = open(path, encoding="utf-8").read()
        # Tests may use anything of their module's parent (`use super::*`).
        text = re.split(r"^#\[cfg\(test\)\]\s*\nmod tests", raw, flags=re.M)[0]
        text = strip_comments_and_strings(text)
        children = {c for c in MOD.findall(text)}
        is_dir = os.path.basename(path) in ("mod.rs", "lib.rs", "main.rs")
        base = mod if is_dir else mod[:-1]  # where `self::`/child names resolve

        def resolve(head, rest):
            if head == "crate":
                return deepest(rest)
            if head == "self":
                return deepest(list(mod) + rest)
            if head == "super":
                parent = list(mod[:-1])
                while rest and rest[0] == "super":
                    parent, rest = parent[:-1], rest[1:]
                return deepest(parent + rest)
            if head in children:
                return deepest(list(mod) + [head] + rest)
            return None

        refs = []
        for m in USE.finditer(text):
            for p in expand(m.group(1)):
                parts = [x for x in p.split("::") if x]
                if parts:
                    refs.append((parts[0], parts[1:], p))
        for m in PATH.finditer(text):
            refs.append((m.group(1), [x for x in m.group(2).split("::") if x], m.group(0)))
        for child in children:
            for m in re.finditer(rf"(?<![:\w]){child}((?:::[A-Za-z_]\w*)+)", text):
                refs.append((child, [x for x in m.group(1).split("::") if x], m.group(0)))
        for head, rest, shown in refs:
            target = resolve(head, list(rest))
            if target is not None and target != mod:
                edges[mod].setdefault(target, shown)
        _ = base

    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    name = lambda m: "crate::" + "::".join(m) if m else "crate"
    for comp in sccs:
        print(f"{src}: import cycle among {', '.join(sorted(name(m) for m in comp))}:")
        for a in sorted(comp):
            for b, shown in sorted(edges[a].items()):
                if b in comp:
                    print(f"  {name(a)} -> {name(b)}  ({shown})")
    return not sccs


if __name__ == "__main__":
    ok = all([check(src) for src in sys.argv[1:]])
    if ok:
        print(f"No import cycle among the modules of {', '.join(sys.argv[1:])}.")
    sys.exit(0 if ok else 1)
