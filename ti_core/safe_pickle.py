"""Reading pickles (.pt/.bin embedding files, .ckpt checkpoints) without ever running code from them.

A pickle names the functions it calls to rebuild its objects; this unpickler resolves only the names on the
allow-list of the file's purpose and refuses every other name before anything is called (the way the web UIs'
safe loader works). One list a purpose:

- ``EMBEDDING_FILES``: what embedding files need. torch.load(weights_only=True) refuses two things real
  embedding files hold: the ``torch.nn.ParameterDict`` of the original textual_inversion repository
  (``string_to_param``), and tensors pickled through numpy arrays. Here a ParameterDict becomes a plain dict of
  its parameters (no module is built) and a numpy array becomes a CPU tensor.
- ``CHECKPOINTS``: tensors, containers and the training-framework objects a .ckpt carries (Lightning callback
  state, hyper-parameters), which become inert placeholders.
"""

from __future__ import annotations

import _codecs
import builtins
import collections
import contextlib
import importlib
import inspect
import pickle
import types
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy
import torch

try:  # numpy 2 moved the module; files written with numpy 1 still name the old one
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a function or class outside its purpose's allow-list; ``name`` is ``module.name``."""

    def __init__(self, name: str):
        super().__init__(f"refused global {name}")
        self.name = name


class ParameterDictContents(dict):
    """What a pickled ``torch.nn.ParameterDict`` unpickles to: its parameters by key, as a plain dict.

    A Module pickles as "make an empty instance, then set its ``__dict__``"; only ``_parameters`` is kept
    (torch 1.11 and later both keep the parameters there), so no hook or other attribute is ever set.
    """

    dump_patches = False  # read by torch's legacy loader, which never writes patch files for it then

    def __setstate__(self, state: Any) -> None:
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if isinstance(parameters, dict):
            self.update(parameters)


def _tensor_from_numpy(array: Any, dtype: Any, device: Any, requires_grad: Any) -> torch.Tensor:
    """torch's rebuild of a tensor saved through numpy (tensors of devices without storage), on the CPU."""
    if not isinstance(array, numpy.ndarray) or array.dtype.kind not in "biuf":
        raise pickle.UnpicklingError("a tensor saved as a numpy array holds no numbers")
    tensor = torch.from_numpy(numpy.array(array))
    return tensor.to(dtype) if isinstance(dtype, torch.dtype) else tensor


_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}

EMBEDDING_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,  # a Module's _non_persistent_buffers_set
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _tensor_from_numpy,
    ("torch.nn.modules.container", "ParameterDict"): ParameterDictContents,
    ("numpy", "ndarray"): numpy.ndarray,
    ("numpy", "dtype"): numpy.dtype,
    ("_codecs", "encode"): _codecs.encode,  # how protocol 2 stores bytes (a numpy array's data)
    **{(module, name): getattr(_multiarray, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}  # fmt: skip


class _Inert:
    """Stands in for a training-framework object in a .ckpt (callback state, hyper-parameters).

    It accepts any construction and state and does nothing with them.
    """

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # SETITEMS on a dict subclass
        pass

    def append(self, value):  # APPENDS on a list subclass
        pass

    def extend(self, values):
        pass


# Whole packages whose objects are replaced by inert placeholders: they only carry training state.
_INERT_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf")
_INERT_GLOBALS = {
    ("argparse", "Namespace"),  # old Lightning hyper-parameters
    ("typing", "Any"),  # OmegaConf metadata
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
}
_TORCH_REBUILDERS = (
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_device_tensor_from_numpy",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_nested_tensor",
)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    import codecs

    return codecs.encode(text, encoding, errors)


@cache
def _inert_class(module: str, name: str) -> type:
    return type(name, (_Inert,), {"__module__": f"ti_core.inert.{module}"})


def _checkpoint_global(module: str, name: str) -> Any:
    """The object a checkpoint pickle may refer to, or None."""
    if module == "collections" and name in ("OrderedDict", "defaultdict", "Counter"):
        return getattr(collections, name)
    if module == "builtins" and name in ("set", "frozenset", "bytearray", "complex", "slice"):
        return getattr(builtins, name)
    if module == "_codecs" and name == "encode":
        return _codecs_encode
    if module == "torch._utils" and name in _TORCH_REBUILDERS:
        return getattr(torch._utils, name, None)
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return getattr(torch._tensor, name, None)
    if module == "torch.serialization" and name == "_get_layout":
        return getattr(torch.serialization, name, None)
    if module == "torch.nn.parameter" and name == "Parameter":
        return torch.nn.Parameter
    if module == "torch" and name in ("Size", "device", "Tensor"):
        return getattr(torch, name)
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return getattr(torch, name)
    if module == "torch.torch_version" and name == "TorchVersion":
        return str  # a str subclass
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
        return _numpy_global("multiarray", name)
    if module == "numpy" and name in ("dtype", "ndarray"):
        return _numpy_global("", name)
    if module.split(".")[0] in _INERT_PACKAGES or (module, name) in _INERT_GLOBALS:
        return _inert_class(module, name)
    return None


def _numpy_global(submodule: str, name: str):
    if not submodule:
        return getattr(numpy, name)
    # numpy 2 moved numpy.core to numpy._core; numpy 1.x (the web UIs' pin) may have a partial
    # numpy._core stub, so try each real module rather than trusting the attribute.
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(module_name), name)
    return _inert_class(f"numpy.{submodule}", name)


def _embedding_global(module: str, name: str) -> Any:
    return EMBEDDING_GLOBALS.get((module, name))


# One allow-list a purpose: (module, name) -> the object a pickle of that purpose may refer to, or None.
EMBEDDING_FILES: Callable[[str, str], Any] = _embedding_global
CHECKPOINTS: Callable[[str, str], Any] = _checkpoint_global
# Protocol 2 pickles name Python 3's builtins by their Python 2 module.
_PYTHON2_MODULES = {"__builtin__": "builtins"}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names its allow-list gives (torch itself resolves its storage
    classes); RefusedGlobal for any other."""

    allowed: Callable[[str, str], Any] = EMBEDDING_FILES

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed(_PYTHON2_MODULES.get(module, module), name)
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found


@cache
def pickle_module(allowed: Callable[[str, str], Any]) -> types.SimpleNamespace:
    """What torch.load takes as ``pickle_module``: the module it takes Unpickler and load from, for every
    pickle in the file, restricted to ``allowed``."""
    unpickler = type("RestrictedUnpickler", (RestrictedUnpickler,), {"allowed": staticmethod(allowed)})
    return types.SimpleNamespace(
        __name__=__name__,
        Unpickler=unpickler,
        UnpicklingError=pickle.UnpicklingError,
        load=lambda file, **kwargs: unpickler(file, **kwargs).load(),
        Pickler=pickle.Pickler,
        dump=pickle.dump,
    )


def load_pickle(path: Path, allowed: Callable[[str, str], Any] = EMBEDDING_FILES, *, mmap: bool = False) -> Any:
    """A torch file's contents (zip or legacy serialisation), tensors on the CPU; RefusedGlobal for code.

    torch.serialization.load, not torch.load: a web UI replaces torch.load with its own checker, whose
    answer for a file it refuses is None rather than an error. ``mmap`` maps a zip file's tensors instead
    of reading them (a checkpoint's gigabytes).
    """
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": False, "pickle_module": pickle_module(allowed)}
    if mmap and "mmap" in inspect.signature(torch.serialization.load).parameters:
        kwargs["mmap"] = True
    with warnings.catch_warnings():
        # A legacy file carries the source code of each module class it pickled, and torch warns when it is not
        # the source of the class loaded now: for ParameterDict's stand-in it never is, and nothing depends on it.
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        return torch.serialization.load(Path(path), **kwargs)
