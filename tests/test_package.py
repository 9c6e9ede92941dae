import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_comfyui_entry_imports_as_a_package():
    # ComfyUI loads custom_nodes/<folder>/__init__.py as a package under the folder's name.
    spec = importlib.util.spec_from_file_location("comfyui_rcod_entry", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
    assert module.WEB_DIRECTORY == "./web"


def test_rcod_core_never_imports_comfy():
    code = "import sys, rcod_core.pipeline, rcod_core.build, rcod_core.cli; " \
           "bad = [m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'folder_paths', 'nodes'))]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "tests")


def test_shipped_configs_are_package_data():
    import rcod_core.models as models

    for family in models.BASE_FAMILIES:
        for component in ("unet", "vae", "scheduler", "clip_vision"):
            assert models.config_path(family, component).is_file(), (family, component)
