"""One rank of the 2-process (gloo, CPU) runs behind tests/test_sharded_head.py.

``python -m tests.sharded_head_worker RUN RANK WORLD STORE OUT`` joins a process group through the
file store STORE (no TCP port to pick), runs the scenarios of RUN and saves each scenario's result
as ``OUT/{scenario}_r{rank}.pt``. ``launch`` starts all ranks and kills every one of them if any
fails or the run times out. The synthetic problem (rows, batches) lives here so that the test's
single-process references use exactly the same data.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

U, D, DIMS, WEIGHTS, MARGIN, TAU = 40, 8, [4, 8], [1.0, 0.5], 0.2, 0.1
N, SPLIT = 8, [5, 3]          # global batch, uneven split over 2 ranks (exercises the padding)
LR, MOMENTUM = 0.5, 0.9
TRAIN_STEPS, SAVE_AT = 6, 3


def rows() -> np.ndarray:
    """Four planted clusters of ten prototypes (well separated, so KNN neighbourhoods are clusters)."""
    rng = np.random.default_rng(0)
    centres = np.eye(D, dtype=np.float32)[:4]
    return np.concatenate([c + 0.05 * rng.standard_normal((10, D)) for c in centres]).astype(np.float32)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(N, D, generator=g), torch.randint(0, U, (N,), generator=g)


def local(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if world == 1:
        return t
    start = sum(SPLIT[:rank])
    return t[start:start + SPLIT[rank]]


def head_kwargs(**kw) -> dict:
    return {"dims": DIMS, "weights": WEIGHTS, "margin": MARGIN, "temperature": TAU, **kw}


def train(head, rank: int, world: int, steps) -> list[float]:
    """A few steps of forward + backward + sparse update on the fixed batches; the losses."""
    losses = []
    for step in steps:
        h, y = batch(step)
        loss, _ = head(local(h, rank, world), local(y, rank, world))
        loss.backward()
        head.sparse_sgd_step(LR, MOMENTUM)
        losses.append(float(loss.detach()))
    return losses


def one_step(head, rank: int, world: int, step: int = 0) -> dict:
    """Forward + backward on batch ``step``: loss, dL/dh (local), the rows' gradients by global id."""
    h, y = batch(step)
    h = local(h, rank, world).clone().requires_grad_()
    loss, stats = head(h, local(y, rank, world))
    loss.backward()
    (ids, leaf), = head._pending
    # the scored set is the union of the ranks' row ids (head.select() would draw the random sampler again)
    return {"loss": float(loss), "h_grad": h.grad, "row_ids": ids * world + rank, "row_grad": leaf.grad,
            "stats": stats}


def run_a(rank: int, world: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from training.head import ShardedPrototypeHead as Head
    res = {}
    res["full"] = one_step(Head(rows(), **head_kwargs(knn_fraction=1.0)), rank, world)
    res["knn"] = one_step(Head(rows(), **head_kwargs(knn_fraction=0.2)), rank, world)
    res["random"] = one_step(Head(rows(), **head_kwargs(knn_fraction=0.2, sampler="random", seed=3)), rank, world)
    # DDP backbone: its averaged gradient must equal the single-process one on the global batch
    torch.manual_seed(0)
    backbone = torch.nn.Linear(6, D)
    ddp = DDP(backbone)
    x = torch.randn(N, 6, generator=torch.Generator().manual_seed(7))
    head = Head(rows(), **head_kwargs(knn_fraction=0.2))
    loss, _ = head(ddp(local(x, rank, world)), local(batch(0)[1], rank, world))
    loss.backward()
    res["ddp"] = {"loss": float(loss), "grad_w": backbone.weight.grad.clone(), "grad_b": backbone.bias.grad.clone()}
    res["graph"] = {"local": head.graph.clone(), "ids": head.local_ids(), "neighbours": head.neighbours(5)}
    # training with a sharded checkpoint in the middle (refresh every 2 steps: the graph moves too)
    head = Head(rows(), **head_kwargs(knn_fraction=0.2, refresh_steps=2))
    losses = train(head, rank, world, range(SAVE_AT))
    head.save_sharded(out / "ckpt_w2")
    saved_rows = head.rows.clone()
    losses += train(head, rank, world, range(SAVE_AT, TRAIN_STEPS))
    res["train"] = {"losses": losses, "rows_at_save": saved_rows, "ids": head.local_ids()}
    # bf16 rows vs fp32 (no refresh: a graph rebuilt from slightly different rows may pick another set)
    fp, bf = (Head(rows(), **head_kwargs(knn_fraction=0.2, refresh_steps=0, row_dtype=dt))
              for dt in (torch.float32, torch.bfloat16))
    res["train_bf16"] = {"losses": train(bf, rank, world, range(TRAIN_STEPS)), "rows": bf.rows.float(),
                         "losses_fp32": train(fp, rank, world, range(TRAIN_STEPS)), "rows_fp32": fp.rows}
    # bad input: every rank must raise the same ValueError (not hang in a collective)
    errors = []
    h, y = batch(0)
    y_bad = local(y, rank, world).clone()
    if rank == 1:
        y_bad[0] = U
    for args in [(local(h, rank, world), y_bad), (local(h, rank, world)[:, : 6 if rank == 1 else D], local(y, rank, world))]:
        try:
            head(*args)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    try:
        Head(rows()[:1], **head_kwargs(dims=[4], weights=[1.0]))
        errors.append(None)
    except ValueError as e:
        errors.append(str(e))
    res["errors"] = errors
    return res


def run_b(rank: int, world: int, out: Path, pre=None) -> dict:
    from training.head import ShardedPrototypeHead as Head
    res = {"shard": one_step(pre.shard(), rank, world)}   # built at world size 1 before the group existed
    for name in ("ckpt_w2", "ckpt_w1"):
        head = Head(rows() * 0 + 1, **head_kwargs(knn_fraction=0.2, refresh_steps=2), build_graph=False)
        head.load_sharded(out / name)
        res[name] = {"step": head.step, "rows": head.rows.clone(), "ids": head.local_ids(),
                     "losses": train(head, rank, world, range(SAVE_AT, TRAIN_STEPS))}
    return res


def main(run: str, rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from training.head import ShardedPrototypeHead as Head
    torch.set_num_threads(1)
    pre = Head(rows(), **head_kwargs(knn_fraction=0.2)) if run == "b" else None
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        res = run_a(rank, world, Path(out)) if run == "a" else run_b(rank, world, Path(out), pre)
        for name, value in res.items():
            torch.save(value, Path(out) / f"{name}_r{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(run: str, world: int, out: Path, timeout: float = 120.0) -> None:
    """Run ``run`` on ``world`` ranks; raise with the failing rank's stderr if any rank fails."""
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"store_{run}_{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharded_head_worker", run, str(r), str(world),
                               str(store), str(out)], cwd=root, env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:   # each rank is its own session: kill exactly the process groups we started
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        outputs = [p.communicate() for p in procs]
    bad = [(r, p.returncode, outputs[r][1]) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        r, code, err = bad[0]
        raise RuntimeError(f"{run}: rank {r} exited {code} (timeout {timeout}s or failure)\n{err[-4000:]}")


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
