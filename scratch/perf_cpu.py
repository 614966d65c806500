import sys, time, torch
sys.path.insert(0, 'python')
import gradzip
torch.set_num_threads(1)
n = 2**int(sys.argv[1]) if len(sys.argv) > 1 else 2**24
x = torch.randn(n); r = torch.randn(n) * 0.01
src = torch.ones(n); dst = torch.empty(n)
def ct(fn, rep=5):
    fn(); best = 1e9
    for _ in range(rep):
        t = time.thread_time(); fn(); best = min(best, time.thread_time() - t)
    return best * 1e3
m = ct(lambda: dst.copy_(src)); mgb = 8 * n / m / 1e6
print(f"memcpy cpu-time {m:.2f} ms -> {mgb:.1f} GB/s")
def rep(name, ms, nbytes):
    gb = nbytes / ms / 1e6
    print(f"{name:28s} {ms:8.2f} ms {gb:6.1f} GB/s {100*gb/mgb:5.0f}% memcpy")
for bits in (8, 4, 2, 1):
    p = gradzip.quantize_pack(x, bits, 128, r)
    rep(f"quantize ef bits={bits}", ct(lambda: gradzip.quantize_pack(x, bits, 128, r)), 12 * n + p.numel())
rep("quantize noef 8", ct(lambda: gradzip.quantize_pack(x, 8, 128)), 5 * n)
rep("quantize ef 4 stoch", ct(lambda: gradzip.quantize_pack(x, 4, 128, r, "stochastic")), 12 * n + n // 2)
k = n // 100
for exact in (True, False):
    rep(f"topk exact={exact}", ct(lambda: gradzip.topk_select(x, k, r, exact)), 12 * n)
rep("torch.topk |x|", ct(lambda: torch.topk(x.abs(), k), 1), 4 * n)
for bits in (8, 4, 2, 1):
    P = torch.stack([gradzip.quantize_pack(torch.randn(n), bits, 128) for _ in range(8)])
    out = torch.zeros(n)
    rep(f"accumulate W=8 bits={bits}", ct(lambda: gradzip.dequantize_accumulate(P, out, 0.125)), P.numel() + 8 * n)
P = torch.stack([gradzip.topk_select(torch.randn(n), k) for _ in range(8)])
rep("accumulate W=8 topk", ct(lambda: gradzip.dequantize_accumulate(P, out, 0.125)), P.numel() + 8 * n)
