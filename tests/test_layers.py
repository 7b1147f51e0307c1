"""The package's layers: each imports only the layers below it, and no module imports itself back
through others (so a change low in the stack never needs one high up)."""

from __future__ import annotations

import graphlib

import grimp
import pytest

# highest first: a layer may import any layer below it, never one above
LAYERS = (
    "labelling",
    "review",
    "evaluation",
    "inference",
    "sweeps",
    "training",
    "callbacks",
    "models",
    "data",
    "utils",
)
PACKAGE = "railway_defect"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE, include_external_packages=False)


def test_every_subpackage_has_a_layer(graph: grimp.ImportGraph) -> None:
    subpackages = {m.split(".")[1] for m in graph.modules if m.count(".") >= 2}
    assert subpackages == set(LAYERS)


def test_layers_import_only_the_layers_below(graph: grimp.ImportGraph) -> None:
    illegal = graph.find_illegal_dependencies_for_layers(layers=LAYERS, containers={PACKAGE})
    assert not illegal, "\n".join(f"{d.importer} imports {d.imported}" for d in illegal)


def test_no_module_imports_itself_back(graph: grimp.ImportGraph) -> None:
    imports = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    sorter = graphlib.TopologicalSorter(imports)
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_the_private_lightning_names_spawn_launching_uses_are_there() -> None:
    """training/launching.py subclasses Lightning's spawn launcher and calls a few private names;
    pyproject pins the Lightning releases they are tested with. A new release that moves one fails
    here, by name, instead of deep inside a sweep of DDP jobs."""
    import lightning
    from lightning.pytorch.strategies import DDPStrategy, launchers
    from lightning.pytorch.strategies.launchers import multiprocessing
    from lightning.pytorch.trainer import call

    needed = {
        "launchers._SubprocessScriptLauncher": hasattr(launchers, "_SubprocessScriptLauncher"),
        "multiprocessing._MultiProcessingLauncher": hasattr(multiprocessing, "_MultiProcessingLauncher"),
        "_MultiProcessingLauncher._wrapping_function": hasattr(
            getattr(multiprocessing, "_MultiProcessingLauncher", None), "_wrapping_function"
        ),
        "trainer.call._interrupt": hasattr(call, "_interrupt"),
        "Trainer._teardown": hasattr(lightning.Trainer, "_teardown"),
        "DDPStrategy._launcher, ._start_method": {"_launcher", "_start_method"} <= set(vars(DDPStrategy())),
    }
    missing = [name for name, present in needed.items() if not present]
    assert not missing, (
        f"lightning {lightning.__version__} lacks {', '.join(missing)}, which training/launching.py uses; "
        "install a release in pyproject's range or port SpawnLauncher to it."
    )


def test_no_function_is_longer_than_a_screen() -> None:
    """Functions short enough to read at once: at most 50 lines, docstring included."""
    import ast
    from pathlib import Path

    import railway_defect

    long = []
    for path in sorted(Path(railway_defect.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 50:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def test_one_type_holds_what_a_model_needs_to_see_an_image() -> None:
    """ModelContract is the only class that declares the model's classes: every artefact's reader
    returns it, nothing keeps a copy of its own."""
    import ast
    from pathlib import Path

    import railway_defect

    holders = []
    for path in sorted(Path(railway_defect.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                fields = {
                    s.target.id
                    for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                }
                if {"class_names", "positive_class"} <= fields:
                    holders.append(node.name)
    assert holders == ["ModelContract"]
