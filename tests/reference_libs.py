"""Reference implementations the tests compare against, loaded without the parts that need torchvision.

k-diffusion is installed without its dependencies (torchvision would replace the CPU torch with a CUDA build).
Its package __init__ imports the training stack, and k_diffusion.utils imports torchvision.transforms.functional
and PIL at import time for image helpers the samplers never call. So the package is registered as an empty
module pointing at its folder, and empty stand-ins for torchvision / PIL exist only while k_diffusion.sampling is
imported; they are removed afterwards, so nothing else in the session sees them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def k_diffusion_sampling() -> types.ModuleType:
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("k-diffusion is not installed")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("k_diffusion", pkg)
    missing = {top for top in ("torchvision", "PIL") if top not in sys.modules and importlib.util.find_spec(top) is None}
    stubs = {}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "PIL", "PIL.Image"):
        if name.split(".")[0] in missing:
            stubs[name] = sys.modules.setdefault(name, types.ModuleType(name))
    if "torchvision.transforms" in stubs:
        stubs["torchvision"].transforms = stubs["torchvision.transforms"]
        stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    if "PIL.Image" in stubs:
        stubs["PIL"].Image = stubs["PIL.Image"]
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
