"""What a rule saves over the fallback (forward-mode AD of the single op), on user networks with
ops fewstep's own networks do not use: `--net decoder`, a decoder stage of a user UNet
(transposed-convolution upsampling, mish, softplus, leaky_relu, elu, log1p), or `--net block`,
SD3/Flux-style transformer blocks (RMSNorm, F.normalize on q and k, attention scores by baddbmm with
a key mask by masked_fill, a GLU feed-forward).

    python benchmarks/tangent_rules_cost.py [--net decoder --batch 16 --channels 32 --size 16 --repeats 15]

Times one eager tangent pass (`tangent_forward`: the forward with autograd plus the tangent) and
its backward, with the built-in rules, then with the rules of those ops removed (they then fall
back), beside a plain forward + backward,
and the replays of the traced joint graphs (`mode="traced"`) traced with and without those rules;
all interleaved round by round, 1 thread; CPU time of the process (steadier than wall-clock
on a shared machine), median and best of the rounds.
"""

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.jvp import engine
from fewstep.jvp.engine import tangent_forward
from fewstep.jvp.traced import TracedJVP, repeated_calls

ap = argparse.ArgumentParser()
ap.add_argument("--net", choices=("decoder", "block"), default="decoder")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--channels", type=int, default=32)
ap.add_argument("--size", type=int, default=16, help="image side (decoder); tokens are size^2 / 4 (block)")
ap.add_argument("--repeats", type=int, default=15)
args = ap.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
c = args.channels


class Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, t):
        h = F.mish(self.up(x)) * torch.log1p(t)[:, None, None, None]
        return F.softplus(self.conv(F.leaky_relu(h, 0.1))) + F.elu(h)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Up() for _ in range(3))

    def forward(self, x, t):
        for i, b in enumerate(self.blocks):
            x = b(x, t)
            if i < len(self.blocks) - 1:
                x = F.avg_pool2d(x, 2)
        return x


class Block(nn.Module):
    """One head of width c over tokens; a key mask hides the last quarter of the tokens."""

    def __init__(self, tokens: int):
        super().__init__()
        self.norm1, self.norm2, self.mod = nn.RMSNorm(c), nn.RMSNorm(c), nn.Linear(1, 2 * c)
        self.qkv, self.proj, self.ff1, self.ff2 = nn.Linear(c, 3 * c), nn.Linear(c, c), nn.Linear(c, 8 * c), \
            nn.Linear(4 * c, c)
        self.bias = nn.Parameter(0.02 * torch.randn(tokens, tokens))
        self.register_buffer("keep", torch.arange(tokens) < tokens - tokens // 4)

    def forward(self, h, t):
        s, g = self.mod(t[:, None])[:, None].chunk(2, -1)
        q, k, v = self.qkv(self.norm1(h) * (1 + s)).chunk(3, -1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        scores = torch.baddbmm(self.bias, q, k.mT, alpha=4.0).masked_fill(~self.keep, float("-inf"))
        h = h + g * self.proj(scores.softmax(-1) @ v)
        return h + self.ff2(F.glu(self.ff1(self.norm2(h))))


class Blocks(nn.Module):
    def __init__(self, tokens: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(tokens) for _ in range(3))

    def forward(self, x, t):
        for b in self.blocks:
            x = b(x, t)
        return x


if args.net == "decoder":
    model = Decoder()
    x = torch.randn(args.batch, c, args.size, args.size)
    ops = (F.conv_transpose2d, F.mish, F.softplus, F.leaky_relu, F.elu, torch.log1p)
else:
    model = Blocks(args.size ** 2 // 4)
    x = torch.randn(args.batch, args.size ** 2 // 4, c)
    ops = (F.rms_norm, torch.rms_norm, F.normalize, torch.baddbmm, torch.Tensor.masked_fill, F.glu)
t = torch.rand(args.batch)
tx, tt = torch.randn_like(x), torch.randn_like(t)
replays = {}
removed = {f: engine.RULES[f] for f in ops}


def step():
    out, tout = tangent_forward(model, (x, t), (tx, tt))
    out.sum().backward()
    return tout


def plain():
    model(x, t).sum().backward()


def use_rules(on: bool) -> None:
    if on:
        engine.RULES.update(removed)
    else:
        for f in removed:
            engine.RULES.pop(f, None)
    engine._DISPATCH.clear()  # the per-op dispatch cache holds the rules it looked up


def traced(with_rules: bool):
    """The replay of a joint graph traced with or without the rules (a graph of its own each)."""
    use_rules(with_rules)
    runner = TracedJVP(model)
    with repeated_calls():
        run = runner.prepare((x, t), (tx, tt), {})
    use_rules(True)
    nodes = len(runner.graphs[next(iter(runner.graphs))][0].graph.nodes)

    def call():
        out, tout = run()
        out.sum().backward()
    return call, nodes


def timed(mode: str) -> float:
    if mode in ("rules", "fallback"):
        use_rules(mode == "rules")
    start = time.process_time()
    {"plain": plain, "rules": step, "fallback": step}.get(mode, lambda: replays[mode]())()
    return time.process_time() - start


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    (replays["traced rules"], n_rules), (replays["traced fallback"], n_fallback) = traced(True), traced(False)
    rounds = {"plain": [], "rules": [], "fallback": [], "traced rules": [], "traced fallback": []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for mode in rounds:
            rounds[mode].append(timed(mode))
    use_rules(True)
print(f"{args.net}: batch {args.batch}, {c} channels, {args.size}x{args.size}, 1 thread, CPU ms over {args.repeats} rounds")
for name, how in (("median", statistics.median), ("best", min)):
    v = {m: how(r[1:]) for m, r in rounds.items()}
    print(f"{name}: plain forward + backward {1e3 * v['plain']:.1f}; tangent pass + backward with the rules "
          f"{1e3 * v['rules']:.1f} ({v['rules'] / v['plain']:.2f}x), with those ops falling back "
          f"{1e3 * v['fallback']:.1f} ({v['fallback'] / v['plain']:.2f}x); traced with the rules "
          f"{1e3 * v['traced rules']:.1f} ({v['traced rules'] / v['plain']:.2f}x), traced with the fallback "
          f"{1e3 * v['traced fallback']:.1f} ({v['traced fallback'] / v['plain']:.2f}x)")
print(f"joint graph nodes: {n_rules} with the rules, {n_fallback} with the fallback")
