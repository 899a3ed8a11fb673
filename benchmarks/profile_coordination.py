"""What-if runs of the coordination benchmark, to locate kvdist's control-plane time.

Not a benchmark of record: it patches private kvdist internals *in this process only* to
estimate what a proposed change would buy, then runs `kvdist.bench.coordination` as usual.

    mpiexec -n 2 python benchmarks/profile_coordination.py VARIANT [bench options]
    python benchmarks/profile_coordination.py codec [SIZES]

`codec` times, in one process, encoding and decoding one step's plan per in-flight size:
the current codec, the `array` variant, two columnar layouts for the decoding requests
(one packed array per field instead of one msgpack entry per request; `columnar` rebuilds
the `RequestData` objects on decode, `columnar-lazy` hands out the arrays), against
pickling the baseline's step metadata.

VARIANT is a '+'-joined list of:
  asis    nothing patched
  spin    MPI communicator busy-polls instead of sleeping with backoff (_SPIN_S = 60 s)
  array   wire codec packs/unpacks id arrays with array('i') instead of numpy (same bytes)
  native  the engine holds token and block ids as array('i') rather than lists (both
          implementations get them), and the codec ships them without converting: packing
          is a copy, decoding returns array('i') (implies `array`)
  nogc    Python's cyclic garbage collector disabled (locates the p99 spikes)
"""

import array
import sys


def _pack_ids(ids):
    from kvdist.wire.codec import WireError

    try:
        a = array.array("i", ids)
    except OverflowError as exc:
        raise WireError("an id does not fit in int32") from exc
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _unpack_ids(data, what):
    from kvdist.wire.codec import WireError

    if not isinstance(data, bytes) or len(data) % 4:
        raise WireError(f"{what}: expected packed int32 bytes, got {type(data).__name__}")
    a = array.array("i")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


def _pack_native(ids):
    if isinstance(ids, array.array) and ids.typecode == "i" and sys.byteorder == "little":
        return ids.tobytes()
    return _pack_ids(ids)


def _unpack_native(data, what):
    from kvdist.wire.codec import WireError

    if not isinstance(data, bytes) or len(data) % 4:
        raise WireError(f"{what}: expected packed int32 bytes, got {type(data).__name__}")
    a = array.array("i")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _native_workload() -> None:
    from kvdist.bench.coordination_workload import Workload

    plain = Workload.next_step

    def next_step(self):
        data = plain(self)
        for r in data.new + data.cached:
            r.new_tokens = array.array("i", r.new_tokens)
            r.new_block_ids = array.array("i", r.new_block_ids)
        for j in data.save_jobs:
            j.block_ids = array.array("i", j.block_ids)
        return data

    Workload.next_step = next_step  # type: ignore[method-assign]


def apply(variant: str) -> None:
    for part in variant.split("+"):
        if part == "asis":
            continue
        if part == "spin":
            import kvdist.comm.mpi as mpi

            mpi._SPIN_S = 60.0
        elif part == "array":
            import kvdist.bench.coordination as bench
            import kvdist.wire.codec as codec

            codec.pack_ids, codec.unpack_ids = _pack_ids, _unpack_ids
            bench.pack_ids = _pack_ids
        elif part == "nogc":
            import gc

            gc.disable()
        elif part == "native":
            import kvdist.bench.coordination as bench
            import kvdist.wire.codec as codec

            codec.pack_ids, codec.unpack_ids = _pack_native, _unpack_native
            bench.pack_ids = _pack_native
            _native_workload()
        else:
            raise SystemExit(f"unknown variant part {part!r}")


def _columnar(reqs):
    from itertools import chain

    a = array.array
    return [
        [r.request_id for r in reqs],
        a("i", [len(r.new_tokens) for r in reqs]).tobytes(),
        a("i", chain.from_iterable(r.new_tokens for r in reqs)).tobytes(),
        a("i", [len(r.new_block_ids) for r in reqs]).tobytes(),
        a("i", chain.from_iterable(r.new_block_ids for r in reqs)).tobytes(),
        a("i", [r.computed_position for r in reqs]).tobytes(),
        a("i", [r.num_scheduled_tokens for r in reqs]).tobytes(),
    ]


def _columns(obj):
    ids, *packed = obj
    cols = []
    for b in packed:
        c = array.array("i")
        c.frombytes(b)
        cols.append(c)
    return ids, cols


def _uncolumnar(obj):
    from kvdist.api.types import RequestData

    ids, (ntok, tok, nblk, blk, pos, ns) = _columns(obj)
    tok, blk = tok.tolist(), blk.tolist()
    out, ti, bi = [], 0, 0
    for i, rid in enumerate(ids):
        a, b = ntok[i], nblk[i]
        out.append(RequestData(rid, tok[ti : ti + a], blk[bi : bi + b], pos[i], ns[i]))
        ti += a
        bi += b
    return out


def _best_us(f, n: int = 10) -> float:
    import timeit

    return min(timeit.repeat(f, number=n, repeat=7)) / n * 1e6


def codec_micro(sizes) -> None:
    print(
        "| in-flight | plan bytes | current enc/dec µs | array enc/dec | columnar enc/dec | "
        "columnar-lazy dec | pickle dumps/loads (baseline meta) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        print(_codec_row(n))


def _codec_row(n: int) -> str:
    import pickle

    import msgpack

    import kvdist.wire.codec as codec
    from kvdist.bench.coordination import _kv_meta, _plan
    from kvdist.bench.coordination_baseline import step_metadata
    from kvdist.bench.coordination_workload import Workload

    wl = Workload(n, 0)
    for _ in range(5):
        data = wl.next_step()
    plan = _plan(data)
    plan.connector_meta = _kv_meta(data)
    so = plan.scheduler_output
    meta = step_metadata(data)
    plain = (codec.pack_ids, codec.unpack_ids)
    wire = codec.encode_plan(plan)
    cur = _best_us(lambda: codec.encode_plan(plan)), _best_us(lambda: codec.decode_plan(wire))
    codec.pack_ids, codec.unpack_ids = _pack_ids, _unpack_ids
    try:
        wire_a = codec.encode_plan(plan)
        arr = _best_us(lambda: codec.encode_plan(plan)), _best_us(lambda: codec.decode_plan(wire_a))

        def enc_col():
            head = {
                "new": [codec._encode_request(r) for r in so.new_requests],
                "cached": _columnar(so.cached_requests),
            }
            meta_bytes = msgpack.packb(plan.connector_meta, use_bin_type=True)
            return msgpack.packb(head, use_bin_type=True) + meta_bytes

        wire_c = enc_col()

        def dec_col(lazy):
            u = msgpack.Unpacker(raw=False)
            u.feed(wire_c)
            head, _meta = list(u)
            new = [codec._decode_request(r) for r in head["new"]]
            return new, (_columns(head["cached"]) if lazy else _uncolumnar(head["cached"]))

        assert dec_col(False)[1] == so.cached_requests
        col = _best_us(enc_col), _best_us(lambda: dec_col(False)), _best_us(lambda: dec_col(True))
    finally:
        codec.pack_ids, codec.unpack_ids = plain
    pk = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    pic = (
        _best_us(lambda: pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)),
        _best_us(lambda: pickle.loads(pk)),
    )
    return (
        f"| {n} | {len(wire)} | {cur[0]:.0f} / {cur[1]:.0f} | {arr[0]:.0f} / {arr[1]:.0f} | "
        f"{col[0]:.0f} / {col[1]:.0f} | {col[2]:.0f} | {pic[0]:.0f} / {pic[1]:.0f} ({len(pk)} B) |"
    )


if __name__ == "__main__":
    if sys.argv[1] == "codec":
        codec_micro(
            [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,16,64,256,1024").split(",")]
        )
        sys.exit(0)
    apply(sys.argv[1])
    from kvdist.bench.coordination import main

    sys.exit(main(sys.argv[2:]))
