"""Probe what a copy-engine pool transport needs on this GPU machine (the 2-GPU run issue; notes §2.7).

    torchrun --nproc_per_node N tools/probe_copy_engine.py [--gib 1] [--json OUT]

On every rank (N = 1 is enough for these):

* facts: torch / CUDA / NCCL versions, ``_SymmetricMemory.stream_write_value32`` present, the device's
  ``CAN_USE_STREAM_MEM_OPS`` attribute (through ``cuda.bindings``);
* symmetric memory: ``set_backend("CUDA")``, ``symm_mem.empty`` and ``rendezvous`` over the world group;
* bandwidth of a contiguous ``copy_`` into the rank's own symmetric buffer (``cudaMemcpyAsync``: a copy
  engine, no SMs) against the same bytes through an elementwise kernel (SMs), side by side;
* flag latency: a ping-pong between two streams through the signal pad, ``stream_write_value32`` to
  signal and ``cuStreamWaitValue32`` to wait (stream memory operations: no kernel).

With N = 2 also: rank 0's ``copy_`` into rank 1's buffer (a peer view) in 1, 2 and 4 concurrent pieces,
against NCCL send/recv of the same bytes. Prints one JSON object per rank (and writes rank 0's with --json).
Leaves NVLink multicast off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` are set if unset).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def _attempt(report: dict, name: str, fn):
    """Run ``fn``; its result (or the error, first line) under ``report[name]``."""
    try:
        report[name] = fn()
    except Exception as e:  # a probe reports what does not work instead of stopping
        report[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return report[name]


def _time_ms(fn, *, reps: int, stream) -> float:
    """Mean milliseconds of ``fn()`` queued on ``stream`` (one warm-up call)."""
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / reps


def _driver():
    from cuda.bindings import driver  # cuda-python, on the GPU image

    return driver


def _stream_mem_ops(device: int):
    driver = _driver()
    err, dev = driver.cuDeviceGet(device)
    out = {"cuDeviceGet": int(err)}
    for name in ("CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1", "CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS",
                 "CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_WAIT_VALUE_NOR", "CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_WAIT_VALUE_NOR_V1"):
        attr = getattr(driver.CUdevice_attribute, name, None)
        if attr is not None:
            e, value = driver.cuDeviceGetAttribute(attr, dev)
            out[name.removeprefix("CU_DEVICE_ATTRIBUTE_")] = int(value) if int(e) == 0 else f"error {e}"
    return out  # the V1 attributes describe the deprecated v1 API; the ping-pong below tries the ops themselves


def _wait_value(stream, ptr: int, value: int) -> None:
    driver = _driver()
    (err,) = driver.cuStreamWaitValue32(driver.CUstream(stream.cuda_stream), driver.CUdeviceptr(ptr), value,
                                        driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
    if int(err) != 0:
        raise RuntimeError(f"cuStreamWaitValue32 returned {err}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="bytes per bandwidth copy, in GiB (default 1)")
    p.add_argument("--reps", type=int, default=10, help="timed copies per measurement (default 10)")
    p.add_argument("--pings", type=int, default=1000, help="flag round trips timed (default 1000)")
    p.add_argument("--json", default=None, help="write rank 0's report here")
    args = p.parse_args()

    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    report: dict = {"rank": rank, "world": world, "device": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d")}
    report["torch"], report["cuda"] = torch.__version__, torch.version.cuda
    report["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    import torch.distributed._symmetric_memory as symm_mem
    from torch._C._distributed_c10d import _SymmetricMemory

    report["has_stream_write_value32"] = hasattr(_SymmetricMemory, "stream_write_value32")
    _attempt(report, "stream_mem_ops", lambda: _stream_mem_ops(local))

    nbytes = int(args.gib * (1 << 30))

    def rendezvous():
        report["backend_default"] = _attempt({}, "b", lambda: symm_mem.get_backend(dev))
        try:
            symm_mem.set_backend("CUDA")
        except Exception as e:  # not registered in this build: stay on the default, say so
            report["set_backend_CUDA"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        report["backend"] = _attempt({}, "b", lambda: symm_mem.get_backend(dev))
        buf = symm_mem.empty(nbytes + 4096, dtype=torch.uint8, device=dev)
        hdl = symm_mem.rendezvous(buf, group=dist.group.WORLD)
        report["_hdl"], report["_buf"] = hdl, buf
        return {"ok": True, "buffer_size": int(hdl.buffer_size), "world_size": int(hdl.world_size)}

    _attempt(report, "rendezvous", rendezvous)
    hdl = report.pop("_hdl", None)
    report.pop("_buf", None)
    side = torch.cuda.Stream(dev)
    src = torch.randn(nbytes // 2, device=dev, dtype=torch.bfloat16)

    if hdl is not None:
        def local_bandwidth():
            dst = hdl.get_buffer(rank, (nbytes // 2,), torch.bfloat16)
            ce = _time_ms(lambda: dst.copy_(src), reps=args.reps, stream=side)
            sm = _time_ms(lambda: torch.add(src, 0, out=dst), reps=args.reps, stream=side)
            assert torch.equal(dst, src)
            gbps = lambda ms: round(nbytes / ms / 1e6, 1)  # noqa: E731
            return {"bytes": nbytes, "copy_engine_ms": round(ce, 3), "copy_engine_GBps": gbps(ce),
                    "sm_kernel_ms": round(sm, 3), "sm_kernel_GBps": gbps(sm)}

        _attempt(report, "own_buffer_copy", local_bandwidth)

        def flag_latency():
            pad = hdl.get_signal_pad(rank, (64,), torch.uint32)  # stream_write_value32 takes uint32 words
            pad.view(torch.int32).zero_()
            torch.cuda.synchronize(dev)
            a, b = side, torch.cuda.Stream(dev)
            ptr = pad.data_ptr()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(a)
            for e in range(1, args.pings + 1):  # a signals word 0, b answers on word 1, a waits for it
                _SymmetricMemory.stream_write_value32(pad, 0, e)
                _wait_value(b, ptr, e)
                with torch.cuda.stream(b):
                    _SymmetricMemory.stream_write_value32(pad, 1, e)
                _wait_value(a, ptr + 4, e)
            end.record(a)
            end.synchronize()
            return {"round_trip_us": round(start.elapsed_time(end) * 1000 / args.pings, 2), "pings": args.pings,
                    "final_words": pad.view(torch.int32)[:2].tolist()}

        with torch.cuda.stream(side):
            _attempt(report, "flag_ping_pong_two_streams", flag_latency)

    if world == 2 and hdl is not None:
        def peer_bandwidth():
            out = {}
            for pieces in (1, 2, 4):
                streams = [torch.cuda.Stream(dev) for _ in range(pieces)]
                if rank == 0:
                    view = hdl.get_buffer(1, (nbytes // 2,), torch.bfloat16)
                    parts_dst, parts_src = view.chunk(pieces), src.chunk(pieces)
                    torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        for s, d_, s_ in zip(streams, parts_dst, parts_src):
                            with torch.cuda.stream(s):
                                d_.copy_(s_)
                    torch.cuda.synchronize(dev)
                    ms = (time.perf_counter() - t0) * 1000 / args.reps
                    out[f"pieces_{pieces}_GBps"] = round(nbytes / ms / 1e6, 1)
                dist.barrier()
            recv = torch.empty_like(src)
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                if rank == 0:
                    dist.send(src, dst=1)
                else:
                    dist.recv(recv, src=0)
            torch.cuda.synchronize(dev)
            out["nccl_send_recv_GBps"] = round(nbytes / ((time.perf_counter() - t0) * 1000 / args.reps) / 1e6, 1)
            return out

        _attempt(report, "peer_copy", peer_bandwidth)

    print(json.dumps(report, sort_keys=True), flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
