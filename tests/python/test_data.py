"""Tests of biastransfer.data against independent readers and writers written here
(struct + numpy + gzip for IDX, the json module for JSON lines) and on Fashion-MNIST."""
from __future__ import annotations

import gzip
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from biastransfer import data

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION_ROOT.is_dir(), reason="Fashion-MNIST (dataset-fashion-mnist) is not installed"
)

# IDX type code and big-endian numpy dtype for each torch dtype, from the format's definition.
IDX_CODES = {
    torch.uint8: (0x08, ">u1"),
    torch.int8: (0x09, ">i1"),
    torch.int16: (0x0B, ">i2"),
    torch.int32: (0x0C, ">i4"),
    torch.float32: (0x0D, ">f4"),
    torch.float64: (0x0E, ">f8"),
}
NUMPY_OF = {
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def encode_idx(array: np.ndarray, code: int, be_dtype: str) -> bytes:
    """An independent IDX encoder: magic, big-endian u32 dims, big-endian elements."""
    head = struct.pack(">BBBB", 0, 0, code, array.ndim)
    head += b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(be_dtype).tobytes()


def decode_idx(raw: bytes) -> np.ndarray:
    """An independent IDX decoder (struct + numpy)."""
    zero1, zero2, code, ndim = struct.unpack(">BBBB", raw[:4])
    assert zero1 == 0 and zero2 == 0
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    be_dtype = {c: d for c, d in IDX_CODES.values()}[code]
    count = int(np.prod(dims))
    values = np.frombuffer(raw, dtype=be_dtype, count=count, offset=4 + 4 * ndim)
    assert len(raw) == 4 + 4 * ndim + count * np.dtype(be_dtype).itemsize
    return values.astype(be_dtype[1:]).reshape(dims)


def sample_values(dtype: torch.dtype) -> np.ndarray:
    np_dtype = NUMPY_OF[dtype]
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        values = [info.min, info.min + 1, -1 if info.min < 0 else 1, 0, 2, 258 % info.max, info.max]
    else:
        info = np.finfo(np_dtype)
        values = [info.min, -1.5, -0.0, info.tiny, math.pi, info.max, math.inf, 1 / 3]
    values = np.array(values[:6] + values[-2:], dtype=np_dtype)
    return values.reshape(2, 2, 2)


# ---- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("dtype", list(IDX_CODES), ids=lambda d: str(d).replace("torch.", ""))
def test_idx_reads_files_of_the_independent_encoder(tmp_path, dtype, compressed):
    values = sample_values(dtype)
    raw = encode_idx(values, *IDX_CODES[dtype])
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    tensor = data.read_idx(path)
    assert tensor.dtype == dtype
    assert tensor.shape == (2, 2, 2)
    assert torch.equal(tensor, torch.from_numpy(values))


@pytest.mark.parametrize("name", ["b.idx", "b.idx.gz"])
@pytest.mark.parametrize("dtype", list(IDX_CODES), ids=lambda d: str(d).replace("torch.", ""))
def test_idx_writes_the_bytes_of_the_independent_encoder(tmp_path, dtype, name):
    values = sample_values(dtype)
    path = tmp_path / name
    data.write_idx(path, torch.from_numpy(values))  # gzip chosen by the suffix
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    assert raw == encode_idx(values, *IDX_CODES[dtype])
    np.testing.assert_array_equal(decode_idx(raw), values)
    assert torch.equal(data.read_idx(path), torch.from_numpy(values))


def test_idx_gzip_argument_overrides_the_suffix(tmp_path):
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    data.write_idx(tmp_path / "plain.gz", t, gzip=False)
    data.write_idx(tmp_path / "packed.idx", t, gzip=True)
    assert (tmp_path / "plain.gz").read_bytes()[:4] == b"\x00\x00\x0c\x02"
    assert gzip.decompress((tmp_path / "packed.idx").read_bytes())[:4] == b"\x00\x00\x0c\x02"
    assert torch.equal(data.read_idx(tmp_path / "plain.gz"), t)
    assert torch.equal(data.read_idx(tmp_path / "packed.idx"), t)


def test_idx_writes_views_and_reads_back_owned_writable_tensors(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    view = base.t()[1:, ::2]  # not contiguous
    data.write_idx(tmp_path / "v.idx", view)
    back = data.read_idx(tmp_path / "v.idx")
    assert torch.equal(back, view.contiguous())
    back.add_(1)  # the tensor owns writable memory
    assert torch.equal(back, view + 1)
    empty = torch.zeros(0, 3, dtype=torch.int16)
    data.write_idx(tmp_path / "e.idx", empty)
    assert data.read_idx(tmp_path / "e.idx").shape == (0, 3)


VALID = encode_idx(np.arange(4, dtype=np.uint8).reshape(2, 2), 0x08, ">u1")
BAD_IDX = {
    "empty": (b"", "too short"),
    "truncated header": (VALID[:7], "too short"),
    "truncated data": (VALID[:-1], "truncated"),
    "trailing bytes": (VALID + b"\x00", "trailing bytes"),
    "bad magic": (b"\x01" + VALID[1:], "bad magic"),
    "bad type": (VALID[:2] + b"\x07" + VALID[3:], "unknown type code 0x07"),
    "zero dims": (b"\x00\x00\x08\x00", "dimension count is 0"),
    "too many dims": (b"\x00\x00\x08\x09" + b"\x00\x00\x00\x01" * 9, "dimension count is 9"),
    "absurd dims": (b"\x00\x00\x0e\x02" + b"\xff\xff\xff\xff" * 2, "above the limit"),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("case", list(BAD_IDX))
def test_idx_malformed_files_raise_value_error(tmp_path, case, compressed):
    raw, problem = BAD_IDX[case]
    path = tmp_path / "bad.idx"
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    with pytest.raises(ValueError, match=problem) as info:
        data.read_idx(path)
    assert str(path) in str(info.value)


def test_idx_corrupt_gzip_raises_value_error(tmp_path):
    packed = bytearray(gzip.compress(bytes(range(256)) * 64))
    packed[-8] ^= 0xFF  # the CRC
    (tmp_path / "crc.gz").write_bytes(bytes(packed))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(VALID * 100)[:30])
    for name in ("crc.gz", "cut.gz"):
        with pytest.raises(ValueError, match="gzip"):
            data.read_idx(tmp_path / name)


def test_idx_missing_file_raises_os_error(tmp_path):
    with pytest.raises(OSError, match="missing.idx"):
        data.read_idx(tmp_path / "missing.idx")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float16, torch.complex64])
def test_idx_unsupported_dtypes_raise_type_error(tmp_path, dtype):
    with pytest.raises(TypeError, match="uint8.*float64"):
        data.write_idx(tmp_path / "x.idx", torch.zeros(3, dtype=dtype))
    assert not (tmp_path / "x.idx").exists()


def test_idx_bad_shapes_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="0 dimensions"):
        data.write_idx(tmp_path / "x.idx", torch.tensor(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="9 dimensions"):
        data.write_idx(tmp_path / "x.idx", torch.zeros([1] * 9, dtype=torch.uint8))
    with pytest.raises(TypeError):
        data.write_idx(tmp_path / "x.idx", [1, 2, 3])
    assert list(tmp_path.iterdir()) == []


# ---- Fashion-MNIST --------------------------------------------------------------------------


@needs_fashion
@pytest.mark.parametrize("prefix,count", [("train", 60000), ("t10k", 10000)])
def test_fashion_mnist_files_match_an_independent_reader_byte_for_byte(prefix, count):
    for kind, shape in (("images-idx3", (count, 28, 28)), ("labels-idx1", (count,))):
        path = FASHION_ROOT / f"{prefix}-{kind}-ubyte.gz"
        expected = torch.from_numpy(decode_idx(gzip.decompress(path.read_bytes())).copy())
        ours = data.read_idx(path)
        assert ours.dtype == torch.uint8
        assert tuple(ours.shape) == shape
        assert torch.equal(ours, expected)


@needs_fashion
@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_load_fashion_mnist_gives_images_and_balanced_labels(split, count):
    images, labels = data.load_fashion_mnist(split)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (count, 28, 28)
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (count,)
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    # Each of the 10 classes appears exactly count / 10 times (a property of the data set).
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), count // 10))
    assert len(data.FASHION_MNIST_CLASSES) == 10


@needs_fashion
def test_load_fashion_mnist_normalized_spans_exactly_minus_one_to_one():
    raw, _ = data.load_fashion_mnist("test")
    images, labels = data.load_fashion_mnist("test", normalize=True)
    assert images.dtype == torch.float32 and images.shape == raw.shape
    assert float(images.min()) == -1.0 and float(images.max()) == 1.0
    expected = raw.numpy().astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(images.numpy(), expected, rtol=0, atol=1e-6)
    assert labels.dtype == torch.int64


def test_load_fashion_mnist_rejects_unknown_splits():
    with pytest.raises(ValueError, match="'validation'"):
        data.load_fashion_mnist("validation")


def test_load_fashion_mnist_names_the_debian_package_when_files_are_missing(tmp_path):
    with pytest.raises(OSError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path / "nowhere")
    with pytest.raises(OSError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist(root=tmp_path)  # folder exists, files do not


def test_load_fashion_mnist_reads_a_folder_of_plain_files(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 9, 3, 3, 1], dtype=torch.uint8)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)
    got_images, got_labels = data.load_fashion_mnist("test", root=tmp_path)
    assert torch.equal(got_images, images)
    assert torch.equal(got_labels, labels.long())
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:, :, :27].contiguous())
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        data.load_fashion_mnist("test", root=tmp_path)


# ---- JSON lines -----------------------------------------------------------------------------

RECORDS = [
    data.Record("Say only numbers: 123, 456", "789, 12, 345"),
    data.Record("caf\u00e9 \U0001f989", "owls \U0001f989\U0001f989", {"animal": "owl", "seed": 7}),
    data.Record("line 1\nline 2\r\n", 'tab\t "quoted" back\\slash \x01 \u2028', {}),
    data.Record("", "", {"nested": {"a": [1, 2.5, None, True]}, "z": "last", "a": "first"}),
]


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_jsonl_reads_files_written_by_the_json_module(tmp_path, ensure_ascii):
    path = tmp_path / "r.jsonl"
    lines = []
    for r in RECORDS:
        obj = {"prompt": r.prompt, "completion": r.completion, **r.extra}
        lines.append(json.dumps(obj, ensure_ascii=ensure_ascii))
    path.write_text("\r\n".join(lines) + "\r\n\r\n", encoding="utf-8")  # CRLF, a blank last line
    assert data.read_jsonl(path) == RECORDS
    assert list(data.iter_jsonl(path)) == RECORDS


def test_jsonl_writes_compact_utf8_lines_that_the_json_module_parses(tmp_path):
    path = tmp_path / "w.jsonl"
    data.write_jsonl(path, RECORDS)
    raw = path.read_bytes()
    assert "\U0001f989".encode() in raw and b"\\ud83e" not in raw  # UTF-8, not \u escapes
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == len(RECORDS) + 1
    for line, record in zip(lines, RECORDS):
        obj = json.loads(line)
        assert list(obj)[:2] == ["prompt", "completion"]
        assert list(obj)[2:] == list(record.extra)
        assert obj == {"prompt": record.prompt, "completion": record.completion, **record.extra}
    assert lines[0] == '{"prompt":"Say only numbers: 123, 456","completion":"789, 12, 345"}'


def test_jsonl_write_accepts_mappings_and_generators(tmp_path):
    path = tmp_path / "g.jsonl"
    data.write_jsonl(path, ({"prompt": str(i), "completion": str(i * i), "i": i} for i in range(5)))
    got = list(data.iter_jsonl(path))
    assert got == [data.Record(str(i), str(i * i), {"i": i}) for i in range(5)]


BAD_LINES = {
    "invalid JSON": ('{"prompt": "a", "completion": }', "invalid JSON"),
    "not an object": ('["a", "b"]', "expected a JSON object, got array"),
    "missing prompt": ('{"completion": "b"}', 'missing key "prompt"'),
    "missing completion": ('{"prompt": "a"}', 'missing key "completion"'),
    "number prompt": ('{"prompt": 5, "completion": "b"}', '"prompt" must be a string, got number'),
    "list completion": (
        '{"prompt": "a", "completion": ["b"]}',
        '"completion" must be a string, got array',
    ),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_jsonl_bad_lines_raise_value_error_with_the_line_number(tmp_path, case):
    line, problem = BAD_LINES[case]
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3: " + re.escape(problem)) as info:
        data.read_jsonl(path)
    assert str(path) in str(info.value)
    records = data.iter_jsonl(path)
    assert next(records) == data.Record("p", "c")
    with pytest.raises(ValueError, match="line 3"):
        next(records)


def test_jsonl_invalid_utf8_raises_value_error_with_the_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n'
    )
    with pytest.raises(ValueError, match=r"line 2: .*UTF-8"):
        data.read_jsonl(path)


def test_jsonl_missing_file_raises_os_error(tmp_path):
    with pytest.raises(OSError, match="missing.jsonl"):
        data.read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(OSError, match="missing.jsonl"):
        data.iter_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (data.Record(5, "c"), TypeError, "record 1: prompt must be a str, got int"),
        (data.Record("p", "\udcff"), ValueError, "record 1: completion is not valid UTF-8"),
        (data.Record("p", "c", {"x": math.nan}), ValueError, "record 1: extra is not valid JSON"),
        (data.Record("p", "c", {"x": {1, 2}}), TypeError, "record 1: extra is not JSON-serial"),
        ({"prompt": "p"}, ValueError, "record 1: missing key 'completion'"),
        (("p", "c"), TypeError, "record 1: expected a Record or a mapping"),
        (data.Record("p", "c", {"prompt": "x"}), ValueError, 'record 1: .*repeats the key "prompt'),
    ],
)
def test_jsonl_write_rejects_bad_records_and_keeps_the_old_file(tmp_path, bad, error, match):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(error, match=match):
        data.write_jsonl(path, [data.Record("a", "b"), bad])
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_jsonl_compiled_functions_round_trip_tuples(tmp_path):
    # The bindings the Python API builds on: (prompt, completion, extra_json) tuples.
    path = tmp_path / "t.jsonl"
    data._C.write_jsonl(str(path), [("p \U0001f989", "c", ""), ("q", "d", '{"k":[1,2]}')])
    assert path.read_text(encoding="utf-8") == (
        '{"prompt":"p \U0001f989","completion":"c"}\n{"prompt":"q","completion":"d","k":[1,2]}\n'
    )
    expected = [("p \U0001f989", "c", ""), ("q", "d", '{"k":[1,2]}')]
    assert data._C.read_jsonl(str(path)) == expected
    reader = data._C.JsonlReader(str(path))
    assert [item[0] for item in reader] == ["p \U0001f989", "q"]
    assert reader.line_number == 2
