import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from test_nodes import ext  # noqa: E402,F401  (the extension over ComfyUI stand-ins)


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
    # outside ComfyUI (no folder_paths): the package imports and offers no nodes
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}
    assert module.WEB_DIRECTORY == "./web" and (ROOT / "web" / "js" / "rcod.js").is_file()


NODES = {"RCODModelLoader", "RCODVisualPrompt", "RCODLatentMetric", "RCODEncode", "RCODDenoise", "RCODDecode",
         "RCODUpscale", "RCODRealismSweep"}


def test_comfyui_entry_registers_every_node(ext):  # noqa: F811  (the imported fixture)
    """Inside ComfyUI (the stand-ins of test_nodes): every node with a display name and the classic API."""
    assert set(ext.NODE_CLASS_MAPPINGS) == NODES
    assert set(ext.NODE_DISPLAY_NAME_MAPPINGS) == NODES
    for name, cls in ext.NODE_CLASS_MAPPINGS.items():
        assert ext.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("RCOD"), name
        assert callable(getattr(cls(), cls.FUNCTION)) and cls.CATEGORY.startswith("RCOD"), name
        assert isinstance(cls.INPUT_TYPES()["required"], dict) and isinstance(cls.RETURN_TYPES, tuple), name


def test_presets_come_from_rcod_core():
    """The nodes' presets are rcod_core's, and the web extension has no copy of them."""
    from rcod_core.grouping import PRESETS

    js = (ROOT / "web" / "js" / "rcod.js").read_text()
    assert "rcod_preset_t" in js and not any(f"{name.capitalize()}: {t}" in js for name, t in PRESETS.items())


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
