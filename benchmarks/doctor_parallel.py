"""Wall time of ``gw.doctor`` in this process, on a local pool of 2 workers and on Ray with 2 CPUs; Ray's per-trial
overhead; and the time projected for a cluster of N machines from the per-trial times, checked against the pool.

    nice python benchmarks/doctor_parallel.py [--steps 100] [--repeats 2] [--setups a,b,c]

Every configuration runs the same zoo set-ups with the same seeds in one process, interleaved per repeat, so
that the ratios compare like with like on a machine whose load drifts; the load average is printed beside them.
The driver is warmed first (imports, the digits data), so "serial" is the doctor's own time; each doctor call on
a pool starts its own workers (spawn: a fresh interpreter imports torch and loads the data), which is the
pool's real cost per call. Ray's cluster is started once (its start-up is reported apart) and its workers are
warmed by one probe trial each, as on a long-lived cluster.

The projection: the doctor runs rounds (the baseline, then each round of remedies), each round's trials
submitted together, FIFO on N slots, the next round decided when the last one ends. So the time on N
machines is, per set-up, the start-up of a worker plus the sum over rounds of the round's makespan when its
trials (their serial times) are list-scheduled on N slots, plus a per-trial overhead.
"""

from __future__ import annotations

import argparse
import heapq
import os
import pickle
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

import gradwatch as gw
from gradwatch import zoo
from gradwatch.doctor.execute import Job, run_job

SETUPS = ("deep_tanh_mlp", "dead_relu_mlp", "exploding_relu_mlp")


def makespan(times: list[float], slots: int) -> float:
    """Finish time of ``times`` scheduled in order, each on the first free of ``slots`` (the doctor's runner)."""
    free = [0.0] * slots
    end = 0.0
    for t in times:
        start = heapq.heappop(free)
        end = max(end, start + t)
        heapq.heappush(free, start + t)
    return end


def rounds(report: gw.DoctorReport) -> list[list[float]]:
    """The trial times of each round, the baseline first (one time per remedy row: its seeds' sum)."""
    out = [[report.baseline.seconds]]
    for r in sorted({t.rounds for t in report.trials}):
        out.append([t.seconds for t in report.trials if t.rounds == r])
    return out


def project(per_setup: list[list[list[float]]], slots: int, start: float, overhead: float) -> float:
    """Seconds on ``slots`` machines: per set-up, a worker start-up plus each round's makespan (times + overhead)."""
    return sum(start + sum(makespan([t + overhead for t in rnd], slots) for rnd in rds) for rds in per_setup)


def table_of(report: gw.DoctorReport) -> list[tuple[str, str]]:
    return [(t.label, t.verdict) for t in [report.baseline] + report.trials]


def timed_doctor(name: str, steps: int, workers: object) -> tuple[float, gw.DoctorReport]:
    t0 = time.perf_counter()
    report = gw.doctor(zoo.get(name), steps=steps, progress=False, workers=workers)  # type: ignore[arg-type]
    return time.perf_counter() - t0, report


def probe_job(name: str) -> Job:
    """The baseline trial of ``name`` for 1 step (in a temporary store): what a cold worker pays beyond a warm one."""
    return Job(zoo.get(name), 0, 1, "probe", None, {}, None, False, 1)


def cold_start_pool(name: str, workers: int) -> float:
    """Seconds ``workers`` freshly spawned pool workers take for a 1-step trial each, less what this warm process
    takes for one: a worker's start-up alone (1), or beside another on these 2 cores (2)."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for fut in [pool.submit(run_job, probe_job(name)) for _ in range(workers)]:
            fut.result()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_job(probe_job(name))
    return cold - (time.perf_counter() - t0)


def ray_overheads(name: str, steps: int) -> dict[str, float]:
    """Ray's costs per trial: a task's round trip on a warm worker, and what a trial's job and result weigh."""
    import ray
    from ray import cloudpickle

    noop = ray.remote(num_cpus=1)(lambda: None)
    ray.get([noop.remote() for _ in range(4)])
    t0 = time.perf_counter()
    for _ in range(20):
        ray.get(noop.remote())
    trip = (time.perf_counter() - t0) / 20
    job = Job(zoo.get(name), 0, steps, "sized", None, {}, None, True, 1)
    outcome = run_job(job)  # a real trial, its run shipped back as bytes
    out: dict[str, float] = {"round_trip_s": trip}
    for label, obj in (("job", job), ("result", outcome._replace(files=None)), ("result+store", outcome)):
        t0 = time.perf_counter()
        data = cloudpickle.dumps(obj)
        pickle.loads(data)
        out[f"{label}_kb"] = len(data) / 1024
        out[f"{label}_ser_s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--setups", default=",".join(SETUPS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # serial: one thread; the pool's 2 workers get cores // 2 = 1 each on this machine
    names = args.setups.split(",")
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}; "
          f"steps {args.steps}; load average {os.getloadavg()[0]:.1f}")
    for name in names:  # warm this process: imports, data
        run_job(probe_job(name))

    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray_init = time.perf_counter() - t0
    warm = ray.remote(num_cpus=1)(run_job)
    t0 = time.perf_counter()
    ray.get([warm.remote(probe_job(names[0])) for _ in range(2)])  # both workers import torch, load the data
    ray_cold = time.perf_counter() - t0
    overheads = ray_overheads(names[0], args.steps)

    walls: dict[str, list[float]] = {"serial": [], "pool-2": [], "ray-2": []}
    per_setup_rounds: list[list[list[float]]] = []
    starts: dict[int, list[float]] = {1: [], 2: []}
    trials, same = 0, True
    for rep in range(args.repeats):
        load = os.getloadavg()[0]
        for k in starts:
            starts[k].append(cold_start_pool(names[0], k))
        totals = {k: 0.0 for k in walls}
        for name in names:
            s, serial = timed_doctor(name, args.steps, 1)
            p, pooled = timed_doctor(name, args.steps, 2)
            r, rayed = timed_doctor(name, args.steps, "ray")
            same &= table_of(serial) == table_of(pooled) == table_of(rayed)
            totals["serial"] += s
            totals["pool-2"] += p
            totals["ray-2"] += r
            if rep == 0:
                per_setup_rounds.append(rounds(serial))
                trials += 1 + len(serial.trials)
            print(f"  repeat {rep} {name}: {1 + len(serial.trials)} trials in {len(rounds(serial))} rounds "
                  f"(the baseline's included); "
                  f"serial {s:.1f} s, pool-2 {p:.1f} s, ray-2 {r:.1f} s")
        for k, v in totals.items():
            walls[k].append(v)
        print(f"repeat {rep} (load {load:.1f} → {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{k} {v:.1f} s ({v / totals['serial']:.2f}×)" for k, v in totals.items()))
    ray.shutdown()

    start, start2 = statistics.median(starts[1]), statistics.median(starts[2])
    trip = overheads["round_trip_s"] + overheads["job_ser_s"] + overheads["result_ser_s"]
    serial = statistics.median(walls["serial"])
    print(f"\nsame verdicts in all three modes: {same}")
    print("| configuration | wall s (median) | ratio to serial |\n|---|---:|---:|")
    for k, v in walls.items():
        print(f"| {k} | {statistics.median(v):.1f} | {statistics.median(v) / serial:.2f}× |")
    print(f"\n{trials} trials over {len(names)} set-ups; pool worker start-up (spawn, imports, data) per doctor "
          f"call: {start:.1f} s alone, {start2:.1f} s for two at once; Ray: cluster start {ray_init:.1f} s, cold workers {ray_cold:.1f} s, "
          f"task round trip {1e3 * overheads['round_trip_s']:.1f} ms; job {overheads['job_kb']:.1f} KiB, result "
          f"{overheads['result_kb']:.1f} KiB ({overheads['result+store_kb']:.0f} KiB with its run store); "
          f"serialisation {1e3 * (overheads['job_ser_s'] + overheads['result_ser_s']):.1f} ms per trial")
    print("\n| machines N | projected s, a fresh worker per call | ratio | projected s, warm workers (Ray) | ratio |\n"
          "|---|---:|---:|---:|---:|")
    one = project(per_setup_rounds, 1, 0.0, 0.0)
    for n in (1, 2, 4, 8, 16, 64):  # N machines: each starts its own worker, alone; or a cluster already warm
        fresh = project(per_setup_rounds, n, start if n > 1 else 0.0, trip if n > 1 else 0.0)
        warm = project(per_setup_rounds, n, 0.0, trip if n > 1 else 0.0)
        print(f"| {n} | {fresh:.1f} | {fresh / one:.2f}× | {warm:.1f} | {warm / one:.2f}× |")
    pool, rayed = statistics.median(walls["pool-2"]), statistics.median(walls["ray-2"])
    projected, projected_ray = project(per_setup_rounds, 2, start2, 0.0), project(per_setup_rounds, 2, 0.0, trip)
    print(f"\ncheck: projected pool-2 (two workers starting at once) {projected:.1f} s against measured {pool:.1f} s "
          f"({pool / projected:.2f}×); projected warm ray-2 {projected_ray:.1f} s against measured {rayed:.1f} s "
          f"({rayed / projected_ray:.2f}×); serial's trial times sum to {one:.1f} s against its wall {serial:.1f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
