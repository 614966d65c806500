import sys, time, torch
sys.path.insert(0, 'python'); sys.path.insert(0, 'bench')
import gradzip
from timing import measure
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
n = 2**24
x = torch.randn(n); r = torch.randn(n) * 0.01
src = torch.ones(n); dst = torch.empty(n)
def mc():
    t = measure(lambda: dst.copy_(src), repeat=7); return 8 * n / t.min_ms / 1e6
m = mc()
print(f"memcpy {m:.1f} GB/s")
for bits in (8, 4, 2, 1):
    p = gradzip.quantize_pack(x, bits, 128, r)
    t = measure(lambda: gradzip.quantize_pack(x, bits, 128, r), repeat=7)
    gb = (12 * n + p.numel()) / t.min_ms / 1e6
    print(f"quantize ef bits={bits}: {t.min_ms:.2f} ms {gb:.1f} GB/s {100*gb/mc():.0f}% of memcpy")
t = measure(lambda: gradzip.quantize_pack(x, 8, 128), repeat=7)
print(f"quantize noef 8: {t.min_ms:.2f} ms {(4*n + n)/t.min_ms/1e6:.1f} GB/s")
t = measure(lambda: gradzip.quantize_pack(x, 4, 128, r, "stochastic"), repeat=7)
print(f"quantize ef 4 stoch: {t.min_ms:.2f} ms")
k = n // 100
for exact in (True, False):
    t = measure(lambda: gradzip.topk_select(x, k, r, exact), repeat=7)
    gb = (12 * n) / t.min_ms / 1e6
    print(f"topk exact={exact}: {t.min_ms:.2f} ms {gb:.1f} GB/s {100*gb/mc():.0f}%")
t = measure(lambda: torch.topk(x.abs(), k), repeat=2)
print(f"torch.topk |x|: {t.min_ms:.2f} ms")
for bits in (8, 1):
    P = torch.stack([gradzip.quantize_pack(torch.randn(n), bits, 128) for _ in range(8)])
    out = torch.zeros(n)
    t = measure(lambda: gradzip.dequantize_accumulate(P, out, 0.125), repeat=7)
    gb = (P.numel() + 8 * n) / t.min_ms / 1e6
    print(f"accumulate W=8 bits={bits}: {t.min_ms:.2f} ms {gb:.1f} GB/s {100*gb/mc():.0f}%")
P = torch.stack([gradzip.topk_select(torch.randn(n), k) for _ in range(8)])
t = measure(lambda: gradzip.dequantize_accumulate(P, out, 0.125), repeat=7)
print(f"accumulate W=8 topk: {t.min_ms:.2f} ms {(P.numel() + 8*n)/t.min_ms/1e6:.1f} GB/s")
