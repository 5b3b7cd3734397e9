"""Score store at scale: creation, random gather/scatter, resident memory, and the feedback
channel's cost next to a training step.

Part 1, for each store size n in ``--sizes`` (each in a fresh process, so resident memory is
its own): the memory-mapped store (``ScoreStore.open``) and, side by side, the in-memory baseline
(``ScoreStore(n)``, a torch tensor): creation time and disk blocks, then a training-like loop of
``--ids`` random ids in meta-batches of ``--batch``: ``gather`` then ``scatter`` of the same ids
(each timed), the rate in ids/s, resident memory after the loop (``RssAnon``: private memory;
``RssFile``: file pages mapped by the process, reclaimable page cache), the peak (``VmHWM``) —
each as the increase over the process before the store existed —
a chunked ``save``, and ESWP's and InfoBatch's chunked decisions (``decide``, ratios 0.3 and
0.5) over the memory-mapped store.
Goals: creation in seconds, >= 1M ids/s gather and scatter, bounded memory at 1e9; each
decision over 1e9 scores in <= 30 s.

Part 2: the feedback channel per training step: one step of the pipeline's 1D CNN (no-grad
forward on B, forward+backward+SGD on b) next to ``ESSelector.select`` (with ``prefetch``) for
a store of ``--channel-n`` scores kept in memory on the device, and memory-mapped on the host.
On CPU the memory-mapped store is read directly (``feedback="auto"``); with ``--device cuda`` it
sits behind a :class:`es_stream.FeedbackChannel` (pinned staging, non-blocking copies, commits
on CUDA events) — the configuration whose per-step overhead the goals bound.

    .venv/bin/python tools/bench_store.py                 # 1e7, 1e8, 1e9 (~10 minutes)
    .venv/bin/python tools/bench_store.py --sizes 1e7 --ids 1e6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `pipelines`

from es_stream import ESSelector, ESWPPolicy, InfoBatchPolicy, ScoreStore  # noqa: E402

from _timing import median_ms  # noqa: E402  (tools/_timing.py)


def memory() -> dict[str, float]:
    """This process's RssAnon, RssFile and VmHWM in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def measure_size(n: int, total_ids: int, batch: int, directory: str, backing: str,
                 decide: bool) -> dict:
    """One store size, one backing: the figures of part 1 (run in a child process)."""
    path = os.path.join(directory, f"scores-{n}.npy")
    base = memory()  # the interpreter, torch and numpy: subtracted below
    start = time.perf_counter()
    store = ScoreStore.open(path, n) if backing == "memmap" else ScoreStore(n)
    created = time.perf_counter() - start
    disk = os.stat(path).st_blocks * 512 if backing == "memmap" else 0
    rng = np.random.default_rng(0)
    gather_s = scatter_s = 0.0
    steps = max(1, total_ids // batch)
    for _ in range(steps):
        ids = torch.from_numpy(rng.choice(n, batch, replace=False) if n < 4 * batch
                               else np.unique(rng.integers(0, n, batch)))
        t0 = time.perf_counter()
        values = store.gather(ids)
        t1 = time.perf_counter()
        store.scatter(ids, values * 0.8 + 0.2)
        t2 = time.perf_counter()
        gather_s += t1 - t0
        scatter_s += t2 - t1
    done = steps * batch
    t0 = time.perf_counter()
    store.sync()  # the write buffer's last updates reach the file
    sync_s = time.perf_counter() - t0
    mem_loop = memory()
    t0 = time.perf_counter()
    store.save(os.path.join(directory, "saved.npy"))
    save_s = time.perf_counter() - t0
    os.unlink(os.path.join(directory, "saved.npy"))
    decide_s = decide_ib_s = float("nan")
    if decide:
        t0 = time.perf_counter()
        kept = sum(int(d.keep.sum()) for d in ESWPPolicy(ratio=0.3, burn_in_epochs=0, anneal=0.0)
                   .decide(store.read_range, n, epoch=1, total_epochs=4))
        decide_s = time.perf_counter() - t0
        assert kept == int(np.ceil(0.7 * n))
        t0 = time.perf_counter()
        for _ in InfoBatchPolicy(ratio=0.5, anneal=0.0).decide(store.read_range, n, epoch=1,
                                                                total_epochs=4):
            pass
        decide_ib_s = time.perf_counter() - t0
    mem_end = memory()
    if backing == "memmap":
        del store
        os.unlink(path)
    return {"n": n, "backing": backing, "create_s": created, "disk_bytes": disk, "ids": done,
            "gather_per_s": done / gather_s, "scatter_per_s": done / (scatter_s + sync_s),
            "rss_anon_mib": mem_loop["RssAnon"] - base["RssAnon"],
            "rss_file_mib": mem_loop["RssFile"] - base["RssFile"],
            "save_s": save_s, "decide_s": decide_s, "decide_ib_s": decide_ib_s, "peak_mib": mem_end["VmHWM"] - base["VmHWM"]}


def part1(args: argparse.Namespace) -> None:
    print(f"part 1: {args.ids:,.0f} random ids per size, meta-batches of {args.batch}; each size "
          "and backing in a fresh process\n")
    head = (f"{'n':>14} {'backing':<8} {'create s':>9} {'disk MB':>8} {'gather/s':>10} "
            f"{'scatter/s':>10} {'RssAnon MB':>11} {'RssFile MB':>11} {'save s':>7} "
            f"{'ESWP s':>7} {'InfoB s':>7} {'peak MB':>8}")
    print(head)
    print("-" * len(head))
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for n in (int(float(s)) for s in args.sizes.split(",")):
            for backing in ("memmap", "memory"):
                cmd = [sys.executable, __file__, "--child", str(n), backing, directory,
                       "--ids", str(args.ids), "--batch", str(args.batch)]
                if args.no_decide or backing == "memory":  # the same computation: timed once
                    cmd.append("--no-decide")
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                              text=True).stdout.strip().splitlines()[-1])
                print(f"{r['n']:>14,} {r['backing']:<8} {r['create_s']:>9.3f} "
                      f"{r['disk_bytes'] / 1e6:>8.2f} {r['gather_per_s']:>10.3g} "
                      f"{r['scatter_per_s']:>10.3g} {r['rss_anon_mib']:>11.0f} "
                      f"{r['rss_file_mib']:>11.0f} {r['save_s']:>7.2f} {r['decide_s']:>7.1f} {r['decide_ib_s']:>7.1f} "
                      f"{r['peak_mib']:>8.0f}", flush=True)
    print()


def part2(args: argparse.Namespace) -> None:
    from pipelines.mnist1d.train import CNN1D

    device = torch.device(args.device)
    big_b, b, n = args.step_batch, args.step_batch // 2, int(float(args.channel_n))
    print(f"part 2: feedback channel per step, B = {big_b}, b = {b}, device {device}, "
          f"memory-mapped store of {n:,} scores\n")
    torch.manual_seed(0)
    model = CNN1D().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(big_b, 1, 40, device=device)
    y = torch.randint(0, 10, (big_b,), device=device)
    rng = np.random.default_rng(1)

    def next_ids() -> torch.Tensor:
        ids = np.unique(rng.integers(0, n, big_b + 64))
        while len(ids) < big_b:  # a small store (--channel-n near B): draw until B distinct ids
            ids = np.unique(np.concatenate([ids, rng.integers(0, n, big_b)]))
        return torch.from_numpy(ids[:big_b])

    def step() -> None:
        with torch.no_grad():
            losses = F.cross_entropy(model(x), y, reduction="none")
        chosen = losses.topk(b).indices
        opt.zero_grad()
        F.cross_entropy(model(x[chosen]), y[chosen]).backward()
        opt.step()

    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    step_ms = median_ms(step, args.repeats, device)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        mapped = "mmap host store" + (" + channel" if device.type == "cuda" else ", direct")
        stores = {
            "store in memory on " + device.type: ESSelector(
                n, b, store=ScoreStore(n, device=device)),
            mapped: ESSelector(n, b, store=ScoreStore.open(os.path.join(directory, "s.npy"), n)),
        }
        print(f"{'training step (forward B, backward b)':<40} {step_ms:>9.3f} ms")
        # one sequential pass first, as any epoch's pruning or save makes: a fresh sparse file's
        # first random touches cost a page allocation each (--cold times that case)
        if not args.cold:
            for a in range(0, n, 1 << 24):
                stores[mapped].store.read_range(a, min(a + (1 << 24), n))
        for name, sel in stores.items():
            def select(sel=sel) -> None:
                ids = next_ids()
                sel.prefetch(ids, device)
                sel.select(ids, losses)
            ms = median_ms(select, args.repeats, device)
            print(f"{'select, ' + name:<40} {ms:>9.3f} ms  {100 * ms / step_ms:6.2f}% of the step")
            sel.flush()
            del sel
        stores.clear()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e7,1e8,1e9", help="comma-separated store sizes n")
    p.add_argument("--ids", type=lambda s: int(float(s)), default=20_000_000,
                   help="random ids gathered and scattered per size")
    p.add_argument("--batch", type=int, default=4096, help="ids per gather/scatter call")
    p.add_argument("--no-decide", action="store_true", help="skip the ESWP decision timing")
    p.add_argument("--dir", default=None, help="where the store files go (default: the temp dir)")
    p.add_argument("--channel-n", default="1e9", help="store size n for part 2")
    p.add_argument("--step-batch", type=int, default=4096, help="meta-batch size B of part 2")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--cold", action="store_true",
                   help="part 2: time the memory-mapped store fresh, without the warming pass")
    p.add_argument("--child", nargs=3, metavar=("N", "BACKING", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        n, backing, directory = args.child
        print(json.dumps(measure_size(int(n), args.ids, args.batch, directory, backing,
                                      not args.no_decide)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
          f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}\n")
    if not args.skip_part1:
        part1(args)
    part2(args)


if __name__ == "__main__":
    main()
