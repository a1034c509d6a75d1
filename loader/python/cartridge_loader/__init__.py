"""Client of the cartridge loader sidecar.

Loads cartridges through the loader's local API and hands their keys and values to PyTorch
without copying them, as tensors shaped for a Hugging Face ``DynamicCache``
(``[1, kv_heads, tokens, head_dim]`` per layer). A loader serving a GPU (``--device cuda``)
answers with a CUDA IPC handle, which this client opens in this process (the tensors are views
of the loader's GPU memory); a loader serving host memory answers with a shared-memory file,
which this client maps.

    loader = Loader("http://127.0.0.1:7071")           # or Loader(socket="/run/cartridge.sock")
    with loader.load(model_fingerprint, ["legal/contracts@v3", "hr/handbook@v1"]) as handle:
        cache = handle.dynamic_cache()                 # prompt positions start at handle.tokens
        # A cartridge stands for a system turn: the prompt is the conversation as it follows
        # one (rendered after a system message, that message's text removed; no BOS).
        ...
    # released on leaving the block: tensors() views are invalid from here on
"""

from __future__ import annotations

import ctypes
import functools
import http.client
import json
import mmap
import socket as socket_module
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlparse

__all__ = ["Loader", "Handle", "LoaderError"]

_TORCH_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


class LoaderError(RuntimeError):
    """The loader answered with an error body ``{code, message}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status, self.code, self.message = status, code, message


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


class _DeviceMemory:
    """Raw GPU memory as torch sees it through ``__cuda_array_interface__``."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False), "version": 3, "strides": None}


@functools.cache
def _driver():
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcMemHandle, ctypes.c_uint]
    driver.cuIpcCloseMemHandle.argtypes = [ctypes.c_uint64]
    driver.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return driver


def _check(driver, result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        driver.cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{what}: {(name.value or b'CUDA error %d' % result).decode()}")


def _device_index(location: dict) -> int:
    """This process's index of the loader's GPU: by UUID, as ordinals differ between processes
    with different ``CUDA_VISIBLE_DEVICES``."""
    import torch

    wanted = location["uuid"].removeprefix("GPU-")
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid).removeprefix("GPU-") == wanted:
            return index
    raise RuntimeError(f"the loader's GPU {location['uuid']} is not visible to this process")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("loader", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Loader:
    """The loader's API, over loopback HTTP or a Unix socket."""

    def __init__(self, url: str = "http://127.0.0.1:7071", socket: str | None = None, timeout: float = 600.0):
        self._url = urlparse(url)
        self._socket = socket
        self._timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self._socket:
            return _UnixConnection(self._socket, self._timeout)
        return http.client.HTTPConnection(self._url.hostname, self._url.port or 80, timeout=self._timeout)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        connection = self._connection()
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        answer = json.loads(data) if data else None
        if response.status >= 400:
            answer = answer or {}
            raise LoaderError(response.status, answer.get("code", "unknown"), answer.get("message", data.decode(errors="replace")))
        return answer

    def load(self, model: dict, cartridges: list[str], on_layers: Callable[[int, int, Any], None] | None = None, lease: int | None = None) -> "Handle":
        """Loads (and composes, in order) cartridges for the model with this fingerprint.

        With ``lease`` (seconds; without one, the loader's ``--default-lease`` where it has one:
        ``handle.answer["lease"]`` says which), the loader releases the handle by itself unless
        :meth:`Handle.renew` comes first (renew well within it, say every third of it): a
        process that dies holding it does not hold the memory for good. Once a lease lapsed,
        the buffer is no longer kept for this process: stop using its tensors (on a GPU the
        memory may go to another load).

        With ``on_layers``, the load streams: while a single cartridge is decoded into a new
        buffer, ``on_layers(ready, layers, location)`` is called each time more leading layers of
        the buffer at ``location`` (a file path, or the ``cuda`` location of GPU memory) hold
        their final bytes, so work on the first layers can start early. Events are provisional
        until the call returns: a new location means the decode started over (a cached blob
        failed verification).
        """
        body = {"model": model, "cartridges": list(cartridges)}
        if lease is not None:
            body["lease"] = lease
        if on_layers is None:
            answer = self._request("POST", "/v1/load", body)
            return Handle(self, answer, leased=_leased(lease, answer))
        connection = self._connection()
        try:
            connection.request("POST", "/v1/load", body=json.dumps(dict(body, stream=True)).encode(), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status >= 400:  # refused before streaming began
                answer = json.loads(response.read() or b"{}")
                raise LoaderError(response.status, answer.get("code", "unknown"), answer.get("message", ""))
            while line := response.readline():
                event = json.loads(line)
                kind = event.pop("event")
                if kind == "layers":
                    try:
                        on_layers(event["ready"], event["layers"], _location(event))
                    except Exception:
                        # The load goes on in the loader: its handle, which nobody would
                        # receive, is released before the callback's error goes on. (On
                        # Ctrl-C the connection just closes: the loader releases a handle
                        # it could not send.)
                        self._release_unreceived(response)
                        raise
                elif kind == "loaded":
                    return Handle(self, event, leased=_leased(lease, event))
                else:
                    raise LoaderError(event.get("status", 500), event.get("code", "internal"), event.get("message", ""))
        finally:
            connection.close()
        raise LoaderError(500, "internal", "the stream ended without an answer")

    def _release_unreceived(self, response: http.client.HTTPResponse) -> None:
        """Reads a stream up to its last event and releases the handle it answers, if any."""
        try:
            for line in response:
                event = json.loads(line)
                if event.get("event") == "loaded":
                    self.release(event["handle"])
                if event.get("event") != "layers":
                    return
        except (OSError, ValueError, LoaderError):
            pass  # best effort: the callback's error is the one to report

    def release(self, handle: int) -> None:
        self._request("POST", "/v1/release", {"handle": handle})

    def renew(self, handle: int) -> dict:
        """Extends a handle's lease by its length from now: ``{"handle", "lease"}``."""
        return self._request("POST", "/v1/renew", {"handle": handle})

    def prefetch(self, cartridges: list[str]) -> list[dict]:
        return self._request("POST", "/v1/prefetch", {"cartridges": list(cartridges)})

    def status(self) -> dict:
        return self._request("GET", "/v1/status")


def _leased(asked: int | None, answer: dict) -> bool:
    """Whether a load's handle has a lease: the one asked for, or the loader's default (which
    its answer says; a loader from before defaults says nothing)."""
    return asked is not None or answer.get("lease") is not None


def _location(answer: dict):
    return answer["path"] if "path" in answer else answer["cuda"]


@dataclass
class Handle:
    """A loaded (composed) cartridge. Release it when done (or use it as a context manager:
    ``with loader.load(...) as handle:``); the loader may then evict it."""

    loader: Loader
    answer: dict
    leased: bool = False
    _map: mmap.mmap | None = field(default=None, repr=False)
    _opened: int | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def handle(self) -> int:
        return self.answer["handle"]

    @property
    def tokens(self) -> int:
        """Positions the cartridge occupies: the prompt starts at this position."""
        return self.answer["tokens"]

    @property
    def location(self):
        """The shared-memory file's path, or the ``cuda`` location (device, uuid, ipc_handle)."""
        return _location(self.answer)

    def _flat(self) -> "torch.Tensor":  # noqa: F821
        """The whole buffer as bytes, without a copy."""
        import torch

        if "cuda" in self.answer:
            location = self.answer["cuda"]
            index = _device_index(location)
            if self._opened is None:
                driver = _driver()
                handle = _IpcMemHandle.from_buffer_copy(bytes.fromhex(location["ipc_handle"]))
                pointer = ctypes.c_uint64()
                # Opened in that GPU's primary context (the one torch uses), made current here.
                with torch.cuda.device(index):
                    torch.cuda.synchronize()
                    # 1 = CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
                    _check(driver, driver.cuIpcOpenMemHandle_v2(ctypes.byref(pointer), handle, 1), "opening the loader's GPU memory")
                self._opened = pointer.value
            return torch.as_tensor(_DeviceMemory(self._opened, self.answer["bytes"]), device=torch.device("cuda", index))
        return torch.frombuffer(self.buffer(), dtype=torch.uint8)

    def buffer(self) -> memoryview:
        """A loader serving host memory: its buffer (every layer's keys and values, at the
        offsets of ``answer["layout"]``) mapped from the shared file, for readers without torch."""
        if "cuda" in self.answer:
            raise RuntimeError("the buffer is in GPU memory: use tensors()")
        if self._map is None:
            with open(self.answer["path"], "rb") as file:
                # Copy-on-write: torch wants a writable buffer; pages are shared until written.
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        return memoryview(self._map)

    def tensors(self, device: str | None = None) -> list[tuple["torch.Tensor", "torch.Tensor"]]:  # noqa: F821
        """Per layer, ``(keys, values)`` shaped ``[1, kv_heads, tokens, head_dim]``: views of the
        loader's buffer (GPU memory, or the shared file in host memory), valid until
        :meth:`release`; with ``device`` they are copied there instead."""
        import torch

        dtype = getattr(torch, _TORCH_DTYPES[self.answer["dtype"]])
        flat = self._flat()
        shape = (1, self.answer["kv_heads"], self.answer["tokens"], self.answer["head_dim"])
        nbytes = shape[1] * shape[2] * shape[3] * flat.new_empty((), dtype=dtype).element_size()
        layers = []
        for span in self.answer["layout"]:
            pair = []
            for offset in (span["keys"], span["values"]):
                tensor = flat[offset : offset + nbytes].view(dtype).view(shape)
                # A copy even onto the device the view is on.
                pair.append(tensor if device is None else tensor.to(device, copy=True))
            layers.append((pair[0], pair[1]))
        return layers

    def dynamic_cache(self, device: str | None = None):
        """A transformers ``DynamicCache`` holding the cartridge. ``generate`` reads the
        prompt's ids at the cache's positions: give it ``handle.tokens`` placeholder ids (any)
        before the prompt, and the cache.

        The cache holds copies (``DynamicCache.update`` concatenates onto its own tensors), so
        it stays usable after :meth:`release` and costs the cartridge's size again in GPU
        memory; :meth:`tensors` gives the loader's memory itself."""
        from transformers import DynamicCache

        cache = DynamicCache()
        # Always copies: some transformers releases keep a layer's first tensors as given, and
        # release() unmaps the loader's memory under every view of it.
        if device is None:
            layers = [(keys.clone(), values.clone()) for keys, values in self.tensors()]
        else:
            layers = self.tensors(device)
        for index, (keys, values) in enumerate(layers):
            cache.update(keys, values, index)
        return cache

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            self.release()
        except Exception:
            # An error from the block is the one to see, not the release's after it.
            if kind is None:
                raise

    def renew(self) -> dict:
        """Extends this handle's lease (see :meth:`Loader.load`); 404 once it lapsed."""
        return self.loader.renew(self.handle)

    def release(self) -> None:
        """Lets the loader evict the buffer. Views from :meth:`tensors` must not be used after.
        Releasing again does nothing."""
        if self._released:
            return
        try:
            if self._opened is not None:
                import torch

                driver = _driver()
                # Work queued on the views finishes before they are unmapped.
                with torch.cuda.device(_device_index(self.answer["cuda"])):
                    torch.cuda.synchronize()
                    opened, self._opened = self._opened, None
                    _check(driver, driver.cuIpcCloseMemHandle(opened), "closing the loader's GPU memory")
        finally:
            # The mapping goes with the last view of it.
            self._map = None
            try:
                self.loader.release(self.handle)
            except LoaderError as error:
                # A lapsed lease released it already.
                if not (error.status == 404 and self.leased):
                    raise
            # Only once the loader has it back: a failed call (a loader restarting) may be
            # made again.
            self._released = True
