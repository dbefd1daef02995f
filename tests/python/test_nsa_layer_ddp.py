"""Data-parallel training with nsa_ops.NSAAttention: two processes under DistributedDataParallel (torch.distributed,
gloo, localhost) take the same SGD steps as one process over the same global batch.

Model (fp32): byte embedding [256, H] -> NSAAttention over the packed sequences (docs/spec/nsa_layer.md) ->
residual -> RMSNorm -> linear head [256, H]. Data: every step draws 6 sequences of random lengths (some shorter
than the compression block l, some longer than the selection block l') and random bytes from a seeded generator,
the same in every process. Rank r trains on its own sequences (rank 0 the first three, rank 1 the last three),
packed along T with its own cu_seqlens; the single process trains on all six. Loss: next-byte cross-entropy summed
over the tokens of the global batch and divided by their number N; a rank's loss is its own sum times world / N, so
that DDP's gradient average (sum over ranks / world) is the gradient of the global loss.

The ranks are separate Python processes (this file run as a script, one thread each; the single-process run takes
place in the test's process meanwhile): a rank that fails makes the test fail at once with its error output, the
others are killed, and every wait has a timeout.

Tolerance (per parameter element, after S steps of SGD with learning rate lr, without momentum):

    |p_ddp - p_one| <= 4 ulp(|p_one|) + lr * sum_steps n * eps32 * max|g_step|

with eps32 = 2^-24 (the unit roundoff of fp32), n = the tokens of the global batch at that step and max|g_step| the
largest gradient element of that parameter tensor in the single-process run. Why: every forward quantity of a
sequence is computed from the same parameters and the same tokens in both runs (the NSA operators give a sequence
the same bits alone or inside a batch, §9; torch's projections may round a row differently with the number of
rows, at the scale of eps32), so the runs differ essentially in how the gradients are summed: the single process
sums a parameter gradient over all n tokens in one reduction, DDP sums each rank's tokens and then adds the
two partial sums; two orders of the same n-term fp32 sum differ by at most about n * eps32 * (sum of |terms|), here
taken at the gradient's scale (n * eps32 * max|g|). The update p - lr * g then carries that difference times lr,
plus its own roundings (the 4 ulp term), and S steps add up. With about 500 tokens a step the accumulation term is
about 3e-5 of lr times the gradient's scale; the differences observed are at most a fifth of the bound (a few fp32
ulps of the parameters, several parameters bit-equal); the steps move every parameter tensor by more than 100 times
the bound (checked), and a run that trains on the wrong part of the batch violates it (checked).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 3
LR = 0.5
SEQS_PER_RANK = 3
HIDDEN = 32
WORKER_TIMEOUT_S = 120.0            # whole run; a test run takes about 10 s on 2 busy cores
EPS32 = 2.0 ** -24


# ------------------------------------------------------------------------------------------------ model and data
def build_model():
    import nsa_ops
    from torch import nn

    class TinyNSA(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(256, HIDDEN)
            self.attn = nsa_ops.NSAAttention(HIDDEN, 4, 2, 16, 16, compress_block_size=32, compress_stride=16,
                                             select_block_size=64, select_block_count=2, window_size=48)
            self.norm = nn.RMSNorm(HIDDEN)
            self.head = nn.Linear(HIDDEN, 256, bias=False)

        def forward(self, tokens: torch.Tensor, cu: list) -> torch.Tensor:    # tokens [T] -> logits [T, 256]
            x = self.embed(tokens)
            x = x + self.attn(x, cu)
            return self.head(self.norm(x))

    torch.manual_seed(1234)
    return TinyNSA()


def step_batch(step: int) -> list:
    """The global batch of one step: WORLD * SEQS_PER_RANK byte sequences (int64 [L + 1]: L inputs, L targets)."""
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(8, 160, (WORLD * SEQS_PER_RANK,), generator=g).tolist()
    lengths[step % len(lengths)] = 20               # one sequence shorter than l = 32 (no compressed token)
    return [torch.randint(0, 256, (L + 1,), generator=g) for L in lengths]


def local_loss(model, seqs: list, scale: float) -> torch.Tensor:
    """scale * (sum of next-byte cross-entropies over the tokens of seqs), the sequences packed along T."""
    tokens = torch.cat([s[:-1] for s in seqs])
    targets = torch.cat([s[1:] for s in seqs])
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + s.numel() - 1)
    logits = model(tokens, cu)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") * scale


# ------------------------------------------------------------------------------------------------ workers
def train_single() -> dict:
    """The single-process run over the whole global batch, and a control run over rank 0's part alone as DDP
    without the gradient all-reduce would train rank 0. Returns the final parameters, the losses, the largest
    gradient element of every parameter at every step (with that step's token count) and the control's
    parameters."""
    model, control = build_model(), build_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt_c = torch.optim.SGD(control.parameters(), lr=LR)
    result = {"losses": [], "grad_max": {}}
    for step in range(STEPS):
        seqs = step_batch(step)
        n = sum(s.numel() - 1 for s in seqs)
        loss = local_loss(model, seqs, 1.0 / n)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            result["grad_max"].setdefault(name, []).append((float(p.grad.abs().max()), n))
        opt.step()
        result["losses"].append(float(loss.detach()))
        loss_c = local_loss(control, seqs[:SEQS_PER_RANK], WORLD / n)
        opt_c.zero_grad()
        loss_c.backward()
        opt_c.step()
    result["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result["control"] = {k: v.detach().clone() for k, v in control.state_dict().items()}
    return result


def worker(rank: int, world: int, port: int, out: Path, fail_rank: int) -> None:
    """One DDP rank (one thread): trains its part of every step's batch; writes the final parameters and the
    per-step global losses to out (torch.save). Rank fail_rank raises right after joining the group."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    model = build_model()
    result = {"losses": []}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if rank == fail_rank:
            raise RuntimeError(f"injected failure in rank {rank}")
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        for step in range(STEPS):
            seqs = step_batch(step)
            n = sum(s.numel() - 1 for s in seqs)
            mine = seqs[rank * SEQS_PER_RANK:(rank + 1) * SEQS_PER_RANK]
            loss = local_loss(ddp, mine, world / n)           # DDP divides the summed gradients by world
            opt.zero_grad()
            loss.backward()
            opt.step()
            total = loss.detach() / world
            dist.all_reduce(total)
            result["losses"].append(float(total))
        # every rank done with the group before any tears it down: a rank closing its connections while the other
        # still reads from them can abort the other in gloo's threads ("terminate called without an active
        # exception", seen once under a fully loaded machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    result["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(result, out)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path: Path, fail_rank: int = -1, timeout: float = WORKER_TIMEOUT_S,
                while_running=None) -> tuple:
    """Starts the WORLD DDP ranks as processes, calls while_running() (the single-process run, meanwhile, in this
    process), then waits for the ranks; fails the test with a rank's output as soon as one exits with an error or
    the timeout passes (the others are killed). Returns (while_running's result, [rank 0's result, ...])."""
    port = free_port()
    env = dict(os.environ, NSA_NUM_THREADS="1", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    procs = []
    for rank in range(WORLD):
        out = tmp_path / f"rank{rank}.pt"
        log = open(tmp_path / f"rank{rank}.log", "w+")
        cmd = [sys.executable, __file__, "--worker", str(rank), str(WORLD), str(port), str(out), str(fail_rank)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, log, rank))
    deadline = time.monotonic() + timeout
    try:
        local = while_running() if while_running is not None else None
        while True:
            codes = [p.poll() for p, *_ in procs]
            failed = [(p, log, r) for (p, _, log, r), c in zip(procs, codes) if c not in (None, 0)]
            if failed:
                p, log, r = failed[0]
                log.seek(0)
                pytest.fail(f"rank {r} exited with {p.returncode}:\n{log.read()[-3000:]}")
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {timeout:.0f} s (exit codes so far: {codes})")
            time.sleep(0.05)
    finally:
        for p, _, log, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    return local, [torch.load(out) for _, out, _, _ in procs]


# ------------------------------------------------------------------------------------------------ tests
def bound(name: str, p_one: torch.Tensor, grad_max: list) -> torch.Tensor:
    """The tolerance of the module docstring for parameter `name`, per element."""
    ulp = torch.finfo(torch.float32).eps * p_one.abs()            # eps * |p| = ulp(|p|) up to a factor 2
    accumulation = sum(LR * n * EPS32 * gmax for gmax, n in grad_max)
    return 4 * ulp + accumulation


def test_ddp_two_ranks_equal_one_process(tmp_path):
    t0 = time.monotonic()
    single, ranks = run_workers(tmp_path, while_running=train_single)
    initial = build_model().state_dict()
    for r, res in enumerate(ranks):
        assert len(res["losses"]) == STEPS
        for step, (a, b) in enumerate(zip(res["losses"], single["losses"])):
            assert abs(a - b) <= 1e-5 * abs(b), f"rank {r} step {step}: global loss {a} vs one process {b}"
        for name, p_one in single["params"].items():
            p = res["params"][name]
            tol = bound(name, p_one, single["grad_max"][name])
            diff = (p - p_one).abs()
            assert bool((diff <= tol).all()), (
                f"rank {r} {name}: max |ddp - one| {float(diff.max()):.3g} (bound there "
                f"{float(tol.flatten()[diff.argmax()]):.3g}) at element {int(diff.argmax())}")
            # the ranks hold the same parameters bit for bit (DDP applies the same averaged gradient everywhere)
            assert torch.equal(p, ranks[0]["params"][name]), f"{name} differs between rank 0 and rank {r}"
    for name, p_one in single["params"].items():
        tol = bound(name, p_one, single["grad_max"][name])
        moved = (p_one - initial[name]).abs()
        # the steps move every parameter tensor far beyond the tolerance: the comparison can fail
        assert float(moved.max()) > 100 * float(tol.max()), f"{name} barely moved: {float(moved.max()):.3g}"
        # a run over rank 0's part alone (wrong data split) is outside the tolerance
        wrong = (single["control"][name] - p_one).abs()
        assert bool((wrong > tol).any()), f"{name}: training on half the batch stays within the bound"
    assert time.monotonic() - t0 < WORKER_TIMEOUT_S


def test_ddp_worker_failure_fails_fast(tmp_path):
    """A rank that raises makes the harness fail with that rank's error, without waiting for the timeout (the other
    rank would block in its first all-reduce)."""
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="injected failure in rank 1"):
        run_workers(tmp_path, fail_rank=1, timeout=60.0)
    assert time.monotonic() - t0 < 45.0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="a worker of test_nsa_layer_ddp.py")
    ap.add_argument("--worker", nargs=5, metavar=("RANK", "WORLD", "PORT", "OUT", "FAIL_RANK"), required=True)
    a = ap.parse_args()
    rank, world, port, out, fail_rank = a.worker
    worker(int(rank), int(world), int(port), Path(out), int(fail_rank))
    # The rank's results are saved and its group destroyed: leave without the interpreter's teardown, where torch's
    # gloo threads have aborted a rank ("terminate called without an active exception") after every collective had
    # completed and its output was written (twice, under a fully loaded machine). A rank that raises still exits
    # with its error above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
