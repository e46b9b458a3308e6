"""Measure the code layout of the repository, the same way before and after a refactor.

Run:  python bench/layout.py [--root DIR] [--json OUT]   (root defaults to the parent of bench/)

Pure `ast` parsing, standard library only; nothing of the repository is imported. Three sections:

1. Line counts: `wc -l` of the six paper files (model, losses, masks, data, train, evaluate) and
   their total, plus the length of the largest `parse_args` in train.py (def line to end_lineno).
2. Share of each paper file that implements the paper, by line. Each line belongs to the
   innermost definition that covers it (decorators included): a def or class at any depth, named by
   its qualified name (`ReMatch.forward`, `TrainDataset.__init__.target`), or a module-level
   assignment (named by its first target, for `a, b = ...` the first name; annotated ones too).
   Blank and comment lines belong to the next line of code (lines after the last one to none). A
   line is paper when its owner is in the file's PAPER entry below ("*": every owner); lines no
   definition covers (imports, the module docstring, `if __name__ ...`) are not. A class entry
   covers the class's own lines (header, docstring, attributes), not its methods: each method is
   listed, so code added inside a class counts only once its name is listed.
3. Import graph of every .py file under root (skipping .git, runs/, __pycache__, hidden folders):
   edges from `import X` / `from X import Y`, top level or inside a function ("lazy"); a bare name is
   resolved against the importing file's own folder first, then against the root. Reports modules and
   edges per room, circles (strongly connected components, without and with lazy edges), arrows from
   a lower room to a higher one, and paper-file order violations (losses, masks < model < data <
   evaluate < train).
"""
import argparse
import ast
import json
import os
from collections import Counter

PAPER_FILES = ["model.py", "losses.py", "masks.py", "data.py", "train.py", "evaluate.py"]
# Per paper file, the definitions whose lines implement the paper (qualified names, resolved to line
# ranges by owners()): an equation, or the input/output format the paper defines (templates, prompts,
# the K tokens, collation feeding the losses, the metrics of Tables 1-2); not plumbing, file formats,
# checks, CLI. data.py and evaluate.py are set against a hand count (tests/fixtures/layout/
# hand_count.json); the others keep the names of the README's paper -> code table, a class split into
# its methods (ReMatch: the embedding and matching passes, not the backbone pieces). Names missing
# from a file count nothing (printed under the table), so the same table serves before and after code
# moves. "*" = every definition of the file.
PAPER = {
    "losses.py": {"orthogonality_loss", "info_nce", "matching_loss", "total_loss", "at_least_fp32"},
    "masks.py": "*",  # the whole file is Fig. 3
    "model.py": {"ReMatch", "ReMatch.__init__", "ReMatch.embed_inputs", "ReMatch.embed", "ReMatch.match_inputs",
                 "ReMatch.match", "ReMatch.forward",  # not the backbone pieces (vision, M-RoPE call, decoder)
                 "mrope_position_ids", "embedding_stats", "LORA_TARGETS", "apply_lora"},
    "data.py": {"IMAGE_BLOCK", "SYSTEM", "USER", "ASSISTANT", "EMBED_TEMPLATES", "MATCH_INSTRUCTION", "MATCH_P",
                "MATCH_RAW", "MATCH_FEAT", "MATCH_H", "MATCH_ANSWER", "TARGET_BY_META", "TARGET_INSTRUCTIONS",
                "target_prompt", "with_target_instruction", "collate_embed", "draw_pos_slot", "collate_match",
                "TrainDataset.__init__.target", "TrainDataset.__getitem__"},
    "train.py": {"Step", "Step.__post_init__", "train_step", "forward_backward", "train_step_chunked",
                 "_rng_state", "_replayed_rng", "Instances", "Instances.n_match", "Instances.chunk",
                 "Instances.reorder", "length_grouped_order", "step_instances", "collate_step", "doc_ids",
                 "local_terms", "fill_negatives", "lr_at", "PAPER", "PRESETS", "main"},
    "evaluate.py": {"cosine_scores", "hit_at_1", "recall_at_k", "META_TASKS", "task_items", "score_rows",
                    "_groups", "summarize", "SUGARCREPE_GROUPS", "_recall_chunked", "eval_retrieval",
                    "eval_sugarcrepe"},
}
ROOM_ORDER = {"util": 0, "paper": 1, "demo": 2, "tools": 2, "bench": 3, "tests": 3, "other": 3}
PAPER_ORDER = {"losses": 0, "masks": 0, "model": 1, "data": 2, "evaluate": 3, "train": 4}
RULE = ("each line belongs to the innermost def/class (any depth, qualified: Class.method) or module-level "
        "assignment covering it, blank/comment lines to the next line of code; paper = owner in the PAPER "
        "table; imports, docstring, unnamed statements = not paper")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def stmt_name(node):
    """Name of a def/class/assignment (first target, first element of a tuple); None otherwise."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
    while isinstance(target, (ast.Tuple, ast.List)) and target.elts:
        target = target.elts[0]
    named = isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(target, ast.Name)
    return target.id if named else None


def owners(text):
    """Owner of each line (list, [0] = line 1): the qualified name of the innermost def/class, or
    module-level assignment, covering it (from its first decorator to its last line), None where no
    definition covers the line; blank and comment lines take the owner of the next line of code."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()                                                   # the final newline ends a line
    owner = [None] * (len(lines) + 1)                                 # 1-based; [0] unused

    def visit(node, prefix, top):
        is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        name = prefix + node.name if is_def else stmt_name(node) if top else None
        if name is not None:                                          # outer first: inner ones repaint
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            owner[first:node.end_lineno + 1] = [name] * (node.end_lineno + 1 - first)
        for child in ast.iter_child_nodes(node):
            visit(child, name + "." if is_def else prefix, False)
    for node in ast.parse(text).body:
        visit(node, "", True)
    following = None                                                  # owner of the next line of code
    for i in range(len(lines), 0, -1):
        if lines[i - 1].strip() and not lines[i - 1].lstrip().startswith("#"):
            following = owner[i]
        else:                      # blank or comment (inside a string too: the next line is the string's)
            owner[i] = following
    return owner[1:]


def paper_lines(text, table):
    """1-based numbers of the lines whose owner is in `table` (a set of qualified names, or "*")."""
    return [i for i, o in enumerate(owners(text), 1) if o is not None and (table == "*" or o in table)]


def paper_share(fname, text):
    """Number of lines of the file that PAPER counts as the paper."""
    return len(paper_lines(text, PAPER.get(fname, set())))


def module_of(rel):
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(rel):
    if rel in PAPER_FILES:
        return "paper"
    top = rel.split("/")[0]
    return top if "/" in rel and top in ("util", "demo", "tools", "bench", "tests") else "other"


def imports_of(tree):
    """(module, imported name or None, lazy) for every absolute import; lazy = inside a function."""
    out = []

    def visit(node, lazy):
        if isinstance(node, ast.Import):
            out.extend((a.name, None, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.extend((node.module, a.name, lazy) for a in node.names)  # `from . import` is ignored
        for child in ast.iter_child_nodes(node):
            visit(child, lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    visit(tree, False)
    return out


def resolve(dotted, folder, modules):
    """Longest repository module that prefixes `dotted`, tried under the importer's folder, then the root."""
    parts = dotted.split(".")
    for base in ([folder + "."] if folder else []) + [""]:
        for k in range(len(parts), 0, -1):
            if base + ".".join(parts[:k]) in modules:
                return base + ".".join(parts[:k])
    return None


def import_graph(root):
    files = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("runs", "__pycache__") and not d.startswith("."))
        for rel in (os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/") for n in names):
            files.update({module_of(rel): rel} if rel.endswith(".py") else {})
    edges = {}  # (importer, imported) -> {"names", "lazy": every import of the edge is inside a function}
    for mod, rel in files.items():
        folder = os.path.dirname(rel).replace("/", ".")
        for target, name, lazy in imports_of(ast.parse(read(os.path.join(root, rel)))):
            dst = resolve(target + "." + name if name else target, folder, files)  # X.Y if a module
            if dst and dst != mod:
                e = edges.setdefault((mod, dst), {"names": set(), "lazy": True})
                e["names"].add(name or target)
                e["lazy"] = e["lazy"] and lazy
    return {m: room_of(rel) for m, rel in files.items()}, edges


def circles(nodes, edges):
    """Strongly connected components of size > 1 (iterative Tarjan)."""
    succ = {n: sorted(b for a, b in edges if a == n) for n in nodes}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
            if i < len(succ[v]):
                w = succ[v][i]
                work.append((v, i + 1))
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = stack[stack.index(v):]
                del stack[stack.index(v):]
                on.difference_update(comp)
                out += [sorted(comp)] if len(comp) > 1 else []
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
    return sorted(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    texts = {f: read(os.path.join(args.root, f)) for f in PAPER_FILES}
    lines = {f: t.count("\n") for f, t in texts.items()}
    pa = [n for n in ast.walk(ast.parse(texts["train.py"]))
          if isinstance(n, ast.FunctionDef) and n.name == "parse_args"]
    parse_args_lines = max((n.end_lineno - n.lineno + 1 for n in pa), default=0)
    print("== 1. Line counts ==")
    print("\n".join(f"{lines[f]:7d} {f}" for f in PAPER_FILES))
    print(f"{sum(lines.values()):7d} total\n{parse_args_lines:7d} train.py parse_args (largest)")

    print("\n== 2. Share of each paper file that implements the paper ==\nrule: " + RULE)
    share = {f: {"lines": lines[f], "paper": paper_share(f, texts[f])} for f in PAPER_FILES}
    share["total"] = {k: sum(share[f][k] for f in PAPER_FILES) for k in ("lines", "paper")}
    print(f"{'file':12s} {'lines':>6s} {'paper':>6s} {'share':>7s}")
    for f, s in share.items():
        s["share_pct"] = round(100 * s["paper"] / max(s["lines"], 1), 1)
        print(f"{f:12s} {s['lines']:6d} {s['paper']:6d} {s['share_pct']:6.1f}%")
    for f in PAPER_FILES:
        table = PAPER.get(f, set())
        missing = sorted(table - set(owners(texts[f]))) if table != "*" else []
        if missing:
            print(f"PAPER names not in {f} (count nothing): {', '.join(missing)}")

    print("\n== 3. Import graph ==")
    rooms, edges = import_graph(args.root)
    per_room = Counter(rooms.values())
    print("(a) modules per room: " + ", ".join(f"{r} {per_room[r]}" for r in ROOM_ORDER if per_room[r]))
    room_edges = Counter((rooms[a], rooms[b]) for a, b in edges)
    room_lazy = Counter((rooms[a], rooms[b]) for (a, b), e in edges.items() if e["lazy"])
    print("(b) room -> room edges (of which lazy):")
    for (ra, rb), n in sorted(room_edges.items(), key=lambda kv: (ROOM_ORDER[kv[0][0]], kv[0])):
        print(f"    {ra:6s} -> {rb:6s} {n:4d} ({room_lazy[(ra, rb)]})")
    top_edges = [k for k, e in edges.items() if not e["lazy"]]
    circ = {"top_level": circles(rooms, top_edges), "with_lazy": circles(rooms, list(edges))}
    for kind, comps in circ.items():
        listed = "".join("\n    " + ", ".join(c) for c in comps)
        print(f"(c) circles, {kind.replace('_', ' ')}: {len(comps)}{listed}")

    def fmt(a, b):
        e = edges[(a, b)]
        return f"{a} -> {b} ({', '.join(sorted(e['names']))})" + (" [lazy]" if e["lazy"] else "")
    up = sorted(k for k in edges if ROOM_ORDER[rooms[k[0]]] < ROOM_ORDER[rooms[k[1]]])
    order = sorted(k for k in edges if rooms[k[0]] == rooms[k[1]] == "paper"
                   and PAPER_ORDER[k[0]] < PAPER_ORDER[k[1]])
    print(f"(d) arrows back up: {len(up)}" + "".join("\n    " + fmt(*k) for k in up))
    print(f"    paper-file order violations: {len(order)}" + "".join("\n    " + fmt(*k) for k in order))

    if args.json:
        out = {"lines": lines, "lines_total": sum(lines.values()), "parse_args_lines": parse_args_lines,
               "paper_share": share, "rooms": rooms, "modules_per_room": dict(per_room),
               "room_edges": {f"{a}->{b}": n for (a, b), n in sorted(room_edges.items())},
               "room_edges_lazy": {f"{a}->{b}": n for (a, b), n in sorted(room_lazy.items())},
               "edges": [{"from": a, "to": b, "names": sorted(e["names"]), "lazy": e["lazy"]}
                         for (a, b), e in sorted(edges.items())],
               "circles": circ, "arrows_up": [fmt(*k) for k in up],
               "paper_order_violations": [fmt(*k) for k in order]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
