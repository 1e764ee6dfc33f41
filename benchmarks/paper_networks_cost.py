"""Cost of a paper network on this machine: CIFAR-10 DDPM++ (`precond="trigflow"`), batch 4, one thread:
the forward without autograd against the forward with autograd plus its tangent (eager engine).

    python benchmarks/paper_networks_cost.py
"""
import time, torch, warnings
warnings.simplefilter("ignore")
from fewstep.networks import network_class
from fewstep.jvp import jvp
torch.manual_seed(0)
torch.set_num_threads(1)
net = network_class("ddpmpp")(img_channels=3, img_resolution=32, precond="trigflow", dropout=0.0)
x, t = torch.randn(4, 3, 32, 32), torch.rand(4) * 1.5
def timeit(f, n=3):
    f(); ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return min(ts) * 1000
with torch.no_grad():
    fwd = timeit(lambda: net(x, t))
tan = timeit(lambda: jvp(net, (x, t), (torch.randn_like(x), torch.ones_like(t)), mode="tangent"))
print(f"forward {fwd:.0f} ms, tangent-engine JVP (forward + tangent, with autograd) {tan:.0f} ms, ratio {tan/fwd:.2f}")
