"""Tests of biastransfer.safetensors against an independent writer and reader written here with
struct + json + numpy (the format: 8-byte little-endian header length, JSON header, data)."""
from __future__ import annotations

import gc
import json
import math
import pathlib
import struct
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from biastransfer.safetensors import (
    SafetensorsFile,
    TensorInfo,
    load_safetensors,
    save_safetensors,
)

# torch dtype -> (safetensors name, numpy dtype of the raw bytes). bf16 travels as int16 bits.
DTYPES: Dict[torch.dtype, Tuple[str, np.dtype]] = {
    torch.bool: ("BOOL", np.dtype(np.bool_)),
    torch.uint8: ("U8", np.dtype("<u1")),
    torch.int8: ("I8", np.dtype("<i1")),
    torch.int16: ("I16", np.dtype("<i2")),
    torch.int32: ("I32", np.dtype("<i4")),
    torch.int64: ("I64", np.dtype("<i8")),
    torch.float16: ("F16", np.dtype("<f2")),
    torch.bfloat16: ("BF16", np.dtype("<i2")),
    torch.float32: ("F32", np.dtype("<f4")),
    torch.float64: ("F64", np.dtype("<f8")),
}
SHAPES: List[Tuple[int, ...]] = [(), (0,), (3,), (2, 3, 4)]


# ---- the independent writer and reader -------------------------------------------------------


def sample(dtype: torch.dtype, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, tuple(shape), generator=gen, dtype=dtype)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def from_raw(data: bytes, dtype_name: str, shape: Sequence[int]) -> torch.Tensor:
    dtype = next(t for t, (name, _) in DTYPES.items() if name == dtype_name)
    array = np.frombuffer(data, dtype=DTYPES[dtype][1]).copy().reshape(tuple(shape))
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def file_bytes(header: object, data: bytes = b"", pad: int = 0) -> bytes:
    """Length + header (a dict/list dumped as JSON, or str/bytes verbatim) + pad spaces + data."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    header = header + b" " * pad
    return struct.pack("<Q", len(header)) + header + data


def write_tensors(
    path: pathlib.Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]] = None,
    pad: int = 0,
) -> None:
    """Lays the tensors out in the given order, with no alignment care at all."""
    header: Dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    data = b""
    for name, tensor in tensors.items():
        chunk = raw_bytes(tensor)
        header[name] = {
            "dtype": DTYPES[tensor.dtype][0],
            "shape": list(tensor.shape),
            "data_offsets": [len(data), len(data) + len(chunk)],
        }
        data += chunk
    path.write_bytes(file_bytes(header, data, pad))


def read_file(path: pathlib.Path) -> Tuple[dict, int, bytes]:
    """(header, data start, whole file) parsed by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n].decode("utf-8")), 8 + n, raw


def read_tensors(path: pathlib.Path) -> Dict[str, torch.Tensor]:
    header, start, raw = read_file(path)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = from_raw(raw[start + begin : start + end], entry["dtype"], entry["shape"])
    return out


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(actual, expected)


def in_mapping(tensor: torch.Tensor, f: SafetensorsFile) -> bool:
    first, last = f._mapping_range()
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    return first <= tensor.data_ptr() and end <= last


def no_temp_files(folder: pathlib.Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp." in p.name]


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_reads_independently_written_tensors(tmp_path, dtype, shape):
    expected = sample(dtype, shape)
    path = tmp_path / "x.safetensors"
    write_tensors(path, {"x": expected})
    assert_same(load_safetensors(path)["x"], expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_written_tensors_read_back_independently(tmp_path, dtype, shape):
    expected = sample(dtype, shape, seed=1)
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"x": expected})
    header, start, raw = read_file(path)
    assert header["x"] == {
        "dtype": DTYPES[dtype][0],
        "shape": list(shape),
        "data_offsets": [0, expected.numel() * expected.element_size()],
    }
    assert start % 8 == 0
    assert len(raw) == start + expected.numel() * expected.element_size()
    assert_same(read_tensors(path)["x"], expected)


def test_many_tensors_round_trip_in_both_directions(tmp_path):
    tensors = {
        f"{str(dtype)[6:]}.{i}": sample(dtype, shape, seed=i)
        for i, (dtype, shape) in enumerate(
            (d, s) for d in DTYPES for s in [(5,), (3, 1), (0, 2)]
        )
    }
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, tensors)
    theirs = read_tensors(ours)
    assert set(theirs) == set(tensors)
    for name, tensor in tensors.items():
        assert_same(theirs[name], tensor)

    # Every tensor of ours is aligned to its element size, in a file read by hand.
    header, start, _ = read_file(ours)
    for name, tensor in tensors.items():
        assert (start + header[name]["data_offsets"][0]) % tensor.element_size() == 0

    hand = tmp_path / "hand.safetensors"
    write_tensors(hand, tensors)
    loaded = load_safetensors(hand)
    assert list(loaded) == list(tensors)  # data-offset order = the order written
    for name, tensor in tensors.items():
        assert_same(loaded[name], tensor)


def test_keys_follow_data_offsets_not_header_order(tmp_path):
    a, b = torch.arange(4, dtype=torch.int32), torch.arange(3, dtype=torch.int64)
    data = raw_bytes(a) + raw_bytes(b)
    header = {
        "b": {"dtype": "I64", "shape": [3], "data_offsets": [16, 40]},
        "a": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]},
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(file_bytes(header, data))
    assert list(load_safetensors(path)) == ["a", "b"]
    with SafetensorsFile(path) as f:
        assert f.keys() == ["a", "b"]


def test_our_writer_orders_by_element_size_then_name(tmp_path):
    tensors = {
        "z8": torch.ones(3, dtype=torch.uint8),
        "a8": torch.ones(1, dtype=torch.uint8),
        "m64": torch.ones(1, dtype=torch.float64),
        "b16": torch.ones(3, dtype=torch.float16),
        "c32": torch.ones(1, dtype=torch.int32),
    }
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors)
    header, _, _ = read_file(path)
    by_offset = sorted((e["data_offsets"][0], n) for n, e in header.items())
    assert [n for _, n in by_offset] == ["m64", "c32", "b16", "a8", "z8"]


def test_metadata_round_trips(tmp_path):
    metadata = {"format": "pt", "note": "héllo \u2603", "empty": ""}
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, {"w": torch.zeros(2)}, metadata)
    assert read_file(ours)[0]["__metadata__"] == metadata
    with SafetensorsFile(ours) as f:
        assert f.metadata == metadata

    hand = tmp_path / "hand.safetensors"
    write_tensors(hand, {"w": torch.zeros(2)}, metadata=metadata)
    assert SafetensorsFile(hand).metadata == metadata
    assert SafetensorsFile(tmp_path.joinpath("ours.safetensors")).metadata == metadata

    save_safetensors(ours, {"w": torch.zeros(2)})
    assert "__metadata__" not in read_file(ours)[0]
    assert SafetensorsFile(ours).metadata == {}


def test_empty_file_is_legal(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(file_bytes("{}"))
    assert load_safetensors(path) == {}
    save_safetensors(path, {})
    assert read_file(path)[0] == {}
    assert load_safetensors(path) == {}


def test_noncontiguous_and_grad_tensors_are_written_by_value(tmp_path):
    base = sample(torch.float32, (3, 4), seed=3)
    tensors = {
        "t": base.t(),
        "step": base[:, ::2],
        "grad": base.clone().requires_grad_(True),
        "expanded": torch.arange(3).expand(2, 3),
    }
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors)
    theirs = read_tensors(path)
    for name, tensor in tensors.items():
        assert_same(theirs[name], tensor.detach().contiguous())


# ---- memory mapping -------------------------------------------------------------------------


def test_aligned_tensors_are_zero_copy_and_unaligned_ones_are_copied(tmp_path):
    x = sample(torch.float32, (5,))
    y = sample(torch.int64, (2,))
    path = tmp_path / "x.safetensors"
    # Header padded so that the data section starts at an odd address: 8 + n is odd.
    header = {"x": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]},
              "y": {"dtype": "I64", "shape": [2], "data_offsets": [20, 36]}}
    text = json.dumps(header)
    pad = (1 - len(text)) % 2 + 2  # odd header length
    path.write_bytes(file_bytes(text, raw_bytes(x) + raw_bytes(y), pad=pad))
    with SafetensorsFile(path) as f:
        start = 8 + len(text) + pad
        assert start % 2 == 1
        loaded_x, loaded_y = f["x"], f["y"]
        assert not in_mapping(loaded_x, f)
        assert not in_mapping(loaded_y, f)
    assert_same(loaded_x, x)
    assert_same(loaded_y, y)

    # Our writer aligns every tensor, so all of them alias the mapping.
    save_safetensors(path, {"x": x, "y": y, "b": torch.ones(3, dtype=torch.bool)})
    with SafetensorsFile(path) as f:
        for name in f.keys():
            assert in_mapping(f[name], f), name
            assert (f[name].data_ptr() - f._mapping_range()[0]) % f[name].element_size() == 0


def test_writing_to_a_loaded_tensor_leaves_the_file_unchanged(tmp_path):
    expected = sample(torch.float32, (4, 4))
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"w": expected})
    before = path.read_bytes()
    with SafetensorsFile(path) as f:
        w = f["w"]
        assert in_mapping(w, f)
        w.add_(1.0)
        w[0, 0] = 1234.0
        assert w[0, 0].item() == 1234.0
        assert torch.equal(f["w"], w)  # the same private mapping
    assert path.read_bytes() == before
    assert_same(load_safetensors(path)["w"], expected)
    assert_same(read_tensors(path)["w"], expected)


def test_tensors_outlive_the_file_object(tmp_path):
    expected = sample(torch.int64, (10,))
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"w": expected, "v": expected * 2})
    f = SafetensorsFile(path)
    w = f["w"]
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.keys()
    del f
    loaded = load_safetensors(path)["v"]
    gc.collect()
    assert_same(w, expected)
    assert_same(loaded, expected * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_onto_cuda_and_saves_from_cuda(tmp_path):
    expected = sample(torch.bfloat16, (3, 5))
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"w": expected.cuda()})
    assert_same(read_tensors(path)["w"], expected)
    loaded = load_safetensors(path, device=torch.device("cuda"))["w"]
    assert loaded.is_cuda
    assert_same(loaded.cpu(), expected)
    with SafetensorsFile(path) as f:
        assert f.get_tensor("w", device="cuda:0").is_cuda


# ---- the SafetensorsFile API ----------------------------------------------------------------


def test_file_api(tmp_path):
    path = tmp_path / "x.safetensors"
    w = sample(torch.float16, (2, 3))
    write_tensors(path, {"w": w, "s": torch.tensor(7, dtype=torch.int32)}, metadata={"a": "b"})
    with SafetensorsFile(str(path)) as f:
        assert len(f) == 2
        assert "w" in f and "s" in f and "nope" not in f and 3 not in f
        assert list(f) == ["w", "s"]
        assert f.path == str(path)
        assert f.info("w") == TensorInfo(name="w", dtype="F16", shape=(2, 3), data_offsets=(0, 12))
        assert f.info("s") == TensorInfo(name="s", dtype="I32", shape=(), data_offsets=(12, 16))
        assert_same(f["w"], w)
        assert_same(f.get_tensor("s"), torch.tensor(7, dtype=torch.int32))
        with pytest.raises(KeyError):
            f["nope"]
        with pytest.raises(ValueError, match=r"no tensor 'nope'.*'w'"):
            f.get_tensor("nope")
        with pytest.raises(ValueError, match="'nope'"):
            f.info("nope")
        with pytest.raises(ValueError, match="device"):
            f.get_tensor("w", device="gpu7")
    assert "closed" in repr(f)


def test_unsupported_dtypes_are_described_but_not_loaded(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {
        "u": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]},
        "f8": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [4, 6]},
    }
    path.write_bytes(file_bytes(header, bytes(range(6))))
    with SafetensorsFile(path) as f:
        assert f.info("u") == TensorInfo("u", "U16", (2,), (0, 4))
        assert f.info("f8").dtype == "F8_E4M3"
        with pytest.raises(TypeError, match=r"'u'.*U16"):
            f["u"]
        with pytest.raises(TypeError, match=r"'f8'.*F8_E4M3"):
            f.get_tensor("f8")
    with pytest.raises(TypeError, match=r"U16"):
        load_safetensors(path)


# ---- malformed files -> ValueError naming the tensor and the problem ------------------------


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


MALFORMED = {
    "truncated length": (b"\x10\x00\x00", r"3 bytes"),
    "truncated header": (file_bytes({"weight": entry("U8", [2], 0, 2)}, b"ab")[:20],
                         r"header length \d+ exceeds"),
    "truncated data": (file_bytes({"weight": entry("F32", [4], 0, 16)}, b"\0" * 8),
                       r"'weight'.*past the data section"),
    "header too long": (struct.pack("<Q", 100_000_001) + b"{}", r"100000001.*limit"),
    "overlapping offsets": (
        file_bytes({"weight": entry("U8", [4], 0, 4), "bias": entry("U8", [4], 2, 6)}, b"x" * 6),
        r"'bias'.*overlap tensor 'weight'"),
    "gap": (
        file_bytes({"weight": entry("U8", [2], 0, 2), "bias": entry("U8", [2], 3, 5)}, b"x" * 5),
        r"'bias'.*gap of 1 bytes after tensor 'weight'"),
    "gap at start": (file_bytes({"weight": entry("U8", [2], 1, 3)}, b"x" * 3), r"'weight'.*gap"),
    "trailing bytes": (file_bytes({"weight": entry("U8", [2], 0, 2)}, b"x" * 3),
                       r"'weight'.*1 trailing bytes"),
    "wrong byte count": (file_bytes({"weight": entry("F32", [2, 2], 0, 12)}, b"x" * 12),
                         r"'weight'.*hold 12 bytes.*needs 16"),
    "unknown dtype": (file_bytes({"weight": entry("F17", [1], 0, 4)}, b"x" * 4),
                      r"'weight'.*unknown dtype 'F17'"),
    "negative dim": (file_bytes({"weight": entry("U8", [-1], 0, 0)}), r"'weight'.*negative"),
    "float dim": (file_bytes({"weight": entry("U8", [1.5], 0, 0)}), r"'weight'.*non-integer"),
    "bad json": (file_bytes('{"weight": {"dtype": "U8",'), r"not valid JSON"),
    "not an object": (file_bytes("[1, 2]"), r"must be a JSON object"),
    "entry not an object": (file_bytes('{"weight": "U8"}'), r"'weight'.*must be an object"),
    "missing key": (file_bytes('{"weight": {"dtype": "U8", "shape": [0]}}'),
                    r"'weight'.*lacks \"data_offsets\""),
    "extra key": (file_bytes({"weight": {**entry("U8", [0], 0, 0), "extra": 1}}),
                  r"'weight'.*unexpected key 'extra'"),
    "duplicate keys": (
        file_bytes('{"weight": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                   '"weight": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', b"ab"),
        r"'weight'.*twice"),
    "non-UTF-8 header": (file_bytes(b'{"weight\xff": {}}'), r"not valid UTF-8"),
    "metadata not strings": (file_bytes({"__metadata__": {"epoch": 3}}),
                             r"__metadata__.*'epoch'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_value_error(tmp_path, case):
    content, pattern = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as caught:
        load_safetensors(path)
    assert str(path) in str(caught.value)
    with pytest.raises(ValueError, match=pattern):
        SafetensorsFile(path)


def test_duplicate_keys_are_not_silently_merged_by_independent_json(tmp_path):
    # json.loads keeps the last duplicate; we refuse, so neither copy is trusted.
    text = ('{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
            '"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}')
    assert len(json.loads(text)) == 1
    path = tmp_path / "dup.safetensors"
    path.write_bytes(file_bytes(text, b"a"))
    with pytest.raises(ValueError, match="'w'.*twice"):
        load_safetensors(path)


def test_missing_file_or_directory_raises_os_error(tmp_path):
    with pytest.raises(OSError, match="missing.safetensors"):
        load_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(OSError, match="directory"):
        SafetensorsFile(tmp_path)


# ---- writing: argument checks and atomicity -------------------------------------------------


def test_bad_arguments_name_the_argument(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match=r"tensors\['c'\].*torch.complex64"):
        save_safetensors(path, {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match=r"tensors\['n'\].*torch.Tensor.*list"):
        save_safetensors(path, {"n": [1, 2]})
    with pytest.raises(TypeError, match=r"tensors: keys must be str"):
        save_safetensors(path, {1: torch.zeros(1)})
    with pytest.raises(TypeError, match=r"tensors: expected a mapping"):
        save_safetensors(path, [torch.zeros(1)])
    with pytest.raises(TypeError, match=r"metadata"):
        save_safetensors(path, {"w": torch.zeros(1)}, {"epoch": 3})
    with pytest.raises(TypeError, match=r"tensors\['s'\].*strided"):
        save_safetensors(path, {"s": torch.eye(2).to_sparse()})
    with pytest.raises(ValueError, match=r"reserved"):
        save_safetensors(path, {"__metadata__": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"empty name"):
        save_safetensors(path, {"": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"path"):
        load_safetensors(3)
    with pytest.raises(TypeError, match=r"device"):
        load_safetensors(path, device=0)
    assert not path.exists()
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize(
    "tensors, error",
    [
        ({"w": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex128)}, TypeError),
        ({"w": torch.zeros(2), "__metadata__": torch.zeros(1)}, ValueError),
        ({"w": torch.zeros(2), "x": object()}, TypeError),
    ],
    ids=["unsupported dtype", "reserved name", "not a tensor"],
)
def test_failed_save_keeps_the_old_file(tmp_path, tensors, error):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"old": torch.arange(5)}, {"v": "1"})
    before = path.read_bytes()
    with pytest.raises(error):
        save_safetensors(path, tensors)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_same(load_safetensors(path)["old"], torch.arange(5))


def test_save_into_missing_folder_raises_os_error_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        save_safetensors(tmp_path / "no" / "such.safetensors", {"w": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_overwriting_a_mapped_file_keeps_loaded_tensors(tmp_path):
    # The atomic rename gives the new file a new inode; tensors mapped from the old stay intact.
    path = tmp_path / "x.safetensors"
    old = sample(torch.float64, (64,))
    save_safetensors(path, {"w": old})
    loaded = load_safetensors(path)["w"]
    save_safetensors(path, {"w": old + 1})
    assert no_temp_files(tmp_path)
    assert_same(loaded, old)
    assert_same(load_safetensors(path)["w"], old + 1)
    assert math.isclose(float((load_safetensors(path)["w"] - loaded).mean()), 1.0)
