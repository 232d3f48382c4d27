"""Weight files from strangers: every malformed safetensors header and legacy pickle is a `CheckpointError`
naming the file and the tensor, and a well-formed file still reads exactly as the `safetensors` library reads it."""

import json
import shutil
import struct

import pytest
import torch
from helpers import make_hf_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llmasos.checkpoints.load import load_model
from llmasos.checkpoints.weights import MAX_HEADER_BYTES, load_tensor, read_safetensors_header
from llmasos.errors import CheckpointError


def write_safetensors(path, header, data=b""):
    """A file with this header (a dict, written as JSON, or raw bytes) followed by `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def f32(offsets, shape=(4,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED = {  # name -> (header, data, what the message says)
    "header_not_json": (b"{not json", b"", "not a safetensors file \\(bad header"),
    "header_a_list": (b"[1, 2]", b"", "the header is a JSON list, not an object"),
    "entry_not_an_object": ({"w": 5}, b"", "tensor w: expected an object with dtype, shape and data_offsets"),
    "unknown_dtype": ({"w": {**f32((0, 16)), "dtype": "Q9"}}, bytes(16), "tensor w has unsupported dtype 'Q9'"),
    "missing_dtype": ({"w": {"shape": [4], "data_offsets": [0, 16]}}, bytes(16), "tensor w has unsupported dtype None"),
    "shape_not_a_list": ({"w": {**f32((0, 16)), "shape": 4}}, bytes(16), "tensor w has shape 4, not a list"),
    "negative_dim": ({"w": f32((0, 16), shape=(-4,))}, bytes(16), r"tensor w has shape \[-4\], not a list of non-neg"),
    "float_dim": ({"w": f32((0, 16), shape=(4.0,))}, bytes(16), r"tensor w has shape \[4.0\]"),
    "offset_before_the_data": ({"w": f32((-256, 0), shape=(64,))}, bytes(256), r"tensor w has data_offsets \[-256, 0\]"),
    "offsets_reversed": ({"w": f32((16, 0))}, bytes(16), r"tensor w has data_offsets \[16, 0\], not \[start, end\]"),
    "offsets_not_a_pair": ({"w": f32((0,))}, bytes(16), r"tensor w has data_offsets \[0\]"),
    "length_not_dtype_times_shape": ({"w": f32((0, 12))}, bytes(12), r"tensor w has 12 bytes for shape \[4\] F32"),
    "overlapping": ({"a": f32((0, 16)), "b": f32((0, 16))}, bytes(16), "tensor b starts at byte 0 of the data, expected 16"),
    "gap_before_a_tensor": ({"w": f32((16, 32))}, bytes(32), "tensor w starts at byte 16 of the data, expected 0"),
    "beyond_the_file": ({"w": f32((0, 16))}, bytes(8), "truncated: tensor w needs bytes up to"),
    "bytes_after_the_last_tensor": ({"w": f32((0, 16))}, bytes(20), "4 bytes after the last tensor"),
    "metadata_not_strings": ({"__metadata__": {"format": 5}}, b"", "__metadata__ must map names to strings"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_safetensors_header_is_a_checkpoint_error_naming_file_and_tensor(case, tmp_path):
    header, data, message = MALFORMED[case]
    path = write_safetensors(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError, match=f"{case}.safetensors: .*{message}"):
        read_safetensors_header(path)
    with pytest.raises(SafetensorError):  # never more lenient than the reference reader
        safe_open(path, "pt")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"abc", r"truncated safetensors file \(3 bytes, no header\)"),
        (struct.pack("<Q", 100), r"truncated safetensors file \(header of 100 bytes, file of 8\)"),
        (
            struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}",
            r"not a safetensors file \(a header of 100000001 bytes; the "
            r"limit is 100000000\)",
        ),
    ],
    ids=["shorter_than_8_bytes", "header_beyond_the_file", "header_over_100MB"],
)
def test_short_file_and_oversized_header_are_refused_before_reading_the_header(content, message, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"bad.safetensors: {message}"):
        read_safetensors_header(path)
    with pytest.raises(SafetensorError):
        safe_open(path, "pt")


def test_weight_offset_into_the_header_does_not_load(tmp_path):
    """The report: `data_offsets: [-256, 0]` loaded a weight from the header's own bytes."""
    path, _ = make_hf_model(tmp_path / "model")
    header_len = struct.unpack("<Q", (path / "model.safetensors").read_bytes()[:8])[0]
    raw = (path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + header_len])
    info = header["model.norm.weight"]
    size = info["data_offsets"][1] - info["data_offsets"][0]
    info["data_offsets"] = [-size, 0]
    write_safetensors(path / "model.safetensors", header, raw[8 + header_len :])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.norm.weight has data_offsets \[-"):
        load_model(path)


def test_well_formed_files_read_as_the_safetensors_library_reads_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(6).view(2, 3),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    entries = read_safetensors_header(path)
    expected = load_file(path)
    assert set(entries) == set(expected)
    for name, entry in entries.items():
        assert torch.equal(load_tensor(entry, maps={}), expected[name]), name


@torch.no_grad()
def test_legacy_pickle_bin_says_how_to_convert_it(tmp_path):
    """Legacy (non-zip) pickles cannot be memory-mapped; the message says what to do instead."""
    path, hf = make_hf_model(tmp_path / "model")
    legacy = shutil.copytree(path, tmp_path / "legacy", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(path / "model.safetensors"), legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(
        CheckpointError,
        match=r"legacy/pytorch_model.bin: a PyTorch file in the legacy .*"
        r"save_pretrained\(OUT, safe_serialization=True\)",
    ) as e:
        load_model(legacy)
    assert "mmap" not in str(e.value) and "_use_new_zipfile_serialization" not in str(e.value)
    # the conversion the message suggests (weights_only, so no code runs) gives a file that loads
    state = torch.load(legacy / "pytorch_model.bin", weights_only=True)
    torch.save(state, legacy / "pytorch_model.bin")
    x = torch.randint(0, 400, (1, 8))
    assert (load_model(legacy)(x) - hf(x).logits).abs().max() < 1e-4


def test_a_bin_that_is_not_pytorch_at_all_keeps_the_plain_message(tmp_path):
    path, _ = make_hf_model(tmp_path / "model")
    junk = shutil.copytree(path, tmp_path / "junk", ignore=shutil.ignore_patterns("*.safetensors"))
    (junk / "pytorch_model.bin").write_bytes(b"not a pickle" * 10)
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be read as a PyTorch weights file"):
        load_model(junk)
