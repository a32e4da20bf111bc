"""Reading .pt/.bin embedding files without ever running code from them.

A pickle names the functions it calls to rebuild its objects; this unpickler resolves only the names listed in
``ALLOWED``, the ones embedding files need, and refuses every other name before anything is called (the way the
web UIs' safe loader works). torch.load(weights_only=True) refuses two things real embedding files hold: the
``torch.nn.ParameterDict`` of the original textual_inversion repository (``string_to_param``), and tensors pickled
through numpy arrays. Here a ParameterDict becomes a plain dict of its parameters (no module is built) and a numpy
array becomes a CPU tensor.
"""

from __future__ import annotations

import _codecs
import collections
import pickle
import types
import warnings
from pathlib import Path
from typing import Any

import numpy
import torch

try:  # numpy 2 moved the module; files written with numpy 1 still name the old one
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a function or class outside the allowed list; ``name`` is ``module.name``."""

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

ALLOWED: dict[tuple[str, str], Any] = {
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
# Protocol 2 pickles name Python 3's builtins by their Python 2 module.
_PYTHON2_MODULES = {"__builtin__": "builtins"}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the names in ``ALLOWED`` (torch itself resolves its storage classes)."""

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((_PYTHON2_MODULES.get(module, module), name))
        if found is None:
            raise RefusedGlobal(f"{module}.{name}")
        return found


# torch.load's pickle_module: the module it takes Unpickler and load from, for every pickle in the file.
_RESTRICTED = types.SimpleNamespace(
    __name__=__name__,
    Unpickler=RestrictedUnpickler,
    UnpicklingError=pickle.UnpicklingError,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load(),
)


def load_pickle(path: Path) -> Any:
    """A torch file's contents (zip or legacy serialisation), tensors on the CPU; RefusedGlobal for code.

    torch.serialization.load, not torch.load: a web UI replaces torch.load with its own checker, whose
    answer for a file it refuses is None rather than an error.
    """
    with warnings.catch_warnings():
        # A legacy file carries the source code of each module class it pickled, and torch warns when it is not
        # the source of the class loaded now: for ParameterDict's stand-in it never is, and nothing depends on it.
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        return torch.serialization.load(Path(path), map_location="cpu", weights_only=False, pickle_module=_RESTRICTED)
