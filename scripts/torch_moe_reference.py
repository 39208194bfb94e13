"""PyTorch MoE layer references on one GPU: what a user would otherwise run.

Usage (on a GPU node with PyTorch): python3 torch_moe_reference.py T d d_ff E k [swiglu]
Run it in the same job as moka-bench on the same shapes, so both see the same card and clocks.

MoKA's copy of the project's reference (GPU nodes do not see the shared
folder; scripts/gpu-vs-torch.sh runs it beside moka-bench). Two additions:
a sixth argument `swiglu` makes the experts SwiGLU (W1 of d x 2 d_ff, the
first half through SiLU times the second half: the shapes of MoKA's
expert.activation = swiglu), with the FLOPs counted to match; and each
layer's line says how many MiB of gradients were already allocated when its
peak was measured (they are not in its "peak extra memory").

Layer: top-k softmax gate, E experts, FFN d -> d_ff -> d with GeLU, bf16, fwd+bwd.
Variants: (a) loop over experts (FastMoE-like), (b) torch._grouped_mm, (c) dense GEMM
rate for the same FLOPs (the ceiling). Prints ms and TFLOP/s (expert GEMM FLOPs only).
"""
import sys, torch, torch.nn.functional as F
torch.manual_seed(0)
dev = 'cuda'
T, d, dff, E, k = (int(v) for v in (sys.argv[1:6] if len(sys.argv) > 5 else (16384, 2048, 8192, 8, 2)))
swiglu = len(sys.argv) > 6 and sys.argv[6] == 'swiglu'
dff_in = 2 * dff if swiglu else dff
def act(a):
    if not swiglu: return F.gelu(a)
    g, u = a.split(dff, dim=-1)
    return F.silu(g) * u
dt = torch.bfloat16

def bench(fn, iters=20, warm=5):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e))
    times.sort(); return times[len(times)//2]

x0 = torch.randn(T, d, device=dev, dtype=dt)
Wg = (torch.randn(d, E, device=dev, dtype=torch.float32) * d**-0.5).requires_grad_()
W1 = (torch.randn(E, d, dff_in, device=dev, dtype=dt) * d**-0.5).requires_grad_()
W2 = (torch.randn(E, dff, d, device=dev, dtype=dt) * dff**-0.5).requires_grad_()

def route(x):
    logits = x.float() @ Wg
    p = logits.softmax(-1)
    s, idx = p.topk(k, dim=-1)
    s = s / s.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    tok = order // k
    return s, order, counts, tok

def loop_layer():
    x = x0.detach().requires_grad_()
    s, order, counts, tok = route(x)
    xs = x[tok]
    outs = []; off = 0
    for e, c in enumerate(counts.tolist()):
        h = act(xs[off:off+c] @ W1[e]); outs.append(h @ W2[e]); off += c
    ys = torch.cat(outs)
    y = torch.zeros(T * k, d, device=dev, dtype=dt); y[order] = ys
    y = (y.view(T, k, d) * s.unsqueeze(-1).to(dt)).sum(1)
    y.backward(torch.ones_like(y))

def grouped_layer():
    x = x0.detach().requires_grad_()
    s, order, counts, tok = route(x)
    xs = x[tok]
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = act(torch._grouped_mm(xs, W1, offs=offs))
    ys = torch._grouped_mm(h, W2, offs=offs)
    y = torch.zeros(T * k, d, device=dev, dtype=dt); y[order] = ys
    y = (y.view(T, k, d) * s.unsqueeze(-1).to(dt)).sum(1)
    y.backward(torch.ones_like(y))

flops = 3 * 2 * (T * k) * (d * dff_in + dff * d)  # fwd + 2x bwd, two GEMMs per expert
A = torch.randn(T * k, d, device=dev, dtype=dt); B = torch.randn(d, dff, device=dev, dtype=dt)  # the rate of one GEMM shape
def dense():
    (A @ B)
dense_ms = bench(dense); dense_tf = 2 * T * k * d * dff / dense_ms / 1e9
print(f'config T={T} d={d} dff={dff} E={E} k={k} {"swiglu" if swiglu else "gelu"} bf16; GPU {torch.cuda.get_device_name()}')
print(f'dense GEMM ({T*k}x{d}x{dff}) rate: {dense_tf:.0f} TFLOP/s')
for name, fn in [('torch loop over experts', loop_layer), ('torch._grouped_mm', grouped_layer)]:
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    # What "peak extra memory" leaves out: the gradients already allocated
    # (by the run before; the loop runs first, so the grouped layer's figure
    # holds no gradient). MoKA's addition, printed; the measurement is the reference's.
    held = sum(p.grad.numel() * p.grad.element_size() for p in (Wg, W1, W2) if p.grad is not None) / 2**20
    ms = bench(fn)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    print(f'{name:26s} fwd+bwd {ms:8.3f} ms   {flops/ms/1e9:6.0f} TFLOP/s (expert GEMMs)   {flops/ms/1e9/dense_tf*100:5.1f}% of dense   peak extra memory {peak:8.0f} MiB   (gradients held before: {held:.0f} MiB)')
print(f'ideal at dense rate: {flops/dense_tf/1e9:.3f} ms')
