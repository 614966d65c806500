import sys, torch
sys.path.insert(0, 'python')
import gradzip
n = 2**20 + 3
x = torch.randn(n); r = torch.randn(n) * 0.1
res = {}
for t in (1, 2, 3):
    torch.set_num_threads(t)
    out = []
    for bits in (8, 4, 2, 1):
        rr = r.clone(); out.append(gradzip.quantize_pack(x, bits, 64, rr, "nearest")); out.append(rr)
    for exact in (True, False):
        rr = r.clone(); out.append(gradzip.topk_select(x, n // 50, rr, exact, "int8")); out.append(rr)
    P = torch.stack([gradzip.topk_select(x.roll(i), 5000) for i in range(4)])
    o = torch.randn(n, generator=torch.Generator().manual_seed(0)); gradzip.dequantize_accumulate(P, o, 0.3); out.append(o)
    P = torch.stack([gradzip.quantize_pack(x.roll(i), 2, 256) for i in range(4)])
    o = torch.randn(n, generator=torch.Generator().manual_seed(0)); gradzip.dequantize_accumulate(P, o, 0.3); out.append(o)
    res[t] = out
print("threads 1 vs 2 vs 3 identical:", all(torch.equal(a.view(torch.uint8) if a.dtype==torch.uint8 else a.view(torch.int32), b.view(torch.uint8) if b.dtype==torch.uint8 else b.view(torch.int32)) for t in (2, 3) for a, b in zip(res[1], res[t])))
