"""Train a tiny byte-level language model whose attention is nsa_ops.NSAAttention, next to the same model with
dense causal attention, on CPU, and plot both loss curves.

Corpus: the Python standard library's own source files (``sysconfig.get_paths()['stdlib']``, every ``*.py`` file
in sorted path order, concatenated as bytes), present offline on every machine that runs Python. The last 5 % of
the bytes are held out for validation.

Model: byte embedding (256) -> ``--layers`` pre-norm blocks (RMSNorm, attention, RMSNorm, GELU MLP of width 4H)
-> RMSNorm -> output head tied to the embedding. The two models differ only in the attention:

* ``nsa``: ``nsa_ops.NSAAttention`` over the batch's sequences packed along T (cu_seqlens = multiples of the
  sequence length), with l = 32, d = 16, l' = 64, K = ``--topk``, w = ``--window``;
* ``dense``: q/k/v/o projections of the same shapes (hence the same parameter count for them) and
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` over each sequence.

Both start from the same seed, see the same batches in the same order and take the same number of AdamW steps.
The script prints the final training and validation losses (nats per byte) and the throughput (tokens/s) of both,
and writes the two curves to ``--plot`` (default docs/train_tiny_lm.png).

    python examples/train_tiny_lm.py                  # the documented run (a few minutes on 2 cores)
    python examples/train_tiny_lm.py --smoke          # a few steps at tiny sizes, no plot (the test suite runs it)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import nsa_ops

REPO = Path(__file__).resolve().parents[1]


# ---- data -------------------------------------------------------------------------------------------------------

def load_corpus(max_bytes: int) -> torch.Tensor:
    """The standard library's *.py files, concatenated, at most max_bytes: uint8 [N]. The tree is walked depth
    first with directory and file names sorted (a deterministic order), skipping site-packages / dist-packages
    (installed third-party code) and __pycache__, and the walk stops once max_bytes are read."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            chunks.append(data)
            total += len(data)
            if total >= max_bytes:
                break
        if total >= max_bytes:
            break
    corpus = b"".join(chunks)[:max_bytes]
    if len(corpus) < 100_000:
        raise RuntimeError(f"only {len(corpus)} bytes of Python sources found under {root}")
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)


def sample_batch(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] int64 windows at uniformly drawn offsets."""
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()


# ---- model ------------------------------------------------------------------------------------------------------

class DenseAttention(nn.Module):
    """Causal attention per sequence with the projections of NSAAttention (no gate, no compression weights)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:        # x: [B·S, H], equal lengths S
        T = x.shape[0]
        S = T // batch
        q = self.q_proj(x).view(batch, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, S, self.kv_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(o.transpose(1, 2).reshape(T, self.heads * self.head_dim))


class NSABlockAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, topk: int, window: int):
        super().__init__()
        self.attn = nsa_ops.NSAAttention(hidden, heads, kv_heads, head_dim, head_dim, compress_block_size=32,
                                         compress_stride=16, select_block_size=64, select_block_count=topk,
                                         window_size=window)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        T = x.shape[0]
        cu = torch.arange(batch + 1, dtype=torch.int64) * (T // batch)     # one packed sequence per sample
        return self.attn(x, cu)


class Block(nn.Module):
    def __init__(self, hidden: int, attention: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.attention = attention
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden, bias=False), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden, bias=False))

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), batch)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, kind: str, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, topk: int,
                 window: int):
        super().__init__()
        self.embed = nn.Embedding(256, hidden)
        nn.init.normal_(self.embed.weight, std=0.02)
        make = (lambda: DenseAttention(hidden, heads, kv_heads, head_dim)) if kind == "dense" else \
            (lambda: NSABlockAttention(hidden, heads, kv_heads, head_dim, topk, window))
        self.blocks = nn.ModuleList(Block(hidden, make()) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:             # tokens [B, S] -> logits [B·S, 256]
        batch = tokens.shape[0]
        x = self.embed(tokens.reshape(-1))
        for block in self.blocks:
            x = block(x, batch)
        return self.norm(x) @ self.embed.weight.T                          # tied head


def loss_of(model: TinyLM, window: torch.Tensor) -> torch.Tensor:
    logits = model(window[:, :-1])
    return F.cross_entropy(logits.float(), window[:, 1:].reshape(-1))


# ---- training ---------------------------------------------------------------------------------------------------

class Progress:
    """tqdm when it is installed, else a one-line text bar on stderr."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=True)
        except ImportError:
            self.bar = None
        self.total, self.desc, self.n, self.t0, self.postfix = total, desc, 0, time.perf_counter(), ""

    def update(self, postfix: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
            return
        width = 30
        filled = width * self.n // self.total
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.n * (self.total - self.n)
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} "
                         f"{elapsed:5.0f}s eta {eta:4.0f}s {postfix}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def train(kind: str, args: argparse.Namespace, train_data: torch.Tensor, val_batches: list[torch.Tensor]) -> dict:
    torch.manual_seed(args.seed)
    model = TinyLM(kind, args.hidden, args.layers, args.heads, args.kv_heads, args.head_dim, args.topk, args.window)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, args.steps)
                                                                                      / args.steps))))
    gen = torch.Generator().manual_seed(args.seed + 1)                    # the same batches for both models
    params = sum(p.numel() for p in model.parameters())
    history = {"step": [], "train": [], "val_step": [], "val": []}
    bar = Progress(args.steps, f"{kind:>5}")
    train_time = 0.0
    for step in range(1, args.steps + 1):
        batch = sample_batch(train_data, args.batch, args.seq, gen)
        t0 = time.perf_counter()
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_time += time.perf_counter() - t0
        history["step"].append(step)
        history["train"].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                val = sum(loss_of(model, b).item() for b in val_batches) / len(val_batches)
            history["val_step"].append(step)
            history["val"].append(val)
        bar.update(f"loss {loss.item():.3f}" + (f" val {history['val'][-1]:.3f}" if history["val"] else ""))
    bar.close()
    tail = history["train"][-max(1, args.steps // 20):]
    return {"kind": kind, "params": params, "history": history, "train_final": sum(tail) / len(tail),
            "val_final": history["val"][-1], "tokens_per_s": args.steps * args.batch * args.seq / train_time,
            "seconds": train_time}


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    colors = {"nsa": "tab:blue", "dense": "tab:orange"}
    for r in results:
        h, c = r["history"], colors[r["kind"]]
        k = max(1, args.steps // 50)                                      # moving average of the training loss
        smooth = [sum(h["train"][max(0, i - k + 1):i + 1]) / len(h["train"][max(0, i - k + 1):i + 1])
                  for i in range(len(h["train"]))]
        name = "NSAAttention" if r["kind"] == "nsa" else "dense causal (SDPA)"
        ax.plot(h["step"], smooth, color=c, lw=1.2, label=f"{name}: train (moving avg of {k})")
        ax.plot(h["val_step"], h["val"], color=c, lw=0, marker="o", ms=4, label=f"{name}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(f"tiny byte LM on the Python stdlib: {args.layers} layers, H={args.hidden}, seq {args.seq}, "
                 f"batch {args.batch}\nNSA l=32 d=16 l'=64 K={args.topk} w={args.window}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few steps at tiny sizes, no plot (for the test suite)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default 100; smoke 3)")
    p.add_argument("--seq", type=int, default=None, help="bytes per sequence (default 512; smoke 160)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; smoke 2)")
    p.add_argument("--hidden", type=int, default=None, help="model width H (default 128; smoke 32)")
    p.add_argument("--layers", type=int, default=None, help="blocks (default 2; smoke 1)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None, help="Dqk = Dv (default 32; smoke 16)")
    p.add_argument("--topk", type=int, default=4, help="NSA selected blocks K")
    p.add_argument("--window", type=int, default=64, help="NSA window w")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation losses (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--corpus-bytes", type=int, default=None, help="bytes of stdlib source read (default 8 MB)")
    p.add_argument("--plot", type=Path, default=None,
                   help="loss-curve PNG (default docs/train_tiny_lm.png; smoke: none unless given)")
    args = p.parse_args(argv)
    full = dict(steps=100, seq=512, batch=8, hidden=128, layers=2, head_dim=32, eval_every=20,
                corpus_bytes=8_000_000)
    smoke = dict(steps=3, seq=160, batch=2, hidden=32, layers=1, head_dim=16, eval_every=3, corpus_bytes=400_000)
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.plot is None and not args.smoke:
        args.plot = REPO / "docs" / "train_tiny_lm.png"
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    data = load_corpus(args.corpus_bytes)
    split = int(data.numel() * 0.95)
    train_data, val_data = data[:split], data[split:]
    vgen = torch.Generator().manual_seed(12345)
    val_batches = [sample_batch(val_data, args.batch, args.seq, vgen) for _ in range(2 if args.smoke else 4)]
    print(f"corpus: {data.numel():,} bytes of Python stdlib sources ({split:,} train); {args.steps} steps of "
          f"{args.batch} x {args.seq} bytes; {torch.get_num_threads()} threads")

    results = [train(kind, args, train_data, val_batches) for kind in ("nsa", "dense")]
    for r in results:
        print(f"{r['kind']:>5}: {r['params']:,} parameters, final train loss {r['train_final']:.4f}, "
              f"validation loss {r['val_final']:.4f} nats/byte, {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['seconds']:.1f} s training)")
    if args.plot is not None:
        plot(results, args, args.plot)
        print(f"plot: {args.plot}")
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    for r in results:
        if not all(math.isfinite(x) for x in r["history"]["train"]):
            print(f"error: non-finite training loss for {r['kind']}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
