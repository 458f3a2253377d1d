"""Where the QVPO authors' reference code lies and how to import it, for tests/test_parity_reference.py.

The reference is github.com/wadx2019/qvpo at commit 40a197473ecf68517b880cfc2c2ca4209f65c5ff (MIT
licence). It is never copied into this repository: the tests import it from where it lies, found
through the environment variable QVPO_REFERENCE (a path to a checkout), else
`.reference/wadx2019-qvpo` in the repository root (what `make reference` clones; git-ignored).
Where it is absent the parity tests skip with the reason `missing_reason` gives.

Its `main.py` needs gym 0.21 and mujoco-py, which no longer install, so it is never imported: the
argparse defaults (`readParser`) and the facts of its training loop the tests check are read from
its source with `ast`. The agent itself (`agent/qvpo.py`) needs only torch and numpy; its unused
`from agent.vae import VAE` is stubbed.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import types
from pathlib import Path

REPO = "wadx2019/qvpo"
COMMIT = "40a197473ecf68517b880cfc2c2ca4209f65c5ff"
CITE = f"{REPO}@{COMMIT[:7]}"
# the files the tests use; all must be there
FILES = ("agent/qvpo.py", "agent/diffusion.py", "agent/model.py", "agent/helpers.py", "agent/q_transform.py",
         "main.py")
# run as the authors' README does: `main.py --weighted --aug` (q_transform defaults to 'qadv')
MAIN_ARGV = ("--weighted", "--aug")


def reference_root() -> Path:
    """$QVPO_REFERENCE, else .reference/wadx2019-qvpo in the repository root (`make reference`)."""
    env = os.environ.get("QVPO_REFERENCE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / ".reference" / "wadx2019-qvpo"


def missing_reason(root: Path) -> str | None:
    """None when the reference is usable at `root`, else why not (the skip message)."""
    missing = [f for f in FILES if not (root / f).is_file()]
    if not missing:
        return None
    how = (f"a checkout of github.com/{REPO} at commit {COMMIT}: `make reference` clones it into "
           ".reference/wadx2019-qvpo, or point QVPO_REFERENCE at one")
    if not root.is_dir():
        return f"QVPO reference code not found at {root}: the parity tests need {how}"
    return f"QVPO reference code at {root} lacks {', '.join(missing)}: the parity tests need {how}"


def import_reference(root: Path) -> types.SimpleNamespace:
    """The reference's modules: qvpo (agent/qvpo.py), diffusion, model, helpers, q_transform.

    Its package is the top-level name `agent` (a namespace package: no __init__.py); a different
    module already imported under that name is an error rather than a silent mix-up.
    """
    root = root.resolve()
    existing = sys.modules.get("agent")
    if existing is not None and Path(root / "agent") not in [Path(p).resolve() for p in getattr(existing, "__path__", [])]:
        raise ImportError(f"a module named 'agent' is already imported from elsewhere ({existing!r}); "
                          f"cannot import the reference's agent package from {root}")
    sys.path.insert(0, str(root))
    try:
        # agent/qvpo.py L11 imports agent.vae.VAE, which QVPO never uses (agent/vae.py needs packages we do not install)
        sys.modules.setdefault("agent.vae", types.ModuleType("agent.vae")).VAE = object
        import agent.diffusion
        import agent.helpers
        import agent.model
        import agent.q_transform
        import agent.qvpo
    finally:
        sys.path.remove(str(root))
    return types.SimpleNamespace(qvpo=agent.qvpo, diffusion=agent.diffusion, model=agent.model,
                                 helpers=agent.helpers, q_transform=agent.q_transform)


def _main_tree(root: Path) -> ast.Module:
    return ast.parse((root / "main.py").read_text(), filename="main.py")


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(f"main.py has no function {name}()")


def main_args(root: Path, argv: tuple[str, ...] = MAIN_ARGV) -> argparse.Namespace:
    """The argparse namespace of the reference's main.py run as `main.py *argv`: its readParser()
    (main.py L16-L100), compiled from the source alone (main.py's imports are not run)."""
    fn = _function(_main_tree(root), "readParser")
    namespace: dict = {"argparse": argparse}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(root / "main.py"), "exec"), namespace)
    saved = sys.argv
    sys.argv = ["main.py", *argv]
    try:
        return namespace["readParser"]()
    finally:
        sys.argv = saved


class MainLoopFacts(types.SimpleNamespace):
    """What main.py's training loop does around each update (main()): see `main_loop_facts`."""


def main_loop_facts(root: Path) -> MainLoopFacts:
    """Facts of main.py's main() the tests compare with the package's trainer-level choices.

    start_steps: the value of `start_steps = ...`; update_test: the source of the `if` that guards
    `agent.train(...)`; update_block: the calls/assignments in that block, in order (names);
    after_step_increment: whether `steps += 1` comes before that `if` in the episode loop;
    entropy_alpha(args, steps, num_steps): the expression main.py assigns to agent.entropy_alpha
    (compiled from its source); lines: where each was found.
    """
    main = _function(_main_tree(root), "main")
    facts = MainLoopFacts(lines={})
    for node in ast.walk(main):
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["start_steps"]:
            facts.start_steps = ast.literal_eval(node.value)
            facts.lines["start_steps"] = node.lineno
        if isinstance(node, ast.While):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.If) and any("agent.train" in ast.unparse(s) for s in stmt.body):
                    facts.update_test = ast.unparse(stmt.test)
                    facts.lines["update_if"] = stmt.lineno
                    facts.update_block = [ast.unparse(s.value.func if isinstance(s, ast.Expr) else s.targets[0])
                                          for s in stmt.body if isinstance(s, (ast.Expr, ast.Assign))]
                    facts.after_step_increment = any(
                        isinstance(s, ast.AugAssign) and ast.unparse(s.target) == "steps" for s in body[:i])
                    for s in stmt.body:
                        if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "agent.entropy_alpha":
                            code = compile(ast.Expression(body=s.value), str(root / "main.py"), "eval")
                            facts.lines["entropy_alpha"] = s.lineno
                            facts.entropy_alpha = (lambda code: lambda args, steps, num_steps: eval(
                                code, {"min": min, "max": max}, {"args": args, "steps": steps,
                                                                 "num_steps": num_steps}))(code)
                        if isinstance(s, ast.Expr) and "agent.train" in ast.unparse(s):
                            facts.lines["train"] = s.lineno
    return facts
