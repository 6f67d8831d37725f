"""Hold the layering of docs/STYLE true: lower layers never import upper ones, each outside
library is imported by one module, and nothing in ringtrain can execute a peer's bytes.

Every module's imports are read with ``ast`` (including imports inside functions), so this
needs no import side effects and runs in well under a second.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import ringtrain

PACKAGE = Path(ringtrain.__file__).parent

# module or package (dotted, relative to ringtrain; the longest entry that covers a module wins)
# -> layer. The table follows the folders: each subpackage is one concern.
LAYERS: dict[str, int] = {
    # 0 pure: stdlib and numpy only
    "errors": 0, "config": 0, "comm": 0, "comm.wire": 0, "comm.security": 0,
    "comm.identity": 0, "comm.ledger": 0, "comm.endpoints": 0, "ring": 0,
    "ring.plan": 0, "ring.compression": 0, "train.nn": 0, "train.optim": 0,
    "train.sharding": 0, "train.datasets": 0, "membership": 0, "discovery": 0, "node": 0,
    "lab": 0, "discovery.candidates": 0, "discovery.advert": 0,
    # 1 one outside world each
    "comm.transport": 1, "comm.zap": 1, "comm.polling": 1, "comm.door": 1,
    "comm.handshakes": 1, "comm.curve": 1, "comm.shm": 1,
    "discovery.mdns": 1, "discovery.mdns_unicast": 1, "discovery.interfaces": 1,
    "train.checkpoint": 1,
    "lab.netns": 1, "lab.cpu_budget": 1, "models": 1, "discovery.dns": 1, "discovery.names": 1,
    # 2 protocols
    "comm.mailbox": 2, "membership.links": 2, "membership.dialling": 2, "ring.collectives": 2,
    "ring.segments": 2,
    "ring.runner": 2, "ring.plan_run": 2, "ring.one_round": 2, "ring.link_probe": 2,
    # the membership protocol itself is pure (sans-I/O): no socket, thread or clock
    "membership.messages": 0, "membership.peers": 0, "membership.agreement": 0,
    "membership.protocol": 0,
    # 3 the node, and the package surface that re-exports it
    "node.node": 3, "node.launch": 3, "node.wrong_key": 3, "node.gate": 3, "node.engine": 3,
    "node.executor": 3, "node.ring_order": 3, "node.work": 3, "node.collective_calls": 3,
    "node.parts": 3, "node.peer_sources": 3, "node.names": 3, "__init__": 3,
    # 4 training and tools built on a node
    "train": 4, "testing": 4, "integrations": 4, "infer": 4, "pipeline": 4, "agent": 4,
    "agent.protocol": 0,
    # reinforcement learning: pure pieces, Gymnasium's one module, the learner on a node
    "rl": 4, "rl.stats": 0, "rl.ppo": 0, "rl.rollout": 0, "rl.exchange": 0, "rl.envs": 1,
    # 5 entry points and tooling: every command and benchmark module
    "cli": 5, "bench": 5, "__main__": 5,
    # observe: the recorder sits low (the runner feeds it); the rest is tooling
    "observe": 0, "observe.analysis": 0, "observe.recorder": 1, "observe.timeline": 1,
    "observe.metrics": 1, "observe.status": 2, "observe.diagnose": 2, "observe.observer": 4,
    "lab.hostile": 5, "lab.restart": 5,
}
# benchmarks and lab tools: only entry points and other tools may import them
TOOLING = ("bench", "lab")
LAYER_NAMES = {0: "pure", 1: "one outside world", 2: "protocols", 3: "node", 4: "training",
               5: "entry points"}

# outside libraries (not stdlib) and the only modules that may import them
OUTSIDE = {
    "numpy": None,  # anyone
    # comm's zmq side
    "zmq": {"comm.transport", "comm.zap", "comm.handshakes", "comm.curve", "comm.polling"},
    "zeroconf": {"discovery.mdns", "discovery.mdns_unicast"},
    "ifaddr": {"discovery.interfaces"},  # zeroconf's own dependency, for interface addresses
    "dns": {"discovery.dns"},  # dnspython
    "torch": {"integrations", "bench.baselines", "bench.torch_ddp", "bench.ddp_baseline"},
    "mpi4py": {"bench.mpi_baseline"},
    "gymnasium": {"rl.envs"},
    "matplotlib": {"bench.wifi", "cli.plot"},  # optional extras, each drawn by one command
    "rich": {"cli.status"},
}
NEVER_IMPORTED = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle",
                  "joblib"}
NEVER_CALLED = {"eval", "exec", "compile", "__import__"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to ``ringtrain``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_key(module: str) -> str:
    """The LAYERS entry that covers a module: itself, or the nearest package it lives in."""
    while module not in LAYERS and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package_parts = ["ringtrain", *module.split(".")]
    if not path.name == "__init__.py":
        package_parts = package_parts[:-1]
    if module == "__init__":
        package_parts = ["ringtrain"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.level and not node.module:
                # from . import a, b: each name is a module, or a name from the package
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    known = candidate.removeprefix("ringtrain.") in modules()
                    found.append((candidate if known else target, node.lineno))
            else:
                found.append((target, node.lineno))
    return found


def internal_name(target: str) -> str | None:
    """``ringtrain.x.y`` -> ``x.y`` (``__init__`` for the package itself); None if outside."""
    if target == "ringtrain":
        return "__init__"
    if target.startswith("ringtrain."):
        return target.removeprefix("ringtrain.")
    return None


def internal_module(name: str) -> str:
    """The existing module an internal import refers to (``from .wire import X`` -> wire)."""
    known = modules()
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


ALL = modules()


def test_every_module_has_a_layer():
    unknown = sorted(m for m in ALL if layer_key(m) not in LAYERS)
    assert not unknown, (
        f"new module(s) {unknown} have no layer: add them to LAYERS in "
        f"tests/unit/test_layering.py (see the layering table in STYLE.md), so the table "
        f"stays current")


def test_the_table_names_no_module_twice_and_the_core_exists():
    for core in ("errors", "config", "comm.wire", "ring.plan", "comm.transport", "comm.mailbox",
                 "membership.protocol", "ring.collectives", "node.node", "testing", "cli.main"):
        assert core in ALL, f"ringtrain.{core} is gone: update LAYERS"


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_module_imports_an_upper_layer(module):
    if layer_key(module) not in LAYERS:
        pytest.skip("not in the table (see test_every_module_has_a_layer)")
    mine = LAYERS[layer_key(module)]
    offending = []
    for target, line in imports(module, ALL[module]):
        name = internal_name(target)
        if name is None:
            continue
        other = internal_module(name)
        theirs = LAYERS.get(layer_key(other))
        if theirs is None:
            offending.append(f"line {line}: imports {target}, which is not in the layer table")
        elif theirs > mine:
            offending.append(f"line {line}: imports {other} (layer {theirs}, "
                             f"{LAYER_NAMES[theirs]})")
    assert not offending, (f"ringtrain.{module} (layer {mine}, {LAYER_NAMES[mine]}) reaches up:\n"
                           + "\n".join(offending))


@pytest.mark.parametrize("module", sorted(ALL))
def test_outside_libraries_stay_in_their_one_module(module):
    key = layer_key(module)
    offending = []
    for target, line in imports(module, ALL[module]):
        top = target.split(".")[0]
        if top == "ringtrain" or top in sys.stdlib_module_names:
            continue
        if top not in OUTSIDE:
            offending.append(f"line {line}: imports {target}, an outside library this test "
                             f"does not know: add it to OUTSIDE with the one module that owns it")
            continue
        owners = OUTSIDE[top]
        if owners is not None and module not in owners and key not in owners:
            offending.append(f"line {line}: imports {top}, which only {sorted(owners)} may import")
        if LAYERS.get(key) == 0 and top != "numpy":
            offending.append(f"line {line}: layer 0 imports {top}; it may use stdlib and numpy")
    assert not offending, f"ringtrain.{module}:\n" + "\n".join(offending)


@pytest.mark.parametrize("module", sorted(ALL))
def test_nothing_can_execute_a_peers_bytes(module):
    path = ALL[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    offending = []
    for target, line in imports(module, path):
        if target.split(".")[0] in NEVER_IMPORTED:
            offending.append(f"line {line}: imports {target}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else (
            func.attr if isinstance(func, ast.Attribute) else None)
        if name in NEVER_CALLED and not (isinstance(func, ast.Attribute)
                                         and name == "compile"):  # re.compile is fine
            offending.append(f"line {node.lineno}: calls {name}()")
        for keyword in node.keywords:
            if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                offending.append(f"line {node.lineno}: allow_pickle is not literally False")
    assert not offending, f"ringtrain.{module}:\n" + "\n".join(offending)


def test_the_checks_see_imports():
    """Guard the parser itself: it finds relative, absolute, package and lazy imports."""
    found = {internal_module(internal_name(t)) for module in ALL if module.startswith("node.")
             for t, _ in imports(module, ALL[module]) if internal_name(t)}
    assert {"ring.collectives", "ring.runner", "config", "errors", "comm.mailbox",
            "membership.protocol", "comm.transport", "comm.wire"} <= found
    assert any(t == "zmq" for t, _ in imports("comm.transport", ALL["comm.transport"]))
    assert internal_module(internal_name("ringtrain.comm.wire.X") or "") == "comm.wire"


@pytest.mark.parametrize("module", sorted(m for m in ALL if layer_key(m).split(".")[0]
                                          not in (*TOOLING, "cli", "__main__")))
def test_the_core_never_imports_benchmarks_or_lab_tools(module):
    offending = [f"line {line}: imports {target}"
                 for target, line in imports(module, ALL[module])
                 if (internal_name(target) or "").split(".")[0] in TOOLING]
    assert not offending, (f"ringtrain.{module} is core and imports tooling (benchmarks and "
                           f"lab tools stay apart):\n" + "\n".join(offending))
