"""Import the released SoundNet8 weights: ``soundnet8.npz`` or the ``sound8.npy`` the public ports publish (layout:
../shared/data/soundnet8/README.md).

``sound8.npy`` is a Python pickle. Unpickling runs whatever callables a pickle names, so a tampered copy could run
any command on ``np.load(allow_pickle=True)``. :class:`NumpyOnlyUnpickler` admits the three callables that numpy
arrays are rebuilt with, called as numpy's pickles call them, and nothing else; dicts, lists and tuples are pickle
opcodes, not callables.
"""

from __future__ import annotations

import math
import os
import pickle
from typing import IO, Any

import numpy as np
import torch

from soundnet.student.model import ModelConfig, SoundNet

# npz head name -> our teacher name
RELEASED_HEADS = {"conv8_objs": "imagenet", "conv8_scns": "places"}
# sound8.npy layer name -> npz layer name; sound8.npy BN entry -> npz BN parameter
SOUND8_HEADS = {"conv8": "conv8_objs", "conv8_2": "conv8_scns"}
SOUND8_BN = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class UnsafePickle(ValueError):
    """A pickle that does more than rebuild numpy arrays (another callable, another call, a forged state): refused
    before any of it ran."""


class NumpyOnlyUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be checked one by one
    """Unpickles numpy arrays in dicts, lists and tuples; refuses everything else before it runs.

    Admitting numpy's rebuilders is not enough: ``ndarray(shape)`` hands out uninitialised memory, and a forged dtype
    state (BUILD) makes numpy read object pointers from bytes the pickle chose. So only the calls and states numpy's
    own pickles hold get through: ``_reconstruct(ndarray, (0,), b"b")``, ``dtype(NAME, align, copy)`` of a plain
    number or object dtype whose state may set only the byte order, and the state of an empty array whose bytes (or
    objects) are exactly as many as its shape and dtype need. The opcodes that build other objects are refused.
    Both spellings of the array rebuilder are admitted (``numpy.core`` before numpy 2, ``numpy._core`` since), and
    they resolve to this numpy's own function rather than to an import of the named module.
    """

    _reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    DTYPE_KINDS = "biufcO"  # numbers, and objects for the pickled dict; no records, strings or subarrays
    REFUSED = (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4,
               pickle.PERSID, pickle.BINPERSID, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER)  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickle(f"it calls {module}.{name}, and only numpy arrays are admitted")
        return found

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        empty = (np.ndarray, (0,), b"b"), (np.ndarray, (0,), "b")  # the placeholder numpy pickles (Python 3, 2)
        if func is self._reconstruct and any(_same(args, placeholder) for placeholder in empty):
            self.stack[-1] = np.ndarray((0,), np.uint8)  # empty: BUILD gives it its shape, dtype and contents
        elif func is np.dtype and len(args) == 3 and isinstance(args[0], str) and args[0].isalnum():
            self.stack[-1] = np.dtype(self._admitted_dtype(np.dtype(args[0])), False, True)  # a copy BUILD may set
        else:
            name = getattr(func, "__name__", type(func).__name__)
            raise UnsafePickle(f"it calls {name}{args!r:.80}, which numpy's pickles never do")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(state, tuple):
            raise UnsafePickle(f"it sets the state of a {type(inst).__name__} to a {type(state).__name__}")
        if isinstance(inst, np.dtype) and len(state) >= 5 and isinstance(state[1], str) and state[1] in tuple("<>|="):
            if any(part is not None for part in state[2:5]):  # subarray, field names, fields
                raise UnsafePickle(f"it turns the dtype {inst} into a record or a subarray")
            # only the byte order, as numpy itself sets it (none for objects and bytes); sizes and flags are numpy's
            inst.__setstate__(inst.newbyteorder(state[1]).__reduce__()[2])
        elif type(inst) is np.ndarray and inst.shape == (0,) and inst.dtype == np.uint8 and len(state) == 5:
            self._check_array_state(*state)
            inst.__setstate__(state)
        else:
            raise UnsafePickle(f"it sets the state of a {type(inst).__name__} as numpy's pickles never do")

    def load_refused(self) -> None:
        raise UnsafePickle("it builds objects with INST, OBJ, NEWOBJ, EXT or PERSID, which numpy's pickles never do")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch.update(dict.fromkeys([op[0] for op in REFUSED], load_refused))

    def _admitted_dtype(self, dtype: np.dtype) -> np.dtype:
        if dtype.kind not in self.DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise UnsafePickle(f"it makes the dtype {dtype}, and only numbers and objects are admitted")
        return dtype

    def _check_array_state(self, version: Any, shape: Any, dtype: Any, fortran: Any, data: Any) -> None:
        """The state BUILD gives an array: numpy's checks come after it allocates, these before."""
        if not isinstance(dtype, np.dtype):
            raise UnsafePickle(f"it gives an array the dtype {dtype!r:.80}")
        self._admitted_dtype(dtype)
        # numpy does not check that the strides of an empty array fit: (0, 2**63 - 1, 2**63 - 1) gets negative ones
        if not (
            isinstance(shape, tuple)
            and all(type(n) is int and n >= 0 for n in shape)
            and math.prod(n for n in shape if n) * dtype.itemsize < 2**63
        ):
            raise UnsafePickle(f"it gives an array the shape {shape!r:.80}")
        count = math.prod(shape)
        if dtype.hasobject:
            if not (isinstance(data, list) and len(data) == count):
                raise UnsafePickle(f"it claims {count:,} objects for an array and gives others")
        elif not (isinstance(data, (bytes, str)) and len(data) == count * dtype.itemsize):
            raise UnsafePickle(f"it claims {count * dtype.itemsize:,} bytes for a {dtype} array and gives others")


def _same(args: Any, expected: tuple) -> bool:
    """``args == expected`` for a tuple of plain values, without comparing whatever a pickle put in ``args``."""
    return (
        type(args) is tuple
        and len(args) == len(expected)
        and all(type(a) is type(e) and (a is e or a == e) for a, e in zip(args, expected))
    )


def npy_dtype(f: IO[bytes]) -> np.dtype:
    """The dtype in a ``.npy`` header; ``f`` is left at the start of the data (a pickle for object arrays)."""
    version = np.lib.format.read_magic(f)
    if version not in NPY_HEADERS:
        raise ValueError(f".npy format version {version} (sound8.npy is version 1.0)")
    return NPY_HEADERS[version](f)[2]


def read_pickled_npy(path: str | os.PathLike) -> Any:
    """The object stored in a pickled ``.npy`` (``np.save`` of a dict), read with :class:`NumpyOnlyUnpickler`."""
    with open(path, "rb") as f:
        try:
            dtype = npy_dtype(f)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not dtype.hasobject:
            raise ValueError(f"{path}: a plain {dtype} array, not the pickled weights of sound8.npy")
        try:  # Python 2 pickles (sound8.npy is one) hold array bytes as str: latin1 keeps them byte for byte
            array = NumpyOnlyUnpickler(f, encoding="latin1").load()
        except UnsafePickle as exc:
            raise UnsafePickle(f"{path}: refused to unpickle: {exc} (nothing in it was run)") from None
        except Exception as exc:  # a truncated or corrupt pickle raises many types
            raise ValueError(f"{path}: damaged pickle ({type(exc).__name__}: {exc})") from None
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array


def sound8_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of ``sound8.npy`` under the npz names and PyTorch layouts: TF ``[k, 1, in, out]`` conv weights
    become ``[out, in, k]``; nothing is flipped or rescaled."""
    layers = read_pickled_npy(path)
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError(f"{path}: not the sound8.npy layout (a dict of layers, each a dict of arrays)")
    arrays = {}
    for layer, params in layers.items():
        name = SOUND8_HEADS.get(layer, layer)
        for param, value in params.items():
            value = np.asarray(value)
            if param == "weights":
                if value.ndim != 4 or value.shape[1] != 1:
                    raise ValueError(f"{path}: {layer}.weights has shape {value.shape}, expected [k, 1, in, out]")
                arrays[f"{name}.weight"] = value[:, 0].transpose(2, 1, 0)
            elif param == "biases":
                arrays[f"{name}.bias"] = value
            elif param in SOUND8_BN and layer.startswith("conv"):
                arrays[f"bn{layer[4:]}.{SOUND8_BN[param]}"] = value
            else:
                raise ValueError(f"{path}: unexpected entry {layer}.{param} in sound8.npy")
    return arrays


def released_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The released tensors under their npz names, from ``soundnet8.npz`` or ``sound8.npy`` (told apart by content)."""
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head.startswith(ZIP_MAGIC):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        except Exception as exc:  # a damaged archive raises zipfile, zlib and numpy errors; object arrays refused
            raise ValueError(f"{path}: not a readable soundnet8.npz ({type(exc).__name__}: {exc})") from None
    if head == NPY_MAGIC:
        return sound8_arrays(path)
    raise ValueError(f"{path}: neither soundnet8.npz nor sound8.npy")


def _npz_to_ours(name: str) -> str:
    """Map a released tensor name (``conv3.weight``, ``bn3.running_var``, ``conv8_objs.bias``) to our key."""
    layer, _, param = name.partition(".")
    if layer in RELEASED_HEADS:
        return f"heads.{RELEASED_HEADS[layer]}.{param}"
    if layer.startswith("bn"):
        return f"blocks.conv{layer[2:]}.1.{param}"
    return f"blocks.{layer}.0.{param}"


def import_soundnet8(path: str | os.PathLike) -> SoundNet:
    """Build a SoundNet8 with the released weights (``soundnet8.npz`` or ``sound8.npy``); every tensor's name and
    shape is checked."""
    arrays = released_arrays(path)
    absent = [f"{theirs}.bias" for theirs in RELEASED_HEADS if f"{theirs}.bias" not in arrays]
    if absent:
        raise ValueError(f"{path}: released weights lack {absent}")
    heads = {ours: int(arrays[f"{theirs}.bias"].shape[0]) for theirs, ours in RELEASED_HEADS.items()}
    model = SoundNet(ModelConfig(arch="soundnet8", heads=heads))
    expected = model.state_dict()
    state = {}
    for name, array in arrays.items():
        key = _npz_to_ours(name)
        if key not in expected:
            raise ValueError(f"{path}: released tensor {name!r} maps to {key!r}, which SoundNet8 does not have")
        if tuple(array.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path}: {name} has shape {tuple(array.shape)} but SoundNet8 expects {tuple(expected[key].shape)}"
            )
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    for key, tensor in expected.items():  # BN counters are not in the release
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.zeros_like(tensor))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: released weights lack {missing}")
    model.load_state_dict(state, strict=True)
    return model.eval()
