"""Generate text with the tiny byte-level NSA language model of examples/train_tiny_lm.py through the decode path
(``NSAAttention.prefill`` / ``decode_step`` over paged caches), and print the decode throughput.

The model (embedding -> pre-norm blocks with ``nsa_ops.NSAAttention`` -> tied head) is the ``nsa`` model of
train_tiny_lm.py. Its weights come from ``--checkpoint`` (a ``state_dict`` saved with ``torch.save``, e.g. by
``--save`` here) or, by default, from ``--train-steps`` AdamW steps of train_tiny_lm.py's own training loop on the
Python stdlib corpus. Generation: a batch of ``--batch`` prompts taken from the validation bytes, one prefill of
all of them, then one ``decode_step`` per new byte (all sequences together), sampling with ``--temperature`` (0:
greedy). Each layer has its own ``NSACache``.

``--check`` (on in ``--smoke``) runs the training forward on every prompt + generated sequence (followed by
l + d = 48 bytes, so that no generated position is among a training sequence's last tokens, nsa_layer.md
"Generation") and prints the largest difference of the logits against those the decode path produced.

    python examples/generate.py                        # train 100 steps (minutes), generate 200 bytes x 4
    python examples/generate.py --checkpoint m.pt --layers 2 --hidden 128 --head-dim 32
    python examples/generate.py --smoke                # seconds: tiny sizes (2 layers), 3 training steps, the check on
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _train_module():
    """examples/train_tiny_lm.py as a module (its model, corpus and training loop)."""
    spec = importlib.util.spec_from_file_location("train_tiny_lm", HERE / "train_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_tiny_lm", module)
    spec.loader.exec_module(module)
    return module


def _layers(model):
    return [block.attention.attn for block in model.blocks]


@torch.no_grad()
def prefill(model, prompts: torch.Tensor, caches) -> torch.Tensor:
    """prompts [B, S0] bytes -> logits [B, 256] of each prompt's last position; fills one cache per layer."""
    B, S0 = prompts.shape
    cu = [i * S0 for i in range(B + 1)]
    x = model.embed(prompts.reshape(-1))
    for block, cache in zip(model.blocks, caches):
        x = x + block.attention.attn.prefill(block.norm1(x), cu, cache)
        x = x + block.mlp(block.norm2(x))
    logits = model.norm(x) @ model.embed.weight.T
    return logits.view(B, S0, -1)[:, -1]


@torch.no_grad()
def decode_step(model, tokens: torch.Tensor, caches) -> torch.Tensor:
    """tokens [B] (one new byte per sequence) -> logits [B, 256] at their positions."""
    x = model.embed(tokens)
    for block, cache in zip(model.blocks, caches):
        x = x + block.attention.attn.decode_step(block.norm1(x), cache)
        x = x + block.mlp(block.norm2(x))
    return model.norm(x) @ model.embed.weight.T


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def generate(model, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int, page_size: int):
    """(generated [B, new_tokens], decode logits [B, new_tokens, 256], prefill seconds, decode seconds)."""
    B = prompts.shape[0]
    caches = [layer.new_cache(B, page_size=page_size) for layer in _layers(model)]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    logits = prefill(model, prompts, caches)
    t1 = time.perf_counter()
    out, all_logits = [], [logits]
    for i in range(new_tokens):
        tok = sample(logits, temperature, gen)
        out.append(tok)
        if i + 1 < new_tokens:
            logits = decode_step(model, tok, caches)
            all_logits.append(logits)
    t2 = time.perf_counter()
    return torch.stack(out, 1), torch.stack(all_logits, 1), t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds: tiny sizes, 3 training steps, --check on")
    p.add_argument("--checkpoint", type=Path, default=None, help="state_dict of the nsa TinyLM (skips training)")
    p.add_argument("--save", type=Path, default=None, help="save the trained state_dict here")
    p.add_argument("--train-steps", type=int, default=None, help="training steps when no checkpoint (100; smoke 3)")
    p.add_argument("--hidden", type=int, default=None, help="model width H (128; smoke 32)")
    p.add_argument("--layers", type=int, default=None, help="blocks (default 2, also in --smoke)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None, help="Dqk = Dv (32; smoke 16)")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--seq", type=int, default=None, help="training bytes per sequence (512; smoke 160)")
    p.add_argument("--batch", type=int, default=None, help="sequences trained per step and generated (4; smoke 2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt bytes (100; smoke 40)")
    p.add_argument("--new-tokens", type=int, default=None, help="bytes generated per sequence (200; smoke 40)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="compare the decode logits with the training forward")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 is often fastest "
                                                              "for decode steps of a few tokens)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    full = dict(train_steps=100, hidden=128, layers=2, head_dim=32, seq=512, batch=4, prompt_len=100,
                new_tokens=200)
    smoke = dict(train_steps=3, hidden=32, layers=2, head_dim=16, seq=160, batch=2, prompt_len=40, new_tokens=40)
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check = args.check or args.smoke

    tl = _train_module()
    data = tl.load_corpus(400_000 if args.smoke else 8_000_000)
    split = int(data.numel() * 0.95)
    if args.checkpoint is not None:
        torch.manual_seed(args.seed)
        model = tl.TinyLM("nsa", args.hidden, args.layers, args.heads, args.kv_heads, args.head_dim, args.topk,
                          args.window)
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
        print(f"model: {args.checkpoint}")
    else:
        targs = argparse.Namespace(seed=args.seed, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                   kv_heads=args.kv_heads, head_dim=args.head_dim, topk=args.topk,
                                   window=args.window, lr=args.lr, steps=args.train_steps, batch=args.batch,
                                   seq=args.seq, eval_every=args.train_steps)
        torch.manual_seed(args.seed)
        model = tl.TinyLM("nsa", args.hidden, args.layers, args.heads, args.kv_heads, args.head_dim, args.topk,
                          args.window)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(args.seed + 1)
        t0 = time.perf_counter()
        for _ in range(targs.steps):
            loss = tl.loss_of(model, tl.sample_batch(data[:split], args.batch, args.seq, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        print(f"model: trained {targs.steps} steps here ({time.perf_counter() - t0:.1f} s), last loss "
              f"{loss.item():.3f} nats/byte")
        if args.save is not None:
            torch.save(model.state_dict(), args.save)
            print(f"saved: {args.save}")
    model.eval()

    pgen = torch.Generator().manual_seed(args.seed + 2)
    prompts = tl.sample_batch(data[split:], args.batch, args.prompt_len, pgen)[:, :args.prompt_len]
    out, logits, t_prefill, t_decode = generate(model, prompts, args.new_tokens, args.temperature, args.seed,
                                                args.page_size)
    B, n = out.shape
    for b in range(B):
        text = bytes(prompts[b].tolist()).decode("utf-8", "replace")
        more = bytes(out[b].tolist()).decode("utf-8", "replace")
        print(f"--- sequence {b}: prompt | generated\n{text}|{more}")
    steps = max(n - 1, 1)
    print(f"prefill: {B} x {args.prompt_len} bytes in {t_prefill * 1e3:.1f} ms; decode: {steps} steps of {B} "
          f"sequences in {t_decode:.2f} s = {B * steps / max(t_decode, 1e-9):,.0f} tokens/s "
          f"({t_decode / steps * 1e3:.2f} ms per step, {torch.get_num_threads()} threads)")
    if check:
        l, d = 32, 16
        pad = torch.zeros(B, l + d, dtype=prompts.dtype)
        whole = torch.cat([prompts, out, pad], 1)
        with torch.no_grad():
            ref = model(whole).view(B, whole.shape[1], -1)[:, args.prompt_len - 1:args.prompt_len - 1 + n]
        diff = (ref.double() - logits.double()).abs().max().item()
        scale = ref.abs().max().item()
        print(f"check: max |decode - forward| logits = {diff:.3g} (logits up to {scale:.3g})")
        if not diff <= 1e-4 * max(1.0, scale):
            print("error: the decode path disagrees with the training forward", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
