"""Start-up hook that lets a CUDA-build torchvision import on CPU-only torch.

Installed by scripts/setup.sh into the virtual environment's site-packages (together with a
one-line ``.pth`` file that imports it) only when a plain ``import torchvision`` fails there.

Why: the torchvision wheel that matches torch 2.13.0 is a CUDA build. Its compiled ops library
cannot load against the CPU torch, so ``torchvision::nms`` and friends are never registered, and
``torchvision._meta_registrations`` / ``torchvision._autograd_registrations`` (which attach
fake/autograd kernels to those ops at import time) raise
``RuntimeError: operator torchvision::nms does not exist``. Everything else in torchvision
(transforms v2, models, the pure-Python op fallbacks) works. This hook keeps exactly those two
registration modules from running by giving Python an empty module for each; nothing else is
touched, and library code never patches torchvision.
"""
import importlib.abc
import importlib.machinery
import sys

_SKIPPED = frozenset({"torchvision._meta_registrations", "torchvision._autograd_registrations"})


class _EmptyModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module):
        module.__doc__ = "emptied by hybridvision's torchvision CPU shim (compiled ops unavailable)"


class _SkipRegistrations(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in _SKIPPED:
            return importlib.machinery.ModuleSpec(fullname, _EmptyModuleLoader())
        return None


if not any(isinstance(f, _SkipRegistrations) for f in sys.meta_path):
    sys.meta_path.insert(0, _SkipRegistrations())
