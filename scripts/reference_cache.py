#!/usr/bin/env python3
"""Writes a cache in the reference training code's save format without PyTorch.

The format is what `TrainableCache.save` produces: `torch.save` (zip container, pickle protocol 2)
of a dict of four `nn.ParameterList`s — trainable_keys, trainable_values, frozen_keys,
frozen_values — one `[1, kv_heads, tokens, head_dim]` bf16 Parameter per layer. The pickle stream
matches torch 2.x byte for byte and the container mimics PyTorchStreamWriter (64-byte aligned
stored entries, data descriptors, zip64 end records); `torch.load(path, weights_only=False)`
reads the result. Used to make demo and test inputs of any shape with random values:

    python3 scripts/reference_cache.py OUT.pt --layers 30 --kv-heads 3 --head-dim 64 --tokens 64
"""
import argparse
import random
import struct
import zlib

# ----------------------------------------------------------------- pickle ---
PROTO, GLOBAL, BINPUT, LONG_BINPUT, BINGET, LONG_BINGET = b"\x80", b"c", b"q", b"r", b"h", b"j"
EMPTY_DICT, EMPTY_TUPLE, EMPTY_LIST, MARK = b"}", b")", b"]", b"("
TUPLE, TUPLE1, TUPLE2, TUPLE3 = b"t", b"\x85", b"\x86", b"\x87"
SETITEM, SETITEMS, BUILD, REDUCE, NEWOBJ = b"s", b"u", b"b", b"R", b"\x81"
BINUNICODE, BININT1, BININT2, BININT, LONG1 = b"X", b"K", b"M", b"J", b"\x8a"
NEWTRUE, NEWFALSE, NONE, BINPERSID, STOP = b"\x88", b"\x89", b"N", b"Q", b"."

# Module.__dict__ keys in insertion order (torch >= 2.0 Module.__init__, then
# ParameterList.__init__ adds _size). Values: "odict" -> OrderedDict(),
# "dict" -> {}, "set" -> set(), None -> None, True -> True.
MODULE_STATE = [
    ("training", True),
    ("_parameters", "params"),
    ("_buffers", "dict"),
    ("_non_persistent_buffers_set", "set"),
    ("_backward_pre_hooks", "odict"),
    ("_backward_hooks", "odict"),
    ("_is_full_backward_hook", None),
    ("_forward_hooks", "odict"),
    ("_forward_hooks_with_kwargs", "odict"),
    ("_forward_hooks_always_called", "odict"),
    ("_forward_pre_hooks", "odict"),
    ("_forward_pre_hooks_with_kwargs", "odict"),
    ("_state_dict_hooks", "odict"),
    ("_state_dict_pre_hooks", "odict"),
    ("_load_state_dict_pre_hooks", "odict"),
    ("_load_state_dict_post_hooks", "odict"),
    ("_modules", "dict"),
    ("_size", "size"),
]

STORAGE_CLASS = {"bf16": "BFloat16Storage", "f16": "HalfStorage", "f32": "FloatStorage"}
ELEM_SIZE = {"bf16": 2, "f16": 2, "f32": 4}


class _Pickler:
    def __init__(self):
        self.out = bytearray()
        self.n = 0          # next memo index
        self.memo = {}      # ("g", mod, name) / ("s", text) -> memo index

    def w(self, b):
        self.out += b

    def put(self):
        i = self.n
        self.n += 1
        self.w(BINPUT + bytes([i]) if i < 256 else LONG_BINPUT + struct.pack("<I", i))
        return i

    def get(self, i):
        self.w(BINGET + bytes([i]) if i < 256 else LONG_BINGET + struct.pack("<I", i))

    def glob(self, mod, name):
        k = ("g", mod, name)
        if k in self.memo:
            return self.get(self.memo[k])
        self.w(GLOBAL + mod.encode() + b"\n" + name.encode() + b"\n")
        self.memo[k] = self.put()

    def string(self, s, shared=True):
        # shared=True: the same (interned) str object recurs -> BINGET on reuse.
        k = ("s", s)
        if shared and k in self.memo:
            return self.get(self.memo[k])
        b = s.encode("utf-8")
        self.w(BINUNICODE + struct.pack("<I", len(b)) + b)
        i = self.put()
        if shared:
            self.memo[k] = i

    def int(self, v):
        if 0 <= v <= 0xFF:
            self.w(BININT1 + bytes([v]))
        elif 0 <= v <= 0xFFFF:
            self.w(BININT2 + struct.pack("<H", v))
        elif -0x80000000 <= v <= 0x7FFFFFFF:
            self.w(BININT + struct.pack("<i", v))
        else:  # LONG1: minimal two's-complement little endian
            n = (v.bit_length() + 8) // 8
            b = v.to_bytes(n, "little", signed=True)
            if v < 0 and n > 1 and b[-1] == 0xFF and (b[-2] & 0x80):
                b = b[:-1]
            self.w(LONG1 + bytes([len(b)]) + b)

    def int_tuple(self, vals):
        if not vals:
            return self.w(EMPTY_TUPLE)
        if len(vals) <= 3:
            for v in vals:
                self.int(v)
            self.w((TUPLE1, TUPLE2, TUPLE3)[len(vals) - 1])
        else:
            self.w(MARK)
            for v in vals:
                self.int(v)
            self.w(TUPLE)
        self.put()

    def ordered_dict(self):
        self.glob("collections", "OrderedDict")
        self.w(EMPTY_TUPLE + REDUCE)
        self.put()

    def items(self, pairs, emit_key, emit_val):
        # CPython batch_dict_exact: 1 item -> SETITEM, else MARK..SETITEMS per 1000
        if len(pairs) == 1:
            emit_key(pairs[0][0]); emit_val(pairs[0][1]); self.w(SETITEM)
            return
        for s in range(0, len(pairs), 1000):
            self.w(MARK)
            for k, v in pairs[s:s + 1000]:
                emit_key(k); emit_val(v)
            self.w(SETITEMS)

    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())
    def tensor(self, t, key):
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.w(MARK)
        self.w(MARK)                       # persistent id tuple
        self.string("storage")
        self.glob("torch", STORAGE_CLASS[t["dtype"]])
        self.string(key, shared=False)     # fresh str(len(id_map)) each time
        self.string(t.get("location", "cpu"))
        self.int(t["numel"])
        self.w(TUPLE); self.put()
        self.w(BINPERSID)
        self.int(0)                        # storage_offset
        self.int_tuple(t["shape"])
        self.int_tuple(t["stride"])
        self.w(NEWFALSE)                   # requires_grad of .data
        self.ordered_dict()                # backward_hooks
        self.w(TUPLE); self.put()
        self.w(REDUCE); self.put()

    # torch._utils._rebuild_parameter(tensor, requires_grad, OrderedDict())
    def parameter(self, t, key, requires_grad):
        self.glob("torch._utils", "_rebuild_parameter")
        self.tensor(t, key)
        self.w(NEWTRUE if requires_grad else NEWFALSE)
        self.ordered_dict()
        self.w(TUPLE3); self.put()
        self.w(REDUCE); self.put()

    def parameter_list(self, tensors, keys, requires_grad):
        self.glob("torch.nn.modules.container", "ParameterList")
        self.w(EMPTY_TUPLE + NEWOBJ); self.put()
        self.w(EMPTY_DICT); self.put()          # module __dict__ (state)

        def emit_val(kind):
            if kind is True:
                self.w(NEWTRUE)
            elif kind is None:
                self.w(NONE)
            elif kind == "odict":
                self.ordered_dict()
            elif kind == "dict":
                self.w(EMPTY_DICT); self.put()
            elif kind == "set":   # protocol 2: __builtin__.set([])
                self.glob("__builtin__", "set")
                self.w(EMPTY_LIST); self.put()
                self.w(TUPLE1); self.put()
                self.w(REDUCE); self.put()
            elif kind == "size":
                self.int(len(tensors))
            elif kind == "params":
                self.w(EMPTY_DICT); self.put()
                pairs = [(str(i), i) for i in range(len(tensors))]
                if pairs:
                    self.items(pairs, self.string,
                               lambda i: self.parameter(tensors[i], keys[i], requires_grad))
        self.items(MODULE_STATE, self.string, emit_val)
        self.w(BUILD)


def contiguous_stride(shape):
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return list(reversed(st))


def build_pickle(lists):
    """lists: list of (name, [tensor], requires_grad); tensor = dict(dtype, shape, data)."""
    p = _Pickler()
    p.w(PROTO + b"\x02")
    p.w(EMPTY_DICT); p.put()
    storages, keys_per_list = [], []
    for _, tensors, _ in lists:
        ks = []
        for t in tensors:
            t.setdefault("stride", contiguous_stride(t["shape"]))
            n = 1
            for d in t["shape"]:
                n *= d
            t["numel"] = n
            assert len(t["data"]) == n * ELEM_SIZE[t["dtype"]]
            ks.append(str(len(storages)))
            storages.append(t["data"])
        keys_per_list.append(ks)
    idx = {name: i for i, (name, _, _) in enumerate(lists)}
    p.items([(name, name) for name, _, _ in lists], p.string,
            lambda name: p.parameter_list(lists[idx[name]][1], keys_per_list[idx[name]],
                                          lists[idx[name]][2]))
    p.w(STOP)
    return bytes(p.out), storages


# -------------------------------------------------------------------- zip ---
ALIGN = 64


class _ZipWriter:
    """Mimics caffe2 PyTorchStreamWriter + its miniz (stored, data descriptors)."""

    def __init__(self, prefix):
        self.prefix, self.buf, self.cd = prefix, bytearray(), []

    def record(self, name, data):
        full = (self.prefix + "/" + name).encode()
        off = len(self.buf)
        start = off + 30 + len(full) + 4
        pad = (-start) % ALIGN
        assert off < 0xFFFFFFFF and len(data) < 0xFFFFFFFF, "zip64 records not implemented"
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc = zlib.crc32(data) & 0xFFFFFFFF
        # version_needed=0, flags=0x0808 (data descriptor + utf8), stored, time/date 0,
        # crc/sizes 0 in the local header (they follow in the data descriptor)
        self.buf += struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, 0x0808, 0, 0, 0, 0, 0, 0,
                                len(full), len(extra)) + full + extra
        assert len(self.buf) % ALIGN == 0
        self.buf += data
        self.buf += struct.pack("<IIII", 0x08074B50, crc, len(data), len(data))
        self.cd.append((full, crc, len(data), off))

    def finish(self):
        cd_off = len(self.buf)
        for full, crc, size, off in self.cd:
            self.buf += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, 0x0808, 0, 0, 0,
                                    crc, size, size, len(full), 0, 0, 0, 0, 0, off) + full
        cd_size, n = len(self.buf) - cd_off, len(self.cd)
        z64 = len(self.buf)
        self.buf += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n,
                                cd_size, cd_off)
        self.buf += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
        self.buf += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_off, 0)
        return bytes(self.buf)


def write_torch_file(path, lists, prefix=None, format_version=True, serialization_id=True):
    """prefix: archive folder; torch uses the file's basename without extension
    (e.g. 'cache-step100' for cache-step100.pt), 'archive' for streams."""
    if prefix is None:
        base = path.replace("\\", "/").rsplit("/", 1)[-1]
        prefix = base.rsplit(".", 1)[0] if "." in base else base
    pkl, storages = build_pickle(lists)
    z = _ZipWriter(prefix)
    z.record("data.pkl", pkl)
    if format_version:  # torch >= 2.6-ish; promises storages in numeric key order
        z.record(".format_version", b"1")
        z.record(".storage_alignment", b"64")
    z.record("byteorder", b"little")
    for i, data in enumerate(storages):  # numeric order, consecutive
        z.record(f"data/{i}", data)
    z.record("version", b"3\n")
    if serialization_id:
        h = zlib.crc32(pkl) & 0xFFFFFFFF
        c = 0
        for d in storages:
            c = zlib.crc32(d, c)
        z.record(".data/serialization_id", f"{h:020d}{c:020d}".encode())
    with open(path, "wb") as f:
        f.write(z.finish())



def bf16_bytes(values):
    """Little-endian bf16 of floats, rounded to nearest even as torch does."""
    out = bytearray()
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out += struct.pack("<H", bits & 0xFFFF)
    return bytes(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--kv-heads", type=int, required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True, help="frozen + trainable tokens")
    parser.add_argument("--frozen", type=int, default=1, help="leading frozen tokens (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixed-names", action="store_true", help="use the pre-2025-08 fixed_* names")
    args = parser.parse_args()
    if not 0 <= args.frozen <= args.tokens:
        parser.error("--frozen must be between 0 and --tokens")

    rng = random.Random(args.seed)

    def tensors(tokens):
        shape = [1, args.kv_heads, tokens, args.head_dim]
        count = args.kv_heads * tokens * args.head_dim
        return [dict(dtype="bf16", shape=shape, data=bf16_bytes(rng.gauss(0, 1) for _ in range(count)))
                for _ in range(args.layers)]

    trainable = args.tokens - args.frozen
    frozen_name = "fixed" if args.fixed_names else "frozen"
    lists = [("trainable_keys", tensors(trainable), True),
             ("trainable_values", tensors(trainable), True),
             (f"{frozen_name}_keys", tensors(args.frozen) if args.frozen else [], False),
             (f"{frozen_name}_values", tensors(args.frozen) if args.frozen else [], False)]
    write_torch_file(args.output, lists)


if __name__ == "__main__":
    main()
