"""Data-parallel private training: W processes × T threads against 1 process × W·T threads, same global batch.

    python bench/distributed_throughput.py --model resnet18_gn --batch-size 64 --world 2 --threads 1 \\
        --out bench/results/distributed_cpu.json
    python bench/distributed_throughput.py --device cuda --world 8 ...     (one GPU per rank, NCCL)
    python bench/distributed_throughput.py --device cuda --world 1 ...     (one GPU: the release path alone)

Each rank runs DP-SGD steps (book-keeping engine, σ = 1, C = 1) on its share of a synthetic batch (the
global batch split evenly); the release all-reduces the clipped sums once per step. The ranks always take the
distributed release, also a world of 1 (a process group of one rank: the bucketed all-reduce, the noise
added after it instead of fused into the clipped sums, the key agreed over the group), so ``--world 1``
measures what that path costs against the plain single process. Reported per setting: median step time over
``--iters`` steps after ``--warmup``, the time of the all-reduce of the clipped sums
(``DPOptimizer.last_communication_seconds``, median: host time, which on CUDA is the time to enqueue it), and
examples per second; on CUDA also ``allreduce_ms``, the bucketed all-reduce of tensors shaped like the
model's parameters timed to completion (synchronized, median of 20); with device and versions.

NCCL takes one GPU per rank (two ranks on one device are refused), so ``--world`` is at most the number of
visible GPUs on CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import collect_metadata  # noqa: E402

from dpsat_fast.engine import BookKeepingEngine  # noqa: E402
from dpsat_fast.models import INPUT_SHAPES, NUM_CLASSES, build_model  # noqa: E402
from dpsat_fast.optim import DPOptimizer  # noqa: E402


def _steps(model_name, batch, device, warmup, iters, rank, world, distributed):
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(batch, *INPUT_SHAPES[model_name], generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES[model_name], (batch,), generator=g).to(device)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), engine=engine,
                      noise_multiplier=1.0, expected_batch_size=float(batch * world), distributed=distributed)
    times, comm = [], []
    for k in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
            comm.append(opt.last_communication_seconds * 1e3)
    result = {"ms_per_step": statistics.median(times), "comm_ms": statistics.median(comm), "times_ms": times}
    if distributed and device.type == "cuda":
        result["allreduce_ms"] = _timed_all_reduce([p.detach().clone() for p in model.parameters()])
    return result


def _timed_all_reduce(tensors, reps: int = 20) -> float:
    """The release's bucketed all-reduce of ``tensors``, timed to completion on the GPU (median ms)."""
    from dpsat_fast import distributed as distributed_mod

    times = []
    for _ in range(3 + reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        distributed_mod.all_reduce_sums(tensors)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[3:])


def _rank(rank, world, port, args, out):
    torch.set_num_threads(args.threads)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    try:
        result = _steps(args.model, args.batch_size // world, device, args.warmup, args.iters, rank, world, True)
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18_gn")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per rank (the single process gets world·threads)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="repeat both settings, interleaved; median round")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible")
    if cuda and args.world > torch.cuda.device_count():
        p.error(f"--world {args.world} on CUDA needs {args.world} GPUs (NCCL: one GPU per rank), "
                f"{torch.cuda.device_count()} visible")
    if cuda:  # one GPU per rank; the thread counts only matter on CPU
        single_name, ranks_name = "1 process, 1 GPU", f"{args.world} ranks x 1 GPU (nccl)"
    else:
        single_name = f"1 process x {args.world * args.threads} threads"
        ranks_name = (f"{args.world} processes x {args.threads} threads" if args.world > 1
                      else f"1 process x {args.threads} threads, gloo group of 1")
    rows = []
    for _ in range(args.rounds):
        torch.set_num_threads(args.world * args.threads)
        device = torch.device(args.device)
        single = _steps(args.model, args.batch_size, device, args.warmup, args.iters, 0, 1, False)
        rows.append({"setting": single_name, **single})
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_rank, args=(args.world, _free_port(), args, out), nprocs=args.world, join=True)
            ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(args.world)]
        row = {"setting": ranks_name, "ms_per_step": max(r["ms_per_step"] for r in ranks),
               "comm_ms": statistics.median(r["comm_ms"] for r in ranks), "ranks": ranks}
        if cuda:
            row["allreduce_ms"] = statistics.median(r["allreduce_ms"] for r in ranks)
        rows.append(row)
    summary = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting]
        ms = statistics.median(r["ms_per_step"] for r in mine)
        summary[setting] = {"ms_per_step": ms, "examples_per_s": args.batch_size / ms * 1e3,
                            "comm_ms": statistics.median(r["comm_ms"] for r in mine)}
        line = (f"{setting}: {ms:.1f} ms/step, {args.batch_size / ms * 1e3:.1f} examples/s, all-reduce "
                f"{summary[setting]['comm_ms']:.1f} ms")
        if "allreduce_ms" in mine[0]:
            summary[setting]["allreduce_ms"] = statistics.median(r["allreduce_ms"] for r in mine)
            line += f" (host), {summary[setting]['allreduce_ms']:.3f} ms to completion"
        print(line)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    result = {"metadata": collect_metadata(torch.device(args.device), args.threads, argv_list,
                                           script="bench/distributed_throughput.py"),
              "summary": summary, "rounds": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
