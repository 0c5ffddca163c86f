"""The package's shape: no import cycles, ``flwr`` only in the Flower skin, no method names outside the registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "flora"
# The Flower skin: the only modules that may import flwr.
SKIN = {"flora.strategy", "flora.server_app", "flora.client_app", "flora.simulation", "flora.adversary"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # A module's own parent packages are imported first by Python anyway: not an edge of interest.
    return {name: {m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_even_through_function_level_imports():
    graph = _graph()
    assert "flora.engines" in graph and "flora.lora.methods" in graph  # the walk sees the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_flower_skin_imports_flwr():
    offenders = sorted(_module_name(p) for p in PACKAGE.rglob("*.py")
                       if _module_name(p) not in SKIN and any(m.split(".")[0] == "flwr" for m in _imports(p)))
    assert offenders == []
    assert all(any(m.split(".")[0] == "flwr" for m in _imports(PACKAGE / f"{name.split('.')[1]}.py")) for name in SKIN)


def test_no_method_name_checks_outside_the_registry():
    """Behaviour per method lives in ``flora/lora/methods.py``: no ``method == "..."`` / ``in (...)`` elsewhere."""
    from flora.lora.methods import METHODS

    names = "|".join(METHODS)
    check = re.compile(rf"""(method\w*\s*(==|!=|in|not in)\s*[\(\[\{{]?\s*["']({names})["'])|(["']({names})["']\s*(==|!=)\s*\w*method)""")
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{i}: {line.strip()}"
                 for p in PACKAGE.rglob("*.py") if p.name != "methods.py"
                 for i, line in enumerate(p.read_text().splitlines(), start=1) if check.search(line)]
    assert offenders == []
    assert check.search('if config.method == "flora":') and check.search("method in ('fedit', 'ffa')")


# Config fields that do not change what a run loads (model weights, records, partition); everything else
# must be part of the asset cache key, so a new field cannot silently reuse stale assets.
NOT_ASSET_FIELDS = {
    "cutoff", "method", "num_clients", "ranks", "rounds", "sample_fraction", "min_clients", "weighting",
    "max_update_norm", "clip_update_norm", "outlier_mad", "broadcast", "round_timeout", "warm_source", "warm_split",
    "dp_noise_multiplier",
    "dp_clip_norm", "dp_delta", "dp_broadcast_rank", "dp_noise_seed", "adapters", "adalora_target_ratio",
    "adalora_warmup", "adalora_final", "adalora_init", "adalora_lr_ratio", "adalora_value_lr_ratio", "adalora_orth_weight", "alpha_per_rank", "dropout", "targets", "local_steps", "batch_size",
    "micro_batch_size", "lr", "eval_examples", "client_eval_examples", "threads", "out_dir",
    "lr_schedule", "warmup_steps", "gradient_checkpointing", "client_cpus", "client_gpus", "max_client_weight",
    "min_clients_wait", "report_to",
    "server_test_data",  # read by the server only, uncached (flora/runner.py: server_for)
    "error_check", "eval_every", "server_lr", "dropout_sampler",
}


def test_every_config_field_is_classified_for_the_asset_cache():
    import dataclasses

    from flora.config import RunConfig
    from flora.runtime import AssetKey

    config_fields = {f.name for f in dataclasses.fields(RunConfig)}
    key_fields = {f.name for f in dataclasses.fields(AssetKey)} - {"num_partitions"}  # derived from method
    assert key_fields <= config_fields
    unclassified = config_fields - key_fields - NOT_ASSET_FIELDS
    assert unclassified == set(), f"add {sorted(unclassified)} to AssetKey or to NOT_ASSET_FIELDS"
    # the key separates configs that load different assets, and merges those that do not
    base = RunConfig(num_clients=2, ranks=[4])
    assert AssetKey.of(base) == AssetKey.of(dataclasses.replace(base, lr=1.0, rounds=9))
    assert AssetKey.of(base) != AssetKey.of(dataclasses.replace(base, seed=1))
    assert AssetKey.of(base) != AssetKey.of(dataclasses.replace(base, method="centralized"))
