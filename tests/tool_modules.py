"""The scripts under tools/ as modules: they are tools, not package modules, so tests load
them by path."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    """``tools/<name>.py`` loaded as the module ``dw_d2_tool_<name>``."""
    spec = importlib.util.spec_from_file_location(f"dw_d2_tool_{name}",
                                                  REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
