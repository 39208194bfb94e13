#!/usr/bin/python3
"""Moves MoE layer weights between PyTorch and MoKA checkpoints, and checks
that both compute the same layer (issue 14; docs/checkpoints.md).

  torch-moka.py export <out.h5> [T d d_ff E k]   PyTorch layer -> MoKA layout (+ batch.h5 beside it)
  torch-moka.py check <weights.h5> <batch.h5> <moka_out.h5> <fp32|bf16> [block]
        PyTorch computes the layer of <weights.h5> (a MoKA checkpoint or an
        exported file) on the batch, forward and backward, and compares with
        what moka-layer wrote; exit 1 when they differ beyond round-off.
  torch-moka.py batch <weights.h5> <batch.h5> [T]  a random batch for a checkpoint's layer

The layer is the one of ../shared/bench/torch_moe_reference.py: a softmax
gate over all experts, the top k renormalised, experts d -> d_ff -> d with
erf GeLU and no biases (MoKA: gate.type = softmax, gate.renormalize = true,
expert.bias = false, expert.activation = gelu). Files are written with
h5py in MoKA's layout, checksums included (docs/checkpoints.md), so MoKA
verifies them as its own; `check` verifies MoKA's the same way.
"""
import sys
import numpy as np
import h5py

M1, M2, M3 = np.uint64(0x9e3779b97f4a7c15), np.uint64(0xbf58476d1ce4e5b9), np.uint64(0x94d049bb133111eb)


def mix64(z):
    z = z + M1
    z = (z ^ (z >> np.uint64(30))) * M2
    z = (z ^ (z >> np.uint64(27))) * M3
    return z ^ (z >> np.uint64(31))


def checksum(a):
    """MoKA's dataset checksum: sum over elements of mix64(bits ^ flat index * 0x9e3779b97f4a7c15), mod 2^64."""
    a = np.ascontiguousarray(a).reshape(-1)
    bits = a.view(np.uint32).astype(np.uint64) if a.dtype.itemsize == 4 else a.view(np.uint64)
    idx = np.arange(a.size, dtype=np.uint64)
    with np.errstate(over='ignore'):
        return np.uint64(np.sum(mix64(bits ^ (idx * M1)), dtype=np.uint64))


def put(f, name, a):
    d = f.create_dataset(name, data=a)
    d.attrs['checksum'] = checksum(d[()])


def get(f, name):
    a = f[name][()]
    if 'checksum' in f[name].attrs and checksum(a) != np.uint64(f[name].attrs['checksum']):
        sys.exit(f'torch-moka: {f.filename}: dataset {name} does not match its checksum')
    return a


def layer_deck(d, dff, E, k):
    return (f'moe.d_model = {d}\nmoe.d_ff = {dff}\nmoe.num_experts = {E}\nmoe.top_k = {k}\nmodel.blocks = 1\n'
            'gate.type = softmax\ngate.renormalize = true\ngate.dropless = true\nexpert.bias = false\n'
            'expert.activation = gelu\n')


def export(out, T=4096, d=256, dff=512, E=8, k=2):
    import torch
    torch.manual_seed(0)
    # As torch_moe_reference.py builds them; bf16 experts, fp32 gate.
    Wg = torch.randn(d, E) * d ** -0.5
    W1 = (torch.randn(E, d, dff) * d ** -0.5).to(torch.bfloat16)
    W2 = (torch.randn(E, dff, d) * dff ** -0.5).to(torch.bfloat16)
    with h5py.File(out, 'w') as f:
        f.attrs['format'] = np.bytes_('MoKA checkpoint')
        f.attrs['format_version'] = np.bytes_('1')
        f.attrs['deck'] = np.bytes_(layer_deck(d, dff, E, k))
        f.attrs['written_by'] = np.bytes_('scripts/torch-moka.py (PyTorch %s)' % torch.__version__)
        put(f, 'model/block0/gate_w', Wg.numpy().astype(np.float32))
        put(f, 'model/block0/w1', W1.float().numpy())
        put(f, 'model/block0/w2', W2.float().numpy())
    write_batch(out.replace('.h5', '') + '.batch.h5', T, d)
    print(f'torch-moka: wrote {out} (E={E}, d={d}, d_ff={dff}, k={k}) and its batch')


def to_bf16(a):
    """float32 values rounded to bf16 (nearest, ties to even), kept as float32."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    b = (b + np.uint32(0x7fff) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xffff0000)
    return b.view(np.float32)


def write_batch(path, T, d):
    g = np.random.default_rng(1)
    x = to_bf16(g.standard_normal((T, d), dtype=np.float32))   # bf16-representable inputs
    dy = to_bf16(g.standard_normal((T, d), dtype=np.float32))
    with h5py.File(path, 'w') as f:
        put(f, 'x', x)
        put(f, 'dy', dy)


def deck_value(deck, key, default=None):
    for line in deck.splitlines():
        if '=' in line and line.split('=')[0].strip() == key:
            return line.split('=', 1)[1].split('#')[0].strip().strip('"')
    return default


def numpy_layer(x, dy, Wg, W1, W2, k):
    """The layer in fp64 NumPy, forward and backward (the exact answer)."""
    import math
    erf = np.vectorize(math.erf)
    T, d = x.shape
    E = Wg.shape[1]
    logits = x @ Wg
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind='stable')[:, :k]
    r = np.take_along_axis(p, idx, 1)
    S = r.sum(1, keepdims=True)
    s = r / S
    y = np.zeros_like(x)
    dx = np.zeros_like(x)
    dW1, dW2 = np.zeros_like(W1), np.zeros_like(W2)
    ds = np.zeros_like(s)
    for e in range(E):
        t, j = np.nonzero(idx == e)
        if t.size == 0:
            continue
        a = x[t] @ W1[e]
        cdf = 0.5 * (1 + erf(a / math.sqrt(2)))
        h = a * cdf
        o = h @ W2[e]
        np.add.at(y, t, s[t, j, None] * o)
        ds[t, j] = np.einsum('ij,ij->i', dy[t], o)
        do = s[t, j, None] * dy[t]
        dW2[e] += h.T @ do
        da = (do @ W2[e].T) * (cdf + a * np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi))
        dW1[e] += x[t].T @ da
        np.add.at(dx, t, da @ W1[e].T)
    dr = (ds - (ds * s).sum(1, keepdims=True)) / S
    dp = np.zeros_like(p)
    np.put_along_axis(dp, idx, dr, 1)
    dlogits = p * (dp - (p * dp).sum(1, keepdims=True))
    dx += dlogits @ Wg.T
    return {'y': y, 'dx': dx, 'grad/gate_w': x.T @ dlogits, 'grad/w1': dW1, 'grad/w2': dW2}


def torch_layer(x0, dy, Wg, W1, W2, k, precision):
    """The layer as torch_moe_reference.py computes it, at the given precision."""
    import torch
    import torch.nn.functional as F
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    dt = torch.bfloat16 if precision == 'bf16' else torch.float32
    x = torch.tensor(x0, device=dev).to(dt).requires_grad_()
    wg = torch.tensor(Wg, device=dev, dtype=torch.float32).requires_grad_()
    w1 = torch.tensor(W1, device=dev).to(dt).requires_grad_()
    w2 = torch.tensor(W2, device=dev).to(dt).requires_grad_()
    s, idx = (x.float() @ wg).softmax(-1).topk(k, dim=-1)
    s = s / s.sum(-1, keepdim=True)
    y = torch.zeros(x.shape, device=dev, dtype=torch.float32)
    for e in range(wg.shape[1]):
        t, j = (idx == e).nonzero(as_tuple=True)
        if t.numel():
            y = y.index_add(0, t, (F.gelu(x[t] @ w1[e]) @ w2[e]).float() * s[t, j].unsqueeze(-1))
    y.backward(torch.tensor(dy, device=dev, dtype=torch.float32))
    out = {'y': y, 'dx': x.grad, 'grad/gate_w': wg.grad, 'grad/w1': w1.grad, 'grad/w2': w2.grad}
    return {n: v.detach().double().cpu().numpy() for n, v in out.items()}, torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'


def check(weights, batch, moka_out, precision, block=0):
    with h5py.File(weights, 'r') as f:
        deck = f.attrs['deck']
        deck = deck.decode() if isinstance(deck, bytes) else str(deck)
        p = f'model/block{block}/'
        Wg, W1, W2 = (get(f, p + n).astype(np.float64) for n in ('gate_w', 'w1', 'w2'))
    k = int(deck_value(deck, 'moe.top_k', 2))
    if not (deck_value(deck, 'gate.type') == 'softmax' and deck_value(deck, 'gate.renormalize') == 'true'
            and deck_value(deck, 'expert.bias') == 'false' and deck_value(deck, 'expert.activation', 'gelu') == 'gelu'):
        sys.exit('torch-moka: the layer of torch_moe_reference.py needs gate.type = softmax, gate.renormalize = true, '
                 'expert.bias = false, expert.activation = gelu')
    with h5py.File(batch, 'r') as f:
        x0, dy = get(f, 'x').astype(np.float64), get(f, 'dy').astype(np.float64)
    with h5py.File(moka_out, 'r') as f:
        mk = {n: get(f, n) for n in ('y', 'dx', 'grad/gate_w', 'grad/w1', 'grad/w2')}
    ref = numpy_layer(x0, dy, Wg, W1, W2, k)
    try:
        if precision == 'fp64':
            raise ImportError
        tch, where = torch_layer(x0, dy, Wg, W1, W2, k, precision)
    except ImportError:
        tch, where = None, 'MoKA against the fp64 NumPy layer only (no PyTorch here, or fp64)'
    u = {'bf16': 2.0 ** -8, 'fp32': 2.0 ** -24, 'fp64': 2.0 ** -53}[precision]
    print(f'torch-moka check ({precision}; {where}): max-norm error relative to the fp64 answer\'s max')
    print(f'  {"tensor":12s} {"MoKA":>10s} {"PyTorch":>10s} {"MoKA-PyTorch":>13s}')
    worst = 0.0
    for n in ref:
        scale = np.abs(ref[n]).max() or 1.0
        em = np.abs(mk[n] - ref[n]).max() / scale
        et = np.abs(tch[n] - ref[n]).max() / scale if tch else float('nan')
        ed = np.abs(mk[n] - tch[n]).max() / scale if tch else float('nan')
        print(f'  {n:12s} {em:10.2e} {et:10.2e} {ed:13.2e}')
        # Within round-off: no further from the exact answer than 64 unit
        # round-offs, or than 4 x PyTorch at the same precision.
        bound = max(64 * u, 4 * et if tch else 0.0)
        worst = max(worst, em / bound)
    print(f'  worst MoKA error / bound: {worst:.3f} ({"PASS" if worst <= 1 else "FAIL"})')
    return 0 if worst <= 1 else 1


def batch_for(weights, path, T=1024):
    with h5py.File(weights, 'r') as f:
        d = f['model/block0/gate_w'].shape[0]
    write_batch(path, int(T), d)


if __name__ == '__main__':
    a = sys.argv[1:]
    if len(a) >= 2 and a[0] == 'export':
        export(a[1], *[int(v) for v in a[2:7]])
    elif len(a) >= 5 and a[0] == 'check':
        sys.exit(check(a[1], a[2], a[3], a[4], int(a[5]) if len(a) > 5 else 0))
    elif len(a) >= 3 and a[0] == 'batch':
        batch_for(a[1], a[2], *a[3:4])
    else:
        sys.exit(__doc__)
