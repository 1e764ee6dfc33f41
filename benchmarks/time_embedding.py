"""How large is the time part of sCM's JVP? The sCM paper (Lu & Song 2025, sec. 4) warns that
high-frequency time embeddings make `dF/dt` large and training unstable. A diffusers student keeps
its teacher's time input (timesteps 0..999 into a positional embedding), so measure it.

The JVP of sCT/sCD (docs/math.md#the-jvp-rearrangement) is `dF = F_x . x_dot + F_t . t_dot` with `x_dot = cos t sin t dx_t/dt / sigma_d`
and `t_dot = cos t sin t sigma_d`. For each model this prints, per band of t, the RMS of the time
part `F_t . t_dot`, of the x part, and their ratio, on digits noised to t with the teacher's own
velocity as dx_t/dt:

    python benchmarks/time_embedding.py runs/ddpm-digits runs/flow-teacher [--num 256]
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def jvp_parts(model, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample RMS of the time part and the x part of the sCM JVP at (x_t, t)."""
    from fewstep.jvp.engine import tangent_forward
    from fewstep.core.trigflow import net_velocity

    net, sd = model.net, model.sigma_d
    z = sd * torch.randn_like(x0)
    c, s = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    x_t = c * x0 + s * z
    dxdt = net_velocity(net, x_t, t, sd)  # the teacher's own PF-ODE direction (sCD)
    cs = (torch.cos(t) * torch.sin(t))
    x_dot, t_dot = cs.view(-1, 1, 1, 1) * dxdt / sd, cs * sd
    with torch.enable_grad():
        _, time_part = tangent_forward(net, (x_t / sd, t), (torch.zeros_like(x_t), t_dot))
        _, x_part = tangent_forward(net, (x_t / sd, t), (x_dot, torch.zeros_like(t)))
    rms = lambda v: v.flatten(1).square().mean(1).sqrt()  # noqa: E731
    return rms(time_part), rms(x_part)


def main() -> None:
    from fewstep.data import load_dataset
    from fewstep.apps.generate import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--num", type=int, default=256, help="points per band")
    p.add_argument("--out", default=None, help="write the table as JSON")
    args = p.parse_args()
    torch.manual_seed(0)
    x_all, _ = load_dataset("digits").all()
    bands = [(0.02, 0.3), (0.3, 0.7), (0.7, 1.1), (1.1, 1.4), (1.4, 1.55)]
    result = {}
    for spec in args.models:
        model = load_model(spec)
        rows = []
        for lo, hi in bands:
            x0 = x_all[torch.randint(len(x_all), (args.num,))]
            t = lo + (hi - lo) * torch.rand(args.num)
            tp, xp = jvp_parts(model, x0, t)
            rows.append({"t": [lo, hi], "time_part": float(tp.mean()), "x_part": float(xp.mean()),
                         "ratio": float((tp / xp).mean()), "ratio_max": float((tp / xp).max())})
        result[spec] = rows
        print(f"\n{spec} ({type(model.net).__name__}, {model.method_name})")
        print("t band        time part   x part   time/x (mean, max)")
        for r in rows:
            print(f"[{r['t'][0]:.2f}, {r['t'][1]:.2f}]  {r['time_part']:9.4f} {r['x_part']:8.4f}   "
                  f"{r['ratio']:.3f}, {r['ratio_max']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
