"""The ctypes side of the kernel boundary, read from the C header (csrc/gemmakit_kernels.h).

The header is the one declaration of every exported function and struct. This module parses it (a small,
fixed subset of C: ``typedef struct { ... } Name;`` blocks and prototypes) into ctypes signatures and
``ctypes.Structure`` classes, so a signature changed in C changes here with it, and :func:`bind` checks that a
loaded library exports every declared function and was built for the same ABI number.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

HEADER = Path(__file__).parent / "csrc" / "gemmakit_kernels.h"

_SCALARS = {
    "void": None, "int": ctypes.c_int, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
    "uint64_t": ctypes.c_uint64, "uint32_t": ctypes.c_uint32, "float": ctypes.c_float, "double": ctypes.c_double,
}


class HeaderError(ValueError):
    """The header uses C this parser does not read (a bug in gemmakit, caught by its tests)."""


@dataclass(frozen=True)
class Function:
    name: str
    restype: object
    argtypes: tuple


@dataclass(frozen=True)
class Declarations:
    abi: int
    structs: dict[str, type[ctypes.Structure]]
    functions: dict[str, Function]


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def _ctype(decl: str, structs: dict[str, type[ctypes.Structure]]) -> tuple[str, object]:
    """'const int64_t *slot' -> ('slot', c_void_p); 'QMatrix qkv' -> ('qkv', QMatrix)."""
    decl = " ".join(decl.replace("*", " * ").split())
    match = re.fullmatch(r"(?:const )?(\w+)( \*)?(?: (\w+))?", decl)
    if match is None:
        raise HeaderError(f"cannot read the declaration {decl!r}")
    type_name, pointer, name = match.groups()
    if pointer:  # every pointer crosses as an address (arrays of structs included)
        return name or "", ctypes.c_void_p
    if type_name in _SCALARS:
        return name or "", _SCALARS[type_name]
    if type_name in structs:
        return name or "", structs[type_name]
    raise HeaderError(f"unknown type {type_name!r} in {decl!r}")


def _structs(text: str) -> dict[str, type[ctypes.Structure]]:
    structs: dict[str, type[ctypes.Structure]] = {}
    for body, name in re.findall(r"typedef struct \{(.*?)\}\s*(\w+)\s*;", text, flags=re.S):
        fields = []
        for member in filter(None, (m.strip() for m in body.split(";"))):
            field_name, ctype = _ctype(member, structs)
            if ctype is None or not field_name:
                raise HeaderError(f"struct {name}: cannot read the member {member!r}")
            fields.append((field_name, ctype))
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    return structs


def _functions(text: str, structs: dict[str, type[ctypes.Structure]]) -> dict[str, Function]:
    text = re.sub(r"typedef struct \{.*?\}\s*\w+\s*;", " ", text, flags=re.S)
    text = re.sub(r"^\s*#[^\n]*", " ", text, flags=re.M)
    functions = {}
    for ret, name, params in re.findall(r"([\w ]+?\*?)\s*\b(\w+)\s*\(([^)]*)\)\s*;", text):
        _, restype = _ctype(ret.strip(), structs)
        params = params.strip()
        argtypes = () if params in ("", "void") else tuple(_ctype(p, structs)[1] for p in params.split(","))
        functions[name] = Function(name, restype, argtypes)
    return functions


@lru_cache(maxsize=1)
def declarations(header: Path = HEADER) -> Declarations:
    """The structs, functions and ABI number the header declares."""
    text = header.read_text()
    abi = re.search(r"#define\s+GEMMAKIT_KERNELS_ABI\s+(\d+)", text)
    if abi is None:
        raise HeaderError(f"{header} does not define GEMMAKIT_KERNELS_ABI")
    text = _strip_comments(text)
    structs = _structs(text)
    return Declarations(int(abi.group(1)), structs, _functions(text, structs))


def struct(name: str) -> type[ctypes.Structure]:
    """The ctypes class of a struct the header declares (e.g. ``struct("Layer")``)."""
    return declarations().structs[name]


def bind(lib: ctypes.CDLL) -> str | None:
    """Give every declared function of ``lib`` its signature. Returns None, or why the library cannot be used:
    built for another ABI number (a stale build), or missing a declared function."""
    decl = declarations()
    try:
        abi_fn = lib.gemmakit_kernels_abi
    except AttributeError:
        return "it exports no gemmakit_kernels_abi (a build older than the ABI check, or not gemmakit's)"
    abi_fn.argtypes, abi_fn.restype = [], ctypes.c_int64
    if abi_fn() != decl.abi:
        return f"it was built for kernel ABI {abi_fn()}, and this gemmakit needs ABI {decl.abi} (a stale build)"
    for fn in decl.functions.values():
        try:
            symbol = getattr(lib, fn.name)
        except AttributeError:
            return f"it does not export {fn.name}, which the header declares"
        symbol.argtypes, symbol.restype = list(fn.argtypes), fn.restype
    return None
