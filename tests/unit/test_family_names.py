"""Only the family registry compares family names (issue 17).

What differs between model families is a field of `engine.models.families.FamilyInfo` (or a family group of
`engine.config.choices`), so that adding a family means editing the registry only. This test reads the source of
`engine/` and `gui/` with `ast` and fails, naming file:line, on a family name written as a string constant where it
decides something:

- in a comparison: `family == "sdxl"`, `family != "sd1"`, `family in ("flux1", "chroma")`, `"sd3" not in names`;
- as a `case "sdxl":` pattern;
- as a key of a dict literal keyed by family names (`{"sd1": ..., "sdxl": ...}`), which a lookup turns into a
  comparison. "sdxl" and "sd3" are also keys of the registries FamilyInfo points into (text_encoding, sampler,
  loader, objective: `_GENERATORS = {"sd": ..., "sdxl": ..., "flux": ..., "sd3": ...}`), so a dict is flagged only
  when a key is a family name that is no such registry key ("sd1", "sd2", "flux1", "chroma").

Family names as data stay: return values of detection (`return "sdxl"`), defaults, subscripts such as
`FAMILY_INFO["sd3"]` in SD3-only code, docstrings and messages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from engine.models.families import FAMILY_INFO

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "gui")
FAMILIES = frozenset(FAMILY_INFO)
# Keys of the registries FamilyInfo names (a family's text_encoding "sdxl" is no family name there).
REGISTRY_KEYS = frozenset(getattr(info, field) for info in FAMILY_INFO.values()
                          for field in ("objective", "unet_naming", "text_encoding", "sampler", "loader"))
FAMILY_ONLY = FAMILIES - REGISTRY_KEYS

# (file, scope) -> why it may name families: the scope is the enclosing function or class, or the name a module-level
# assignment binds. Keep it small; a new entry needs a reason that is not "it was quicker".
ALLOWED: dict[tuple[str, str], str] = {
    ("engine/models/families.py", "*"): "the registry itself",
    ("engine/config/choices.py", "*"): "the config's family choices and groups",
    ("engine/cache/text_encoder.py", "expected_key"): "`kind` is FamilyInfo.text_encoding, a registry key",
    ("engine/config/importers/kohya_network.py", "LORA_TYPES"): "kohya_ss' LoRA_type 'Flux1' (its vocabulary)",
    ("engine/models/configs/__init__.py", "_COMPONENTS"): "data: the diffusers configs shipped per SD family",
    ("engine/models/ldm_checkpoint.py", "TEXT_ENCODER_LAYOUTS"): "data: how the LDM single-file format lays out "
                                                                 "each SD family's text encoders",
    ("engine/models/text_encoders.py", "TEXT_COMPONENTS"): "data: each SD family's diffusers text-encoder folders",
    ("engine/networks/embedding_file.py", "EMBEDDING_KEYS"): "data: the keys of each family's embedding files "
                                                             "(the A1111/sd-scripts format)",
    ("engine/networks/tools/convert_names.py", "TEXT_COMPONENTS"): "data: diffusers' text-encoder names of each "
                                                                   "family's LoRA files",
}


def _constants(node: ast.AST) -> Iterator[ast.Constant]:
    """The string constants a comparison operand spells: itself, or the items of a tuple, list or set."""
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    yield from (item for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str))


def _compared(node: ast.Compare) -> Iterator[ast.Constant]:
    if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
        return
    for operand in (node.left, *node.comparators):
        yield from (const for const in _constants(operand) if const.value in FAMILIES)


def _dict_keys(node: ast.Dict) -> Iterator[ast.Constant]:
    keys = [key for key in node.keys if isinstance(key, ast.Constant) and isinstance(key.value, str)]
    if any(key.value in FAMILY_ONLY for key in keys):
        yield from (key for key in keys if key.value in FAMILIES)


def _hits(node: ast.AST) -> Iterator[ast.Constant]:
    if isinstance(node, ast.Compare):
        yield from _compared(node)
    elif isinstance(node, ast.Dict):
        yield from _dict_keys(node)
    elif isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant) and node.value.value in FAMILIES:
        yield node.value


def _scoped(node: ast.AST, scope: str) -> Iterator[tuple[ast.Constant, str]]:
    """Every hit under `node` with the innermost function/class (or module-level assignment) it is in."""
    for child in ast.iter_child_nodes(node):
        inner = scope
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            inner = child.name
        elif scope == "" and isinstance(child, ast.Assign | ast.AnnAssign):
            targets = child.targets if isinstance(child, ast.Assign) else [child.target]
            inner = next((ast.unparse(target) for target in targets), "")
        yield from ((hit, inner) for hit in _hits(child))
        yield from _scoped(child, inner)


def family_name_uses(source: str, relative: str) -> list[str]:
    """'file:line: "name" (scope)' for each family name that decides something in `source`, allowed ones left out."""
    if (relative, "*") in ALLOWED:
        return []
    found = []
    for const, scope in _scoped(ast.parse(source, filename=relative), ""):
        if (relative, scope) not in ALLOWED:
            found.append(f"{relative}:{const.lineno}: {const.value!r} ({scope or 'module'})")
    return sorted(set(found), key=lambda line: (line.split(":")[0], int(line.split(":")[1]), line))


def test_only_the_registry_compares_family_names():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            found += family_name_uses(path.read_text(encoding="utf-8"), relative)
    assert found == [], ("family names compared outside the registry; use a FamilyInfo field "
                         "(engine/models/families.py) or a family group (engine/config/choices.py):\n"
                         + "\n".join(found))


def _scopes(tree: ast.Module) -> set[str]:
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assigned = {ast.unparse(target) for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}
    annotated = {ast.unparse(node.target) for node in tree.body if isinstance(node, ast.AnnAssign)}
    return functions | assigned | annotated


def test_the_allow_list_names_real_scopes():
    for file, scope in ALLOWED:
        path = REPO / file
        assert path.is_file(), file
        assert scope == "*" or scope in _scopes(ast.parse(path.read_text(encoding="utf-8"))), (file, scope)


def test_the_scan_finds_comparisons_keys_and_patterns():
    source = '''
def pick(family, kind):
    if family == "sdxl" or kind != "flux":
        return 1
    if family in ("flux1", "chroma"):
        return 2
    match family:
        case "sd3":
            return 3
    return {"sd1": 4, "sd2": 4}[family]

GENERATORS = {"sd": 1, "sdxl": 2, "flux": 3, "sd3": 4}  # registry keys: not family names here
DETECTED = "sd2"  # data
LABEL = "SD3" if FAMILY_INFO["sd3"] else ""  # a subscript: data
'''
    assert family_name_uses(source, "engine/x.py") == [
        "engine/x.py:3: 'sdxl' (pick)", "engine/x.py:5: 'chroma' (pick)", "engine/x.py:5: 'flux1' (pick)",
        "engine/x.py:8: 'sd3' (pick)", "engine/x.py:10: 'sd1' (pick)", "engine/x.py:10: 'sd2' (pick)"]
    assert family_name_uses(source, "engine/models/families.py") == []
