"""`sweep`: the entry of a sweep (`app.sweep` plans and computes it), in one process or in every
process of a cluster joined by `jax.distributed`: then the units are split across the processes and
the results written once, by process 0.

- Joining: `join(coordinator, num_processes, process_id)` (the command line's `--coordinator`,
  `--num-processes`, `--process-id`, or `--distributed` for JAX's own detection on TPU VMs, Slurm and
  Open MPI) calls `jax.distributed.initialize` before any JAX work.
- The work list: every process checks the plan (`sweep.plan`); process 0 alone claims the output folder
  (its lock) and decides which units are done (its reading of `units/`), and sends the indices of the
  units left to every process, so all agree on the work list even where their disks differ.
- The split: the units left, in `sweep.work_order` (by category, then by score group), are cut into
  contiguous blocks, one per process (`multihost.process_share`): each process extracts the taps of the
  categories of its block and runs its units on its own default device, independently of the others.
- Rounds: after each unit, the processes exchange what they finished (`multihost.exchange_bytes`, one
  small all-gather of JSON); process 0 writes those units' files and results.csv at once, so a run
  stopped at any point loses only the units of the round in flight. A process whose units are done
  takes part in the remaining rounds with nothing. At the end process 0 writes table.md and the plots.
- Errors: a process whose plan or unit fails says so in the next exchange and raises its own error; the
  others raise `ProcessFailed` there, so none waits forever.
- Other processes write nothing under the output folder: they read the feature store (where the file
  system is shared) but keep the taps they compute in memory only.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import jax
import numpy as np

from patchcore_jax._src.app import sweep as sweep_lib
from patchcore_jax._src.io.outputs import OutputDir
from patchcore_jax._src.model.config import PatchCoreConfig
from patchcore_jax._src.run import multihost


def join(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
         auto: bool = False) -> bool:
    """Joins this process to a JAX cluster before any JAX work: all three of `coordinator` ("HOST:PORT",
    process 0's host), `num_processes` and `process_id`, or `auto` (JAX detects them: TPU VMs, Slurm,
    Open MPI). Returns whether it joined (False: none given, one process as before). ValueError naming
    a missing or bad option."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given) and not auto:
        return False
    if any(given) and auto:
        raise ValueError("--distributed: give either it (JAX detects the cluster) or --coordinator, "
                         "--num-processes and --process-id, not both")
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id: give all three (or --distributed)")
    if num_processes is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id: expected 0 <= process id < --num-processes, got {process_id} of "
                             f"{num_processes}")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator: expected HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts' collectives
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as err:
        if not auto:
            raise
        raise ValueError(f"--distributed: JAX found no cluster here (TPU VM, Slurm, Open MPI: {err}); give "
                         "--coordinator, --num-processes and --process-id") from None
    return True


def sweep(dataset: str, root: str, config: PatchCoreConfig | None = None, *, out: str, grid, seeds=(0,),
          categories=None, mask_rule: str = "published", dry_run: bool = False, remove_features: bool = False,
          log: Callable[[str], None] = lambda message: None) -> dict:
    """Runs (or, with `dry_run`, describes) a sweep; see the module docstring. Returns
    `{"results": rows as in results.csv, "ran": units computed now, "kept": units reused, "out": S}`.

    `config`: the fixed base of every cell (the data set's protocol geometry applied, see
    `evaluate.protocol_config`). `grid`: `{key: [values]}` or `["KEY=V1,V2", ...]`. `seeds`: the seeds
    of every cell (`"0,1,2"` or a sequence). `log` receives one line per unit with an estimate of the
    time left. In a cluster of processes joined by `jax.distributed`, every process calls it with the
    same arguments: the units are split across the processes and process 0 writes the results
    (`sweep_processes`; docs/sweep.md)."""
    if not dry_run and jax.process_count() > 1:
        return sweep_processes(dataset, root, config, out=out, grid=grid, seeds=seeds, categories=categories,
                               mask_rule=mask_rule, remove_features=remove_features, log=log)
    p = sweep_lib.plan(dataset, root, config, grid=grid, seeds=seeds, categories=categories, mask_rule=mask_rule, out=out)
    if dry_run:
        for line in sweep_lib.describe_plan(p):
            log(line)
        return {"plan": p, "results": [], "ran": 0, "kept": sum(u["done"] is not None for u in p["units"]), "out": p["out"]}
    todo = [u for u in p["units"] if u["done"] is None]
    outdir = OutputDir.claim(p["out"], "sweep", keep=True)
    start = time.perf_counter()
    units = sweep_lib.compute(p, todo, sweep_lib.store_for(outdir), dataset=dataset, mask_rule=mask_rule)
    for finished, u in enumerate(units, 1):
        sweep_lib.record(outdir, p, [u])
        log(sweep_lib.progress_line(u, finished, len(todo), start))
    rows = sweep_lib.finish(outdir, p, remove_features=remove_features, log=log)
    return {"results": rows, "ran": len(todo), "kept": len(p["units"]) - len(todo), "out": p["out"]}


def _exchange(message: dict, failed: BaseException | None) -> list[dict]:
    """Every process's `message` (a collective); raises this process's own error, or `ProcessFailed`
    when another process reported one."""
    got = [json.loads(b) for b in multihost.exchange_bytes(json.dumps(message).encode())]
    if failed is not None:
        raise failed
    multihost.check_counts(np.array([-1 if "error" in g else 0 for g in got]), list(range(len(got))))
    return got


def sweep_processes(dataset: str, root: str, config, *, out: str, grid, seeds, categories, mask_rule: str,
                    remove_features: bool, log) -> dict:
    """`sweep` in every process of a cluster (see the module docstring). Returns its report; on
    processes other than 0, `results` holds the rows known there (every unit of this run, and those
    found done on this process's disk) and nothing is written."""
    me = jax.process_index()
    outdir = p = failed = None
    message: dict = {"error": True}
    try:
        p = sweep_lib.plan(dataset, root, config, grid=grid, seeds=seeds, categories=categories,
                           mask_rule=mask_rule, out=out)
        message = {"units": len(p["units"])}
        if me == 0:
            outdir = OutputDir.claim(p["out"], "sweep", keep=True)
            message["todo"] = [i for i, u in enumerate(p["units"]) if u["done"] is None]
    except BaseException as err:  # noqa: BLE001 -- told to the others first, then raised
        failed = err
    got = _exchange(message, failed)
    for q, g in enumerate(got):
        if g["units"] != got[0]["units"]:
            raise ValueError(f"process {q} sees {g['units']} units, process 0 sees {got[0]['units']}: every process "
                             "must see the same data set, categories and grid")
    todo = [p["units"][i] for i in got[0]["todo"]]
    for u in todo:
        u["done"] = None  # process 0 decides what is done
    index = {id(u): i for i, u in enumerate(p["units"])}
    mine = multihost.process_share(sweep_lib.work_order(todo))
    units = sweep_lib.compute(p, mine, sweep_lib.store_for(outdir, p["out"]), dataset=dataset, mask_rule=mask_rule)
    start, finished, pending = time.perf_counter(), 0, []
    while True:
        failed = None
        try:
            if pending:  # process 0 writes the last round's units (a failure here is told to the others too)
                finished = _record(outdir, p, pending, finished, len(todo), start, log)
                pending = []
            u = next(units, None)
            message = {"end": True} if u is None else {"unit": index[id(u)], "done": u["done"]}
        except BaseException as err:  # noqa: BLE001 -- told to the others first, then raised
            failed, message = err, {"error": True}
        got = _exchange(message, failed)
        for g in got:
            if "unit" in g:
                x = p["units"][g["unit"]]
                x["done"] = {**g["done"], "fingerprint": x["fingerprint"]}  # process 0's fingerprint names the file
                pending.append(x)
        if all("end" in g for g in got):
            break
    if outdir is not None:
        rows = sweep_lib.finish(outdir, p, remove_features=remove_features, log=log)
    else:
        rows = [sweep_lib.row(u) for u in p["units"] if u["done"] is not None]
    return {"results": rows, "ran": len(todo), "kept": len(p["units"]) - len(todo), "out": p["out"],
            "process": me, "computed_here": len(mine)}


def _record(outdir, p: dict, units: list, finished: int, total: int, start: float, log) -> int:
    """Process 0 writes a round's units (`sweep.record`) and logs them; returns the units finished."""
    if outdir is None:
        return finished
    sweep_lib.record(outdir, p, units)
    for u in units:
        finished += 1
        log(sweep_lib.progress_line(u, finished, total, start))
    return finished
