"""Checks the client against a running loader (host memory or a GPU): the tensors it hands out
are exactly the cartridge's keys and values. Needs torch for a GPU loader (and transformers for
the cache check); without torch, a host-memory loader's buffer is checked byte for byte instead.

    LOADER_URL=http://127.0.0.1:7071 CARTRIDGE=legal/contracts@v3 CARTRIDGE_FILE=contracts.safetensors \
        python test_client.py

With CARTRIDGE_OTHER (another ref of the same model) it also checks that a streamed load whose
callback fails leaves no handle, and with CARTRIDGE_OTHER_FILE (that ref's file) the two composed.
"""

import json
import os
import struct

from cartridge_loader import Loader, LoaderError


def file_tensors(path):
    """The cartridge file's tensors as raw bytes, and its header's model fingerprint."""
    with open(path, "rb") as file:
        data = file.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    tensors = {
        name: body[info["data_offsets"][0] : info["data_offsets"][1]]
        for name, info in header.items()
        if name != "__metadata__"
    }
    return tensors, json.loads(header["__metadata__"]["cartridge"])


def raw(tensor):
    import torch

    return tensor.cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes()


def layer_bytes(handle, header):
    """Per layer, the keys' and values' bytes as the client hands them out, and whether through
    its tensors (torch is here) rather than its mapped buffer (host memory only)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        buffer = handle.buffer()
        model = header["model"]
        size = model["kv_heads"] * header["tokens"] * model["head_dim"] * {"bf16": 2, "f16": 2, "f32": 4}[handle.answer["dtype"]]
        print("torch not installed: the buffer checked, not tensors")
        return [tuple(bytes(buffer[span[part] : span[part] + size]) for part in ("keys", "values")) for span in handle.answer["layout"]], False
    layers = handle.tensors()
    assert all(k.device.type == ("cuda" if "cuda" in handle.answer else "cpu") for k, _ in layers)
    for keys, _ in layers:
        assert keys.shape == (1, header["model"]["kv_heads"], header["tokens"], header["model"]["head_dim"]), keys.shape
    return [(raw(keys), raw(values)) for keys, values in layers], True


def check_composition(loader, header, expected):
    """The cartridge composed with CARTRIDGE_OTHER (its file CARTRIDGE_OTHER_FILE): each layer holds
    the two parts' keys and values side by side along the token axis, byte for byte."""
    other, other_header = file_tensors(os.environ["CARTRIDGE_OTHER_FILE"])
    heads = header["model"]["kv_heads"]
    tokens = header["tokens"] + other_header["tokens"]
    with loader.load(header["model"], [os.environ["CARTRIDGE"], os.environ["CARTRIDGE_OTHER"]]) as composed:
        assert composed.tokens == tokens, (composed.tokens, tokens)
        layers, _ = layer_bytes(composed, dict(header, tokens=tokens))
    for index, pair in enumerate(layers):
        for part, got in zip(("keys", "values"), pair):
            first, second = expected[f"layers.{index}.{part}"], other[f"layers.{index}.{part}"]
            a, b = len(first) // heads, len(second) // heads
            want = b"".join(first[h * a : (h + 1) * a] + second[h * b : (h + 1) * b] for h in range(heads))
            assert got == want, (index, part)
    print("composed with the other:", len(layers), "layers match the two files side by side")


def main():
    loader = Loader(os.environ.get("LOADER_URL", "http://127.0.0.1:7071"), socket=os.environ.get("LOADER_SOCKET"))
    expected, header = file_tensors(os.environ["CARTRIDGE_FILE"])
    # Streamed first, so a fresh loader reports layers as they land.
    ready = []
    handle = loader.load(header["model"], [os.environ["CARTRIDGE"]], on_layers=lambda n, of, path: ready.append((n, of, path)))
    assert all(a[0] < b[0] for a, b in zip(ready, ready[1:])), ready
    # Layers are told as they are decoded into a new buffer; one already in memory comes whole.
    if handle.answer["tier"] in ("disk", "registry"):
        assert ready and ready[-1][0] == header["model"]["layers"] and ready[-1][2] == handle.location, ready
    print("streamed load:", len(ready), "layer events")
    handle.release()
    held = loader.status()["handles"]
    other = os.environ.get("CARTRIDGE_OTHER")
    if other:
        # A callback that fails leaves no handle behind: the one the loader made is released.
        class Stop(Exception):
            pass

        def stop(*_):
            raise Stop

        try:
            loader.load(header["model"], [other], on_layers=stop).release()
            print("the other cartridge came whole: the failing callback was not called")
        except Stop:
            pass
        assert loader.status()["handles"] == held, "a streamed load's handle outlived its failed callback"
        if os.environ.get("CARTRIDGE_OTHER_FILE"):
            check_composition(loader, header, expected)
    with loader.load(header["model"], [os.environ["CARTRIDGE"]]) as scoped:
        assert loader.status()["handles"] == held + 1
    assert loader.status()["handles"] == held, "leaving the block released the handle"
    assert scoped.tokens == header["tokens"]
    handle = loader.load(header["model"], [os.environ["CARTRIDGE"]])
    assert handle.tokens == header["tokens"], (handle.tokens, header["tokens"])
    layers, through_tensors = layer_bytes(handle, header)
    assert len(layers) == header["model"]["layers"]
    where = "GPU memory by IPC handle" if "cuda" in handle.answer else "a shared-memory file"
    for index, (keys, values) in enumerate(layers):
        assert keys == expected[f"layers.{index}.keys"], index
        assert values == expected[f"layers.{index}.values"], index
    cache = None
    if through_tensors:
        try:
            cache = handle.dynamic_cache()
            assert cache.get_seq_length() == header["tokens"]
            print("DynamicCache holds", cache.get_seq_length(), "tokens")
        except ImportError:
            print("transformers not installed: DynamicCache not checked")
    handle.release()
    if cache is not None:
        # The cache holds copies: still whole once the loader's memory is let go.
        keys = cache.layers[0].keys if hasattr(cache, "layers") else cache.key_cache[0]
        assert raw(keys) == expected["layers.0.keys"], "the DynamicCache changed after release"
    handle.release()  # again: nothing happens
    try:
        loader.release(handle.handle)
        raise AssertionError("a released handle was released again")
    except LoaderError as error:
        assert error.status == 404
    # A leased handle, renewed, is held like any other until released.
    held = loader.status()["handles"]
    leased = loader.load(header["model"], [os.environ["CARTRIDGE"]], lease=60)
    leased.renew()
    assert loader.status()["handles"] == held + 1
    leased.release()
    assert loader.status()["handles"] == held
    wrong = dict(header["model"], kv_heads=header["model"]["kv_heads"] + 1)
    # Streamed or not, a refusal carries its own status.
    for on_layers in (None, lambda *_: None):
        try:
            loader.load(wrong, [os.environ["CARTRIDGE"]], on_layers=on_layers)
            raise AssertionError("a cartridge for another model was loaded")
        except LoaderError as error:
            assert error.status == 409 and "kv_heads" in error.message, error
        try:
            loader.load(header["model"], ["team/nope@v1"], on_layers=on_layers)
            raise AssertionError("an unknown cartridge was loaded")
        except LoaderError as error:
            assert error.status == 404 and "team/nope@v1" in error.message, error
    print("ok:", len(layers), "layers match the file byte for byte, from", where)


if __name__ == "__main__":
    main()
