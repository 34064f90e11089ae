"""The tile contract's C side (through the compiled libxyjax_ffi) and its Python mirror agree."""

import ctypes
import re

import pytest

import ascend_ffi
from xyjax.ops.attention import contract
from xyjax.ops.attention.contract import Field, MaskKind


@pytest.fixture(scope="module")
def lib():
    return ascend_ffi.load()


def test_library_path_names_the_file():
    path = ascend_ffi.library_path()
    assert path.name == ascend_ffi.LIBRARY_NAME and path.is_file()


def test_abi_version(lib):
    assert lib.xyjax_ffi_abi_version() == ascend_ffi.ABI_VERSION


def test_row_layout(lib):
    assert lib.xyjax_tile_num_fields() == contract.NUM_FIELDS == len(Field)
    assert lib.xyjax_tile_row_bytes() == 4 * contract.NUM_FIELDS
    assert [f.value for f in Field] == list(range(contract.NUM_FIELDS))


def test_fields_agree_by_name_and_by_index(lib):
    for field in Field:
        name = field.name.lower().encode()
        assert lib.xyjax_tile_field_index(name) == field.value, field
        assert lib.xyjax_tile_field_name(field.value) == name, field
    # Nothing beyond the fields on either side.
    assert lib.xyjax_tile_field_name(contract.NUM_FIELDS) is None
    assert lib.xyjax_tile_field_name(-1) is None
    assert lib.xyjax_tile_field_index(b"no_such_field") == -1


def test_mask_kinds_agree(lib):
    assert lib.xyjax_tile_num_mask_kinds() == contract.NUM_MASK_KINDS == len(MaskKind)
    for kind in MaskKind:
        name = kind.name.lower().encode()
        assert lib.xyjax_tile_mask_kind(name) == kind.value, kind
        assert lib.xyjax_tile_mask_kind_name(kind.value) == name, kind
    assert lib.xyjax_tile_mask_kind_name(contract.NUM_MASK_KINDS) is None


def test_header_text_matches_python():
    """The header as shipped (not only as compiled) lists the same enumerators."""
    header = (ascend_ffi.include_dir() / "xyjax" / "tile_contract.h").read_text()
    fields = dict(re.findall(r"XYJAX_TASK_(\w+) = (\d+)", header))
    masks = dict(re.findall(r"XYJAX_MASK_(\w+) = (\d+)", header))
    assert int(fields.pop("NUM_FIELDS")) == contract.NUM_FIELDS
    assert int(masks.pop("NUM_KINDS")) == contract.NUM_MASK_KINDS
    assert {k: int(v) for k, v in fields.items()} == {f.name: f.value for f in Field}
    assert {k: int(v) for k, v in masks.items()} == {m.name: m.value for m in MaskKind}
    version = re.search(r"#define XYJAX_TILE_ABI_VERSION (\d+)", header)
    assert version and int(version.group(1)) == ascend_ffi.ABI_VERSION


def test_built_with_xla_ffi_headers(lib):
    """pip builds have jax in the build environment, so the XLA FFI headers were compiled in."""
    major, minor = ctypes.c_int32(), ctypes.c_int32()
    assert lib.xyjax_ffi_xla_api_version(ctypes.byref(major), ctypes.byref(minor)) == 1
    assert major.value >= 0 and minor.value >= 0
